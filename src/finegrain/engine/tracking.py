"""What a run tells the tools people already use: learning curves as a picture, TensorBoard, MLflow.

``metrics.jsonl`` stays the built-in record; everything here is derived from the same rows:
- :func:`write_curves` draws ``curves.png`` (train/validation loss and top-1 per epoch, stage boundaries) after
  every epoch, so a run always has its picture, even one that was stopped.
- :class:`RunTracker` mirrors parameters, per-epoch metrics and, from ``finegrain evaluate``, the final metrics,
  the confusion-matrix picture and the checkpoint into TensorBoard event files (``RUN_DIR/tensorboard``) and/or an
  MLflow run (a local ``RUN_DIR/../mlruns`` file store unless ``--tracking-uri`` names another). Both libraries are
  optional extras (``pip install finegrain[tracking]``); only rank 0 logs under torchrun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finegrain.atomic import atomic_path, write_text
from finegrain.config import TRACKERS
from finegrain.errors import ConfigError
from finegrain.extras import has
from finegrain.run_layout import RunDir


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / RunDir.METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_curves(run_dir: Path) -> Path | None:
    """``RUN_DIR/curves.png`` from ``metrics.jsonl``: loss and top-1 per epoch, train and validation."""
    rows = read_metrics(run_dir)
    if not rows or not has("plots"):  # without the plots extra a run has no picture, the numbers stay in the jsonl
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    acc_ax.plot(epochs, [100 * r["train_acc"] for r in rows], "o-", label="train")
    if any("val_loss" in r for r in rows):
        val = [r for r in rows if "val_loss" in r]
        loss_ax.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "s-", label="validation")
        acc_ax.plot([r["epoch"] for r in val], [100 * r["val_top1"] for r in val], "s-", label="validation")
    for prev, row in zip(rows, rows[1:], strict=False):
        if row.get("stage") != prev.get("stage"):
            for ax in (loss_ax, acc_ax):
                ax.axvline(prev["epoch"] + 0.5, color="grey", linestyle="--", linewidth=1)
                ax.text(prev["epoch"] + 0.55, ax.get_ylim()[1], f"stage {row['stage']}", va="top", fontsize=8)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 (%)", title="top-1 accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    out = Path(run_dir) / RunDir.CURVES
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    return out


class RunTracker:
    """TensorBoard and/or MLflow for one run directory; a no-op without trackers."""

    def __init__(self, run_dir: Path, trackers: list[str], tracking_uri: str | None = None) -> None:
        unknown = sorted(set(trackers) - set(TRACKERS))
        if unknown:
            raise ConfigError(f"unknown --log target(s) {unknown}: choose from {', '.join(TRACKERS)}")
        self.run_dir, self.writer, self.mlflow, self.client, self.run_id = Path(run_dir), None, None, None, None
        if "tensorboard" in trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--log tensorboard needs TensorBoard: pip install 'finegrain[tracking]'") from e
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "mlflow" in trackers:
            try:
                import mlflow
            except ImportError as e:
                raise ConfigError("--log mlflow needs MLflow: pip install 'finegrain[tracking]'") from e
            self.mlflow = mlflow
            self._start_mlflow(tracking_uri)

    def _start_mlflow(self, tracking_uri: str | None) -> None:
        record = self.run_dir / RunDir.TRACKING  # which MLflow run it logs to: `evaluate` adds to it
        saved = json.loads(record.read_text()) if record.is_file() else {}
        uri = tracking_uri or saved.get("tracking_uri") or (self.run_dir.resolve().parent / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the plain-folder store working but asks for this opt-in; it needs no database
            # package (mlflow-skinny has none), which is why finegrain defaults to it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self.mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = saved.get("mlflow_run_id")
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name("finegrain")
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment("finegrain")
            run = self.client.create_run(exp_id, run_name=self.run_dir.name)
            self.run_id = run.info.run_id
            write_text(record, json.dumps({"tracking_uri": uri, "mlflow_run_id": self.run_id}, indent=2))

    def params(self, config: dict) -> None:
        flat = _flatten(config)
        if self.writer is not None:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()))
        if self.client is not None:
            existing = self.client.get_run(self.run_id).data.params
            for key, value in flat.items():
                if key not in existing:  # a resumed run keeps its parameters
                    self.client.log_param(self.run_id, key, str(value)[:6000])

    def epoch(self, row: dict) -> None:
        step = row["epoch"]
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "epoch"}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.client is not None:
            for key, value in scalars.items():
                self.client.log_metric(self.run_id, key, float(value), step=step)

    def final(self, metrics: dict, split: str, files: list[Path]) -> None:
        """Evaluation results (``top1``, ...) as ``<split>_<name>``, and files (pictures, the checkpoint)."""
        scalars = {
            f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self.writer is not None:
            step = max((r["epoch"] for r in read_metrics(self.run_dir)), default=0)
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            for path in files:
                if path.suffix == ".png":
                    import numpy as np
                    from PIL import Image

                    self.writer.add_image(
                        path.stem, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC"
                    )
            self.writer.flush()
        if self.client is not None:
            for key, value in scalars.items():
                self.client.log_metric(self.run_id, key, float(value))
            for path in files:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
        if self.client is not None:
            self.client.set_terminated(self.run_id, status)
