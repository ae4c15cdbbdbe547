"""What each choice of the new-class gate is worth (``engine/new_classes.py``), on the protocol of
``new_classes.py`` (classes split in half by the seed, one reference photo + words per new class, frozen features).

Each variant is scored two ways on the test photos: the new classes' photos among the new classes alone, and, among
all classes, the new-class top-1 at the best threshold that costs the known classes at most ``--max-drop`` (chosen on
the test photos themselves: an upper bound that compares gates, not what ``classes add`` reaches). Variants:

- ``whiten ALPHA``: the space's shrinkage (1.0: centred only), the gate against the known classes' prototypes;
- ``gate vs trained logits``: the gate compares the nearest new prototype with the known head's standardised top
  logit instead (the design before, which calibrated linear rows against the trained logits);
- ``gate + probe confidence``: the default gate (in cosines) plus 0.03 log(1 - the known head's top probability);
- ``12 views``: the reference photo's features averaged over 6 crops and their mirror images (``--views``: reads
  the photos again);
- ``hub-adjusted``: each new prototype's score minus its mean similarity to its k nearest known training photos
  (CSLS-style; in the gate only, or in the choice among new classes too);
- ``gate vs k nearest known photos``: the known side of the gate is the mean similarity to the k nearest known
  training photos instead of the nearest class mean;
- ``test photo + mirror``: every test photo's features averaged with its mirror image's (``--test-mirrored``);
- ``--concat CHECKPOINT``: every variant on the features of both backbones side by side.

    python benchmarks/new_classes_ablation.py --views      # cub100, seeds 0-2: results/new_classes_ablation.json
    python benchmarks/new_classes_ablation.py --test-mirrored --out benchmarks/results/new_classes_ablation_gates.json
    python benchmarks/new_classes_ablation.py --concat runs/lite2/best.pt \
        --out benchmarks/results/new_classes_ablation_concat.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finegrain.checkpoint import Checkpoint
from finegrain.config import default_cache_dir
from finegrain.data import load_dataset
from finegrain.data.loading import open_image
from finegrain.data.transforms import eval_transform
from finegrain.engine.features import extract_features
from finegrain.engine.new_classes import Space, class_means, features_from_words, gate, prototypes
from finegrain.engine.probe import fit_probe

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from new_classes import CPU, class_embeddings, split_features  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def best_new(margin: torch.Tensor, nearest: torch.Tensor, known_right: torch.Tensor, y: torch.Tensor, k: int,
             max_drop: float) -> float:  # fmt: skip
    """New-class top-1 (%) at the best threshold costing the known photos at most ``max_drop``."""
    is_known, new_right = y < k, nearest == y - k
    before, best = float(known_right[is_known].float().mean()), 0.0
    for t in np.quantile(margin.numpy(), np.linspace(0, 1, 401)):
        to_new = margin > t
        if before - float((known_right & ~to_new)[is_known].float().mean()) <= max_drop:
            best = max(best, float((new_right & to_new)[~is_known].float().mean()))
    return 100 * best


def reference_views(ckpt: Checkpoint, model, paths: list[Path]) -> torch.Tensor:
    """Per photo: the mean L2-normalised feature of the whole photo and 5 crops of 80% of each side, and their
    mirror images."""
    transform, rows = eval_transform(ckpt.preprocess), []
    for path in paths:
        img = open_image(path)
        w, h = img.size
        cw, ch = int(0.8 * w), int(0.8 * h)
        corners = ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch), ((w - cw) // 2, (h - ch) // 2))
        batch = torch.stack([transform(v) for v in [img] + [img.crop((x, y, x + cw, y + ch)) for x, y in corners]])
        with torch.inference_mode():
            rows.append(F.normalize(model.backbone_features(torch.cat([batch, batch.flip(-1)])).float(), dim=1).mean(0))
    return torch.stack(rows)


def one_seed(feats: dict, embed: torch.Tensor, seed: int, max_drop: float, views) -> dict:
    rng = np.random.default_rng(seed)  # the same split and reference photos as new_classes.py
    n = len(feats["classes"])
    order = [int(c) for c in rng.permutation(n)]
    relabel = torch.full((n,), -1, dtype=torch.long)
    relabel[torch.tensor(order)] = torch.arange(n)
    k = (n + 1) // 2
    (tx, ty), (vx, vy), (ex, ey) = feats["train"], feats["val"], feats["test"]
    ty, vy, ey = relabel[ty], relabel[vy], relabel[ey]
    tk, vk = ty < k, vy < k
    probe = fit_probe(tx[tk], ty[tk], vx[vk], vy[vk], k)
    picks = [int((ty == c).nonzero().flatten()[rng.integers(int((ty == c).sum()))]) for c in range(k, n)]
    emb = embed[torch.tensor(order)]
    logits = ex @ probe["weight"].T + probe["bias"]
    known_right = logits.argmax(1) == ey
    refs = (tx[picks] + feats["train_mirrored"][picks]) / 2
    out = {}

    def score(name: str, space: Space, refs: torch.Tensor, extra=None) -> None:
        means = class_means(space(tx[tk]), ty[tk], k)
        protos = prototypes(space(refs), features_from_words(emb[:k], emb[k:], means), 0.5)
        margin, nearest = gate(space(ex), protos, means)
        if extra is not None:  # in cosines: the other scores' scales were set against them
            margin = extra(F.normalize(space(ex), dim=1) @ protos.T)
        among = 100 * float((nearest[ey >= k] == ey[ey >= k] - k).float().mean())
        out[name] = {"among_new": among, "new_at_drop": best_new(margin, nearest, known_right, ey, k, max_drop)}

    for alpha in (1.0, 0.5, 0.7):
        score(f"whiten {alpha:g}", Space.fit(tx[tk], ty[tk], alpha), refs)
    space = Space.fit(tx[tk], ty[tk])
    top = logits.max(1).values
    standardised = (top - top.mean()) / top.std()
    for s in (0.05, 0.1):
        score(f"gate vs trained logits ({s:g})", space, refs, lambda new, s=s: new.max(1).values - s * standardised)
    unsure = torch.log1p(-logits.softmax(1).max(1).values.clamp_max(1 - 1e-6))
    z = F.normalize(space(ex), dim=1)
    known_side = (z @ F.normalize(class_means(space(tx[tk]), ty[tk], k), dim=1).T).max(1).values
    score("gate + probe confidence", space, refs, lambda new: new.max(1).values - known_side + 0.03 * unsure)
    train_z = F.normalize(space(tx[tk]), dim=1)
    means_z = F.normalize(class_means(space(tx[tk]), ty[tk], k), dim=1)
    for kn, lam in ((10, 0.5), (10, 1.0), (30, 1.0)):  # CSLS-style: a prototype near many known photos is a hub
        protos = prototypes(
            space(refs), features_from_words(emb[:k], emb[k:], class_means(space(tx[tk]), ty[tk], k)), 0.5
        )
        hub = (protos @ train_z.T).topk(kn, dim=1).values.mean(1)
        adjusted = z @ protos.T - lam * hub
        margin = adjusted.max(1).values - (z @ means_z.T).max(1).values
        for name, nearest in (("gate", (z @ protos.T).argmax(1)), ("gate+choice", adjusted.argmax(1))):
            among = 100 * float((nearest[ey >= k] == ey[ey >= k] - k).float().mean())
            out[f"hub-adjusted {name} k{kn} x{lam:g}"] = {
                "among_new": among,
                "new_at_drop": best_new(margin, nearest, known_right, ey, k, max_drop),
            }
    for kn in (1, 3, 10):  # the known side: the k nearest known training photos, not the nearest class mean
        near = (z @ train_z.T).topk(kn, dim=1).values.mean(1)
        score(f"gate vs {kn} nearest known photos", space, refs, lambda new, near=near: new.max(1).values - near)
    if "test_mirrored" in feats:  # each test photo seen with its mirror image (the features averaged)
        ex_saved = ex
        ex = F.normalize(ex + feats["test_mirrored"], dim=1)
        known_right = (ex @ probe["weight"].T + probe["bias"]).argmax(1) == ey
        score("test photo + mirror", space, refs)
        ex, known_right = ex_saved, logits.argmax(1) == ey
    if views is not None:
        score("12 views", space, views(feats["train_paths"], picks))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default/best.pt", help="whose backbone and preprocessing to use")
    p.add_argument("--datasets", nargs="+", default=["cub100"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-drop", type=float, default=0.02)
    p.add_argument("--views", action="store_true", help="also the 12-view reference photo (reads the photos)")
    p.add_argument("--concat", nargs="*", default=[], help="checkpoints whose features are concatenated")
    p.add_argument("--test-mirrored", action="store_true", help="also each test photo averaged with its mirror")
    p.add_argument("--out", default="benchmarks/results/new_classes_ablation.json")
    args = p.parse_args()
    ckpt = Checkpoint.load(args.checkpoint)
    model = ckpt.build_model().eval()
    results = {}
    for name in args.datasets:
        feats = split_features(ckpt, str(DATASETS[name]))
        for other in args.concat:  # each photo's features of another checkpoint's backbone beside (both unit length)
            more = split_features(Checkpoint.load(other), str(DATASETS[name]))
            for key in ("train", "val", "test"):
                feats[key] = (F.normalize(torch.cat([feats[key][0], more[key][0]], 1), dim=1), feats[key][1])
            feats["train_mirrored"] = F.normalize(
                torch.cat([feats["train_mirrored"], more["train_mirrored"]], 1), dim=1
            )
        feats["train_paths"] = [s.path for s in load_dataset(str(DATASETS[name])).split("train")]
        if args.test_mirrored:
            test = load_dataset(str(DATASETS[name])).split("test")
            x = extract_features(model, test, ckpt.preprocess, CPU, flip=True, cache_dir=default_cache_dir())
            feats["test_mirrored"] = F.normalize(x.float(), dim=1)
        embed = class_embeddings(name, feats["classes"], Path(tempfile.mkdtemp(prefix="fg-newcls-")))
        views = (lambda paths, picks: reference_views(ckpt, model, [paths[i] for i in picks])) if args.views else None
        seeds = [one_seed(feats, embed, s, args.max_drop, views) for s in args.seeds]
        results[name] = {v: {m: statistics.mean(s[v][m] for s in seeds) for m in ("among_new", "new_at_drop")}
                         for v in seeds[0]}  # fmt: skip
        results[name]["seeds"] = seeds
        print(f"{name}: new classes' top-1 among the new / among all at <= {args.max_drop:.0%} known lost (best "
              "threshold on test: an upper bound), seed means")  # fmt: skip
        for v, r in results[name].items():
            if v != "seeds":
                print(f"  {v:32s} {r['among_new']:6.2f} {r['new_at_drop']:6.2f}")
    write_json(args.out, {"meta": vars(args), "datasets": results})


if __name__ == "__main__":
    main()
