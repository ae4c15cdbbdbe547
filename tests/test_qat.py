import pytest
import torch
import torch.nn as nn

from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.config import TrainConfig
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.models.fake_quant import QMAX_WEIGHT, QATConv2d, _fake_quant_weight, calibrate, prepare_qat, qat_layers
from finegrain.predict import Predictor

from .conftest import make_checkpoint


def on_int8_grid(w: torch.Tensor, qmax: int = 127) -> bool:
    """Per output channel: w = k * max|w| / qmax with integer k in [-qmax, qmax]."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / qmax
    k = w / scale
    return bool(torch.allclose(k, k.round(), atol=1e-3) and k.abs().max() <= qmax + 1e-3)


@pytest.mark.parametrize("target", ["vnni", "portable"])
def test_weights_round_per_channel_symmetric_as_onnx_runtime_does(target):
    qmax = QMAX_WEIGHT[target]
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 1, 8).view(-1, 1, 1, 1)
    q = _fake_quant_weight(w, qmax)
    assert on_int8_grid(q, qmax) and not on_int8_grid(w, qmax)
    assert torch.allclose(q.abs().amax((1, 2, 3)), w.abs().amax((1, 2, 3)))  # the extreme value is kept exactly
    assert (q - w).abs().max() <= (w.abs().amax() / qmax / 2) + 1e-6
    if target == "portable":  # 7 bits whatever the constant says: 2 x 255 x 64 fits AVX2's int16 pair sums
        assert on_int8_grid(q, 64) and not on_int8_grid(_fake_quant_weight(w, 127), 64)


def test_conv_followed_by_batchnorm_rounds_the_folded_weight():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.01, 4.0)
        model[1].weight.uniform_(0.5, 2.0)
    prepare_qat(model)
    conv, bn = model
    assert isinstance(conv, QATConv2d) and conv._qat_bn is bn
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
    assert on_int8_grid(conv._quant_weight().detach() * factor)  # what export folds is on the int8 grid


def test_prepare_keeps_checkpoint_names_calibrates_and_trains(tmp_path):
    model = Checkpoint.load(make_checkpoint(tmp_path / "m.pt")).build_model().eval()
    keys = list(model.state_dict())
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    prepare_qat(model)
    assert list(model.state_dict()) == keys  # checkpoints of QAT runs load into plain models
    assert len(qat_layers(model)) == sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    assert calibrate(model, [x[:3], x[3:]], torch.device("cpu")) == 6
    layer = qat_layers(model)[0]
    assert layer.act_lo <= x.min() + 1e-6 and layer.act_hi >= x.max() - 1e-6
    out = model(x)
    assert (out - ref).abs().mean() < 0.2 * ref.abs().mean()  # close to fp32, not equal: it rounds
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "overrides, words",
    [({"freeze_backbone": True}, "no-freeze-backbone"), ({"amp": "bf16"}, "amp none"),
     ({"freeze_bn_stats": False}, "freeze-bn-stats")],
)  # fmt: skip
def test_qat_config_is_checked(overrides, words):
    base = {"qat": True, "freeze_backbone": False, "amp": "none"}
    with pytest.raises(ConfigError, match=words):
        TrainConfig().replace(**{**base, **overrides})


@pytest.mark.slow
def test_cli_qat_fine_tunes_and_writes_an_int8_model(tmp_path, imagefolder, tiny_config):
    run = fit(tiny_config(imagefolder, epochs=4, test_fraction=0.3)).run_dir
    out = tmp_path / "qat"
    args = ["qat", str(run), "--epochs", "1", "--run-dir", str(out), "--calib-images", "16", "--batch-size", "8"]
    assert main(args) == 0
    assert (out / "best.pt").is_file() and (out / "best.int8.onnx").is_file()
    ckpt = Checkpoint.load(out / "best.pt")
    assert ckpt.train_config().quantization.qat and ckpt.method == "baseline"
    test = Checkpoint.load(run / "best.pt").dataset().split("test")  # images neither fine-tuning step trained on
    probs = Predictor.load(out / "best.int8.onnx").probabilities_for([s.path for s in test])
    labels = torch.tensor([s.label for s in test])
    # 4 classes, 12 held-out images: a model at chance reaches 75% with probability 0.0004
    assert len(test) == 12 and (probs.argmax(1) == labels).float().mean() >= 0.75
