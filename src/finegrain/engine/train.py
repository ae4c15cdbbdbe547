"""The training engine: one loop for full fine-tuning and for a head on cached features, DDP-ready.

Under ``torchrun`` each rank trains on its shard (DistributedSampler), gradients are averaged by DDP,
metrics are summed across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset
from tqdm import tqdm

from finegrain.config import TrainConfig
from finegrain.data import ImageDataset, find_bad_images, load_dataset, save_split
from finegrain.data.augment import MixStyle, fourier_mix_batch, jigsaw
from finegrain.data.parts import check_part_groups
from finegrain.data.transforms import Preprocess, eval_transform, train_transform
from finegrain.engine import distributed as fgdist
from finegrain.engine.checkpoint import build_model, load_checkpoint, load_weights, model_record, save_atomic
from finegrain.engine.evaluate import autocast, evaluate, to_device
from finegrain.engine.features import extract_features
from finegrain.engine.tracking import RunTracker, write_curves
from finegrain.env import configure_threads, machine_info, precision_name, resolve_amp, resolve_int8_target
from finegrain.errors import CheckpointError, ConfigError, DataError
from finegrain.losses import CenterLoss, distillation_loss
from finegrain.models import create_model


@dataclass
class Task:
    """What the loop optimises: the whole model on images, or only the head on cached features."""

    trainable: nn.Module
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset | None
    workers: int
    images: bool
    teachers: list | None = None  # (teacher model, its preprocessing); with images they run on every batch
    center: CenterLoss | None = None
    head_input: dict | None = None  # filled by a hook on the classifier: the features center loss pulls
    jigsaw: int = 1  # progressive training: shuffle n x n patches of each training image (PMG)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(info: fgdist.DistInfo, message: str) -> None:
    if info.is_main:
        tqdm.write(message)


def _prepare_run_dir(cfg: TrainConfig, info: fgdist.DistInfo) -> Path:
    name = [cfg.run_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if info.enabled:
        dist.broadcast_object_list(name, src=0)  # every rank must agree on the folder
    run_dir = Path(name[0])
    if info.is_main:
        try:  # find out now, not at the first checkpoint an epoch later
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"run directory '{run_dir}' is not writable ({e.strerror}): pass --run-dir to a folder you can write"
            ) from e
    return run_dir


def _drop_bad(index, cfg: TrainConfig, run_dir: Path, info: fgdist.DistInfo):
    """--skip-bad: decode everything once, drop what fails, and say how many and which."""
    bad = find_bad_images([s for s in index.samples if s.split != "test"], progress=info.is_main)
    if bad:
        dropped = {s.path for s, _ in bad}
        index.samples = [s for s in index.samples if s.path not in dropped]
        if info.is_main:
            (run_dir / "skipped.txt").write_text("".join(f"{s.path}\t{why}\n" for s, why in bad))
        _log(info, f"--skip-bad: skipped {len(bad)} unreadable image(s), listed in {run_dir / 'skipped.txt'}")
    return index


def model_from_config(cfg: TrainConfig, classes: list[str]) -> nn.Module:
    model = create_model(
        cfg.method,
        num_classes=len(classes),
        backbone=cfg.backbone,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        drop_rate=cfg.drop_rate,
        freeze_backbone=cfg.freeze_backbone,
        **cfg.model_kwargs,
    )
    if cfg.init_from:
        ckpt = load_checkpoint(cfg.init_from)
        adapt = ckpt["method"] != cfg.method and hasattr(model, "init_from_baseline") and ckpt["method"] == "baseline"
        if ckpt["classes"] != classes or (ckpt["method"] != cfg.method and not adapt):
            raise CheckpointError(
                f"--init-from {cfg.init_from}: its method/classes ({ckpt['method']}, {len(ckpt['classes'])} classes) "
                f"differ from this run's ({cfg.method}, {len(classes)} classes)"
            )
        if adapt:
            model.init_from_baseline(ckpt["state_dict"])
        else:
            load_weights(model, ckpt)
    if cfg.input_size is not None or cfg.crop_pct != model.preprocess.crop_pct:
        model.preprocess = replace(
            model.preprocess, input_size=cfg.input_size or model.preprocess.input_size, crop_pct=cfg.crop_pct
        )
    return model


def _add_center_loss(task: Task, model: nn.Module, num_classes: int, cfg: TrainConfig, device) -> None:
    """Center loss on whatever the classifier (``model.head``) reads, captured by a hook, so it works for any
    method and for both the cached-feature and the image path."""
    task.head_input = {}
    model.head.register_forward_pre_hook(lambda _m, args: task.head_input.__setitem__("x", args[0]))
    sample = task.train_set[0][0][None].to(device)
    with torch.enable_grad():
        (task.trainable.eval())(sample.to(memory_format=torch.channels_last) if task.images else sample)
    if not task.head_input["x"].requires_grad:
        raise ConfigError(
            "--center-loss pulls the features the classifier reads, but with a frozen backbone they cannot move "
            f"(for '{cfg.method}' they are the backbone's output), so it would change nothing: add "
            "--no-freeze-backbone, or use a method whose features train (wsdan has center loss built in)"
        )
    dim = task.head_input.pop("x")[0].numel()  # (drop the sample's graph)
    task.center = CenterLoss(num_classes, dim, cfg.center_beta).to(device)


def add_mixstyle(model: nn.Module, p: float, stages: tuple[int, ...] = (1, 2)) -> None:
    """MixStyle after early backbone stages (where feature statistics carry style, not class), in training
    only; forward hooks, so checkpoints and the evaluated model are unchanged."""
    model.mixstyle = MixStyle(p)
    info = model.backbone.feature_info
    for i in stages:
        if i < len(info):
            module = model.backbone.get_submodule(info[i]["module"])
            module.register_forward_hook(lambda _m, _inp, out: model.mixstyle(out))


def _prepare_qat(model, index, cfg, device, info) -> None:
    """Fake int8 rounding, with activation ranges calibrated on the images the int8 export calibrates on."""
    from finegrain.compress.qat import calibrate, prepare_qat
    from finegrain.export.quantize import calibration_loader, evenly_spaced

    target = resolve_int8_target(cfg.int8_target)
    prepare_qat(model, target)
    samples = evenly_spaced(index.split("train"), cfg.calib_images)
    seen = calibrate(model, (x for x, _ in calibration_loader(samples, model.preprocess)), device)
    _log(info, f"qat: int8 rounding ({target}) simulated, activation ranges calibrated on {seen} training images")


def _feature_task(model, index, cfg, device, info, teachers) -> Task:
    """Frozen backbone: features of the train (plus mirrored) and val images, computed once by rank 0."""
    labels = {sp: torch.tensor([s.label for s in index.split(sp)]) for sp in ("train", "val")}

    def features(split: str, flip: bool) -> torch.Tensor:
        kw = dict(amp=cfg.amp, channels_last=cfg.channels_last, workers=cfg.workers, cache_dir=cfg.cache_dir)
        return extract_features(model, index.split(split), model.preprocess, device, flip=flip, desc=split, **kw)

    views = [False, True] if cfg.feature_flip else [False]
    for rank_turn in (True, False):  # rank 0 fills the cache first; the others then read it
        if info.is_main == rank_turn:
            train_x = torch.cat([features("train", f) for f in views])
            val_x = features("val", False) if len(labels["val"]) else None
        fgdist.barrier()
    train_y = labels["train"].repeat(len(views))
    if teachers:  # the views are fixed, so the teachers' soft labels are computed (and cached) once too
        train = index.split("train")
        soft = torch.cat([teacher_probabilities(teachers, train, f, cfg, device) for f in views])
        train_set = TensorDataset(train_x, train_y, soft)
    else:
        train_set = TensorDataset(train_x, train_y)
    val_set = TensorDataset(val_x, labels["val"]) if val_x is not None else None
    return Task(model.head, train_set, val_set, workers=0, images=False)


class _Logits(nn.Module):
    """A whole model seen as a 'backbone' whose features are its logits: caches teacher outputs with the
    feature cache (keyed by every weight of the teacher, its preprocessing and the files)."""

    feature_spec = "logits"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def load_teachers(cfg: TrainConfig, index, device: torch.device) -> list[tuple[nn.Module, Preprocess]]:
    """The teacher models with their own preprocessing; refused (before any feature extraction) when they were
    trained on other classes."""
    teachers = []
    for path in cfg.teachers:
        ckpt = load_checkpoint(path)
        if ckpt["classes"] != index.classes:
            raise CheckpointError(f"teacher {path} was trained on other classes than '{cfg.data}'")
        teachers.append((build_model(ckpt).to(device).eval(), Preprocess.from_dict(ckpt["preprocess"])))
    return teachers


def teacher_probabilities(teachers, samples, flip: bool, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """Soft labels: the teachers' softmax at the distillation temperature, averaged over teachers."""
    probs = []
    for model, pre in teachers:
        kw = dict(amp=cfg.amp, channels_last=cfg.channels_last, workers=cfg.workers, cache_dir=cfg.cache_dir)
        logits = extract_features(_Logits(model), samples, pre, device, flip=flip, desc="teacher", **kw)
        probs.append((logits / cfg.kd_temperature).softmax(1))
    return torch.stack(probs).mean(0)


