"""The method contract (finegrain.models.base), checked for every registered method: it builds, its forward
passes have the right shapes, it saves and loads to identical outputs, it exports to ONNX with the same logits
(or refuses with a reason), explain draws a map for it, and a killed-and-resumed run ends with the same weights
as an uninterrupted one. A new method gets these checks by being added to METHOD_KWARGS."""

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.checkpoint import Checkpoint
from finegrain.data import Sample
from finegrain.engine.features import extract_features
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.explain import explain
from finegrain.export import export_onnx
from finegrain.models import create_model, list_models
from finegrain.models.base import FGVCModel
from finegrain.predict import Predictor

from .conftest import fit_killed_in_epoch, make_checkpoint

#: small settings per method; every registered method must appear
METHOD_KWARGS = {
    "baseline": {},
    "bcnn": {"reduce_dim": 16},
    "cbcnn": {"reduce_dim": 16, "sketch_dim": 256, "pooling": "rm"},
    "parts": {"part_groups": {"head": ["beak"], "body": ["tail"]}},
    "racnn": {"scales": 2, "apn_start": 1, "alternate": 1},  # the APN schedule starts inside the killed epoch
    "textprior": {"embedding": {"attributes": None, "text": "minilm"}},  # class names as text (no class_info)
    "wsdan": {"num_maps": 4},
}
CLASSES = ["a", "b", "c"]


def test_every_registered_method_has_a_contract_case():
    assert sorted(METHOD_KWARGS) == list_models()


@pytest.mark.parametrize("method", sorted(METHOD_KWARGS))
def test_builds_and_forward_shapes(method):
    torch.manual_seed(0)
    model = create_model(method, num_classes=3, pretrained=False, **METHOD_KWARGS[method])
    assert isinstance(model, FGVCModel) and model.method == method
    assert isinstance(model.cacheable, bool) and isinstance(model.feature_spec, str)
    x = torch.randn(2, 3, 64, 64)
    assert model.eval()(x).shape == (2, 3)
    out = model.train()(x)
    loss, logits = model.compute_loss(out, torch.tensor([0, 2]), torch.nn.functional.cross_entropy)
    assert loss.dim() == 0 and torch.isfinite(loss) and logits.shape == (2, 3)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    for box in model.eval().attention_boxes(x):
        assert box.shape == (2, 4) and box.min() >= 0 and box.max() <= 1


#: every method, plus configurations that cannot become ONNX (so the refusal path is checked too)
SAVE_CASES = [(m, METHOD_KWARGS[m]) for m in sorted(METHOD_KWARGS)] + [
    ("cbcnn", {"reduce_dim": 16, "sketch_dim": 256, "pooling": "tensor_sketch"}),  # Tensor Sketch: FFT has no ONNX form
]


def test_save_cases_include_an_export_blocker():
    assert any(create_model(m, num_classes=3, pretrained=False, **kw).export_blocker for m, kw in SAVE_CASES)


@pytest.mark.parametrize("method, kwargs", SAVE_CASES)
def test_save_load_export_and_explain(method, kwargs, tmp_path):
    path, a = make_checkpoint(tmp_path / "m.pt", method, CLASSES, return_model=True, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    b = Checkpoint.load(path).build_model().eval()
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))  # the model as saved and the model loaded back compute the same
    if a.export_blocker:
        with pytest.raises(ConfigError, match="cannot export"):
            export_onnx(path)
    else:
        assert export_onnx(path)["max_abs_diff"] < 1e-3
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    (e,) = explain(Predictor.load(path), [picture], k=2)
    assert e.cam.shape == (64, 64) and np.isfinite(e.cam).all() and 0 <= e.cam.min() <= e.cam.max() <= 1
    assert len(e.top) == 2


def test_token_backbone_works_as_baseline_cache_and_explain(tmp_path):
    """A ViT (tokens, not maps): the baseline trains on it, its features cache, Grad-CAM lays its tokens out on
    the patch grid; methods that read spatial maps refuse it with the fix."""
    torch.manual_seed(0)
    model = create_model("baseline", num_classes=3, backbone="vit_tiny_patch16_224", pretrained=False).eval()
    assert model.cacheable and model.preprocess.input_size == 224
    x = torch.randn(2, 3, 224, 224)
    assert model(x).shape == (2, 3) and model.backbone_features(x).shape == (2, model.backbone.num_features)
    path = tmp_path / "vit.pt"
    Checkpoint.from_model(model, CLASSES).save(path)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 240, 3), dtype=np.uint8))
    picture.save(tmp_path / "p.jpg")
    (e,) = explain(Predictor.load(path), [picture])
    assert e.cam.shape == (224, 224) and e.cam.max() == pytest.approx(1.0)  # a real map, not all zeros
    sample = Sample(path=tmp_path / "p.jpg", label=0, split="train")
    feats = extract_features(model, [sample], model.preprocess, torch.device("cpu"), workers=0, cache_dir=tmp_path)
    assert feats.shape == (1, model.backbone.num_features)
    with pytest.raises(ConfigError, match="gives tokens"):
        create_model("wsdan", num_classes=3, backbone="vit_tiny_patch16_224", pretrained=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_KWARGS))
def test_killed_and_resumed_run_ends_with_identical_weights(method, cub, tiny_config, tmp_path, monkeypatch):
    """Resume is exact for every method, with DataLoader workers (the default), fine-tuning on images."""

    def config(run: str):
        return tiny_config(
            cub, method=method, model_kwargs=METHOD_KWARGS[method], pretrained=False, freeze_backbone=False,
            epochs=2, batch_size=8, workers=2, run_dir=str(tmp_path / run), scale_min=0.5, color_jitter=0.4,
        )  # fmt: skip

    straight = fit(config("straight"))
    fit_killed_in_epoch(monkeypatch, 1, config("killed"))
    resumed = fit(None, resume=tmp_path / "killed")
    assert [r["epoch"] for r in resumed.history] == [2]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ after resume, e.g. {different[:3]}"
    if method == "racnn":
        assert int(b["steps"]) == int(a["steps"]) > 0
