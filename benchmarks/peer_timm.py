"""The peer: timm's own training script (``../shared/peers/timm_train.py``) fine-tuning lite0 on finegrain's data.

For each dataset it builds the peer's ImageFolder input as a tree of symlinks (``train`` = finegrain's train + val
split, ``validation`` = finegrain's test split, so the peer's per-epoch "validation" top-1 is its test top-1),
writes the ImageNet lite0 weights as a timm state dict, and runs the script with the options its README names.

Equal wall time: the number of epochs comes from ``--budget`` minutes of training and this machine's measured
fine-tuning throughput (lite0, fp32, batch 32, the peer's settings), so the peer gets the time finegrain's budgeted
recipe gets. Each epoch's test top-1 and the wall time at which it was reported are saved, so a later comparison can
read the peer's accuracy at any earlier time too.

    python benchmarks/peer_timm.py --budget 10 --out benchmarks/results/peer_timm.json
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from finegrain.data.datasets import load_dataset
from finegrain.env import machine_info
from finegrain.models.backbone import create_backbone

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATASETS = {
    "cub100": SHARED / "data" / "cub100",
    "flowers17": SHARED / "data" / "flowers17",
    "plantvillage_tomato": SHARED / "data" / "plantvillage_tomato" / "manifest.csv",
    "gtsrb_finegrained": SHARED / "data" / "gtsrb_finegrained" / "manifest.csv",
}


def build_tree(name: str, work: Path, seed: int) -> tuple[Path, int, int]:
    """Symlink tree of finegrain's split for timm's ImageFolder reader; returns (root, classes, training images)."""
    index = load_dataset(DATASETS[name], seed=seed)
    root = work / name / "data"
    n_train = 0
    for i, s in enumerate(index.samples):
        split = "validation" if s.split == "test" else "train"
        n_train += split == "train"
        link = root / split / index.classes[s.label] / f"{i:06d}{s.path.suffix.lower()}"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(s.path.resolve())
    return root, len(index.classes), n_train


def lite0_timm_weights(work: Path) -> Path:
    path = work / "lite0_timm.pth"
    if not path.is_file():
        torch.save(create_backbone("tf_efficientnet_lite0", num_classes=1000).state_dict(), path)
    return path


def train_throughput(batch: int = 32, steps: int = 4) -> float:
    """Images/s of lite0 fp32 fine-tuning steps at 224 px on this machine (the peer's precision)."""
    model = create_backbone("tf_efficientnet_lite0", pretrained=False, num_classes=100).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def run_peer(name: str, work: Path, epochs: int, seed: int, weights: Path) -> dict:
    data, n_classes, n_train = build_tree(name, work, seed)
    out = work / name / "out"
    summary = out / "peer" / "summary.csv"
    summary.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(SHARED / "peers" / "timm_train.py"),
        "--data-dir", str(data), "--train-split", "train", "--val-split", "validation",
        "--model", "tf_efficientnet_lite0", "--pretrained", "--pretrained-path", str(weights),
        "--num-classes", str(n_classes), "--device", "cpu", "--workers", "2",
        "--epochs", str(epochs), "--warmup-epochs", str(min(1, epochs - 1)), "--opt", "adamw", "--lr", "1e-3",
        "--batch-size", "32", "--input-size", "3", "224", "224", "--seed", str(seed),
        "--output", str(out), "--experiment", "peer", "--checkpoint-hist", "1",
    ]  # fmt: skip
    times: list[float] = []
    start = time.perf_counter()
    done = threading.Event()

    def watch() -> None:  # wall time at which each epoch's row appears in summary.csv
        while not done.wait(2.0):
            if summary.is_file():
                rows = summary.read_text().count("\n") - 1
                while len(times) < rows:
                    times.append(time.perf_counter() - start)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with (work / name / "peer.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work).returncode
    done.set()
    watcher.join()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"timm_train.py failed on {name} (exit {rc}); see {work / name / 'peer.log'}")
    with summary.open() as f:
        rows = list(csv.DictReader(f))
    curve = [
        {"epoch": int(r["epoch"]) + 1, "test_top1": float(r["eval_top1"]), "wall_s": round(t, 1)}
        for r, t in zip(rows, times + [wall] * (len(rows) - len(times)), strict=True)
    ]
    return {
        "top1": curve[-1]["test_top1"],
        "train_s": round(wall, 1),
        "epochs": epochs,
        "train_images": n_train,
        "curve": curve,
        "command": " ".join(cmd[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--budget", type=float, default=10.0, help="training minutes per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/finegrain/peers"))
    parser.add_argument("--out", default="benchmarks/results/peer_timm.json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = lite0_timm_weights(work)
    speed = train_throughput()
    results = {"machine": machine_info(), "budget_min": args.budget, "train_img_s": round(speed, 2), "datasets": {}}
    print(f"lite0 fp32 fine-tuning: {speed:.1f} img/s on this machine")
    for name in args.datasets:
        _, _, n_train = build_tree(name, work, args.seed)
        epochs = max(1, int(args.budget * 60 * speed // n_train))
        print(f"{name}: {n_train} training images, {epochs} epoch(s) in {args.budget} min")
        results["datasets"][name] = run_peer(name, work, epochs, args.seed, weights)
        r = results["datasets"][name]
        print(f"{name}: peer test top-1 {r['top1']:.2f}% after {r['epochs']} epoch(s), {r['train_s']:.0f} s")
        write_json(args.out, results)


if __name__ == "__main__":
    main()
