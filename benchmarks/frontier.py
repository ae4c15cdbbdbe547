"""Accuracy against wall-clock minutes, per domain: finegrain's default and budgets beside the peer's whole schedule.

For each of the four domains, on one machine:
- ``default``: ``finegrain train`` with no options (seeds 0 and 1), then ``finegrain evaluate`` (test split);
- ``budget``: ``finegrain train --budget N`` for N in ``--budgets`` (seed 0 unless ``--budget-seeds``);
- ``peer``: ``../shared/peers/timm_train.py`` fine-tuning ImageNet lite0 with its own options (AdamW lr 1e-3, one
  warm-up epoch, batch 32, 224 px, cosine) for as many epochs as fit ``--peer-minutes`` on this machine (stopped at
  that limit if it runs long), every epoch's test top-1 read against its cumulative time.

finegrain runs as a user runs it: the CLI in a subprocess, a cold feature cache inside the run folder, its wall time
from start to exit (evaluation on the test split not counted). The peer's minutes leave out its own per-epoch test
evaluation (which finegrain's runs do not pay either), so its curve is the more favourable reading for the peer.

Each run is one JSON piece under ``benchmarks/results/frontier/<cpu>/<dataset>/<part>.json``, written when the run
ends and skipped when present, so the benchmark resumes run by run; ``--summarize`` merges one CPU's pieces into
``benchmarks/results/frontier.json`` (seed means; the shape the accuracy issue names) and draws
``benchmarks/results/frontier_<dataset>.png``. When the default changes, its pieces are renamed
``default-LABEL_seedN.json`` (e.g. ``default-wholeft``: the head, then whole-network fine-tuning) and summarised as
``earlier_defaults.LABEL``. A tried option on a budget runs as its own pieces, ``--variant LABEL --options "..."``
(``budgetN-LABEL_seedS.json``), which the summary leaves out, as it leaves out a peer run for a fixed number of
epochs instead of its probe's plan (``--peer-epochs N``, ``peer-eN_seedS.json``). A piece records the cores its run
used and the cores everything else on the machine used meanwhile (``/proc/stat``): above 0.3 of a core the run is
marked ``busy`` (its minutes are inflated).

    python benchmarks/frontier.py --parts peer --seeds 0          # 4 x 30 min
    python benchmarks/frontier.py --parts default budget --seeds 0 1
    python benchmarks/frontier.py --parts budget --budgets 30 --datasets flowers17 --seeds 0 \\
        --variant input288 --options "--input-size 288"               # a tried option, its own pieces
    python benchmarks/frontier.py --summarize
    python benchmarks/frontier.py --summarize --cpu intel_r_xeon_r_processor_family_6_model_167 --name frontier_xeon
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import (  # noqa: E402
    DATASETS,
    build_tree,
    lite0_timm_weights,
    machine_cpu_s,
    other_load,
    run_peer,
    train_throughput,
)

from finegrain.env import cpu_family_model, cpu_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EVAL_SPEEDUP = 3.0  # the peer's test pass runs forward only: about 3x its training images/s (measured on cub100)


def cpu_slug() -> str:
    """The pieces' folder: model name plus family/model (a VM's bare "Intel(R) Xeon(R) Processor" names several
    generations), so a later session on another CPU starts its own frontier instead of mixing machines."""
    name = f"{cpu_model()} {cpu_family_model() or ''}"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown_cpu"


def piece_path(dataset: str, part: str) -> Path:
    return RESULTS / "frontier" / cpu_slug() / dataset / f"{part}.json"


def save_piece(dataset: str, part: str, row: dict) -> None:
    row.update({"cpu": f"{cpu_model()}, {cpu_family_model()}", "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_json(piece_path(dataset, part), row)


def finegrain_cli(data: Path, run_dir: Path, seed: int, *options: str) -> dict:
    """``finegrain train`` then ``finegrain evaluate`` in subprocesses; train's wall minutes and the test top-1."""
    finegrain = str(Path(sys.executable).with_name("finegrain"))
    cmd = [finegrain, "train", "--data", str(data), "--run-dir", str(run_dir), "--seed", str(seed),
           "--cache-dir", str(run_dir / "cache"), *options]  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)  # a piece run again (a renamed default) starts cold, as the first did
    run_dir.mkdir(parents=True)
    cpu0, machine0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu_s()
    start = time.perf_counter()
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    cores, others = other_load(machine0, cpu0, wall)
    subprocess.run([finegrain, "evaluate", str(run_dir)], stdout=subprocess.DEVNULL, check=True)
    ev = json.loads((run_dir / "eval_test.json").read_text())
    recipe = run_dir / "recipe.json"
    return {"top1": 100 * ev["top1"], "mean_class": 100 * ev["mean_class_acc"], "minutes": round(wall / 60, 2),
            "cores_used": round(cores, 2), "other_cores": round(others, 2), "busy": others > 0.3,
            "command": " ".join(["finegrain", *cmd[1:]]),
            "recipe": json.loads(recipe.read_text()) if recipe.is_file() else None}  # fmt: skip


