"""Classes described in words: the ``textprior`` method on cub100 (CUB's class-level attributes) and flowers17
(class names in words, one reference photo per class), against the image-only baseline, on frozen lite0 features.

- ``zero_shot``: cub100, 50 seen / 50 unseen classes (seeded); ``finegrain train --method textprior`` on the seen
  classes' training photos, then the unseen classes added from their attribute rows (never trained on). ZSL: top-1
  among the unseen classes; GZSL: all 100 classes together, mean per-class top-1 on seen and unseen test photos and
  their harmonic mean, uncalibrated and with calibrated stacking (a penalty on seen classes chosen on a class split
  of the seen classes: 40 trained, 10 held out as pseudo-unseen).
- ``few_shot``: 1 and 5 training photos per class, all classes, test split; baseline vs textprior.
- ``reference``: flowers17, 9 classes trained, 8 added from one reference photo each (imprinting): their top-1.
- ``full``: every training photo: baseline vs textprior (the prior must not cost accuracy).

    python benchmarks/multimodal.py --seeds 0 1 --out benchmarks/results/multimodal.json
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig, default_cache_dir
from finegrain.data import load_dataset
from finegrain.data.class_info import load_class_info
from finegrain.engine.features import extract_features
from finegrain.engine.train import fit
from finegrain.models.class_embed import embed_classes
from finegrain.predict import Predictor

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS, SHARED  # noqa: E402

ATTRIBUTES = SHARED / "data" / "cub_attributes" / "class_attributes_continuous.csv"
CPU = torch.device("cpu")


def cub_class_info(work: Path) -> Path:
    """cub100's classes' attribute rows (the shared table has all 200 CUB classes) as a class_info folder."""
    out = work / "cub_class_info"
    out.mkdir(parents=True, exist_ok=True)
    with ATTRIBUTES.open() as f:
        rows = list(csv.reader(f))
    with (out / "classes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *rows[0][2:]])
        w.writerows([r[1], *r[2:]] for r in rows[1:])
    return out


def write_manifest(path: Path, samples, classes: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([str(s.path.resolve()), classes[s.label], s.split] for s in samples)
    return path


def train_run(manifest: Path, run_dir: Path, seed: int, method: str, class_info: Path | None, val: float) -> Checkpoint:
    cfg = TrainConfig().replace(data=str(manifest), run_dir=str(run_dir), seed=seed, method=method,
                                class_info=str(class_info) if class_info else None, val_fraction=val)  # fmt: skip
    fit(cfg)
    return Checkpoint.load(run_dir / "best.pt")


def features(ckpt: Checkpoint, samples) -> torch.Tensor:
    """The frozen backbone's features at the checkpoint's view, from finegrain's per-image feature cache."""
    model = ckpt.build_model()
    return extract_features(model, samples, model.preprocess, CPU, amp="auto", channels_last=True,
                            cache_dir=default_cache_dir(), desc="features")  # fmt: skip


