"""The mirror-pair detector (finegrain.engine.mirror) on the four domains: which class pairs it finds, and its cost.

Features of each dataset's training split, un-mirrored and mirrored, from the default frozen lite0 at 224 px (the
feature cache the default run fills), then :func:`mirror_pairs`. Expected: pairs on gtsrb_finegrained (keep
left/right, turn left/right ahead, dangerous curve left/right, go straight or left/right), none on the birds, flowers
and leaves.

    python benchmarks/mirror.py --out benchmarks/results/mirror.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from finegrain.config import default_cache_dir
from finegrain.data import load_dataset
from finegrain.engine.features import extract_features
from finegrain.engine.mirror import mirror_pairs
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--out", default="benchmarks/results/mirror.json")
    args = p.parse_args()
    results = {}
    for name in args.datasets:
        index = load_dataset(DATASETS[name], val_fraction=0.1, seed=0)
        model = create_model("baseline", num_classes=len(index.classes)).eval()
        train = index.split("train")
        views = [
            extract_features(
                model,
                train,
                model.preprocess,
                torch.device("cpu"),
                flip=f,
                amp="auto",
                channels_last=True,
                cache_dir=args.cache_dir,
                desc=name,
            )  # fmt: skip
            for f in (False, True)
        ]
        start = time.perf_counter()
        pairs = mirror_pairs(*views, torch.tensor([s.label for s in train]), len(index.classes))
        seconds = time.perf_counter() - start
        named = [{**q, "names": [index.classes[c] for c in q["classes"]]} for q in pairs]
        results[name] = {"train_images": len(train), "pairs": named, "seconds": round(seconds, 1),
                         "flip_augmentation": "off" if pairs else "on"}  # fmt: skip
        print(
            f"{name:22s} {len(train):5d} images  {len(pairs)} pair(s) in {seconds:.1f} s  "
            + "; ".join(f"{a} <-> {b} {q['share']}" for q in named for a, b in [q["names"]]),
            flush=True,
        )
        write_json(args.out, {"datasets": results})


if __name__ == "__main__":
    main()
