"""Would a judge that fine-tunes see what the unlabelled images give? The semi setting of ``labels.py`` (30% of
each class's labels, the rest unlabelled), judged the way ``--unlabeled``'s probe judge is, but with the maps
command itself: per fold of a stratified k-fold split of the labelled images, ``finegrain train`` on the other folds
(labels only) and the same with ``--unlabeled REST --pseudo-fraction F`` (the probe teacher on those folds), each
scored on the held-out fold. Prints per seed the held-out images each answers right, the difference and its noise
(``NOISE_SD`` x sqrt(images the two answer differently), as the guard reads it), and writes JSON.

Why: the probe judge refused tomato's unlabelled images on all three seeds (within noise), while fine-tuning on
them unguarded gained 2-12 pt test top-1 (docs/labels.md). A probe refitted with its own pseudo-labels barely
moves; the fine-tuned network is what learns from them. This measures whether held-out labelled images, judged by
the fine-tuned networks, see that gain beyond noise, before the judge becomes product code. Each fold costs two
maps runs, so only small labelled sets (tomato: 180 images) are cheap enough.

    python benchmarks/finetune_judge.py --seeds 0 1 --work-dir ~/.cache/finegrain/labels-maps \
        --out benchmarks/results/labels_finetune_judge.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from sklearn.model_selection import StratifiedKFold

from finegrain.config import TrainConfig, default_cache_dir
from finegrain.engine.addons.unlabeled import NOISE_SD
from finegrain.engine.train import fit

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from labels import MAPS, few_labels, test_hits  # noqa: E402


def judge_seed(name: str, seed: int, args) -> dict:
    folder = Path(args.work_dir).expanduser() / "semi" / f"{name}{seed}"
    if not (folder / "few.csv").is_file():
        few_labels(name, seed, args.label_fraction, folder)
    rows = [r for r in csv.DictReader((folder / "few.csv").open()) if r["split"] == "train"]
    labels = [r["label"] for r in rows]
    work = folder / f"finetune_judge_{args.fraction:g}"
    work.mkdir(parents=True, exist_ok=True)
    hits: dict[str, list] = {"labels_only": [], "unlabeled": []}
    kfold = StratifiedKFold(args.folds, shuffle=True, random_state=0)
    for k, (fit_rows, held_rows) in enumerate(kfold.split(labels, labels)):
        manifest = work / f"fold{k}.csv"
        with manifest.open("w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["path", "label", "split"])
            out.writerows([rows[i]["path"], rows[i]["label"], "train"] for i in fit_rows)
            out.writerows([rows[i]["path"], rows[i]["label"], "test"] for i in held_rows)
        unlabeled = {"unlabeled": str(folder / "unlabelled.csv"), "pseudo_fraction": args.fraction}
        for setting, extra in (("labels_only", {}), ("unlabeled", unlabeled)):
            run_dir = work / f"{setting}{k}"
            done = run_dir / "held_out_hits.json"
            if not done.is_file():
                cfg = TrainConfig().replace(data=str(manifest), run_dir=str(run_dir), seed=seed,
                                            cache_dir=args.cache_dir, **MAPS, **extra)  # fmt: skip
                fit(cfg)
                done.write_text(json.dumps(test_hits(run_dir, args.cache_dir).tolist()))  # the held-out fold
            hits[setting].append(torch.tensor(json.loads(done.read_text())))
    base, semi = torch.cat(hits["labels_only"]), torch.cat(hits["unlabeled"])
    row = {"held_out_images": len(base), "labels_only_right": int(base.sum()), "unlabeled_right": int(semi.sum()),
           "gain_images": int(semi.sum() - base.sum()),
           "noise_images": round(NOISE_SD * float((semi != base).sum()) ** 0.5, 1)}  # fmt: skip
    row["beyond_noise"] = row["gain_images"] > row["noise_images"]
    print(f"{name} seed {seed}: {row}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["plantvillage_tomato"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.5, help="--pseudo-fraction of the judged runs (0.5)")
    p.add_argument("--label-fraction", type=float, default=0.3)
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--work-dir", default="~/.cache/finegrain/labels-maps")
    p.add_argument("--out", default="benchmarks/results/labels_finetune_judge.json")
    args = p.parse_args()
    results = {name: {"folds": args.folds, "fraction": args.fraction, "label_fraction": args.label_fraction,
                      "seeds": {seed: judge_seed(name, seed, args) for seed in args.seeds}}
               for name in args.datasets}  # fmt: skip
    print(f"{'dataset':<22}{'seed':>5}{'held out':>10}{'labels only':>13}{'unlabeled':>11}{'gain':>6}{'noise':>7}")
    for name, r in results.items():
        for seed, row in r["seeds"].items():
            print(f"{name:<22}{seed:>5}{row['held_out_images']:>10}{row['labels_only_right']:>13}"
                  f"{row['unlabeled_right']:>11}{row['gain_images']:>+6}{row['noise_images']:>7}")  # fmt: skip
    write_json(args.out, {"finetune_judge": results})


if __name__ == "__main__":
    main()
