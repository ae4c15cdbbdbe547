"""The recipe's choice between its two stages, re-read: the head and the fine-tuned network of ``--budget`` runs,
each on validation and test, with McNemar's z of the head against the fine-tuned network on validation.

``--budget`` keeps one of two networks of one architecture: the head on the frozen backbone (``RUN_DIR/head``) and
the fine-tuned one that started from it (``RUN_DIR/finetune``), the better on validation. With 60-300 validation
images a lead of one or two is within noise; this shows, run by run, how far the head's validation lead (or lag) is
from noise (z over the images the two answer differently, as ``--keep-epoch auto`` weighs epochs) and what each
tests. Each stage's ``best.pt`` at its own input, bf16 where native.

    python benchmarks/stage_choice.py RUN_DIR ... --out benchmarks/results/stage_choice.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data.transforms import eval_transform
from finegrain.engine.epochs import paired_z

sys.path.insert(0, str(Path(__file__).parent))
from _runs import over_runs, probabilities  # noqa: E402


def measure(run: Path, _flag: str, splits: list[str]) -> dict:
    recipe = json.loads((run / "recipe.json").read_text())
    result = {"kept": recipe["kept"], "why": recipe["why"]}
    right = {}
    for stage in ("head", "finetune"):
        ckpt = Checkpoint.load(run / stage / "best.pt")
        model, data = ckpt.build_model().eval().to(memory_format=torch.channels_last), ckpt.dataset()
        for split in splits:
            samples = data.split(split)
            y = torch.tensor([s.label for s in samples])
            right[stage, split] = (
                probabilities(model, samples, eval_transform(model.preprocess)).argmax(1) == y
            ).tolist()
            result[f"{split} {stage} right"] = sum(right[stage, split])
            result[f"{split} images"] = len(y)
    for split in splits:
        result[f"{split} head vs finetune"] = paired_z(right["head", split], right["finetune", split])
    return result


def main() -> None:
    over_runs(__doc__, "benchmarks/results/stage_choice.json", measure, "a --budget run's RUN_DIR")


if __name__ == "__main__":
    main()
