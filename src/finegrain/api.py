"""The Python API, for scripts and notebooks: ``finegrain.load(path).predict(image)`` and
``finegrain.train(data=..., **options)``, the same work as ``finegrain predict`` and ``finegrain train`` +
``finegrain evaluate`` without a shell (docs/api.md; its examples run in the test suite).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finegrain.config import TrainConfig
from finegrain.data.loading import as_image
from finegrain.engine.recipe import train as train_recipe
from finegrain.explain import Explanation, explain
from finegrain.predict import Predictor, model_for_engine
from finegrain.report.evaluation import evaluate_checkpoint
from finegrain.run_layout import RunDir


class Model(Predictor):
    """A trained model ready to use: ``.predict(x)``, ``.explain(x)``, ``.classes``, ``.info``."""

    def explain(self, x, k: int = 5) -> Explanation | list[Explanation]:
        """Where the model looked (a heat-map in [0, 1] at the image's size) and its top-``k``, for one image (a
        path, PIL image or uint8 array) or a list of them."""
        one = not isinstance(x, list | tuple)
        found = explain(self, [as_image(i) for i in ([x] if one else x)], k=k)
        return found[0] if one else found


def load(path: str | Path, engine: str = "auto", device: str = "auto") -> Model:
    """A checkpoint, a run directory or an ONNX file. ``engine``: ``"auto"`` runs a checkpoint in ONNX Runtime
    where it measured faster on this machine (exported next to it once), as ``finegrain predict`` does;
    ``"torch"`` or ``"onnx"`` to choose."""
    file, _ = model_for_engine(path, engine, device)
    return Model.load(file, device=device)


@dataclass
class Run:
    """A finished training run: its folder, one metrics row per epoch, and the test split's numbers (top-1, top-5,
    mean per-class accuracy; None where the data has no test split)."""

    run_dir: Path
    history: list[dict]
    test: dict | None

    def load(self, engine: str = "auto") -> Model:
        return load(self.run_dir, engine=engine)


def train(data: str | Path, run_dir: str | Path | None = None, evaluate: bool = True, **options) -> Run:
    """Train as ``finegrain train --data DATA`` does with the same options (their names as in ``finegrain train
    --help``, with underscores: ``budget=10``, ``epochs=5``, ``backbone="tf_efficientnet_lite2"``), then evaluate
    the kept model on the test split."""
    cfg = TrainConfig().replace(data=str(data), run_dir=None if run_dir is None else str(run_dir), **options)
    result = train_recipe(cfg.validate(), given=options)
    test = None
    if evaluate and result.counts["test"]:
        metrics = evaluate_checkpoint(result.run_dir / RunDir.BEST, workers=cfg.speed.workers)
        test = {k: metrics[k] for k in ("n", "top1", "top5", "mean_class_acc")}
    return Run(result.run_dir, result.history, test)
