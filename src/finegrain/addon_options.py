"""The option groups of the training add-ons (``engine/addons``), one each: ``averaging`` (EMA), ``style`` (Fourier
mix, MixStyle), ``sr``, ``progressive`` (stages, jigsaw), ``center``, ``distill``, ``labels`` (unlabelled images,
noisy labels) and ``quantization`` (QAT). ``TrainConfig`` (config.py) gathers them with the core groups; a new
add-on's options are one dataclass here plus one field there.
"""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.env import INT8_TARGETS
from finegrain.errors import ConfigError
from finegrain.option_values import option, parse_optional_float, parse_yaml_list, require
from finegrain.run_layout import RunDir

LABEL_NOISE = ("none", "prune")  # what --label-noise can do about wrong training labels
UNLABELED_JUDGES = ("auto", "probe", "finetune")  # who judges whether --unlabeled images help
KD_TARGETS = ("auto", "online", "fixed")  # where distillation's soft labels on training images come from


@dataclass
class AveragingOptions:
    ema: bool = option(False, "keep an exponential moving average of the weights and evaluate/save it")
    ema_decay: float = option(0.999, "EMA decay per step")

    def validate(self) -> None:
        require([(0 < self.ema_decay < 1, "ema-decay must be in (0, 1)")])


@dataclass
class StyleOptions:
    """Style augmentation add-ons: what a class looks like should not depend on the photo's colours and texture."""

    IMAGE_LEVEL = ("fourier_mix", "mixstyle")  # options that need images every epoch (not cached features)

    fourier_mix: float = option(
        0.0, "probability of mixing low-frequency Fourier amplitude with another training image (style)"
    )
    fourier_beta: float = option(0.1, "half-size of the mixed low-frequency band, as a fraction of the image side")
    mixstyle: float = option(
        0.0, "probability of MixStyle (feature statistics mixed between samples) after backbone stages 1-2"
    )

    def validate(self) -> None:
        require([
            (0 <= self.fourier_mix <= 1 and 0 < self.fourier_beta < 0.5,
             "fourier-mix in [0, 1], fourier-beta in (0, 0.5)"),
            (0 <= self.mixstyle <= 1, "mixstyle is a probability in [0, 1]"),
        ])  # fmt: skip


@dataclass
class SROptions:
    IMAGE_LEVEL = ("sr_aug",)  # needs images every epoch (not cached features)

    sr_aug: float = option(
        0.0, "probability of reducing a training image by the SR model's scale and restoring it with that model"
    )
    sr_model: str | None = option(None, "super-resolution checkpoint (finegrain sr train) used by --sr-aug")

    def validate(self) -> None:
        require([
            (0 <= self.sr_aug <= 1, "sr-aug is a probability in [0, 1]"),
            (not self.sr_aug or self.sr_model, "sr-aug needs --sr-model (train one: finegrain sr train DATA)"),
        ])  # fmt: skip


@dataclass
class ProgressiveOptions:
    STAGE_KEYS = ("epochs", "input_size", "jigsaw", "model")

    stages: list = option(
        [], "progressive training as a YAML list, e.g. '[{epochs: 2, input_size: 160, jigsaw: 4}, {epochs: 3}]'; "
        "each stage may set input_size, jigsaw (n x n shuffled patches) and model (method settings); "
        "with stages, epochs is their sum",
        type=parse_yaml_list, metavar="YAML",
    )  # fmt: skip
    low_res_share: float = option(
        0.0, "whole-network fine-tuning on images: this share of the planned epochs first sees its training crops "
        "downsized (engine/addons/low_res.py), the rest at full size (0: off; lost on validation on the default's "
        "domains, docs/frontier-tried.md)",
    )  # fmt: skip

    def validate(self) -> None:
        require([(0 <= self.low_res_share < 1, "low-res-share is the share of epochs at low resolution, in [0, 1)")])
        for i, stage in enumerate(self.stages, 1):
            if not isinstance(stage, dict):
                raise ConfigError(f"stage {i} must be a mapping such as {{epochs: 2, input_size: 320}}, got {stage!r}")
            unknown = sorted(set(stage) - set(self.STAGE_KEYS))
            if unknown:
                raise ConfigError(f"stage {i}: unknown key(s) {unknown}; known: {', '.join(self.STAGE_KEYS)}")
            if not isinstance(stage.get("epochs"), int) or stage["epochs"] < 1:
                raise ConfigError(f"stage {i} needs epochs: a whole number >= 1")
            size = stage.get("input_size")
            if size is not None and (not isinstance(size, int) or size < 32):
                raise ConfigError(f"stage {i}: input_size must be a whole number >= 32")
            if not isinstance(stage.get("jigsaw", 1), int) or stage.get("jigsaw", 1) < 1:
                raise ConfigError(f"stage {i}: jigsaw is the grid side n (n x n patches), a whole number >= 1")
            if not isinstance(stage.get("model", {}), dict):
                raise ConfigError(f"stage {i}: model must map method settings to values, e.g. {{augment: true}}")

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

    def check_with(self, cfg) -> None:
        """Stages change what the network sees (no cached features); their epochs are the run's."""
        frozen_cache = cfg.model.freeze_backbone and cfg.features.cache_features
        require([(not self.stages or not frozen_cache,
                  "stages change what the network sees: add --no-cache-features or --no-freeze-backbone"),
                 (not self.stages or not cfg.model.train_input_size,
                  "stages set their own input sizes: drop --train-input-size"),
                 (not (self.stages and self.low_res_share),
                  "stages set their own input sizes: drop --low-res-share")])  # fmt: skip
        if self.stages:
            cfg.optim.epochs = sum(s["epochs"] for s in self.stages)


