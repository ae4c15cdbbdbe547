"""New classes from words and one photo, added to a head trained on the other classes: known-class top-1 before and
after, new-class top-1 among all classes, and their harmonic mean, per seed.

Protocol (anyone can re-run it on the dev data): the classes are split in half by the seed, known and new. A probe
head is fitted on the known classes' training photos (its penalty chosen on their validation photos). Each new
class brings its words and ONE training photo (drawn by the seed) as its reference photo: on cub100 its row of
CUB's 312 class attributes, on flowers17 its name through the sentence encoder. The new classes are added with
``finegrain.engine.new_classes`` (prototypes from photo + words in a whitened space, a gate against the known
classes' prototypes calibrated on pseudo-splits of the known classes), and every test photo is classified among all
classes. Frozen features of ``--checkpoint``'s backbone and preprocessing (cached). Prints a table, writes JSON.

    finegrain train --data ../shared/data/cub100 --backbone tf_efficientnet_lite0+tf_efficientnet_lite2 \
        --run-dir runs/concat                                    # the backbone (its head is not used here)
    python benchmarks/new_classes.py --checkpoint runs/concat/best.pt --out benchmarks/results/new_classes.json
    python benchmarks/new_classes.py --out benchmarks/results/new_classes_lite0.json    # runs/default: lite0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finegrain.checkpoint import Checkpoint
from finegrain.config import default_cache_dir
from finegrain.data import load_dataset
from finegrain.data.class_info import load_class_info
from finegrain.engine.features import extract_features
from finegrain.engine.new_classes import (
    MAX_DROP,
    fit_calibration,
    gated_predictions,
    harmonic,
    new_class_rows,
    threshold_for_share,
)
from finegrain.engine.probe import fit_probe
from finegrain.models.class_embed import EmbeddingSpec, embed_classes

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from multimodal import cub_class_info  # noqa: E402
from peer_timm import DATASETS  # noqa: E402

CPU = torch.device("cpu")


def split_features(ckpt: Checkpoint, data: str) -> dict:
    index = load_dataset(data)
    model = ckpt.build_model()
    out = {"classes": index.classes}
    for split in ("train", "val", "test"):
        samples = index.split(split)
        x = extract_features(model, samples, ckpt.preprocess, CPU, cache_dir=default_cache_dir(), desc=split)
        out[split] = (F.normalize(x.float(), dim=1), torch.tensor([s.label for s in samples]))
    # the reference photos' mirrored views (a reference photo is a training photo here)
    x = extract_features(model, index.split("train"), ckpt.preprocess, CPU, flip=True, cache_dir=default_cache_dir())
    out["train_mirrored"] = F.normalize(x.float(), dim=1)
    return out


def class_embeddings(name: str, classes: list[str], work: Path) -> torch.Tensor:
    if name == "cub100":
        info = load_class_info(cub_class_info(work))
        spec = EmbeddingSpec(tuple(info.attribute_names), None)
        return embed_classes(spec, classes, info)
    return embed_classes(EmbeddingSpec(None, "minilm"), classes, None)  # the class names in words


def one_seed(feats: dict, embed: torch.Tensor, seed: int, splits: int, max_drop: float, mirrored: bool) -> dict:
    rng = np.random.default_rng(seed)
    n = len(feats["classes"])
    order = [int(c) for c in rng.permutation(n)]
    known, new = order[: (n + 1) // 2], order[(n + 1) // 2 :]
    relabel = torch.full((n,), -1, dtype=torch.long)
    relabel[torch.tensor(known + new)] = torch.arange(n)
    (tx, ty), (vx, vy), (ex, ey) = feats["train"], feats["val"], feats["test"]
    ty, vy, ey = relabel[ty], relabel[vy], relabel[ey]
    k = len(known)
    tk, vk = ty < k, vy < k
    probe = fit_probe(tx[tk], ty[tk], vx[vk], vy[vk], k)
    w, b = probe["weight"], probe["bias"]
    emb = embed[torch.tensor(known + new)]
    started = time.perf_counter()
    cal = fit_calibration(tx[tk], ty[tk], emb[:k], probe["C"], n - k, splits=splits, max_drop=max_drop, seed=seed)
    calibrate_s = time.perf_counter() - started
    picks = [int((ty == c).nonzero().flatten()[rng.integers(int((ty == c).sum()))]) for c in range(k, n)]
    refs = (tx[picks] + feats["train_mirrored"][picks]) / 2 if mirrored else tx[picks]
    logits_known = ex @ w.T + b
    is_known = ey < k

    def added(beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions among all classes, and the nearest new class, with the new classes placed at ``beta``."""
        rows = new_class_rows(replace(cal, beta=beta), tx[tk], ty[tk], refs, emb[:k], emb[k:])
        threshold = threshold_for_share(rows.margin(vx[vk])[0], cal.known_share)  # the known validation photos
        margin, nearest = rows.margin(ex)
        return gated_predictions(logits_known, margin, nearest, threshold), nearest

    pred, nearest = added(cal.beta)
    result = {
        "seed": seed,
        "known_before": 100 * float((logits_known[is_known].argmax(1) == ey[is_known]).float().mean()),
        "known_after": 100 * float((pred[is_known] == ey[is_known]).float().mean()),
        "new": 100 * float((pred[~is_known] == ey[~is_known]).float().mean()),
        "calibration": cal.to_dict(),
        "calibrate_s": calibrate_s,
        "known_classes": len(known),
        "new_classes": len(new),
    }
    result["harmonic"] = harmonic(result["known_after"], result["new"])
    result["new_among_new"] = 100 * float((nearest[~is_known] == ey[~is_known] - k).float().mean())
    # the two ingredients alone, at the calibrated share
    for name, beta in (("new_photo_only", 1.0), ("new_words_only", 0.0)):
        result[name] = 100 * float((added(beta)[0][~is_known] == ey[~is_known]).float().mean())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default/best.pt", help="whose backbone and preprocessing to use")
    p.add_argument("--datasets", nargs="+", default=["cub100", "flowers17"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--splits", type=int, default=10, help="pseudo-splits the calibration averages over")
    p.add_argument("--max-drop", type=float, default=MAX_DROP, help="known-class top-1 the calibration may give up")
    p.add_argument("--mirrored", type=int, default=1, help="1: a reference photo counts with its mirror image")
    p.add_argument("--out", default="benchmarks/results/new_classes.json")
    args = p.parse_args()
    ckpt = Checkpoint.load(args.checkpoint)
    work = Path(tempfile.mkdtemp(prefix="fg-newcls-"))
    results = {}
    keys = ("known_before", "known_after", "new", "harmonic")
    for name in args.datasets:
        feats = split_features(ckpt, str(DATASETS[name]))
        embed = class_embeddings(name, feats["classes"], work)
        seeds = [one_seed(feats, embed, s, args.splits, args.max_drop, args.mirrored) for s in args.seeds]
        results[name] = {k: statistics.mean(s[k] for s in seeds) for k in keys}
        results[name]["spread"] = {k: statistics.pstdev(s[k] for s in seeds) for k in keys}
        results[name]["seeds"] = seeds
        for s in seeds:
            print(f"{name:10s} seed {s['seed']}: known {s['known_before']:.2f} -> {s['known_after']:.2f}, new "
                  f"{s['new']:.2f} (photo only {s['new_photo_only']:.2f}, words only {s['new_words_only']:.2f}), "
                  f"H {s['harmonic']:.2f}; among new only {s['new_among_new']:.2f}; beta {s['calibration']['beta']}, "
                  f"known share {s['calibration']['known_share']:.3f}", flush=True)  # fmt: skip
        r = results[name]
        print(f"{name:10s} mean: known {r['known_before']:.2f} -> {r['known_after']:.2f}, new {r['new']:.2f}, "
              f"H {r['harmonic']:.2f} (spread H {r['spread']['harmonic']:.2f})")  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "checkpoint": args.checkpoint, "seeds": args.seeds,
            "splits": args.splits, "max_drop": args.max_drop}  # fmt: skip
    write_json(args.out, {"meta": meta, "datasets": results})


if __name__ == "__main__":
    main()
