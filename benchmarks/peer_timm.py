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
import resource
import signal
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


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``; 0 where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def other_load(start_machine_s: float, start_own: resource.struct_rusage, wall: float) -> tuple[float, float]:
    """(cores this process's children used, cores everything else on the machine used) since the starting marks."""
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_s = own.ru_utime + own.ru_stime - start_own.ru_utime - start_own.ru_stime
    return own_s / wall, max(0.0, machine_cpu_s() - start_machine_s - own_s) / wall


def run_peer(name: str, work: Path, epochs: int, seed: int, weights: Path, limit_s: float | None = None) -> dict:
    """Run the peer; each epoch's test top-1 with the wall time its row appeared and the time its evaluation began.

    ``limit_s`` stops the script (its whole process group) after that many seconds and keeps the epochs it finished.
    ``cores_used`` is the CPU time the script and its loader workers got per wall second (1.76 on an idle 2-core
    machine); ``other_cores`` what everything else on the machine used meanwhile: above 0.3 the run says ``busy``
    (its minutes are inflated).
    """
    data, n_classes, n_train = build_tree(name, work, seed)
    out = work / name / "out"
    summary = out / "peer" / "summary.csv"
    summary.unlink(missing_ok=True)
    log_path = work / name / "peer.log"
    cmd = [
        sys.executable, str(SHARED / "peers" / "timm_train.py"),
        "--data-dir", str(data), "--train-split", "train", "--val-split", "validation",
        "--model", "tf_efficientnet_lite0", "--pretrained", "--pretrained-path", str(weights),
        "--num-classes", str(n_classes), "--device", "cpu", "--workers", "2",
        "--epochs", str(epochs), "--warmup-epochs", str(min(1, epochs - 1)), "--opt", "adamw", "--lr", "1e-3",
        "--batch-size", "32", "--input-size", "3", "224", "224", "--seed", str(seed),
        "--output", str(out), "--experiment", "peer", "--checkpoint-hist", "1",
    ]  # fmt: skip
    times: list[float] = []  # wall time at which each epoch's row appears in summary.csv
    eval_starts: list[float] = []  # wall time of each epoch's first "Test:" log line (training of that epoch done)
    start = time.perf_counter()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            now = time.perf_counter() - start
            if log_path.is_file():  # an evaluation begins where a "Train:" log line is followed by a "Test:" one
                lines = log_path.read_text(errors="replace").splitlines()
                tests = sum(1 for a, b in zip(lines, lines[1:], strict=False) if "Train:" in a and "Test:" in b)
                while len(eval_starts) < tests:
                    eval_starts.append(now)
            if summary.is_file():
                rows = summary.read_text().count("\n") - 1
                while len(times) < rows:
                    times.append(now)

    cpu0, machine0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu_s()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stopped = False
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, stopped = proc.wait(), True
    time.sleep(1.5)  # one more look at the files
    done.set()
    watcher.join()
    wall = time.perf_counter() - start
    cores, others = other_load(machine0, cpu0, wall)
    if rc != 0 and not stopped:
        raise SystemExit(f"timm_train.py failed on {name} (exit {rc}); see {log_path}")
    rows = list(csv.DictReader(summary.open())) if summary.is_file() else []
    curve, eval_total = [], 0.0
    for i, r in enumerate(rows):
        t = times[i] if i < len(times) else wall
        eval_s = max(0.0, t - eval_starts[i]) if i < len(eval_starts) else 0.0
        eval_total += eval_s
        curve.append({"epoch": int(r["epoch"]) + 1, "test_top1": float(r["eval_top1"]), "wall_s": round(t, 1),
                      "train_wall_s": round(t - eval_total, 1), "eval_s": round(eval_s, 1)})  # fmt: skip
    return {
        "top1": curve[-1]["test_top1"] if curve else None,
        "train_s": round(wall, 1),
        "epochs": epochs,
        "epochs_done": len(curve),
        "stopped_at_limit": stopped,
        "cores_used": round(cores, 2),
        "other_cores": round(others, 2),
        "busy": others > 0.3,
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
