"""The recipe's choice between its two stages, re-read: the head and the fine-tuned network of ``--budget`` runs,
each on validation and test, with McNemar's z of the head against the fine-tuned network on validation.

``--budget`` keeps one of two networks of one architecture: the head on the frozen backbone (``RUN_DIR/head``) and
the fine-tuned one that started from it (``RUN_DIR/finetune``), the better on validation. With 60-300 validation
images a lead of one or two is within noise; this shows, run by run, how far the head's validation lead (or lag) is
from noise (z over the images the two answer differently, as ``--keep-epoch auto`` weighs epochs) and what each
tests. Each stage's ``best.pt`` read as the recipe reads it (``engine.evaluate.run_answers``).

    python benchmarks/stage_choice.py RUN_DIR ... --out benchmarks/results/stage_choice.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finegrain.engine.epochs import paired_z
from finegrain.engine.evaluate import right, run_answers

sys.path.insert(0, str(Path(__file__).parent))
from _runs import over_runs  # noqa: E402


def measure(run: Path, _flag: str, splits: list[str]) -> dict:
    """Each stage's answers as the recipe reads them (``run_answers``: its ``best.pt``, its config's precision)."""
    recipe = json.loads((run / "recipe.json").read_text())
    result, answers = {"kept": recipe["kept"], "why": recipe["why"]}, {}
    for stage in ("head", "finetune"):
        for split in splits:
            answers[stage, split] = right(run_answers(run / stage, split, workers=2))
            result[f"{split} {stage} right"] = sum(answers[stage, split])
            result[f"{split} images"] = len(answers[stage, split])
    for split in splits:
        result[f"{split} head vs finetune"] = paired_z(answers["head", split], answers["finetune", split])
    return result


def main() -> None:
    over_runs(__doc__, "benchmarks/results/stage_choice.json", measure, "a --budget run's RUN_DIR")


if __name__ == "__main__":
    main()
