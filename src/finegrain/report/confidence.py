"""When to call an answer unsure: the top-1 probability below which the model is right less than half the time,
read from the validation split (never the test split the card reports).

Why a threshold and not the raw probability: a softmax over the known classes always sums to one, so a daisy shown
to a bird model still gets a "most likely bird" (Green Violetear, 12.7%, in the library issue) and nothing on the page
said that 12.7% is a guess. The probability where accuracy crosses one half is found by isotonic regression of
"top-1 was right" on "top-1 probability" (monotone, no bins to choose), the standard reliability-curve reading.
"""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression

#: below this accuracy an answer is flagged: "right less than half the time"
UNSURE_BELOW_ACCURACY = 0.5


def unsure_threshold(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """``{"below": p, ...}``: answers whose top-1 probability is under ``p`` were right less than half the time on
    these (validation) images, with the share of images flagged and the accuracy on each side. ``p`` is 0 (nothing
    flagged) when every probability range was right at least half the time."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if confidence.size == 0:
        raise ValueError("no validation predictions to choose the unsure threshold from")
    fitted = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(confidence, correct).predict(confidence)
    sure = confidence[fitted >= UNSURE_BELOW_ACCURACY]
    below = float(sure.min()) if sure.size else 1.0
    if below <= confidence.min():
        below = 0.0
    flagged = confidence < below
    return {
        "below": round(below, 4),
        "images": int(confidence.size),
        "flagged_share": round(float(flagged.mean()), 4),
        "accuracy_flagged": round(float(correct[flagged].mean()), 4) if flagged.any() else None,
        "accuracy_kept": round(float(correct[~flagged].mean()), 4) if (~flagged).any() else None,
    }
