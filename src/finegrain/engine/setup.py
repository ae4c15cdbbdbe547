"""Setting a run up: its folder, the machine it records, the data it trains on, the model it starts from,
the optimiser, and the random state that ``--resume`` restores."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from finegrain.atomic import remove_stale_temps, write_text
from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data import DatasetIndex, find_bad_images, load_dataset, save_split
from finegrain.data.class_info import find_class_info, load_class_info
from finegrain.data.source import data_source
from finegrain.engine.distributed import DistInfo
from finegrain.env import machine_info, precision_name
from finegrain.errors import CheckpointError, ConfigError, DataError
from finegrain.models import create_model, needs_class_info
from finegrain.models.class_embed import EmbeddingSpec, embed_classes
from finegrain.progress import say
from finegrain.run_layout import RunDir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The random streams a resumed epoch must continue: Python's, NumPy's, torch's on the CPU and, when this
    process trains on a GPU, that GPU's (dropout, stochastic depth and on-device augmentation draw from it: without
    it a resumed run on a GPU was not the straight one, seen on an H200)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (train.py sets it)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # a run saved on a GPU, resumed on one
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))


def run_dir_for(cfg: TrainConfig) -> Path:
    """``--run-dir``, or a new ``runs/METHOD-TIMESTAMP``."""
    return Path(cfg.run.run_dir or f"runs/{cfg.model.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    name = [str(run_dir_for(cfg))]
    if info.enabled:
        dist.broadcast_object_list(name, src=0)  # every rank must agree on the folder
    run_dir = Path(name[0])
    if info.is_main:
        try:  # find out now, not at the first checkpoint an epoch later
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
            for stale in remove_stale_temps(run_dir):  # a run killed while it wrote a checkpoint
                say(f"removed {stale.name}, a partial file of an interrupted run")
        except OSError as e:
            raise ConfigError(
                f"run directory '{run_dir}' is not writable ({e.strerror}): pass --run-dir to a folder you can write"
            ) from e
    return run_dir


def write_environment(run_dir: Path, cfg: TrainConfig, amp: str, device, threads: dict, info: DistInfo) -> dict:
    """``environment.json``: the machine, and the precision and threads this run chose on it."""
    environment = {**machine_info(), "device": str(device), "amp_requested": cfg.speed.amp,
                   "amp_used": precision_name(amp, device), "threads": threads,
                   "dataloader_workers": cfg.speed.workers, "world_size": info.world_size,
                   "ddp": info.enabled}  # fmt: skip
    write_text(run_dir / RunDir.ENVIRONMENT, json.dumps(environment, indent=2))
    return environment


def dataset_index(cfg: TrainConfig, split_file: Path | None = None) -> DatasetIndex:
    """The dataset the options name, split as they say (or as ``split_file`` records)."""
    d = cfg.dataset
    return load_dataset(d.data, d.format, d.val_fraction, d.test_fraction, cfg.run.seed, split_file=split_file,
                        follow_symlinks=d.follow_symlinks)  # fmt: skip


def load_run_data(cfg: TrainConfig, run_dir: Path, resumed: bool, info: DistInfo) -> DatasetIndex:
    """The dataset and its split (the saved split when resuming); rank 0 records split and config."""
    d = cfg.dataset
    split_file = run_dir / RunDir.SPLIT
    index = dataset_index(cfg, split_file if resumed else None)
    if not index.count("train"):
        raise DataError(f"'{d.data}' has no training images after the split")
    if info.is_main:
        save_split(index, split_file)
        write_text(run_dir / RunDir.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if d.skip_bad and data_source(index).listed:  # a stream skips (and names) them as it reads
        index = drop_bad(index, run_dir, info)
    return index


def drop_bad(index: DatasetIndex, run_dir: Path, info: DistInfo) -> DatasetIndex:
    """--skip-bad: decode everything once, drop what fails, and say how many and which."""
    bad = find_bad_images([s for s in index.samples if s.split != "test"], progress=info.is_main)
    if bad:
        dropped = {s.key for s, _ in bad}
        index.samples = [s for s in index.samples if s.key not in dropped]
        if info.is_main:
            write_text(run_dir / "skipped.txt", "".join(f"{s.key}\t{why}\n" for s, why in bad))
            say(f"--skip-bad: skipped {len(bad)} unreadable image(s), listed in {run_dir / 'skipped.txt'}")
    return index


#: model options every run sets from its own config (the rest of a checkpoint's ``model_kwargs`` are the method's)
RUN_MODEL_KWARGS = ("num_classes", "backbone", "pretrained", "weights", "drop_rate", "freeze_backbone")


def class_prior_kwargs(cfg: TrainConfig, classes: list[str]) -> dict:
    """The class embeddings (and how they were made) of a method built on class side-information."""
    path = find_class_info(cfg.dataset.data, cfg.dataset.class_info)
    info = load_class_info(path) if path is not None else None
    spec = EmbeddingSpec.for_info(info)
    return {"embedding": spec.to_dict(), "class_embed": embed_classes(spec, classes, info)}


def model_from_config(cfg: TrainConfig, classes: list[str]) -> nn.Module:
    """The method built as ``cfg`` says; with ``--init-from``, started from that checkpoint's weights (the same
    method's, or another method's where this one can adapt them)."""
    m = cfg.model
    ckpt = Checkpoint.load(m.init_from) if m.init_from else None
    recorded = {}
    if ckpt is not None and ckpt.method == m.method:  # its own options carry over (e.g. a probe's normalised head)
        recorded = {k: v for k, v in ckpt.model_kwargs.items() if k not in RUN_MODEL_KWARGS}
    if needs_class_info(m.method):
        recorded.update(class_prior_kwargs(cfg, classes))
    model = create_model(
        m.method, num_classes=len(classes), backbone=m.backbone, pretrained=m.pretrained, weights=m.weights,
        drop_rate=m.drop_rate, freeze_backbone=m.freeze_backbone, **{**recorded, **m.model_kwargs},
    )  # fmt: skip
    if ckpt is not None:
        same = ckpt.method == m.method
        if ckpt.classes != classes or not (same or model.adapt_weights(ckpt.method, ckpt.state_dict)):
            raise CheckpointError(
                f"--init-from {m.init_from}: its method/classes ({ckpt.method}, {len(ckpt.classes)} classes) "
                f"differ from this run's ({m.method}, {len(classes)} classes)"
            )
        if same:
            ckpt.load_into(model)
    if m.input_size is not None or m.crop_pct != model.preprocess.crop_pct:
        size = m.input_size or model.preprocess.input_size
        model.preprocess = replace(model.preprocess, input_size=size, crop_pct=m.crop_pct)
    return model


def make_optimizer(module: nn.Module, cfg: TrainConfig, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW (or SGD) over ``module``'s trainable parameters: no weight decay on biases and norms, and with
    ``--layer-decay`` below 1 each of ``model``'s backbone stages at its own fraction of the lr (``lr_scale``, which
    timm's schedulers multiply every value they set by), the head (largest scale) first."""
    o = cfg.optim
    scales = layer_scales(model if model is not None else module, o.layer_decay)
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}  # (as before --layer-decay: resumable)
    for p in module.parameters():
        if p.requires_grad:  # no weight decay on biases and norms
            groups.setdefault((scales.get(id(p), 1.0), p.ndim > 1), []).append(p)
    groups = [{"params": ps, "weight_decay": o.weight_decay if decay else 0.0, "lr_scale": scale}
              for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]  # fmt: skip
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=o.lr)


def layer_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """The lr scale of each backbone parameter (by ``id``) under layer-wise lr decay (BEiT, Bao et al. 2022): the
    stem and each stage of the backbone, as timm's ``group_matcher(coarse=True)`` groups them, learn ``decay`` times
    as fast as the group above them, the head at the full lr. Why stages, not blocks: lite0 has 16 blocks, and
    0.75 ** 16 would all but freeze its stem. Empty (everything at the lr) when ``decay`` is 1."""
    if decay == 1:
        return {}
    backbone = getattr(model, "backbone", None)
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"--layer-decay {decay:g} needs a timm backbone that names its stages (group_matcher), "
                          "and this one has none: drop --layer-decay, or use one backbone, not several")  # fmt: skip
    layers = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True), reverse=True)
    top, named = max(layers.values()) + 1, dict(backbone.named_parameters())
    return {id(named[name]): decay ** (top - layer) for name, layer in layers.items()}


def freeze_bn_stats(module: nn.Module) -> None:
    """BatchNorm layers normalise with their running statistics (affine weights still train).

    Measured on cub100 with lite0: switching BN to batch statistics at batch 32 raises the loss of a trained
    linear probe from 0.14 to 2.39 before any step, so fine-tuning would start by undoing the probe.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
