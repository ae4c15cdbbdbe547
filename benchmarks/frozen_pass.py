"""What folding BatchNorm into the convolutions buys a frozen forward pass (the feature cache, partial fine-tuning's
map cache): images/s of the backbone's features as trained against its folded copy (``models/folded.py``), at
finegrain's precision and layout on this CPU, measured in one run, alternating, as a ratio.

Images are random tensors at the input size (decoding costs both the same). With ``--amp bf16`` on a CPU without
native bf16 the pass is emulated; the recipe folds only fp32 passes (``engine.features.frozen_pass``).

    python benchmarks/frozen_pass.py --out benchmarks/results/frozen_pass_<cpu>.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from finegrain.engine.evaluate import autocast
from finegrain.env import configure_threads, cpu_family_model, cpu_model, resolve_amp
from finegrain.models import create_model
from finegrain.models.folded import folded
from finegrain.predict import images_per_second

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402


def rate(model: torch.nn.Module, x: torch.Tensor, amp: str, repeats: int) -> float:
    """Images/s of ``model``'s features on ``x`` at ``amp`` (the fastest of ``repeats`` passes after a warm-up)."""

    @torch.inference_mode()
    def features(t: torch.Tensor) -> torch.Tensor:
        with autocast(t.device, amp):
            return model.backbone_features(t)

    return images_per_second(features, x, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--amp", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    configure_threads()
    cpu = torch.device("cpu")
    amp = resolve_amp(args.amp, cpu)
    model = create_model("baseline", num_classes=100, backbone=args.backbone).eval()
    model = model.to(memory_format=torch.channels_last)  # finegrain's default layout (--channels-last)
    rows = []
    print(f"{args.backbone}, batch {args.batch}, {amp}, channels-last, {cpu_model()} {cpu_family_model() or ''}")
    print(f"{'input':>6} {'as trained img/s':>17} {'folded img/s':>13} {'ratio':>6} {'max diff':>9}")
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        fold = folded(model, lambda m, t: m.backbone_features(t), x[:2]).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            diff = float((fold.backbone_features(x) - model.backbone_features(x)).abs().max())
        rates: dict[str, list[float]] = {"as_trained": [], "folded": []}
        for _ in range(args.rounds):  # alternating, so a change in the machine's load touches both alike
            rates["as_trained"].append(rate(model, x, amp, args.repeats))
            rates["folded"].append(rate(fold, x, amp, args.repeats))
        plain, quick = statistics.median(rates["as_trained"]), statistics.median(rates["folded"])
        rows.append({"input_size": size, "as_trained_img_s": round(plain, 1), "folded_img_s": round(quick, 1),
                     "ratio": round(quick / plain, 2), "max_abs_diff": diff, "rates": rates})  # fmt: skip
        print(f"{size:>6} {plain:>17.1f} {quick:>13.1f} {quick / plain:>6.2f} {diff:>9.1e}")
    if args.out:
        write_json(args.out, {"backbone": args.backbone, "batch": args.batch, "precision": amp, "rows": rows})


if __name__ == "__main__":
    main()