def _teacher_input(x: torch.Tensor, student: Preprocess, teacher: Preprocess) -> torch.Tensor:
    """The student's normalised batch as the teacher expects it: renormalised and resized if they differ."""
    if (student.mean, student.std) != (teacher.mean, teacher.std):
        s_mean, s_std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (student.mean, student.std))
        t_mean, t_std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
        x = ((x * s_std + s_mean) - t_mean) / t_std
    if teacher.input_size != x.shape[-1]:
        x = nn.functional.interpolate(x, size=teacher.input_size, mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def _soft_labels(task: Task, x: torch.Tensor, student: Preprocess, temperature: float) -> torch.Tensor:
    probs = [(m(_teacher_input(x, student, pre)).float() / temperature).softmax(1) for m, pre in task.teachers]
    return torch.stack(probs).mean(0)


def _image_task(model, index, cfg) -> Task:
    pre = model.preprocess
    tf = train_transform(
        pre, scale=(cfg.scale_min, 1.0), color_jitter=cfg.color_jitter,
        erasing=cfg.random_erasing, erasing_max_area=cfg.erasing_max_area, erasing_fill=cfg.erasing_fill,
    )  # fmt: skip
    if cfg.sr_aug > 0:  # a low-resolution photo, restored: before the crop, at the image's own size
        from torchvision.transforms import v2

        from finegrain.engine.sr import load_sr
        from finegrain.models.sr import SRAugment

        tf = v2.Compose([SRAugment(load_sr(cfg.sr_model), cfg.sr_aug), tf])
    val = index.split("val")
    val_set = ImageDataset(val, eval_transform(pre)) if val else None
    parts = {}
    if getattr(model, "part_groups", None):  # supervised parts: each image brings its annotated part boxes
        check_part_groups(model.part_groups, index.part_names, cfg.data)
        parts = dict(part_groups=model.part_groups, part_names=index.part_names, part_pad=model.part_pad)
    train_set = ImageDataset(index.split("train"), tf, **parts)
    return Task(model, train_set, val_set, workers=cfg.workers, images=True)


def _optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))


