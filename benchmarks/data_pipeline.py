"""How fast images reach training on this machine: loose files vs finegrain's shards, decode + augment, in one run.

The same training images, through the same training transform (finegrain's random-resized crop, flip, colour
jitter, at the backbone's 224 px) and the same DataLoader settings, from:
- ``files``: the dataset's own image files (map-style, shuffled by a sampler);
- ``shards``: a local shard folder (``finegrain data shard``; map-style, random access into the tars);
- ``stream``: the same shards streamed in order (``--data wds:...``);
- ``stream_pipe``: streamed through ``pipe:cat`` (the path a ``pipe:aws s3 cp ... -`` command takes).
Each is timed over ``--images`` images after one warm-up batch, ``--repeats`` times; the best pass is kept (other
work on the machine only slows a pass down). Speeds are also given as a ratio to ``files``.

    python benchmarks/data_pipeline.py --images 1024 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from finegrain.data import ImageDataset, load_dataset
from finegrain.data.shards import write_shards
from finegrain.data.stream import StreamDataset, open_stream
from finegrain.data.transforms import Preprocess, train_transform

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def images_per_second(loader: DataLoader, images: int, batch_size: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: workers started, first files opened
    start, seen = time.perf_counter(), 0
    for x, _ in it:
        seen += len(x)
        if seen >= images - batch_size:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATASETS["cub100"]))
    p.add_argument("--images", type=int, default=1024, help="images timed per pass (1024)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=256, help="images per shard (256)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work-dir")
    p.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fg-pipeline-"))
    index = load_dataset(args.data, seed=0)
    start = time.perf_counter()
    info = write_shards(index, work / "shards", args.shard_size)
    shard_s = time.perf_counter() - start
    transform = train_transform(Preprocess())
    train_urls = [str(work / "shards" / n) for n in info["splits"]["train"]["filenames"]]
    stream = open_stream("wds:" + "::".join(train_urls))
    piped = open_stream("wds:" + "::".join(f"pipe:cat {u}" for u in train_urls))
    steps = args.images // args.batch_size + 2

    def listed(samples) -> DataLoader:
        return DataLoader(ImageDataset(samples, transform), batch_size=args.batch_size, shuffle=True,
                          num_workers=args.workers)  # fmt: skip

    def streamed(s) -> DataLoader:
        ds = StreamDataset(s, "train", ImageDataset([], transform).load, steps=steps, batch_size=args.batch_size)
        return DataLoader(ds, batch_size=args.batch_size, num_workers=ds.workers(args.workers))

    sources = {
        "files": lambda: listed(index.split("train")),
        "shards": lambda: listed(load_dataset(work / "shards").split("train")),
        "stream": lambda: streamed(stream),
        "stream_pipe": lambda: streamed(piped),
    }
    rows = {}
    for name, make in sources.items():
        rates = [images_per_second(make(), args.images, args.batch_size) for _ in range(args.repeats)]
        rows[name] = {"images_per_s": max(rates), "passes": rates}
    for row in rows.values():
        row["vs_files"] = row["images_per_s"] / rows["files"]["images_per_s"]
    print(f"{'source':14s}{'images/s':>10s}{'vs files':>10s}")
    for name, row in rows.items():
        print(f"{name:14s}{row['images_per_s']:10.1f}{row['vs_files']:10.2f}")
    print(f"sharding {len(index.samples)} images took {shard_s:.1f}s")
    write_json(args.out, {"data": args.data, "images": args.images, "batch_size": args.batch_size,
                          "workers": args.workers, "shard_size": args.shard_size, "shard_seconds": shard_s,
                          "sources": rows, "command": " ".join(sys.argv)})  # fmt: skip


if __name__ == "__main__":
    main()
