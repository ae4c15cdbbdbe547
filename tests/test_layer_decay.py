"""Layer-wise lr decay (``--layer-decay``): each backbone stage's lr, as the scheduler sets it."""

import pytest
from timm.scheduler import CosineLRScheduler

from finegrain.config import TrainConfig
from finegrain.engine.setup import make_optimizer
from finegrain.errors import ConfigError
from finegrain.models import create_model
from finegrain.models.stages import Upper


def _lrs(model, module, decay: float, t: int = 5) -> dict[str, float]:
    """The lr the scheduler gives each named parameter of ``module`` at step ``t`` (warm-up done)."""
    opt = make_optimizer(module, TrainConfig().replace(lr=1e-3, layer_decay=decay), model)
    sched = CosineLRScheduler(opt, t_initial=100, lr_min=1e-6, t_in_epochs=False, warmup_t=2, warmup_lr_init=1e-5)
    sched.step_update(t)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in module.named_parameters() if id(p) in lr_of}


def test_each_stage_learns_decay_times_as_fast_as_the_one_above_and_the_head_at_the_lr():
    model = create_model("baseline", backbone="tf_efficientnet_lite0", num_classes=5, pretrained=False)
    plain, decayed = _lrs(model, model, 1.0), _lrs(model, model, 0.5)
    head = plain["head.1.weight"]
    assert len(set(plain.values())) == 1 and 0.9e-3 < head < 1e-3  # one lr, on the cosine after warm-up
    assert decayed["head.1.weight"] == pytest.approx(head)
    # lite0: stem, 7 stages (the last with conv_head), head -> the stem is 8 groups below the head
    assert decayed["backbone.conv_stem.weight"] == pytest.approx(head * 0.5**8)
    assert decayed["backbone.blocks.0.0.conv_dw.weight"] == pytest.approx(head * 0.5**7)
    assert decayed["backbone.blocks.5.0.conv_pw.weight"] == pytest.approx(head * 0.5**2)
    assert decayed["backbone.conv_head.weight"] == pytest.approx(head * 0.5)
    assert decayed["backbone.bn1.bias"] == pytest.approx(head * 0.5**8)  # norms too (without weight decay)
    # the upper stages trained on cached maps (--train-stages) keep their scales: they are the model's parameters
    upper = _lrs(model, Upper(model.backbone, 5, model.head), 0.5)
    assert upper["blocks.5.0.conv_pw.weight"] == pytest.approx(head * 0.5**2)
    assert upper["head.1.weight"] == pytest.approx(head)


def test_layer_decay_out_of_range_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match="layer-decay must be in"):
        TrainConfig().replace(layer_decay=1.5)
