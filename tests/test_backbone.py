import pytest
import timm
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data import eval_transform, open_image
from finegrain.errors import CheckpointError, ConfigError
from finegrain.models import create_backbone, create_model, list_models, map_efficientnet_pytorch_keys
from finegrain.models.backbone import backbone_preprocess, packaged_weights_path, read_weights

from .conftest import CUB100, needs_cub100

IMAGENET_BIRDS = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))


def test_lite0_package_keys_map_onto_timm_exactly():
    state = read_weights(packaged_weights_path("tf_efficientnet_lite0"))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = map_efficientnet_pytorch_keys(state, model)
    assert set(mapped) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert mapped[k].shape == v.shape, k
    model.load_state_dict(mapped, strict=True)


def test_preprocessing_comes_from_the_model_config():
    pre = backbone_preprocess(create_backbone("tf_efficientnet_lite0", pretrained=False))
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5) and pre.input_size == 224


@needs_cub100()
def test_mapped_lite0_sees_a_bird_in_a_cub_photo():
    model = create_backbone("tf_efficientnet_lite0", num_classes=1000).eval()
    pre = backbone_preprocess(model)
    photos = sorted(CUB100.glob("images/*/0000.jpg"))[:8]
    x = torch.stack([eval_transform(pre)(open_image(p)) for p in photos])
    with torch.inference_mode():
        top1 = model(x).argmax(1).tolist()
    hits = sum(c in IMAGENET_BIRDS for c in top1)
    assert hits >= 7, f"ImageNet classes {top1} are mostly not birds: the key mapping is wrong"


def test_local_weights_file_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("tf_efficientnet_lite0", pretrained=True)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = create_backbone("tf_efficientnet_lite0", pretrained=True, weights=tmp_path / name)
        torch.testing.assert_close(model.conv_stem.weight, src.conv_stem.weight)


def test_weight_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "other.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save(Evil(), tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        read_weights(tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="unknown timm backbone"):
        create_backbone("no_such_net")


def test_registry():
    assert "baseline" in list_models()
    model = create_model("baseline", num_classes=7, pretrained=False, backbone="resnet18")
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    assert model.method == "baseline" and model.model_kwargs["num_classes"] == 7
    with pytest.raises(ConfigError, match="unknown method"):
        create_model("nope", num_classes=3)


def test_frozen_backbone_has_no_gradients_and_keeps_bn_stats():
    model = create_model("baseline", num_classes=3, freeze_backbone=True).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not model.backbone.training and model.head.training


def test_concatenated_backbones_give_each_ones_normalised_features_and_survive_save_and_export(tmp_path):
    """``--backbone A+B``: each part keeps its own packaged ImageNet weights, and the features are both parts'
    L2-normalised features side by side (lite0's first), at lite2's input size; a checkpoint reloads and exports
    to ONNX with the same logits."""
    from finegrain.checkpoint import Checkpoint
    from finegrain.export import export_onnx
    from finegrain.predict import Predictor

    torch.manual_seed(0)
    model = create_model("baseline", num_classes=3, backbone="tf_efficientnet_lite0+tf_efficientnet_lite2").eval()
    assert model.preprocess.input_size == 260 and model.backbone.num_features == 1280 + 1280
    x = torch.randn(2, 3, 260, 260)  # the size the ONNX file is exported at
    alone = [create_backbone(f"tf_efficientnet_lite{i}").eval() for i in (0, 2)]
    with torch.no_grad():
        want = torch.cat([torch.nn.functional.normalize(b(x), dim=1) for b in alone], 1) / 2**0.5
        torch.testing.assert_close(model.backbone_features(x), want)
        logits = model(x)
    Checkpoint.from_model(model, ["a", "b", "c"]).save(tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(Checkpoint.load(tmp_path / "m.pt").build_model().eval()(x), logits)
    path = export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx")["path"]
    torch.testing.assert_close(Predictor.load(path).logits(x), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, backbone, weights, says", [
    ("bcnn", "tf_efficientnet_lite0+tf_efficientnet_lite2", None, "concatenates pooled features"),
    ("baseline", "tf_efficientnet_lite0+tf_efficientnet_lite2", "w.pth", "without --weights"),
    ("baseline", "tf_efficientnet_lite0+", None, "name two or more"),
    ("baseline", "tf_efficientnet_lite0+resnet18", None, "differently normalised"),
])  # fmt: skip
def test_concatenated_backbones_are_refused_where_they_cannot_work(method, backbone, weights, says):
    with pytest.raises(ConfigError, match=says):
        create_model(method, num_classes=3, backbone=backbone, pretrained=False, weights=weights)


def test_a_concatenated_backbones_model_card_names_each_base_model():
    import yaml

    from finegrain.report.card import card_header

    result = {"top1": 0.5, "top5": 0.9, "mean_class_acc": 0.5}
    header = card_header("run", "tf_efficientnet_lite0+tf_efficientnet_lite2", "data", "test", result)
    assert next(yaml.safe_load_all(header))["base_model"] == [
        "timm/tf_efficientnet_lite0.in1k", "timm/tf_efficientnet_lite2.in1k"
    ]  # fmt: skip


def test_drop_path_skips_blocks_in_training_only_and_is_kept_by_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    kw = dict(num_classes=3, pretrained=False, drop_rate=0.0)
    model = create_model("baseline", drop_path_rate=0.3, **kw)
    plain = create_model("baseline", **kw)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 64, 64)
    model.train(), plain.train()
    assert torch.equal(plain(x), plain(x))  # batch statistics alone are deterministic
    assert not torch.equal(model(x), model(x)), "drop_path_rate did not reach the backbone's blocks"
    plain.load_state_dict(model.state_dict())  # (the training forwards moved BatchNorm's running statistics)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))  # inference is the same network
    assert model.model_kwargs["drop_path_rate"] == 0.3
    rebuilt = Checkpoint.load(Checkpoint.from_model(model, classes=["a", "b", "c"]).save(tmp_path / "m.pt"))
    assert rebuilt.build_model().model_kwargs["drop_path_rate"] == 0.3


@pytest.mark.parametrize("pretrained", [False, True])
def test_a_backbone_without_drop_path_says_so_not_that_a_download_failed(pretrained):
    with pytest.raises(ConfigError, match="'inception_v3' does not take drop_path_rate"):
        create_model("baseline", num_classes=3, backbone="inception_v3", pretrained=pretrained, drop_path_rate=0.1)