def freeze_bn_stats(module: nn.Module) -> None:
    """BatchNorm layers normalise with their running statistics (affine weights still train).

    Measured on cub100 with lite0: switching BN to batch statistics at batch 32 raises the loss of a trained
    linear probe from 0.14 to 2.39 before any step, so fine-tuning would start by undoing the probe.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def _loss(module: nn.Module, out, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on logits, or the method's own loss when its training forward returns more than logits
    (e.g. RA-CNN: logits of every scale plus the ranking loss)."""
    if isinstance(out, torch.Tensor):
        return loss_fn(out.float(), y), out
    return _unwrap(module).compute_loss(out, y, loss_fn)


def train_one_epoch(task, module, loader, optimizer, scheduler, ema, cfg, device, epoch, info) -> dict:
    module.train()
    if cfg.freeze_bn_stats:
        freeze_bn_stats(module)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    student_pre = getattr(_unwrap(module), "preprocess", None)
    stats = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    steps = len(loader)
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not info.is_main, leave=False)
    for step, batch in enumerate(bar):
        x = to_device(batch[0], device, task.images and cfg.channels_last)
        y = batch[1].to(device)
        targets = batch[2] if isinstance(batch[-1], dict) else None  # e.g. part boxes, for the method's loss
        if task.images and cfg.fourier_mix > 0:
            x = fourier_mix_batch(x, cfg.fourier_mix, cfg.fourier_beta)
        if task.jigsaw > 1:
            x = jigsaw(x, task.jigsaw)
        criterion = loss_fn
        if cfg.teachers:
            soft = _soft_labels(task, x, student_pre, cfg.kd_temperature) if task.images else batch[2].to(device)

            def criterion(logits, target, soft=soft):
                return distillation_loss(logits, soft, target, cfg.kd_temperature, cfg.kd_alpha, teacher_probs=True)

        if task.center is not None:
            base = criterion

            def criterion(logits, target, base=base):
                return base(logits, target) + cfg.center_loss * task.center(task.head_input["x"], target)

        with autocast(device, cfg.amp if task.images else "none"):
            out = module(x) if targets is None else module(x, targets={k: v.to(device) for k, v in targets.items()})
        loss, logits = _loss(module, out, y, criterion)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}: lower --lr or use --amp none")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step_update(epoch * steps + step + 1)
        if ema is not None:
            ema.update(_unwrap(module))
        stats += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
        rate = stats[2].item() * info.world_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{stats[0].item() / stats[2].item():.3f}", img_s=f"{rate:.1f}")
    fgdist.all_reduce_sum(stats)
    seconds = time.perf_counter() - start
    return {
        "train_loss": stats[0].item() / stats[2].item(),
        "train_acc": stats[1].item() / stats[2].item(),
        "lr": optimizer.param_groups[0]["lr"],
        "epoch_seconds": seconds,
        "samples_per_s": stats[2].item() / seconds,
    }


