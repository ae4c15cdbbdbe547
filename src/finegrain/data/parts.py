"""Part boxes from keypoint annotations (CUB ``parts/part_locs.txt``), for the supervised ``parts`` method.

A part is a group of keypoints: its box is the tight box around the group's *visible* keypoints, widened on
every side by ``pad`` x the object's longer side (the annotated bounding box, else the image), so one visible
keypoint still gives a real box. A group with no visible keypoint is absent in that image (visible = False):
the localiser gets no box loss for it. The name ``bbox`` stands for the object's bounding box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from finegrain.data.records import Sample
from finegrain.errors import ConfigError, DataError

#: CUB-200-2011's 15 keypoints grouped into head and body
CUB_PART_GROUPS: dict[str, list[str]] = {
    "head": ["beak", "crown", "forehead", "left eye", "right eye", "nape", "throat"],
    "body": ["back", "breast", "belly", "left wing", "right wing", "tail"],
}


def check_part_groups(groups: Mapping[str, Sequence[str]], part_names: Sequence[str] | None, data: str) -> None:
    """Refuse, naming the fix, part groups the dataset cannot give."""
    if not part_names:
        raise DataError(
            f"'{data}' has no part keypoints (CUB layout: parts/parts.txt and parts/part_locs.txt), which the "
            "'parts' method learns from. Add them, or use 'wsdan', which finds parts without labels."
        )
    known = set(part_names) | {"bbox"}
    for group, names in groups.items():
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise ConfigError(
                f"part group '{group}' names unknown keypoint(s) {unknown or '(none given)'}; "
                f"this dataset's keypoints: {', '.join(part_names)} (and 'bbox' for the object box)"
            )


def part_boxes(
    sample: Sample,
    part_names: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    image_size: tuple[int, int],
    pad: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 4) boxes (x0, y0, x1, y1 in pixels, inside the image) and (P,) visibility, one per group."""
    width, height = image_size
    if sample.parts is None:
        raise DataError(f"'{sample.key}' has no part annotation in parts/part_locs.txt")
    if sample.bbox is not None:
        bx, by, bw, bh = sample.bbox
        obj = (bx, by, bx + bw, by + bh)
    else:
        obj = (0.0, 0.0, float(width), float(height))
    margin = pad * max(obj[2] - obj[0], obj[3] - obj[1])
    where = dict(zip(part_names, sample.parts, strict=True))
    boxes, visible = [], []
    for names in groups.values():
        xs, ys = [], []
        for name in names:
            if name == "bbox":
                if sample.bbox is not None:
                    xs += [obj[0], obj[2]]
                    ys += [obj[1], obj[3]]
            elif where[name][2]:
                xs.append(where[name][0])
                ys.append(where[name][1])
        if xs:
            box = [min(xs) - margin, min(ys) - margin, max(xs) + margin, max(ys) + margin]
            boxes.append([min(max(v, 0.0), float(lim)) for v, lim in zip(box, (width, height) * 2, strict=True)])
            visible.append(True)
        else:
            boxes.append([0.0, 0.0, float(width), float(height)])
            visible.append(False)
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(visible)
