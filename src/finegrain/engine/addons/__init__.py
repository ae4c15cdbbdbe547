"""Training add-ons: optional pieces of training, each a small module with the same few hooks (``base.AddOn``).

``ADDONS`` is the registry and the hook order: a run uses those its config turns on. Adding one is a new file
here, its options as a group in ``finegrain.config``, and a line below.
"""

from __future__ import annotations

from finegrain.config import TrainConfig
from finegrain.engine.addons.base import AddOn
from finegrain.engine.addons.center import CenterLossAddOn
from finegrain.engine.addons.consistency import ConsistencyAddOn
from finegrain.engine.addons.cutmix import CutMixAddOn
from finegrain.engine.addons.distill import DistillAddOn
from finegrain.engine.addons.label_noise import LabelNoiseAddOn
from finegrain.engine.addons.low_res import LowResAddOn
from finegrain.engine.addons.mirror_check import MirrorCheckAddOn
from finegrain.engine.addons.progressive import ProgressiveAddOn
from finegrain.engine.addons.qat import QATAddOn
from finegrain.engine.addons.sr_aug import SRAugAddOn
from finegrain.engine.addons.style import FourierMixAddOn, MixStyleAddOn
from finegrain.engine.addons.train_on_val import TrainOnValAddOn
from finegrain.engine.addons.unlabeled import UnlabeledAddOn

#: in hook order: the data first (wrong labels left out, the validation images added for a refit, the unlabelled
#: images read for consistency training before some of them are pseudo-labelled by a teacher fitted on the labels
#: that remain, both scored with the starting backbone), then the model changes (QAT, MixStyle), image transforms
#: before batch transforms (the mirror check after them: it finds the flips inside what they return), CutMix (it
#: mixes the labels of what the batch transforms made, and its loss is cross-entropy's) before distillation (which
#: replaces cross-entropy) before center loss (which adds to whatever the loss is); consistency adds its loss on
#: cached maps, where distillation and center loss do not run
ADDONS: tuple[type[AddOn], ...] = (
    LabelNoiseAddOn, TrainOnValAddOn, ConsistencyAddOn, UnlabeledAddOn, QATAddOn, MixStyleAddOn, SRAugAddOn,
    FourierMixAddOn, CutMixAddOn, ProgressiveAddOn, LowResAddOn, MirrorCheckAddOn, DistillAddOn, CenterLossAddOn,
)  # fmt: skip


def build_addons(cfg: TrainConfig) -> list[AddOn]:
    return [addon(cfg) for addon in ADDONS if addon.wanted(cfg)]


__all__ = ["ADDONS", "AddOn", "build_addons"]
