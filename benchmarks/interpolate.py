"""The head stage's and the fine-tuned stage's weights interpolated: top-1 of a ``--budget`` run on validation and test.

A ``--budget`` run keeps two networks of one architecture: the head on the frozen ImageNet backbone
(``RUN_DIR/head``) and the fine-tuned one that started from it (``RUN_DIR/finetune``). Averaging their weights,
``alpha * fine-tuned + (1 - alpha) * head``, can keep more of the pre-trained features' generality than the fine-tuned
end does (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models": WiSE-FT); alpha 1 is the fine-tuned
network, 0 the head. BatchNorm statistics are frozen during the recipe's fine-tuning, so both share them.

    python benchmarks/interpolate.py RUN_DIR ... --out benchmarks/results/interpolate.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from finegrain.checkpoint import Checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _runs import over_runs, split_top1  # noqa: E402

ALPHAS = (0.0, 0.5, 0.7, 0.85, 1.0)


def measure(run: Path, _flag: str, splits: list[str]) -> dict:
    head, tuned = (Checkpoint.load(run / stage / "best.pt") for stage in ("head", "finetune"))
    start, end = head.build_model().state_dict(), tuned.build_model().state_dict()
    data, result = tuned.dataset(), {}
    for alpha in ALPHAS:
        model = tuned.build_model().eval()
        model.load_state_dict({k: alpha * v + (1 - alpha) * start[k] if v.is_floating_point() else v
                               for k, v in end.items()})  # fmt: skip
        model = model.to(memory_format=torch.channels_last)
        for split, score in split_top1(model, data, splits).items():
            result[f"{split} alpha={alpha:g}"] = score
    return result


def main() -> None:
    over_runs(__doc__, "benchmarks/results/interpolate.json", measure,
              "RUN_DIR of a --budget run that fine-tuned (RUN_DIR/head, RUN_DIR/finetune)", alphas=ALPHAS)  # fmt: skip


if __name__ == "__main__":
    main()
