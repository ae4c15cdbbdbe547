"""When to call an answer unsure: the top-1 probability below which the model is right less than half the time,
read from the validation split (never the test split the card reports).

Why a threshold and not the raw probability: a softmax over the known classes always sums to one, so a daisy shown
to a bird model still gets a "most likely bird" (Green Violetear, 12.7%, in the library issue) and nothing on the page
said that 12.7% is a guess. The probability where accuracy crosses one half comes from a logistic fit of "top-1
was right" on the logit of the top-1 probability (Platt's reliability model, two parameters): few validation
answers are unsure, and a fit through all of them is steadier than binning those few. On the cub100 default model
(AMD EPYC Zen 3, 2026-12-02) the 293 validation images give 15.2%, and the issue's daisy (12.8%) is flagged; an
isotonic fit, which follows the 10 lowest answers alone, put the crossing at 12.4%.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

#: below this accuracy an answer is flagged: "right less than half the time"
UNSURE_BELOW_ACCURACY = 0.5


def unsure_threshold(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """``{"below": p, ...}``: answers whose top-1 probability is under ``p`` are right less than half the time by
    the fit on these (validation) images, with the share of images flagged and the measured accuracy on each side.
    ``p`` is 0 (nothing flagged) where every answer was right, 1 where none was."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if confidence.size == 0:
        raise ValueError("no validation predictions to choose the unsure threshold from")
    below = float(np.mean(correct) < UNSURE_BELOW_ACCURACY)  # one kind of answer only: all flagged, or none
    if 0 < correct.sum() < correct.size:
        p = np.clip(confidence, 1e-6, 1 - 1e-6)
        fit = LogisticRegression(C=1e6).fit(np.log(p / (1 - p))[:, None], correct.astype(int))
        slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        if slope > 0:  # accuracy rises with the probability, as it should: where it crosses one half
            below = float(1 / (1 + np.exp(intercept / slope)))
    flagged = confidence < below
    return {
        "below": round(below, 4),
        "images": int(confidence.size),
        "flagged_share": round(float(flagged.mean()), 4),
        "accuracy_flagged": round(float(correct[flagged].mean()), 4) if flagged.any() else None,
        "accuracy_kept": round(float(correct[~flagged].mean()), 4) if (~flagged).any() else None,
    }
