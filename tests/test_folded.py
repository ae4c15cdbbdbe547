"""BatchNorm folded into convolutions for frozen fp32 passes (models/folded.py): the same features, or no folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from finegrain.data import Sample
from finegrain.data.loading import open_sample
from finegrain.data.transforms import eval_transform
from finegrain.engine.features import extract_features, frozen_pass
from finegrain.models import create_model
from finegrain.models.folded import folded

from .conftest import synthetic_image
from .test_contract import CLASSES, METHOD_KWARGS


def with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (a fresh model's are 0 and 1: folding them changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("method", sorted(METHOD_KWARGS))
def test_every_cached_method_gives_its_features_folded(method):
    """Over every registered method whose features the cache holds (``cacheable``), as timm checks its contract."""
    model = create_model(method, num_classes=len(CLASSES), pretrained=False, **METHOD_KWARGS[method])
    if not model.cacheable:
        pytest.skip(f"{method} computes its own views: no frozen feature pass")
    model = with_running_stats(model)
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    fold = folded(model, lambda m, t: m.backbone_features(t), x[:2])
    assert fold is not model, "lite0's BatchNorms follow their convolutions: all of them fold"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fold.backbone.modules())
    with torch.inference_mode():
        want, got = model.backbone_features(x), fold.backbone_features(x)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))  # a batch the check did not see
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the model itself is left as it was"


class BatchNormFirst(nn.Module):
    """A convolution listed before a BatchNorm that runs before it: folding that pair would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_a_fold_that_changes_the_output_is_not_used():
    model = with_running_stats(BatchNormFirst())
    assert folded(model, lambda m, t: m(t), torch.randn(2, 3, 8, 8)) is model


def test_the_feature_cache_in_fp32_folds_and_gives_the_unfolded_features(tmp_path):
    model = with_running_stats(create_model("baseline", num_classes=2, pretrained=False))
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        synthetic_image(i % 2, rng).save(tmp_path / f"{i}.jpg")
        samples.append(Sample(path=tmp_path / f"{i}.jpg", label=i % 2, split="train"))
    cpu = torch.device("cpu")
    assert frozen_pass(model, lambda m, t: m.backbone_features(t), 64, cpu, "none", True) is not model
    assert frozen_pass(model, lambda m, t: m.backbone_features(t), 64, cpu, "bf16", True) is model  # bf16 as it is
    feats = extract_features(model, samples, model.preprocess, cpu, amp="none", workers=0, channels_last=True)
    x = torch.stack([eval_transform(model.preprocess)(open_sample(s)) for s in samples])
    with torch.inference_mode():
        want = model.backbone_features(x)
    assert torch.allclose(feats, want, atol=1e-4 * float(want.abs().max()))