def _loaders(task: Task, cfg: TrainConfig, info: fgdist.DistInfo):
    """The training sampler and loader (sharded across ranks) and the validation loader (sharded too)."""
    sampler = DistributedSampler(
        task.train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
        drop_last=len(task.train_set) >= cfg.batch_size * info.world_size * 2,
    )  # fmt: skip
    # Workers are started each epoch from a generator seeded by (seed, epoch, rank), so the random augmentation
    # of epoch e is the same whether the run got there straight or through --resume. (Persistent workers carry
    # their RNG from epoch to epoch, outside anything a checkpoint can save: resume differed in 149 of 296
    # tensors with them.)
    loader = DataLoader(
        task.train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=task.workers,
        drop_last=sampler.drop_last, generator=torch.Generator(),
    )  # fmt: skip
    val_loader = None
    if task.val_set is not None:
        shard = Subset(task.val_set, range(info.rank, len(task.val_set), info.world_size))
        val_loader = DataLoader(shard, batch_size=cfg.batch_size * 2, num_workers=task.workers)
    return sampler, loader, val_loader


def _apply_stage(model, task: Task, cfg: TrainConfig, index, s: int, base_preprocess, info) -> None:
    """Set up progressive-training stage ``s``: its input size (new datasets), its jigsaw grid, and the method
    settings of every stage up to it (so a run resumed mid-stage is set up exactly as it was)."""
    stage = cfg.stages[s]
    model.preprocess = replace(base_preprocess, input_size=stage.get("input_size") or base_preprocess.input_size)
    fresh = _image_task(model, index, cfg)
    task.train_set, task.val_set = fresh.train_set, fresh.val_set
    task.jigsaw = stage.get("jigsaw", 1)
    for i in range(s + 1):
        for name, value in cfg.stages[i].get("model", {}).items():
            if not hasattr(model, name):
                raise ConfigError(f"stage {i + 1}: method '{cfg.method}' has no setting '{name}'")
            setattr(model, name, value)
    _log(info, f"stage {s + 1}/{len(cfg.stages)}: input {model.preprocess.input_size} px, jigsaw {task.jigsaw}x"
               f"{task.jigsaw}, method settings {stage.get('model', {})}")  # fmt: skip


