"""Train and evaluate the super-resolution model on a dataset's own training images (``finegrain sr train``).

High-resolution patches are cut from training images, reduced by the scale (bicubic, antialiased) and the
network learns to restore them (L1 loss). Held-out images (the validation split, carved from the training
data; the test split stays untouched) measure PSNR against bicubic upscaling of the same reduced image.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.atomic import write_text
from finegrain.checkpoint import save_atomic
from finegrain.data import load_dataset, open_sample
from finegrain.errors import CheckpointError, ConfigError, DataError
from finegrain.models.sr import ESPCN, downscale, to_tensor
from finegrain.progress import progress_bar
from finegrain.torchfile import load_tensors


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of two images in [0, 1]."""
    mse = F.mse_loss(a.clamp(0, 1), b.clamp(0, 1)).item()
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.inference_mode()
def evaluate_sr(model: ESPCN, images: list[Image.Image]) -> dict:
    """Mean PSNR of the model and of bicubic upscaling, restoring each image from its reduced version
    (a border of ``scale`` pixels is left out of the comparison, as is customary)."""
    s, ours, bicubic = model.scale, [], []
    model.eval()
    for img in images:
        w, h = img.width // s * s, img.height // s * s
        hr = img.crop((0, 0, w, h))
        lr = downscale(hr, s)
        target = to_tensor(hr)[:, s:-s, s:-s]
        ours.append(psnr(model(to_tensor(lr)[None])[0][:, s:-s, s:-s], target))
        bicubic.append(psnr(to_tensor(lr.resize((w, h), Image.BICUBIC))[:, s:-s, s:-s], target))
    return {"psnr": float(np.mean(ours)), "psnr_bicubic": float(np.mean(bicubic)), "images": len(images)}


def _patches(images: list[Image.Image], n: int, size: int, scale: int, gen: torch.Generator):
    """Random (low-res, high-res) training pairs: ``size``-px crops, mirrored half the time, reduced by
    :func:`downscale` (the very reduction the model is evaluated on)."""
    lr, hr = [], []
    for i in torch.randint(len(images), (n,), generator=gen).tolist():
        img = images[i]
        y = int(torch.randint(img.height - size + 1, (), generator=gen))
        x = int(torch.randint(img.width - size + 1, (), generator=gen))
        crop = img.crop((x, y, x + size, y + size))
        if torch.rand((), generator=gen) < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        hr.append(to_tensor(crop))
        lr.append(to_tensor(downscale(crop, scale)))
    return torch.stack(lr), torch.stack(hr)


def train_sr(
    data: str,
    scale: int = 2,
    steps: int = 2000,
    batch_size: int = 16,
    patch: int = 96,
    lr: float = 1e-3,
    max_images: int = 400,
    eval_images: int = 50,
    run_dir: str | Path = "runs/sr",
    seed: int = 0,
    format: str = "auto",
    val_fraction: float = 0.1,
) -> dict:
    """Train an ``scale``-x model on ``data``'s training images; writes ``sr.pt`` and ``sr_metrics.json``."""
    if patch % scale:
        raise ConfigError(f"the patch side ({patch}) must be a multiple of the scale ({scale})")
    torch.manual_seed(seed)
    index = load_dataset(data, format, val_fraction=val_fraction, seed=seed)
    train, held = index.split("train"), index.split("val")
    if not train or not held:
        raise DataError(f"'{data}' needs training images and a validation split (val-fraction > 0) for sr train")
    pick = np.random.default_rng(seed)
    train = [train[i] for i in sorted(pick.permutation(len(train))[:max_images])]
    held = [held[i] for i in sorted(pick.permutation(len(held))[:eval_images])]
    images = [open_sample(s) for s in progress_bar(train, desc="loading", leave=False)]
    small = [im for im in images if min(im.size) < patch]
    if small:
        raise DataError(f"{len(small)} training image(s) are smaller than the {patch}-px patch: lower --patch")
    held_images = [open_sample(s) for s in held]

    model = ESPCN(scale)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = progress_bar(range(steps), desc=f"sr x{scale}")
    for _ in bar:
        lr_batch, hr = _patches(images, batch_size, patch, scale, gen)
        loss = F.l1_loss(model(lr_batch), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{loss.item():.4f}")
    metrics = {**evaluate_sr(model, held_images), "scale": scale, "steps": steps,
               "train_seconds": time.perf_counter() - start}  # fmt: skip
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"method": "sr", "scale": scale, "state_dict": model.state_dict(), "data": str(data), "metrics": metrics}
    save_atomic(record, run_dir / "sr.pt")
    write_text(run_dir / "sr_metrics.json", json.dumps(metrics, indent=2))
    return metrics


def load_sr(path: str | Path) -> ESPCN:
    """A model trained by ``finegrain sr train`` (a file, or its run directory)."""
    path = Path(path)
    path = path / "sr.pt" if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"super-resolution model '{path}' does not exist: train one with "
                              "'finegrain sr train DATA'")  # fmt: skip
    ckpt = load_tensors(path, "super-resolution model", "pass the sr.pt that `finegrain sr train` wrote")
    if not isinstance(ckpt, dict) or ckpt.get("method") != "sr":
        kind = f"a '{ckpt['method']}' classifier" if isinstance(ckpt, dict) and "method" in ckpt else "something else"
        raise CheckpointError(f"'{path}' is {kind}, not a super-resolution model: train one with "
                              "'finegrain sr train DATA'")  # fmt: skip
    model = ESPCN(ckpt["scale"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
