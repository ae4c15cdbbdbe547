"""Labels that cost less: how well ``finegrain data audit`` finds wrong labels on cub100.

cub100's training photos with 20% and 40% of their labels flipped, symmetric (to any other class, uniformly) and
pair-flip (to the class whose mean frozen feature is nearest: a similar species, the realistic mistake). The audit
sees only the noisy labels; its flags are scored against the flipped set (precision, recall). One feature
extraction serves every setting (finegrain's per-image feature cache).

    python benchmarks/labels.py --seeds 0 1 --out benchmarks/results/labels.json
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from finegrain.config import default_cache_dir
from finegrain.data import load_dataset
from finegrain.engine.audit import audit_labels
from finegrain.engine.features import extract_features
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def nearest_class(index, cache_dir: str) -> np.ndarray:
    """For each class, the other class with the nearest mean (L2-normalised) frozen feature."""
    train = index.split("train")
    model = create_model("baseline", num_classes=len(index.classes)).eval()
    feats = extract_features(model, train, model.preprocess, torch.device("cpu"), amp="auto", channels_last=True,
                             cache_dir=cache_dir)  # fmt: skip
    feats = torch.nn.functional.normalize(feats, dim=1)
    labels = torch.tensor([s.label for s in train])
    means = torch.nn.functional.normalize(torch.stack([feats[labels == k].mean(0) for k in range(len(index.classes))]))
    sim = means @ means.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1).numpy()


def noisy_manifest(index, rate: float, kind: str, pair: np.ndarray, seed: int, path: Path) -> set[str]:
    """The training photos with ``rate`` of their labels flipped (test photos kept, unaudited); the flipped paths."""
    rng = np.random.default_rng(seed)
    train = index.split("train")
    flip = set(rng.permutation(len(train))[: round(rate * len(train))].tolist())
    n = len(index.classes)
    flipped, rows = set(), []
    for i, s in enumerate(train):
        label = s.label
        if i in flip:
            label = int(pair[s.label]) if kind == "pair" else int((s.label + rng.integers(1, n)) % n)
            flipped.add(str(s.path.resolve()))
        rows.append([str(s.path.resolve()), index.classes[label], "train"])
    rows += [[str(s.path.resolve()), index.classes[s.label], "test"] for s in index.split("test")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])
    return flipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--work-dir")
    p.add_argument("--out", default="benchmarks/results/labels.json")
    args = p.parse_args()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fg-labels-"))
    index = load_dataset(DATASETS["cub100"], val_fraction=0.0)
    pair = nearest_class(index, args.cache_dir)
    results: dict = {}
    for kind in ("symmetric", "pair"):
        for rate in args.rates:
            runs = []
            for seed in args.seeds:
                manifest = work / f"{kind}{rate}_{seed}" / "manifest.csv"
                flipped = noisy_manifest(index, rate, kind, pair, seed, manifest)
                noisy = load_dataset(manifest, val_fraction=0.0)
                issues, summary = audit_labels(noisy, seed=seed, cache_dir=args.cache_dir, device="cpu")
                found = {str(e.sample.path.resolve()) for e in issues}
                hits = len(found & flipped)
                runs.append(
                    {
                        "flipped": len(flipped),
                        "flagged": len(found),
                        "precision": hits / max(1, len(found)),
                        "recall": hits / len(flipped),
                        "out_of_fold_top1": summary["out_of_fold_top1"],
                    }
                )
            results[f"{kind}_{int(100 * rate)}"] = {
                k: statistics.mean(r[k] for r in runs) for k in ("precision", "recall", "out_of_fold_top1")
            } | {"seeds": runs}
            write_json(args.out, {"audit": {"cub100": results}, "seeds": args.seeds})
    for name, r in results.items():
        print(f"cub100 {name:14s} audit precision {100 * r['precision']:5.1f}%  recall {100 * r['recall']:5.1f}%  "
              f"(out-of-fold top-1 {100 * r['out_of_fold_top1']:.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