def scores(model, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.head(feats)


def mean_class(pred: np.ndarray, labels: np.ndarray) -> float:
    return 100 * statistics.mean(float((pred[labels == k] == k).mean()) for k in np.unique(labels))


def add_new(ckpt: Checkpoint, new: list[str], info) -> torch.nn.Module:
    """The checkpoint's model with ``new`` classes added from their attribute rows (as predict --class-info)."""
    model = ckpt.build_model()
    model.add_classes(embed_classes(model.embedding, new, info))
    return model


def gzsl(logits: torch.Tensor, labels: np.ndarray, n_seen: int, gamma: float) -> dict:
    adjusted = logits.clone()
    adjusted[:, :n_seen] -= gamma
    pred = adjusted.argmax(1).numpy()
    seen, unseen = labels < n_seen, labels >= n_seen
    s, u = mean_class(pred[seen], labels[seen]), mean_class(pred[unseen], labels[unseen])
    return {"seen": s, "unseen": u, "H": 2 * s * u / (s + u) if s + u else 0.0, "gamma": gamma}


def zero_shot(work: Path, seed: int) -> dict:
    """Seen/unseen split; textprior on the seen classes; unseen classes added from attributes."""
    index = load_dataset(DATASETS["cub100"], val_fraction=0.0, seed=seed)
    info = load_class_info(work / "cub_class_info")
    order = np.random.default_rng(seed).permutation(len(index.classes))
    seen, unseen = [index.classes[i] for i in order[:50]], [index.classes[i] for i in order[50:]]

    def split_run(train_classes: list[str], held: list[str], name: str):
        rows = [s for s in index.samples if index.classes[s.label] in train_classes]
        manifest = write_manifest(work / name / "manifest.csv", rows, index.classes)
        ckpt = train_run(manifest, work / name / "run", seed, "textprior", work / "cub_class_info", 0.1)
        model = add_new(ckpt, held, info)
        names = ckpt.classes + held
        test = [s for s in index.split("test") if index.classes[s.label] in names]
        labels = np.array([names.index(index.classes[s.label]) for s in test])
        return ckpt, model, scores(model, features(ckpt, test)), labels

    # the penalty on seen classes, chosen on a class split of the seen classes (40 trained, 10 pseudo-unseen)
    _, _, logits, labels = split_run(seen[:40], seen[40:], f"zsl_val{seed}")
    gammas = np.linspace(0.0, 3.0, 31)
    gamma = float(max(gammas, key=lambda g: gzsl(logits, labels, 40, float(g))["H"]))
    ckpt, model, logits, labels = split_run(seen, unseen, f"zsl{seed}")
    n_seen = len(ckpt.classes)
    unseen_rows = labels >= n_seen
    zsl_pred = logits[unseen_rows][:, n_seen:].argmax(1).numpy() + n_seen
    return {
        "zsl_unseen_top1": 100 * float((zsl_pred == labels[unseen_rows]).mean()),
        "zsl_unseen_mean_class": mean_class(zsl_pred, labels[unseen_rows]),
        "gzsl": gzsl(logits, labels, n_seen, 0.0),
        "gzsl_calibrated": gzsl(logits, labels, n_seen, gamma),
        "seen_classes": n_seen,
    }


def top1(run_dir: Path, test) -> float:
    """Test top-1 of a frozen-backbone run, its head on the cached test features."""
    ckpt = Checkpoint.load(run_dir / "best.pt")
    logits = scores(ckpt.build_model(), features(ckpt, test))
    return 100 * float((logits.argmax(1) == torch.tensor([s.label for s in test])).float().mean())


def few_shot(work: Path, seed: int, name: str, shots: int, class_info: Path | None) -> dict:
    """``shots`` training photos per class (seeded), every test photo: baseline vs textprior."""
    index = load_dataset(DATASETS[name], val_fraction=0.0, seed=seed)
    rng = np.random.default_rng(seed)
    train = [s for k in range(len(index.classes)) for s in
             rng.permutation([s for s in index.split("train") if s.label == k])[:shots]]  # fmt: skip
    manifest = write_manifest(work / f"{name}_{shots}shot{seed}" / "manifest.csv", train + index.split("test"),
                              index.classes)  # fmt: skip
    out = {}
    for method in ("baseline", "textprior"):
        run = work / f"{name}_{shots}shot{seed}" / method
        train_run(manifest, run, seed, method, class_info if method == "textprior" else None, 0.0)
        out[method] = top1(run, index.split("test"))
    return out


def reference(work: Path, seed: int) -> dict:
    """flowers17: 9 classes trained (textprior on their names), 8 added afterwards, by name alone and by name and
    one reference photo each (a training photo of that class, never trained on); top-1 among all 17 classes."""
    index = load_dataset(DATASETS["flowers17"], val_fraction=0.0, seed=seed)
    order = np.random.default_rng(seed).permutation(len(index.classes))
    trained = {index.classes[i] for i in order[:9]}
    rows = [s for s in index.samples if index.classes[s.label] in trained]
    manifest = write_manifest(work / f"reference{seed}" / "manifest.csv", rows, index.classes)
    run = work / f"reference{seed}" / "run"
    train_run(manifest, run, seed, "textprior", None, 0.0)
    test = index.split("test")
    added = [index.classes[i] for i in order[9:]]
    out = {}
    for kind in ("name", "name_and_reference_photo"):
        info = work / f"reference{seed}" / kind
        info.mkdir(parents=True, exist_ok=True)
        for c in added:
            (info / f"{c}.txt").write_text(c)
            if kind != "name":
                photo = np.random.default_rng(seed).choice(
                    [s.path for s in index.split("train") if index.classes[s.label] == c]
                )
                shutil.copy(photo, info / f"{c}{Path(photo).suffix.lower()}")
        predictor = Predictor.from_checkpoint(run / "best.pt", device="cpu")
        predictor.add_classes(info)
        results = predictor.predict_files([s.path for s in test], k=1)
        hit = np.array([r["top"][0]["class"] == index.classes[s.label] for r, s in zip(results, test, strict=True)])
        new = np.array([index.classes[s.label] in added for s in test])
        out[kind] = {"added_top1": 100 * float(hit[new].mean()), "trained_top1": 100 * float(hit[~new].mean())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["zero_shot", "few_shot", "reference", "full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--work-dir")
    p.add_argument("--out", default="benchmarks/results/multimodal.json")
    args = p.parse_args()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fg-multimodal-"))
    results: dict = {}
    cub_info = cub_class_info(work)

    def save() -> None:
        write_json(args.out, {"seeds": args.seeds, **results})

    if "zero_shot" in args.parts:
        results["zero_shot"] = {"cub100": [zero_shot(work, seed) for seed in args.seeds]}
        save()
    if "few_shot" in args.parts:
        results["few_shot"] = {
            f"{name}_{shots}shot": [few_shot(work, seed, name, shots, info) for seed in args.seeds]
            for name, info in (("cub100", cub_info), ("flowers17", None)) for shots in (1, 5)
        }  # fmt: skip
        save()
    if "reference" in args.parts:
        results["reference"] = {"flowers17": [reference(work, seed) for seed in args.seeds]}
        save()
    if "full" in args.parts:
        results["full"] = {"cub100": [few_shot(work, seed, "cub100", 10_000, cub_info) for seed in args.seeds]}
        save()
    print_table(results)


def print_table(results: dict) -> None:
    def ms(values: list[float]) -> str:
        return f"{statistics.mean(values):6.2f}" + (f" ±{statistics.stdev(values):.2f}" if len(values) > 1 else "")

    for name, runs in results.get("zero_shot", {}).items():
        h, h_cal = [r["gzsl"]["H"] for r in runs], [r["gzsl_calibrated"]["H"] for r in runs]
        print(f"{name} zero-shot (50 unseen): top-1 {ms([r['zsl_unseen_top1'] for r in runs])}; GZSL H {ms(h)}, "
              f"calibrated {ms(h_cal)}")  # fmt: skip
    for part in ("few_shot", "full"):
        for name, runs in results.get(part, {}).items():
            print(f"{part} {name:18s} baseline {ms([r['baseline'] for r in runs])}  "
                  f"textprior {ms([r['textprior'] for r in runs])}")  # fmt: skip
    for name, runs in results.get("reference", {}).items():
        for kind in ("name", "name_and_reference_photo"):
            print(f"{name} added classes by {kind}: {ms([r[kind]['added_top1'] for r in runs])} "
                  f"(trained classes {ms([r[kind]['trained_top1'] for r in runs])})")  # fmt: skip


if __name__ == "__main__":
    main()