def peer_piece(name: str, work: Path, seed: int, minutes: float, img_s: float, epochs: int | None = None) -> dict:
    """The peer's run, for ``epochs`` if given, else as many as the probe's ``img_s`` fits in ``minutes``."""
    _, _, n_train = build_tree(name, work, seed)
    n_test = sum(1 for _ in (work / name / "data" / "validation").rglob("*") if _.is_file() or _.is_symlink())
    epoch_s = n_train / img_s + n_test / (EVAL_SPEEDUP * img_s)
    epochs = epochs or max(1, int(minutes * 60 // epoch_s))
    print(f"peer {name} seed {seed}: {n_train} training images, {epochs} epoch(s) planned in {minutes} min")
    r = run_peer(name, work, epochs, seed, lite0_timm_weights(work), limit_s=minutes * 60 + 60)
    r["curve"] = [{**p, "minutes": round(p["train_wall_s"] / 60, 2)} for p in r["curve"]]
    inside = [p for p in r["curve"] if p["minutes"] <= minutes]
    best = max(inside or r["curve"][:1], key=lambda p: p["test_top1"])
    return {**r, "train_img_s_probe": round(img_s, 2), "planned_minutes": minutes,
            "best_top1": best["test_top1"], "best_minutes": best["minutes"]}  # fmt: skip


def peer_part(epochs: int | None, seed: int) -> str:
    """The peer piece's name: its probe's plan, or a fixed number of epochs (left out of the summary)."""
    return f"peer-e{epochs}_seed{seed}" if epochs else f"peer_seed{seed}"


def run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    img_s = None
    for seed in args.seeds:  # seed-major: every dataset gets a first seed before any gets a second
        for name in args.datasets:
            data = DATASETS[name]
            todo = []
            if "peer" in args.parts:
                todo.append(("peer", peer_part(args.peer_epochs, seed)))
            if "default" in args.parts:
                todo.append(("default", f"default_seed{seed}"))
            if "budget" in args.parts and seed in args.budget_seeds:
                tag = f"-{args.variant}" if args.variant else ""
                todo += [(f"budget{b:g}", f"budget{b:g}{tag}_seed{seed}") for b in args.budgets]
            for kind, part in todo:
                if piece_path(name, part).is_file():
                    print(f"{name} {part}: done before, skipped")
                    continue
                print(f"{name} {part}: running ({time.strftime('%H:%M:%S')})", flush=True)
                if kind == "peer":
                    img_s = img_s or train_throughput()
                    row = peer_piece(name, work / part, seed, args.peer_minutes, img_s, args.peer_epochs)
                else:
                    run_dir = work / name / part
                    options = ["--budget", kind.removeprefix("budget"), *shlex.split(args.options)]
                    opts = [] if kind == "default" else options
                    row = finegrain_cli(data, run_dir, seed, *opts)
                save_piece(name, part, {"seed": seed, **row})


def mean_point(rows: list[dict]) -> dict:
    return {"top1": round(statistics.mean(r["top1"] for r in rows), 2),
            "top1_sd": round(statistics.stdev(r["top1"] for r in rows), 2) if len(rows) > 1 else None,
            "minutes": round(statistics.mean(r["minutes"] for r in rows), 2), "n_seeds": len(rows),
            "busy": any(r["busy"] for r in rows)}  # fmt: skip


def mean_curve(curves: list[list[dict]]) -> list[list[float]]:
    """Seed means epoch by epoch (epochs all seeds reached)."""
    n = min(len(c) for c in curves)
    return [[round(statistics.mean(c[i]["minutes"] for c in curves), 2),
             round(statistics.mean(c[i]["test_top1"] for c in curves), 2)] for i in range(n)]  # fmt: skip


def summarize(args: argparse.Namespace) -> None:
    root = RESULTS / "frontier" / (args.cpu or cpu_slug())
    out: dict = {"cpu_pieces": root.name, "seeds": sorted(set(args.seeds)), "datasets": {}}
    for name in DATASETS:
        pieces = {p.stem: json.loads(p.read_text()) for p in sorted((root / name).glob("*.json"))}
        if not pieces:
            continue
        d: dict = {}
        defaults = [v for k, v in pieces.items() if k.startswith("default_seed")]
        if defaults:
            d["default"] = mean_point(defaults)
        earlier: dict = {}  # default-LABEL_seedN: an earlier default, kept as a row when the default changed
        for k, v in pieces.items():
            if re.match(r"default-.+_seed\d+$", k):
                earlier.setdefault(k.rsplit("_seed", 1)[0].removeprefix("default-"), []).append(v)
        if earlier:
            d["earlier_defaults"] = {label: mean_point(rows) for label, rows in earlier.items()}
        budgets: dict = {}
        for b in args.budgets:
            rows = [v for k, v in pieces.items() if k.startswith(f"budget{b:g}_seed")]
            if rows:
                budgets[f"{b:g}"] = mean_point(rows)
        d["budget"] = budgets
        peers = [v for k, v in pieces.items() if k.startswith("peer_seed")]
        if peers:
            d["peer"] = {"best_top1": round(statistics.mean(p["best_top1"] for p in peers), 2),
                         "best_minutes": round(statistics.mean(p["best_minutes"] for p in peers), 2),
                         "curve": mean_curve([p["curve"] for p in peers]), "n_seeds": len(peers),
                         "busy": any(p["busy"] for p in peers),
                         "epochs": [p["epochs_done"] for p in peers]}  # fmt: skip
        out["datasets"][name] = d
        out.setdefault("machine", next(iter(pieces.values()))["machine"])  # the pieces' CPU, not this one's
        draw(name, d, RESULTS / f"{args.name}_{name}.png")
    write_json(RESULTS / f"{args.name}.json", out)
    print(f"{'dataset':22s}{'default':>16s}" + "".join(f"{'budget ' + f'{b:g}':>16s}" for b in args.budgets)
          + f"{'peer best':>18s}")  # fmt: skip
    for name, d in out["datasets"].items():
        cell = lambda p: f"{p['top1']:6.2f} @{p['minutes']:5.1f}m" if p else f"{'-':>14s}"  # noqa: E731
        row = f"{name:22s}{cell(d.get('default')):>16s}"
        row += "".join(f"{cell(d['budget'].get(f'{b:g}')):>16s}" for b in args.budgets)
        pe = d.get("peer")
        row += f"{pe['best_top1']:8.2f} @{pe['best_minutes']:5.1f}m" if pe else f"{'-':>18s}"
        print(row)


def draw(name: str, d: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - plots only for --summarize

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    # left: the whole range (the peer starts near chance); right: the top, where the points differ
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fg = [("default", d["default"])] if "default" in d else []
    fg += [(f"--budget {b}", p) for b, p in d.get("budget", {}).items()]
    fg.sort(key=lambda lp: lp[1]["minutes"])
    earlier = list(d.get("earlier_defaults", {}).values())
    for ax, zoom in zip(axes, (False, True), strict=True):
        if "peer" in d:
            xs, ys = zip(*d["peer"]["curve"], strict=True)
            ax.plot(xs, ys, "o-", color="tab:gray", label="timm train.py (peer), per epoch")
            ax.axhline(d["peer"]["best_top1"], ls="--", lw=1, color="tab:gray", label="the peer's best (seed mean)")
        if fg:
            ax.plot([p["minutes"] for _, p in fg], [p["top1"] for _, p in fg], "s-", color="tab:blue",
                    label="finegrain: default and --budget N")  # fmt: skip
            for label, p in fg:  # the default above its point, budgets below (the default and --budget 10 meet)
                left = label != "default" and p["minutes"] < 8  # short budgets to the left of theirs
                offset = (4, 5) if label == "default" else (-4 if left else 4, -11)
                ax.annotate(label, (p["minutes"], p["top1"]), textcoords="offset points", fontsize=8,
                            ha="right" if left else "left", xytext=offset)  # fmt: skip
        if earlier:
            ax.plot([p["minutes"] for p in earlier], [p["top1"] for p in earlier], "s", mfc="none", color="tab:blue",
                    label="earlier defaults (docs/frontier.md)")  # fmt: skip
        if zoom:
            tops = [p["top1"] for _, p in fg] + ([d["peer"]["best_top1"]] if "peer" in d else [])
            ax.set_ylim(max(0.0, min(tops) - 4), min(100.5, max(tops) + 1.5))
        ax.set(xlabel="wall-clock minutes (2-core CPU)", ylabel="test top-1 (%)",
               title=f"{name}: the top" if zoom else name)  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--parts", nargs="+", default=["default", "budget", "peer"], choices=["default", "budget", "peer"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budgets", type=float, nargs="+", default=[5, 10, 30])
    p.add_argument("--budget-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variant", help="budget pieces only: a label for --options (pieces budgetN-VARIANT_seedS.json)")
    p.add_argument("--options", default="", help='with --variant: more train options, one argument: --options="--ema"')
    p.add_argument("--peer-minutes", type=float, default=30.0)
    p.add_argument("--peer-epochs", type=int, help="the peer's epochs, not its probe's plan (pieces peer-eN_seedS)")
    p.add_argument("--work", default=os.path.expanduser("~/.cache/finegrain/frontier"))
    p.add_argument("--summarize", action="store_true", help="merge the pieces into frontier.json and the pictures")
    p.add_argument("--cpu", help="with --summarize: the pieces folder of another CPU")
    p.add_argument(
        "--name",
        default="frontier",
        help="with --summarize: the results' name (NAME.json, NAME_<dataset>.png; another CPU's beside)",
    )
    args = p.parse_args()
    if bool(args.variant) != bool(args.options):
        p.error("--variant and --options go together: a tried option's pieces need their own name")
    summarize(args) if args.summarize else run(args)


if __name__ == "__main__":
    main()
