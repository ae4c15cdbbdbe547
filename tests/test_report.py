import re

import numpy as np

from finegrain.engine.train import fit
from finegrain.report.confidence import unsure_threshold
from finegrain.report.evaluation import evaluate_checkpoint
from finegrain.report.html import confused_pairs


def test_confused_pairs_are_the_largest_off_diagonal_counts():
    confmat = np.array([[5, 3, 0], [1, 6, 0], [4, 0, 2]])
    assert confused_pairs(confmat, 2) == [(2, 0, 4), (0, 1, 3)]
    assert confused_pairs(np.eye(3, dtype=int) * 5) == []


def test_report_is_one_self_contained_file(tmp_path, imagefolder, tiny_config):
    run = fit(tiny_config(imagefolder, epochs=1, test_fraction=0.5)).run_dir
    result = evaluate_checkpoint(run, workers=0, report=True)
    page = (run / "report_test.html").read_text()
    assert result["report"] == str(run / "report_test.html")
    assert f"{100 * result['top1']:.2f}%" in page and f"{100 * result['mean_class_acc']:.2f}%" in page
    assert len(re.findall(r"<tr><td>\d+</td>", page)) == 4  # one row per class
    assert not re.search(r'(src|href)="(http|//)', page)  # no external assets
    assert page.count('src="data:image/png;base64,') >= 1  # the confusion matrix
    mistakes = result["n"] - round(result["top1"] * result["n"])
    assert page.count("predicted ") >= min(mistakes, 8)
    rows = (run / "predictions_test.csv").read_text().splitlines()
    assert len(rows) == result["n"] + 1


def test_unsure_threshold_is_where_validation_accuracy_crosses_one_half():
    """Right 10% of the time below 0.4, 90% above: the threshold lands at the crossing, and the two sides' measured
    accuracies are what the card prints. A model right everywhere flags nothing; one wrong everywhere, everything."""
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 4000)
    correct = rng.uniform(0, 1, 4000) < np.where(confidence < 0.4, 0.1, 0.9)
    u = unsure_threshold(confidence, correct)
    assert 0.36 < u["below"] < 0.44, u
    assert u["accuracy_flagged"] < 0.2 and u["accuracy_kept"] > 0.8 and 0.35 < u["flagged_share"] < 0.45
    assert unsure_threshold(confidence, np.ones(4000, bool))["below"] == 0.0
    everything = unsure_threshold(confidence, np.zeros(4000, bool))
    assert everything["below"] == 1.0 and everything["flagged_share"] == 1.0