@dataclass
class FitResult:
    run_dir: Path
    model: nn.Module  # the trained model, on every rank
    history: list[dict]  # one metrics row per epoch run in this call


def fit(cfg: TrainConfig | None = None, resume: str | Path | None = None) -> FitResult:
    """Train as ``cfg`` says, or continue the run in ``resume`` from its ``last.pt``."""
    resume_state = None
    if resume is not None:
        last = Path(resume) / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"cannot resume: '{last}' does not exist (pass the run directory of a run)")
        resume_state = load_checkpoint(last)
        saved = TrainConfig.from_dict(resume_state["config"])
        saved.run_dir = str(resume)
        if cfg is not None and cfg.epochs != saved.epochs:
            saved.epochs = cfg.epochs  # the one setting that may change on resume: train longer
        cfg = saved
    cfg = (cfg or TrainConfig()).validate()

    device = fgdist.resolve_device(cfg.device)
    info = fgdist.init_distributed(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    threads = configure_threads()
    seed_everything(cfg.seed + info.rank)
    run_dir = _prepare_run_dir(cfg, info)
    saved_cfg = cfg  # what config.yaml and the checkpoints record: "auto" stays "auto" on the next machine
    cfg = replace(cfg, amp="none" if cfg.qat else resolve_amp(cfg.amp, device))
    if info.is_main:
        environment = {**machine_info(), "device": str(device), "amp_requested": saved_cfg.amp,
                       "amp_used": precision_name(cfg.amp, device), "threads": threads,
                       "dataloader_workers": cfg.workers, "world_size": info.world_size}  # fmt: skip
        (run_dir / "environment.json").write_text(json.dumps(environment, indent=2))
        _log(info, f"precision {environment['amp_used']} (--amp {saved_cfg.amp}), {threads['intra_op_threads']} "
                   f"thread(s), {cfg.workers} loader worker(s) on {environment['cpu_model']}")  # fmt: skip

    split_file = run_dir / "split.csv"
    index = load_dataset(
        cfg.data, cfg.format, cfg.val_fraction, cfg.test_fraction, cfg.seed,
        split_file=split_file if resume_state else None,
    )  # fmt: skip
    if not index.split("train"):
        raise DataError(f"'{cfg.data}' has no training images after the split")
    if info.is_main:
        save_split(index, split_file)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved_cfg.to_dict(), sort_keys=False))
    if cfg.skip_bad:
        index = _drop_bad(index, cfg, run_dir, info)
    teachers = load_teachers(cfg, index, device)
    counts = {sp: len(index.split(sp)) for sp in ("train", "val", "test")}
    _log(info, f"data: {index.format} '{cfg.data}': {len(index.classes)} classes, {counts}")

    model = model_from_config(cfg, index.classes).to(device)
    if cfg.mixstyle > 0:
        add_mixstyle(model, cfg.mixstyle)
    if cfg.qat:
        _prepare_qat(model, index, cfg, device, info)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cached = cfg.freeze_backbone and cfg.cache_features and getattr(model, "cacheable", True)
    task = _feature_task(model, index, cfg, device, info, teachers) if cached else _image_task(model, index, cfg)
    task.teachers = teachers
    if cfg.center_loss > 0:
        _add_center_loss(task, model, len(index.classes), cfg, device)
    _log(info, f"training {'the head on cached features' if cached else 'on images'}; run dir {run_dir}")
    seed_everything(cfg.seed + info.rank)  # the same training whether or not the feature cache was warm

    start_epoch = resume_state["epoch"] + 1 if resume_state is not None else 0
    base_preprocess, stage = model.preprocess, cfg.stage_at(start_epoch)
    if stage is not None:
        _apply_stage(model, task, cfg, index, stage, base_preprocess, info)
    sampler, loader, val_loader = _loaders(task, cfg, info)

    unused = getattr(task.trainable, "has_unused_parameters", False)
    module = DistributedDataParallel(task.trainable, find_unused_parameters=unused) if info.enabled else task.trainable
    optimizer = _optimizer(task.trainable, cfg)
    steps = len(loader)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps),
        warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False,
    )  # fmt: skip
    ema = ModelEmaV3(task.trainable, decay=cfg.ema_decay) if cfg.ema else None

    best = -math.inf
    if resume_state is not None:
        state = resume_state["resume"]
        task.trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])  # the schedule is a function of the step: nothing to load
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if task.center is not None and state.get("center") is not None:
            task.center.load_state_dict(state["center"])
        _set_rng_state(state["rng"])
        best = state["best"]
        _log(info, f"resumed from {run_dir / 'last.pt'} at epoch {start_epoch + 1}")

    tracker = RunTracker(run_dir, cfg.log, cfg.tracking_uri) if info.is_main else None
    if tracker is not None:
        tracker.params(saved_cfg.to_dict())
    classes, history = index.classes, []
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stage_at(epoch) != stage:
            stage = cfg.stage_at(epoch)
            _apply_stage(model, task, cfg, index, stage, base_preprocess, info)
            sampler, loader, val_loader = _loaders(task, cfg, info)
        sampler.set_epoch(epoch)
        loader.generator.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + info.rank)
        row = {"epoch": epoch + 1} if stage is None else {"epoch": epoch + 1, "stage": stage + 1}
        row.update(train_one_epoch(task, module, loader, optimizer, scheduler, ema, cfg, device, epoch, info))
        scheduler.step(epoch + 1)
        eval_module = ema.module if ema is not None else task.trainable
        if val_loader is not None:
            m = evaluate(eval_module, val_loader, len(classes), device, amp=cfg.amp if task.images else "none",
                         channels_last=cfg.channels_last and task.images)  # fmt: skip
            row.update({f"val_{k}": m[k] for k in ("top1", "top5", "mean_class_acc", "loss")})
        score = row.get("val_top1", row["train_acc"])
        if info.is_main:
            _save(run_dir, model, task, eval_module, classes, saved_cfg, epoch, row, optimizer, ema, best)
            if score >= best:
                best = score
                save_atomic(_record(model, task, eval_module, classes, saved_cfg, epoch, row), run_dir / "best.pt")
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_curves(run_dir)
            tracker.epoch(row)
            val = f" val top1 {row['val_top1']:.4f}" if "val_top1" in row else ""
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} train acc {row['train_acc']:.4f}"
                f"{val} ({row['epoch_seconds']:.1f}s, {row['samples_per_s']:.1f}/s)"
            )
        best = max(best, score)
        history.append(row)
    if tracker is not None:
        tracker.close()
    fgdist.barrier()
    return FitResult(run_dir, model, history)


def _record(model, task, eval_module, classes, cfg, epoch, row) -> dict:
    """A predict-ready checkpoint; with EMA, the averaged weights are the ones to predict with."""
    trained = {k: v.clone() for k, v in task.trainable.state_dict().items()}
    task.trainable.load_state_dict(eval_module.state_dict())
    record = model_record(model, classes)
    task.trainable.load_state_dict(trained)
    record.update({"config": cfg.to_dict(), "epoch": epoch, "metrics": row})
    return record


def _save(run_dir, model, task, eval_module, classes, cfg, epoch, row, optimizer, ema, best) -> None:
    record = _record(model, task, eval_module, classes, cfg, epoch, row)
    record["resume"] = {
        "trainable": task.trainable.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "center": task.center.state_dict() if task.center is not None else None,
        "rng": _rng_state(),
        "best": max(best, row.get("val_top1", row["train_acc"])),
    }
    save_atomic(record, run_dir / "last.pt")
