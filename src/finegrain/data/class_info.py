"""Class side-information: what a practitioner knows about each class besides its photos.

A ``class_info`` folder (inside the dataset folder, or given with ``--class-info DIR``) holds, per class, any of:

- ``CLASS.txt``: a description ("a small finch with a conical pink bill and rusty wing bars");
- ``CLASS.jpg`` / ``.png`` / ``.jpeg`` / ``.webp``: a reference (catalogue, field-guide) image;
- ``classes.csv``: one row per class, column ``class`` then ``description`` and/or numeric attribute columns
  (e.g. CUB's 312 class-level attributes, 0-100).

Class names match the dataset's exactly, or after :func:`class_key` (case, ``_``/``-``/spaces and a numeric prefix
such as CUB's ``001.`` ignored). Info naming a class the data does not have describes a *new* class: the
zero-shot classes of ``finegrain predict --class-info``. Every problem is a :class:`DataError` naming the file.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.data.datasets import INFO_DIR, read_text
from finegrain.data.loading import IMAGE_SUFFIXES
from finegrain.errors import DataError

TABLE = "classes.csv"


def class_key(name: str) -> str:
    """The name a class is matched by: ``001.Black_footed_Albatross`` and ``black footed albatross`` agree."""
    return re.sub(r"[\s_\-]+", " ", re.sub(r"^\d+[.\s_-]+", "", name.strip())).strip().lower()


@dataclass
class ClassInfo:
    """Per class (by its name in the info): a description, a reference image, an attribute vector."""

    root: Path
    descriptions: dict[str, str] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    attributes: dict[str, list[float]] = field(default_factory=dict)
    attribute_names: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted(set(self.descriptions) | set(self.images) | set(self.attributes))

    def match(self, classes: list[str]) -> dict[str, str]:
        """dataset class -> the info's name for it, for the classes the info describes."""
        by_key: dict[str, str] = {}
        for name in self.names():
            other = by_key.setdefault(class_key(name), name)
            if other != name:
                raise DataError(f"{self.root}: '{other}' and '{name}' name the same class; keep one")
        return {c: by_key[class_key(c)] for c in classes if class_key(c) in by_key}

    def new_classes(self, classes: list[str]) -> list[str]:
        """The info's classes the dataset does not have (known only by their info: zero-shot classes)."""
        known = {class_key(c) for c in classes}
        return [n for n in self.names() if class_key(n) not in known]

    def coverage(self, classes: list[str]) -> dict:
        """What ``data check`` reports: which classes have which kind of info, which have none, which info names
        no class of the data."""
        matched = self.match(classes)
        kinds = {"description": self.descriptions, "reference_image": self.images, "attributes": self.attributes}
        return {
            "root": str(self.root),
            "classes_with": {k: sum(matched.get(c) in table for c in classes) for k, table in kinds.items()},
            "num_attributes": len(self.attribute_names),
            "missing": [c for c in classes if c not in matched],
            "new_classes": self.new_classes(classes),
        }


def find_class_info(data: str | Path, explicit: str | Path | None = None) -> Path | None:
    """``explicit`` (which must exist), else the dataset's own ``class_info`` folder when it has one."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataError(f"--class-info '{path}' is not a folder: give a folder of CLASS.txt / CLASS.jpg files "
                            f"and/or a {TABLE}")  # fmt: skip
        return path
    root = Path(data).expanduser()
    root = root if root.is_dir() else root.parent
    return root / INFO_DIR if (root / INFO_DIR).is_dir() else None


def load_class_info(path: str | Path) -> ClassInfo:
    """Read a ``class_info`` folder (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"class info '{root}' is not a folder")
    info = ClassInfo(root)
    for file in sorted(root.iterdir()):
        if file.name.startswith(".") or not file.is_file() or file.name == TABLE:
            continue
        if file.suffix.lower() == ".txt":
            text = read_text(file).strip()
            if not text:
                raise DataError(f"{file} is empty: write the class's description in it, or remove it")
            info.descriptions[file.stem] = " ".join(text.split())
        elif file.suffix.lower() in IMAGE_SUFFIXES:
            if file.stem in info.images:
                raise DataError(f"{root}: two reference images for class '{file.stem}'; keep one")
            info.images[file.stem] = file
    if (root / TABLE).is_file():
        _read_table(root / TABLE, info)
    if not info.names():
        raise DataError(f"class info '{root}' has no CLASS.txt, CLASS.jpg or {TABLE}: nothing describes a class")
    return info


def _read_table(path: Path, info: ClassInfo) -> None:
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    if not rows or not rows[0] or rows[0][0].strip().lower() != "class":
        raise DataError(f"{path}: the first row must be a header starting with 'class' (then 'description' "
                        "and/or attribute columns)")  # fmt: skip
    header = [h.strip() for h in rows[0]]
    text_col = header.index("description") if "description" in header else None
    attr_cols = [i for i in range(1, len(header)) if i != text_col]
    info.attribute_names = [header[i] for i in attr_cols]
    for lineno, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}: {len(row)} columns, the header has {len(header)}")
        name = row[0].strip()
        if name in info.attributes or (text_col is not None and name in info.descriptions and not attr_cols):
            raise DataError(f"{path}:{lineno}: class '{name}' is listed twice; keep one row")
        if text_col is not None and row[text_col].strip():
            if name in info.descriptions:
                raise DataError(f"{path}:{lineno}: class '{name}' has a description here and in {name}.txt; "
                                "keep one")  # fmt: skip
            info.descriptions[name] = " ".join(row[text_col].split())
        if attr_cols:
            values = []
            for i in attr_cols:
                try:
                    v = float(row[i])
                except ValueError:
                    v = math.nan
                if not math.isfinite(v):
                    raise DataError(f"{path}:{lineno}: attribute '{header[i]}' of class '{name}' is {row[i]!r}, "
                                    "not a number")  # fmt: skip
                values.append(v)
            info.attributes[name] = values
