"""The run directory's layout: every file a training run, an evaluation or an add-on writes there, named once.

Why an object: the names were literals in 15 files ("best.pt" 14 times in 7), and the budgeted recipe kept its own
list of the files a stage writes, add-ons' outputs included, so a new add-on output silently stayed behind in a
discarded stage's folder. Now code asks :class:`RunDir` for a path, and add-ons declare their files
(``AddOn.files``), which the recipe and the add-on contract test read.
"""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """The files of one run directory. ``RunDir(path).best`` is ``path / "best.pt"``; the class attributes are the
    bare names, for code that only matches names (a checkpoint path given as a folder, a stage's files)."""

    BEST = "best.pt"  # the checkpoint with the best validation top-1
    LAST = "last.pt"  # the latest epoch's checkpoint: optimizer, scheduler and RNG state for an exact resume
    SPLIT = "split.csv"  # every image's split, so evaluation and later runs read the same test images
    CONFIG = "config.yaml"  # the run's options, grouped
    ENVIRONMENT = "environment.json"  # the machine, libraries and precision the run used
    METRICS = "metrics.jsonl"  # one line per epoch
    CURVES = "curves.png"  # loss and top-1 per epoch (the plots extra)
    PROBE = "probe.json"  # the closed-form head's choice of regularisation, on validation
    RECIPE = "recipe.json"  # what the budget planned, re-planned and kept
    CARD = "MODEL_CARD.md"  # the model card (Hugging Face header)
    SHORT_CARD = "model_card.json"  # its short form, also inside every ONNX export
    TRACKING = "tracking.json"  # which MLflow run the directory logs to
    # written by add-ons, each of which declares the ones it writes in ``AddOn.files``
    MIRROR = "mirror.json"  # --mirror-check: the mirror-image class pairs found, and the mirroring used
    UNLABELED = "unlabeled.json"  # --unlabeled: the pseudo-labels kept, and whether they helped on validation
    LABEL_ISSUES = "label_issues.csv"  # --label-noise (and `data audit`): images whose label is probably wrong
    LABEL_NOISE = "label_noise.json"  # --label-noise: the summary

    #: what every training stage writes; add-ons add their own (``AddOn.files``)
    STAGE_FILES = (BEST, LAST, SPLIT, CONFIG, ENVIRONMENT, METRICS, CURVES, PROBE)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def split(self) -> Path:
        return self.path / self.SPLIT

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def environment(self) -> Path:
        return self.path / self.ENVIRONMENT

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES

    @property
    def probe(self) -> Path:
        return self.path / self.PROBE

    @property
    def recipe(self) -> Path:
        return self.path / self.RECIPE

    @property
    def card(self) -> Path:
        return self.path / self.CARD

    @property
    def short_card(self) -> Path:
        return self.path / self.SHORT_CARD

    @property
    def tracking(self) -> Path:
        return self.path / self.TRACKING

    def evaluation(self, split: str) -> Path:
        """``eval_<split>.json``: every number of ``finegrain evaluate`` on one split."""
        return self.path / f"eval_{split}.json"

    def confusion(self, split: str, picture: bool = False) -> Path:
        """``confusion_<split>.csv`` (or the ``.png`` picture of it)."""
        return self.path / f"confusion_{split}.{'png' if picture else 'csv'}"

    def predictions(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def report(self, split: str) -> Path:
        return self.path / f"report_{split}.html"
