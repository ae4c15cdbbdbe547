"""Which of the budgeted recipe's two stages becomes ``RUN_DIR/best.pt``: the fine-tuned network, unless the head
answers the validation images better beyond their noise.

Why not simply the higher validation top-1: both stages run at one cost (one architecture), and with 60-300
validation images a lead of one or two is noise, while what the two test at is not. Re-read on the 16 ``--budget``
runs on disk, four domains (``benchmarks/stage_choice.py``, AMD EPYC Zen 5, 2026-12-04,
``benchmarks/results/stage_choice.json``): the fine-tuned network tested above its own head on all 16, by 2 to 391
test images, while on 12 of them the two validated within noise (McNemar's z between -1.73 and 1.0). The one run
where the head validated higher, flowers17 ``--budget 15 --backbone tf_efficientnet_lite2`` (seed 1: head 99,
fine-tuned 98 of 102, z 0.58), kept the head, which tested 261 of 272 against the fine-tuned network's 269. The rule
is ``--keep-epoch auto``'s (engine/epochs.py): a paired comparison over the images the two answer differently, the
same ``MIN_Z``. A head better beyond noise (fine-tuning too short, or harmful) is still kept; the answers are read
(one pass over the validation split per stage) only where the head leads. Tried and not adopted (AMD EPYC Zen 4,
2026-12-07, ``benchmarks/short_finetune.py``, docs/stage-choice.md): the plainly higher validation score for
fine-tunings of 1-3 epochs, which those 16 runs did not cover: over the four domains' ``--budget 5`` heads, two seeds,
it raised test top-1 by 0.5-1.3 pt on average, all of it tomato's (+4.8), and cost gtsrb and flowers17 0.6-0.7."""

from __future__ import annotations

from collections.abc import Callable

from finegrain.engine.epochs import MIN_Z, paired_z


def kept_stage(stages: dict[str, dict], answers: Callable[[str], list[bool]]) -> tuple[str, str]:
    """``(stage, why)`` from the stages' ``val_top1`` (``head``, and ``finetune`` where it ran); ``answers(stage)``
    (which validation images the stage answers right, in split order) is asked only where the head leads."""
    scored = {name: s["val_top1"] for name, s in stages.items() if s.get("val_top1") is not None}
    scores = ", ".join(f"{name} {v:.4f}" for name, v in scored.items())
    if "finetune" not in scored:
        return "head", f"the only stage validated ({scores})"
    if scored["finetune"] >= scored["head"]:
        return "finetune", f"validation top-1 {scores}: the fine-tuned network answers at least as many"
    z = paired_z(answers("head"), answers("finetune"))
    counts = (f"right on {z['a_only']} validation image(s) the fine-tuned network missed, it on {z['b_only']} the "
              f"head missed")  # fmt: skip
    if z["z"] > MIN_Z:
        return "head", f"validation top-1 {scores}: the head better beyond noise ({counts}; z {z['z']} > {MIN_Z})"
    return "finetune", f"validation top-1 {scores}: the head's lead is noise ({counts}; z {z['z']} <= {MIN_Z})"