@dataclass
class CenterOptions:
    """Center loss (Wen et al. 2016) on the features the classifier reads."""

    center_loss: float = option(0.0, "weight of the center loss on the features the classifier reads (0: off)")
    center_beta: float = option(0.05, "rate at which class centres follow their features")

    def validate(self) -> None:
        require([(self.center_loss >= 0 and 0 < self.center_beta <= 1, "center-loss >= 0, center-beta in (0, 1]")])


@dataclass
class DistillOptions:
    """Knowledge distillation (``finegrain distill``): checkpoints whose averaged soft labels teach this run."""

    teachers: list = option(
        [], "finegrain checkpoints that teach this run (knowledge distillation; see `finegrain distill`); with "
        "--unlabeled they also pseudo-label the unlabelled images",
        nargs="+", metavar="CKPT",
    )  # fmt: skip
    kd_temperature: float = option(4.0, "distillation temperature T")
    kd_alpha: float = option(0.5, "weight of the teachers' soft labels (1 - kd_alpha: cross-entropy with the labels; "
                             "0 with --unlabeled: the teachers only pseudo-label)")  # fmt: skip
    kd_targets: str = option(
        "auto", "where the soft labels come from on training images: online (the teachers run on every batch, on "
        "the view the student sees), fixed (computed once per image at its evaluation view, as the noisy student "
        "does: no teacher pass per batch), auto (fixed with --unlabeled, else online)", choices=KD_TARGETS,
    )  # fmt: skip

    def validate(self) -> None:
        require([
            (self.kd_temperature > 0, "kd-temperature must be > 0"),
            (0 <= self.kd_alpha <= 1, "kd-alpha must be in [0, 1]"),
            (self.kd_targets in KD_TARGETS, f"kd-targets must be one of {', '.join(KD_TARGETS)}"),
        ])  # fmt: skip

    def check_with(self, cfg) -> None:
        """Teachers with --kd-alpha 0 only pseudo-label unlabelled images."""
        require([(not self.teachers or self.kd_alpha > 0 or cfg.labels.unlabeled is not None,
                  "--kd-alpha 0 leaves the teachers only the pseudo-labelling of --unlabeled images: add --unlabeled "
                  "DIR, or a --kd-alpha above 0 to distil")])  # fmt: skip


