"""Frozen-feature levers for the default head, on the four domains: stronger packaged backbones, larger inputs, and
features of two backbones concatenated. Each variant: the default probe (logistic regression on L2-normalised
features of the training images and their mirror images, C chosen on the validation split), its validation top-1
(what a choice may read), its test top-1 (reported only), and the seconds its features took from a cold cache.

    python benchmarks/levers.py --out benchmarks/results/levers.json
    python benchmarks/levers.py --variants lite0_224 lite2_260 --datasets cub100
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from finegrain.data import load_dataset
from finegrain.engine.features import extract_features
from finegrain.engine.probe import accuracy, fit_probe, l2_normalise
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402

#: variant -> [(backbone, input size)]; several entries: their L2-normalised features concatenated
VARIANTS = {
    "lite0_224": [("tf_efficientnet_lite0", 224)],  # today's default
    "lite0_320": [("tf_efficientnet_lite0", 320)],
    "lite1_240": [("tf_efficientnet_lite1", 240)],
    "lite2_260": [("tf_efficientnet_lite2", 260)],
    "lite2_320": [("tf_efficientnet_lite2", 320)],
    "lite0_224+lite2_260": [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite2", 260)],
}


def features(name: str, index, backbone: str, size: int, cache_dir: str) -> tuple[dict, float]:
    model = create_model("baseline", num_classes=len(index.classes), backbone=backbone).eval()
    pre = replace(model.preprocess, input_size=size)
    start = time.perf_counter()
    out = {}
    for split, flips in (("train", (False, True)), ("val", (False,)), ("test", (False,))):
        out[split] = torch.cat([extract_features(model, index.split(split), pre, torch.device("cpu"), flip=f,
                                                 amp="auto", channels_last=True, cache_dir=cache_dir,
                                                 desc=f"{name} {backbone} {size} {split}") for f in flips])  # fmt: skip
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "finegrain" / "levers"))
    p.add_argument("--out", default="benchmarks/results/levers.json")
    args = p.parse_args()
    results: dict = {}
    for name in args.datasets:
        index = load_dataset(DATASETS[name], val_fraction=0.1, seed=args.seed)
        labels = {sp: torch.tensor([s.label for s in index.split(sp)]) for sp in ("train", "val", "test")}
        labels["train"] = labels["train"].repeat(2)  # and the mirror images
        cached: dict = {}
        for variant in args.variants:
            parts, seconds = [], 0.0
            for backbone, size in VARIANTS[variant]:
                if (backbone, size) not in cached:
                    cached[backbone, size] = features(name, index, backbone, size, args.cache_dir)
                feats, s = cached[backbone, size]
                parts.append(feats)
                seconds += s
            x = {sp: torch.cat([l2_normalise(f[sp]) for f in parts], 1) for sp in ("train", "val", "test")}
            r = fit_probe(x["train"], labels["train"], x["val"], labels["val"], len(index.classes))
            test = accuracy(r["weight"], r["bias"], l2_normalise(x["test"]), labels["test"])
            row = {"val_top1": round(100 * r["val_top1"], 2), "test_top1": round(100 * test, 2), "C": r["C"],
                   "feature_seconds": round(seconds, 1), "dim": x["train"].shape[1]}  # fmt: skip
            results.setdefault(name, {})[variant] = row
            print(
                f"{name:22s} {variant:22s} val {row['val_top1']:6.2f}  test {row['test_top1']:6.2f}  "
                f"C {r['C']:<6g} features {seconds:6.0f} s",
                flush=True,
            )
            write_json(args.out, {"seed": args.seed, "val_fraction": 0.1, "datasets": results})


if __name__ == "__main__":
    main()
