"""The mirror-pair detector: classes that are mirror images of each other are found; ordinary classes are not."""

from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from finegrain.data.transforms import eval_transform
from finegrain.engine.mirror import candidate_pairs, mirror_pairs, pairs_from_answers
from finegrain.models import create_model

from .conftest import synthetic_image


def stripes(label: int, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Dark diagonal stripes on noise: rising to the right (class 0) or, its mirror image, to the left (class 1)."""
    img = Image.fromarray(rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(v) for v in rng.integers(0, 60, size=3))
    gap = int(rng.integers(8, 14))
    for x in range(-size + int(rng.integers(0, gap)), 2 * size, gap):
        draw.line([(x, 0), (x + size, size)] if label == 0 else [(x + size, 0), (x, size)], fill=colour, width=3)
    return img


def features(images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen ImageNet lite0 features at 96 px of the images and of their mirror images."""
    model = create_model("baseline", num_classes=2).eval()
    tf = eval_transform(replace(model.preprocess, input_size=96))
    x = torch.stack([tf(img) for img in images])
    with torch.inference_mode():
        return model.backbone_features(x), model.backbone_features(x.flip(-1))


def test_mirror_image_classes_are_found_and_ordinary_ones_are_not():
    rng = np.random.default_rng(0)
    labels = [c for c in range(4) for _ in range(20)]
    # classes 0 and 1 are mirror images of each other; 2 (yellow disc) and 3 (red square) look the same mirrored
    images = [stripes(c, rng) if c < 2 else synthetic_image(c + 1, rng, 96) for c in labels]
    plain, mirrored = features(images)
    pairs = mirror_pairs(plain, mirrored, torch.tensor(labels), 4)
    assert [p["classes"] for p in pairs] == [(0, 1)], pairs
    assert min(pairs[0]["share"]) >= 0.5


def test_classes_that_survive_mirroring_give_no_pair():
    rng = np.random.default_rng(1)
    labels = [c for c in range(4) for _ in range(20)]
    plain, mirrored = features([synthetic_image(c, rng, 96) for c in labels])
    assert mirror_pairs(plain, mirrored, torch.tensor(labels), 4) == []


def test_candidates_below_the_share_are_kept_as_evidence_not_pairs():
    """mirror.json lists the strongest candidate pairs even when none is a pair, so a miss can be read off it."""
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    as_mirror = labels.clone()
    as_mirror[:2], as_mirror[10:12] = 1, 0  # 4 of 20 go across: 0.2 pooled, below MIN_SHARE
    candidates = candidate_pairs(labels, as_mirror, labels, 3)
    assert [(c["classes"], c["share"], c["pooled"]) for c in candidates] == [((0, 1), (0.2, 0.2), 0.2)]
    assert pairs_from_answers(labels, as_mirror, labels, 3) == []
    as_mirror[12:14] = 0  # 6 of 20: 0.3, a pair
    assert [p["classes"] for p in pairs_from_answers(labels, as_mirror, labels, 3)] == [(0, 1)]
