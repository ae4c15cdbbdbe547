"""A whole-network fine-tuning of 1, 2 or 3 epochs against the head it starts from: top-1 on validation and test.

Where the recipe's seconds left buy no epoch on cached maps but one or two whole-network epochs, it runs those
(``engine/recipe.py``'s ``plan_finetuning``) and keeps them unless the head validates better beyond noise. This asks
whether so short a fine-tuning is worth running at all: from each ``--budget`` run's head (``RUN_DIR/head``), the
recipe's whole-network stage (its config, lr, warm-up of a quarter of the epochs, crops of 0.8x the test input) for
1, 2 and 3 epochs, each from the head again, without a time limit; and which of head and fine-tuned network the
recipe's rule (``engine/keep_stage.py``) would keep. A stage already trained in ``RUN_DIR/short_finetune`` is
re-read, not trained again (minutes: its epochs' training seconds). ``RUN_DIR:lr=5e-5,epochs=2`` fine-tunes at that
lr instead of the recipe's, for those epochs only (into ``RUN_DIR/short_finetune/lr=5e-5_epochsN``; give them their own
``--out``).

    python benchmarks/short_finetune.py RUN_DIR ... --out benchmarks/results/short_finetune.json
    python benchmarks/short_finetune.py RUN_DIR:lr=5e-5,epochs=2 ... --out benchmarks/results/short_finetune_lr5e-5.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.engine.keep_stage import kept_stage
from finegrain.engine.recipe import finetune_config, train_size, validation_right
from finegrain.engine.tracking import read_metrics
from finegrain.engine.train import fit
from finegrain.run_layout import RunDir

sys.path.insert(0, str(Path(__file__).parent))
from _runs import over_runs, split_top1  # noqa: E402

EPOCHS = (1, 2, 3)


def scores(checkpoint: Checkpoint, splits: list[str]) -> dict:
    model = checkpoint.build_model().eval().to(memory_format=torch.channels_last)
    return split_top1(model, checkpoint.dataset(), splits)


def measure(run: Path, flag: str, splits: list[str]) -> dict:
    head = Checkpoint.load(run / "head" / "best.pt")
    result = {"head": scores(head, splits)}
    stage = TrainConfig.from_yaml(run / "finetune" / "config.yaml")  # the recipe's fine-tuning, as it ran
    test_size = head.preprocess.input_size
    whole = stage.replace(train_stages=0, cutmix=None,
                          train_input_size=stage.model.train_input_size or train_size(test_size))  # fmt: skip
    workers = whole.speed.workers
    asked = dict(part.split("=") for part in flag.split(",")) if flag else {}
    lr = asked.get("lr")
    for epochs in [int(asked["epochs"])] if "epochs" in asked else EPOCHS:
        name = f"{f'lr={lr}_' if lr else ''}epochs{epochs}"
        cfg = finetune_config(whole, head, epochs, run / "short_finetune" / name)
        cfg = cfg.replace(lr=float(lr)) if lr else cfg
        stage_dir = Path(cfg.run.run_dir)
        if len(read_metrics(stage_dir)) < epochs or not (stage_dir / RunDir.BEST).is_file():
            fit(cfg)
        rows = read_metrics(stage_dir)
        kept = Checkpoint.load(stage_dir / RunDir.BEST)
        stages = {"head": {"val_top1": head.metrics["val_top1"], "run_dir": str(run / "head")},
                  "finetune": {"val_top1": kept.metrics["val_top1"], "run_dir": cfg.run.run_dir}}  # fmt: skip
        keep, why = kept_stage(stages, lambda stage, dirs=stages: validation_right(dirs[stage]["run_dir"], workers))
        minutes = sum(r["epoch_seconds"] for r in rows) / 60
        result[f"{epochs} epochs"] = {**scores(kept, splits), "minutes": round(minutes, 2), "kept": keep, "why": why}
        print(run.name, epochs, result[f"{epochs} epochs"], flush=True)
    return result


def main() -> None:
    over_runs(__doc__, "benchmarks/results/short_finetune.json", measure,
              "RUN_DIR of a --budget run (RUN_DIR/head, RUN_DIR/finetune/config.yaml)", epochs=EPOCHS)  # fmt: skip


if __name__ == "__main__":
    main()
