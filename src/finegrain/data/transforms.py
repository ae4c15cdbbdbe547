"""Image preprocessing: one implementation shared by training, evaluation, prediction, export and serving.

torchvision's v2 transforms: called with an image and :class:`~torchvision.tv_tensors.BoundingBoxes`, they move
the boxes with the image (what part annotations need); with an image alone they act as the v1 ones did."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import functional as TF
from torchvision.transforms import v2 as T

INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input; stored in every checkpoint and exported file."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0  # resize to input_size / crop_pct, then centre-crop input_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def _to_tensor(pre: Preprocess) -> list:
    """PIL image -> normalised float tensor (and boxes kept inside the image)."""
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std), T.ClampBoundingBoxes()]


def eval_transform(pre: Preprocess) -> T.Compose:
    resize = int(round(pre.input_size / pre.crop_pct))
    return T.Compose(
        [
            T.Resize(resize, interpolation=INTERPOLATION[pre.interpolation]),
            T.CenterCrop(pre.input_size),
            *_to_tensor(pre),
        ]
    )


#: ``--auto-augment``'s policies by name (config.AUTO_AUGMENT lists the same names, for the command line)
AUTO_AUGMENT_POLICIES: dict[str, Callable[[], T.Transform]] = {
    "trivial": lambda: T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR),
    "rand": lambda: T.RandAugment(num_ops=2, magnitude=9, interpolation=T.InterpolationMode.BILINEAR),
}


class Mirrored:
    """``transform`` of the image's mirror image (a class, not a closure: loader workers pickle it)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img):
        return self.transform(TF.hflip(img))


def train_transform(
    pre: Preprocess,
    scale: tuple[float, float] = (0.35, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    erasing: float = 0.0,
    erasing_max_area: float = 0.25,
    erasing_fill: str = "random",
    auto_augment: str | None = None,
) -> T.Compose:
    """Random-resized crop (milder than ImageNet's 0.08: small parts must stay in view), flip, colour, and
    optionally random erasing of one rectangle (torchvision's), so the model must use more than one cue, and
    one of torchvision's automatic augmentation policies (``auto_augment``: trivial or rand; on images only, so
    not with part boxes)."""
    ops = [
        T.RandomResizedCrop(pre.input_size, scale=scale, interpolation=INTERPOLATION[pre.interpolation]),
        T.RandomHorizontalFlip(hflip),
    ]
    if auto_augment is not None:
        ops.append(AUTO_AUGMENT_POLICIES[auto_augment]())
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops += _to_tensor(pre)
    if erasing > 0:
        value = "random" if erasing_fill == "random" else 0
        ops.append(T.RandomErasing(erasing, scale=(0.02, erasing_max_area), ratio=(0.3, 3.3), value=value))
    return T.Compose(ops)
