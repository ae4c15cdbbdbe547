"""WebDataset shards: ``finegrain data shard`` writes them, ``--data SHARD_FOLDER`` reads them.

A shard folder holds ``_info.json`` and one series of tar shards per split (``train-000000.tar``, ...). In a shard,
each image is a WebDataset sample (members sharing a key): ``KEY.jpg`` (or the stored image's own extension; the
bytes as stored, never re-encoded), ``KEY.cls`` (the class index, the member timm's WebDataset reader expects) and
``KEY.json`` (class name, split, the source's id and path, box and part keypoints). Every shard begins with a
``__finegrain__.json`` member: the class list, part names and split sizes, so a shard read alone still describes its
dataset. The split is made when sharding (``--val-fraction``, ``--test-fraction``, ``--seed``, as ``train`` would
make it), so a run on the shards and a run on the source with the same seed train and test on the same images.

A local shard folder is read with random access (the byte offset of each member, from the tar headers), so every
map-style path (samplers, the feature cache, evaluation, reports) works unchanged on it.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

from finegrain.atomic import write_text
from finegrain.data.loading import IMAGE_SUFFIXES
from finegrain.data.records import SPLITS, DatasetIndex, Sample
from finegrain.errors import DataError
from finegrain.extras import need
from finegrain.progress import progress_bar

FORMAT = "finegrain-shards/1"
INFO = "_info.json"  # what makes a folder a shard folder
META_KEY = "__finegrain__"


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _sample_meta(index: DatasetIndex, s: Sample) -> dict:
    meta = {"class": index.classes[s.label], "split": s.split, "id": s.image_id, "source": index.relpath(s)}
    if s.bbox is not None:
        meta["bbox"] = list(s.bbox)
    if s.parts is not None:
        meta["parts"] = [list(p) for p in s.parts]
    return meta


def write_shards(index: DatasetIndex, out: str | Path, shard_size: int = 1000, progress: bool = True) -> dict:
    """Write ``index`` as shards of at most ``shard_size`` images per split under ``out``; returns the info."""
    need("shards", "writing tar shards")
    import webdataset as wds

    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    if (out / INFO).exists():
        raise DataError(f"'{out}' already holds shards ({INFO}): choose an empty folder, or delete it first")
    out.mkdir(parents=True, exist_ok=True)
    by_split = {sp: index.split(sp) for sp in SPLITS if index.split(sp)}
    splits = {
        sp: {"name": sp, "num_samples": len(v), "filenames": [], "shard_lengths": []} for sp, v in by_split.items()
    }
    header = {"format": FORMAT, "classes": index.classes, "part_names": index.part_names,
              "splits": {sp: len(v) for sp, v in by_split.items()}}  # fmt: skip
    bar = progress_bar(total=len(index.samples), desc="sharding", unit="img", disable=not progress)
    for sp, samples in by_split.items():
        for i, start in enumerate(range(0, len(samples), shard_size)):
            chunk, name = samples[start : start + shard_size], shard_name(sp, i)
            partial = out / (name + ".partial")  # renamed once complete: a killed run leaves no shard that looks whole
            with wds.TarWriter(str(partial)) as sink:
                sink.write({"__key__": META_KEY, "json": json.dumps({**header, "shard": name}).encode()})
                for j, s in enumerate(chunk):
                    ext = s.path.suffix.lower().lstrip(".") if s.member is None else s.member[0].rsplit(".", 1)[-1]
                    sink.write({"__key__": f"{sp}{start + j:08d}", ext: s.read_bytes(), "cls": str(s.label).encode(),
                                "json": json.dumps(_sample_meta(index, s)).encode()})  # fmt: skip
                    bar.update()
            partial.rename(out / name)
            splits[sp]["filenames"].append(name)
            splits[sp]["shard_lengths"].append(len(chunk))
    bar.close()
    info = {"format": FORMAT, "name": str(index.root), "classes": index.classes, "part_names": index.part_names,
            "splits": splits}  # fmt: skip
    write_text(out / INFO, json.dumps(info, indent=2))
    return info


def read_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / INFO).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{folder / INFO}' ({e}): write the shards with `finegrain data shard`") from e
    if info.get("format") != FORMAT:
        raise DataError(f"'{folder / INFO}' is not a finegrain shard index (format {info.get('format')!r}, expected "
                        f"{FORMAT!r}): write the shards with `finegrain data shard`")  # fmt: skip
    if not info.get("classes"):
        raise DataError(f"'{folder / INFO}' has no class list: the shards cannot be trained on. Write them again "
                        "with `finegrain data shard`")  # fmt: skip
    return info


def _members(shard: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> {extension: header} for the members of ``shard`` (headers only: the data is skipped)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    groups[key][ext] = m
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard '{shard}' cannot be read ({type(e).__name__}: {e}); it may be truncated: write "
                        "the shards again with `finegrain data shard`") from e  # fmt: skip
    return groups


def read_shards(folder: Path) -> DatasetIndex:
    """The samples of a local shard folder, each pointing at its image member (random access)."""
    info = read_info(folder)
    classes, part_names = info["classes"], info.get("part_names")
    class_index = {c: i for i, c in enumerate(classes)}
    samples = []
    for sp, spec in info["splits"].items():
        for name, expected in zip(spec["filenames"], spec["shard_lengths"], strict=True):
            shard = folder / name
            if not shard.is_file():
                raise DataError(f"shard '{shard}' listed in {INFO} does not exist: copy it back or shard again")
            groups = _members(shard)
            groups.pop(META_KEY, None)
            if len(groups) != expected:
                raise DataError(f"shard '{shard}' holds {len(groups)} images, {INFO} says {expected}: it is "
                                "incomplete (a copy cut short?). Copy it again or shard again")  # fmt: skip
            with shard.open("rb") as f:
                for key, members in groups.items():
                    samples.append(_sample(shard, f, key, members, sp, class_index))
    return DatasetIndex(folder, "shards", classes, samples, part_names=part_names,
                        notes=["the split is the one made when sharding"])  # fmt: skip


def image_extension(where: str | Path, key: str, names: list[str]) -> str:
    """The image member's extension among a sample's member ``names``; anything but one image and a .json is
    refused, naming the shard and the sample."""
    images = [ext for ext in names if "." + ext.lower() in IMAGE_SUFFIXES]
    if len(images) != 1 or "json" not in names:
        raise DataError(f"shard '{where}', sample '{key}': expected one image and a .json member, found "
                        f"{sorted(n for n in names if not n.startswith('__'))}: write the shards with "
                        "`finegrain data shard`")  # fmt: skip
    return images[0]


def sample_from_meta(where: str | Path, key: str, meta: bytes, split: str, class_index: dict[str, int],
                     member: tuple[str, int, int], data: bytes | None = None) -> Sample:  # fmt: skip
    """The :class:`Sample` a shard's ``KEY.json`` describes (its image at ``member``, or in ``data``)."""
    info = json.loads(meta)
    if info.get("class") not in class_index:
        raise DataError(f"shard '{where}', sample '{key}': class {info.get('class')!r} is not in the class list")
    parts = tuple(tuple(p) for p in info["parts"]) if info.get("parts") else None
    bbox = tuple(info["bbox"]) if info.get("bbox") else None
    return Sample(Path(where), class_index[info["class"]], split, info.get("id"), bbox, parts, member, data)


def _sample(shard: Path, f, key: str, members: dict[str, tarfile.TarInfo], split: str,
            class_index: dict[str, int]) -> Sample:  # fmt: skip
    img = members[image_extension(shard, key, list(members))]
    m = members["json"]
    f.seek(m.offset_data)
    return sample_from_meta(shard, key, f.read(m.size), split, class_index, (img.name, img.offset_data, img.size))