@dataclass
class QuantizationOptions:
    """Quantization-aware training (``finegrain qat``): fake int8 rounding as ONNX Runtime will run the model."""

    qat: bool = option(False, "quantization-aware training: simulate the int8 model (see `finegrain qat`)")
    calib_images: int = option(256, "training images that calibrate int8 activation ranges")
    int8_target: str = option(
        "auto", "int8 rounding for: portable (any x86 CPU: 7-bit weights; what auto picks), vnni (full-range "
        "weights, right only on CPUs with VNNI/AMX)", choices=INT8_TARGETS,
    )  # fmt: skip

    def validate(self) -> None:
        require([
            (self.calib_images >= 1, "calib-images must be >= 1"),
            (self.int8_target in INT8_TARGETS,
             f"int8-target must be one of {', '.join(INT8_TARGETS)}, got '{self.int8_target}'"),
        ])  # fmt: skip

    def check_with(self, cfg) -> None:
        """QAT against the rest of the run: it fine-tunes, folds BatchNorm and simulates int8 in fp32."""
        require([
            (not self.qat or not cfg.model.freeze_backbone, "qat fine-tunes the network: add --no-freeze-backbone"),
            (not self.qat or cfg.model.freeze_bn_stats,
             "qat folds BatchNorm into convolutions: keep --freeze-bn-stats"),
            (not self.qat or cfg.speed.amp != "bf16", "qat simulates int8 rounding in fp32: use --amp none"),
        ])  # fmt: skip


@dataclass
class LabelOptions:
    """Training with fewer or imperfect labels, and on which labelled images (``engine/addons/unlabeled.py``,
    ``label_noise.py``, ``train_on_val.py``)."""

    unlabeled: str | None = option(
        None, "folder of unlabelled images (or a CSV of image paths with an empty label column): a probe on the "
        "labelled images (or --teachers, e.g. a fine-tuned run: the noisy student) pseudo-labels those it is "
        "confident about, used only if held-out labelled images (validation and 5-fold cross-validation) say they help "
        f"(RUN_DIR/{RunDir.UNLABELED} says what was used)",
    )  # fmt: skip
    pseudo_fraction: float | None = option(
        None, "fraction of the unlabelled images the teacher assigns to each class that are trained on, the most "
        "confident first (default: chosen on held-out labelled images among 0.25, 0.5, 1 and none)",
        type=parse_optional_float,
    )  # fmt: skip
    unlabeled_judge: str = option(
        "auto", "who judges whether the --unlabeled images help: probe (a logistic-regression probe refitted with "
        "them on held-out folds: cheap), finetune (the run's own training on 5 folds of the labelled images, with and "
        "without them: 10 extra trainings, sees what fine-tuning gains), or auto (finetune for a run that fine-tunes "
        "for fixed epochs on at most 400 labelled images, else probe)",
        choices=UNLABELED_JUDGES,
    )  # fmt: skip
    consistency: float = option(
        0.0, "weight of a consistency loss on the --unlabeled images while the last stages train on cached maps "
        "(--train-stages N, or a --budget run that picks it): a confident prediction on an image's plain view "
        "trains the prediction on its augmented views (FixMatch); 0: off",
    )  # fmt: skip
    consistency_threshold: float = option(
        0.95, "confidence (after distribution alignment) above which a plain view's prediction trains its augmented "
        "views, for --consistency",
    )  # fmt: skip
    label_noise: str = option(
        "none", "none, or prune: before training, drop the training images whose label an out-of-fold probe and "
        f"confident learning flag as probably wrong (listed in RUN_DIR/{RunDir.LABEL_ISSUES}; the data is not changed)",
        choices=LABEL_NOISE,
    )  # fmt: skip

    train_on_val: bool = option(
        False, "also train on the validation images (a final refit, for a fixed schedule): validation scores then "
        "count images the model has seen; split.csv keeps them as validation, test is untouched",
    )  # fmt: skip

    def validate(self) -> None:
        require([
            (self.pseudo_fraction is None or 0 < self.pseudo_fraction <= 1, "pseudo-fraction must be in (0, 1]"),
            (self.unlabeled_judge in UNLABELED_JUDGES,
             f"unlabeled-judge must be one of {', '.join(UNLABELED_JUDGES)}"),
            (self.label_noise in LABEL_NOISE, f"label-noise must be one of {', '.join(LABEL_NOISE)}"),
            (self.consistency >= 0, "consistency is a loss weight >= 0 (0: off)"),
            (0 < self.consistency_threshold < 1, "consistency-threshold is a confidence in (0, 1)"),
            (not self.consistency or self.unlabeled, "consistency trains on unlabelled images: add --unlabeled DIR"),
        ])  # fmt: skip

    def check_with(self, cfg) -> None:
        require([
            (not self.consistency or cfg.model.train_stages or cfg.recipe.budget is not None,
             "consistency trains the last stages on cached maps: add --no-freeze-backbone --train-stages 2, or "
             "--budget MINUTES (it applies where the recipe fine-tunes on maps)"),
        ])  # fmt: skip
