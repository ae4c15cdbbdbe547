"""Speed beside a busy neighbour: each training workload alone and with one competing busy process, per thread policy.

Workloads (each in a fresh child process, so that OpenMP's settings apply from its start, for ``--seconds``):
- ``probe``: the default head, scikit-learn's logistic regression on cached features (cub100's shape: 2,610 x
  1,280, 100 classes), three penalties as finegrain fits them;
- ``sgd_head``: a linear head trained by AdamW on cached features, batch 32 (``--head sgd``): tiny matmuls;
- ``extract``: frozen lite0 features of a batch of 32 images at 224 px (inference);
- ``finetune``: lite0 forward + backward + AdamW step, batch 16 at 224 px.

Competitors: ``torch`` (another PyTorch job: matmuls with PyTorch's default threads, i.e. every core) and ``spin``
(one single-threaded Python loop). Policies: ``default`` (PyTorch as installed), ``passive`` (OMP_WAIT_POLICY=PASSIVE:
threads sleep at the end of a parallel region instead of spinning), ``one`` (one intra-op thread), and
``finegrain`` (whatever finegrain.env.configure_threads chooses). Alone and busy run back to back per cell, and the
table gives busy / alone. Then, with ``--train DATA``, the default ``finegrain train`` on DATA alone and beside the
``torch`` competitor. Prints a table, writes JSON.

    python benchmarks/contention.py --train ../shared/data/flowers17 --out benchmarks/results/contention_<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _results import write_json

COMPETITORS = {
    "torch": "import torch\na = torch.randn(768, 768)\nwhile True:\n    a = (a @ a).tanh_()",
    "spin": "while True:\n    pass",
}
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "one": {"OMP_NUM_THREADS": "1"},
            "finegrain": {"FG_CONFIGURE": "1"}}  # fmt: skip


def child(workload: str, seconds: float) -> None:
    """Run ``workload`` for ``seconds`` and print its rate (items per second) as JSON."""
    import torch

    if os.environ.get("FG_CONFIGURE"):
        from finegrain.env import configure_threads

        configure_threads()
    torch.manual_seed(0)
    if workload == "probe":
        from finegrain.engine.probe import fit_probe

        centres = torch.randn(100, 1280)
        y = torch.arange(2610) % 100
        x = centres[y] + 3 * torch.randn(2610, 1280)
        step = lambda: fit_probe(x, y, x[:300], y[:300], 100, grid=(1.0, 10.0, 100.0))  # noqa: E731
        per_step = len(x)
    elif workload == "sgd_head":
        head = torch.nn.Linear(1280, 100)
        opt = torch.optim.AdamW(head.parameters())
        x, y = torch.randn(32, 1280), torch.randint(0, 100, (32,))

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x), y).backward()
            opt.step()

        per_step = 32
    else:
        from finegrain.models import create_model

        model = create_model("baseline", backbone="tf_efficientnet_lite0", num_classes=100, pretrained=False)
        model = model.to(memory_format=torch.channels_last)
        batch = 32 if workload == "extract" else 16
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 100, (batch,))
        opt = torch.optim.AdamW(model.parameters())

        def step():
            if workload == "extract":
                with torch.inference_mode():
                    model.eval()(x)
                return
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model.train()(x), y).backward()
            opt.step()

        per_step = batch
    step()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += per_step
    print(json.dumps({"rate": done / (time.perf_counter() - start), "threads": torch.get_num_threads()}))


def run_child(workload: str, policy: str, seconds: float) -> dict:
    env = {**os.environ, **POLICIES[policy]}
    cmd = [sys.executable, __file__, "--child", workload, "--seconds", str(seconds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class Competitor:
    """A busy neighbour process, started and stopped around a measurement."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", COMPETITORS[self.kind]])
        time.sleep(2)  # let it reach its loop
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def train_wall(data: str, competitor: str | None) -> float:
    with tempfile.TemporaryDirectory(prefix="fg-contention-") as tmp:
        cmd = [sys.executable, "-m", "finegrain", "train", "--data", data, "--run-dir", f"{tmp}/run",
               "--cache-dir", f"{tmp}/cache", "-q"]  # fmt: skip
        start = time.perf_counter()
        if competitor:
            with Competitor(competitor):
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
        else:
            subprocess.run(cmd, check=True)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    p.add_argument("--workloads", nargs="+", default=["probe", "sgd_head", "extract", "finetune"])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--competitors", nargs="+", default=["torch", "spin"], choices=list(COMPETITORS))
    p.add_argument("--train", help="also time the default `finegrain train` on this data, alone and beside torch")
    p.add_argument("--out", default="benchmarks/results/contention.json")
    args = p.parse_args()
    if args.child:
        child(args.child, args.seconds)
        return

    rows = []
    for workload in args.workloads:
        for policy in args.policies:
            for competitor in args.competitors:
                alone = run_child(workload, policy, args.seconds)
                with Competitor(competitor):
                    busy = run_child(workload, policy, args.seconds)
                row = {"workload": workload, "policy": policy, "competitor": competitor, "threads": alone["threads"],
                       "alone": alone["rate"], "busy": busy["rate"], "ratio": busy["rate"] / alone["rate"]}  # fmt: skip
                rows.append(row)
                print(f"{workload:9s} {policy:9s} {competitor:6s} threads {row['threads']}  alone {row['alone']:9.1f}"
                      f"  busy {row['busy']:9.1f}  busy/alone {row['ratio']:.2f}", flush=True)  # fmt: skip
    train = {}
    if args.train:
        alone = train_wall(args.train, None)
        busy = train_wall(args.train, "torch")
        train = {"data": args.train, "alone_s": alone, "busy_s": busy, "ratio": busy / alone}
        print(f"finegrain train (default) on {args.train}: alone {alone:.0f} s, busy {busy:.0f} s, x{busy / alone:.2f}")
    write_json(args.out, {"meta": {"date": time.strftime("%Y-%m-%d"), "seconds": args.seconds,
                                   "competitors": COMPETITORS}, "rows": rows, "train": train})  # fmt: skip


if __name__ == "__main__":
    main()
