"""Continued self-supervised adaptation (``finegrain pretrain DIR``): a short SimSiam pass on in-domain unlabelled
images, starting from the ImageNet weights, whose backbone ``finegrain train --weights OUT/backbone.pth`` takes.

SimSiam (Chen & He 2021, "Exploring simple Siamese representation learning") needs neither negatives nor a momentum
encoder, so it works at the small batches a CPU affords: two augmented views of each image, a projector and a
predictor, and the negative cosine between one view's prediction and the other's (gradient-stopped) projection.
Whether it helps is measured, not assumed (published results find little gain for small CNNs on fine-grained
data): ``benchmarks/labels.py --parts pretrain``, docs/labels.md.

Why only the last stages adapt, with BatchNorm statistics frozen and a tenth of the rate (``ADAPT_STAGES``,
``BACKBONE_LR_SCALE``): one epoch that adapted the whole backbone, its BatchNorm statistics moving at batch 32, cost
18 pt of test top-1 downstream on cub100 with 30% labels (83.2 -> 65.0, 2026-11-28): the randomly started projector
and predictor pulled the ImageNet features away faster than the objective taught anything. The gentler pass keeps the
features a probe reads close to ImageNet's while it adapts (docs/labels.md has its measurement).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from finegrain.atomic import write_text
from finegrain.data import ImageDataset, Sample
from finegrain.data.transforms import INTERPOLATION, Preprocess
from finegrain.data.unlabeled import UNLABELED, read_unlabeled_paths
from finegrain.engine.distributed import resolve_device
from finegrain.engine.setup import freeze_bn_stats, seed_everything
from finegrain.env import configure_threads, machine_info
from finegrain.errors import ConfigError
from finegrain.models import create_model
from finegrain.models.backbone import JOIN
from finegrain.models.stages import check_stages
from finegrain.progress import progress_bar

#: the backbone's last stages that adapt (timm's EfficientNet family; 0: every parameter, as before 2026-12-03)
ADAPT_STAGES = 2
#: the adapted stages' learning rate against the projector's and predictor's
BACKBONE_LR_SCALE = 0.1


def two_views(pre: Preprocess):
    """SimSiam's augmentation (crops down to 20% of the image, colour, greyscale, blur, flips), twice per image."""
    one = T.Compose([
        T.RandomResizedCrop(pre.input_size, scale=(0.2, 1.0), interpolation=INTERPOLATION[pre.interpolation]),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std),
    ])  # fmt: skip
    return lambda img: torch.stack([one(img), one(img)])


class SimSiam(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, dim: int = 512, bottleneck: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(features, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
        )  # fmt: skip
        self.predictor = nn.Sequential(
            nn.Linear(dim, bottleneck, bias=False), nn.BatchNorm1d(bottleneck), nn.ReLU(inplace=True),
            nn.Linear(bottleneck, dim),
        )  # fmt: skip

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        za, zb = self.projector(self.backbone(a)), self.projector(self.backbone(b))
        pa, pb = self.predictor(za), self.predictor(zb)
        return -(F.cosine_similarity(pa, zb.detach()).mean() + F.cosine_similarity(pb, za.detach()).mean()) / 2


def pretrain(images: str | Path, out: str | Path, backbone: str, epochs: int = 2, batch_size: int = 32,
             lr: float = 0.05, time_limit: float | None = None, workers: int = 2, device: str = "auto",
             seed: int = 0, adapt_stages: int = ADAPT_STAGES) -> Path:  # fmt: skip
    """SimSiam on ``images`` (a folder or CSV of paths) for ``epochs`` (or until ``time_limit`` minutes), adapting
    the backbone's last ``adapt_stages`` stages (0: all of it, BatchNorm statistics moving); writes
    ``out/backbone.pth`` (the backbone's state dict, timm names) and ``out/pretrain.json``; returns the former."""
    if JOIN in backbone:
        raise ConfigError(f"pretrain adapts one backbone, and '{backbone}' names several: pretrain each alone")
    files = read_unlabeled_paths(images)
    if len(files) < 2 * batch_size:
        raise ConfigError(f"{len(files)} image(s) in '{images}': self-supervised adaptation needs at least "
                          f"{2 * batch_size} (two batches); add images or lower --batch-size")  # fmt: skip
    threads = configure_threads()
    seed_everything(seed)
    dev = resolve_device(device)
    model = create_model("baseline", num_classes=1, backbone=backbone)
    if adapt_stages:  # the lower stages stay ImageNet's
        cut = check_stages(model.backbone, backbone, adapt_stages, "--adapt-stages")
        for part in (model.backbone.conv_stem, model.backbone.bn1, model.backbone.blocks[:cut]):
            part.requires_grad_(False)
    net = SimSiam(model.backbone, model.backbone.num_features).to(dev)
    adapted = [q for q in net.backbone.parameters() if q.requires_grad]
    data = ImageDataset([Sample(f, -1, UNLABELED) for f in files], two_views(model.preprocess))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    scaled_lr = lr * batch_size / 256  # SimSiam's linear scaling rule
    scale = BACKBONE_LR_SCALE if adapt_stages else 1.0
    groups = [{"params": adapted, "scale": scale}, {"params": net.projector.parameters(), "scale": 1.0},
              {"params": net.predictor.parameters(), "scale": 1.0, "fixed_lr": True}]  # fmt: skip
    opt = torch.optim.SGD(groups, lr=scaled_lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * len(loader)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    history, start, step = [], time.perf_counter(), 0
    for epoch in range(epochs):
        net.train()
        if adapt_stages:
            freeze_bn_stats(net.backbone)
        total, seen = 0.0, 0
        bar = progress_bar(loader, desc=f"pretrain {epoch + 1}/{epochs}")
        for views, _ in bar:
            for g in opt.param_groups:  # cosine decay; the predictor keeps a fixed rate (SimSiam, sec. 4.2)
                g["lr"] = g["scale"] * (scaled_lr if g.get("fixed_lr") else scaled_lr * 0.5 * (1 + torch.cos(
                    torch.tensor(torch.pi * step / steps)).item()))  # fmt: skip
            loss = net(views[:, 0].to(dev), views[:, 1].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total, seen = total + loss.item() * len(views), seen + len(views)
            bar.set_postfix(loss=f"{total / seen:.3f}")
            if time_limit is not None and time.perf_counter() - start > 60 * time_limit:
                break
        history.append({"epoch": epoch + 1, "loss": total / max(1, seen), "images": seen,
                        "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        if time_limit is not None and time.perf_counter() - start > 60 * time_limit:
            break
    path = out / "backbone.pth"
    torch.save({k: v.detach().cpu() for k, v in net.backbone.state_dict().items()}, path)
    report = {"backbone": backbone, "images": len(files), "epochs": history, "batch_size": batch_size, "lr": lr,
              "adapt_stages": adapt_stages, "backbone_lr_scale": scale,
              "threads": threads, "machine": machine_info(), "use": f"finegrain train --weights {path}"}  # fmt: skip
    write_text(out / "pretrain.json", json.dumps(report, indent=2))
    return path
