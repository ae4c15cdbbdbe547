"""Part-based methods: part boxes from keypoints, attention crop/drop, the localiser, save/reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data import ImageDataset, load_dataset
from finegrain.data.parts import check_part_groups, part_boxes
from finegrain.data.records import Sample
from finegrain.engine.train import fit
from finegrain.errors import ConfigError, DataError
from finegrain.models import create_model
from finegrain.models.parts import centre_heatmap, localisation_loss
from finegrain.models.regions import box_iou, crop_resize, threshold_boxes
from finegrain.models.wsdan import attention_crop, attention_drop, bilinear_attention_pool
from finegrain.report.evaluation import evaluate_checkpoint

from .conftest import made_once, make_checkpoint, make_part_cub

NAMES = ["beak", "crown", "tail", "left eye"]


def _sample(parts, bbox=None) -> Sample:
    return Sample(path="x.jpg", label=0, split="train", bbox=bbox, parts=tuple(parts))


def test_part_boxes_from_hand_made_keypoints():
    s = _sample([(30, 40, True), (50, 20, True), (90, 90, True), (0, 0, False)], bbox=(10, 10, 100, 80))
    groups = {"head": ["beak", "crown", "left eye"], "tail": ["tail"], "object": ["bbox"]}
    boxes, visible = part_boxes(s, NAMES, groups, image_size=(120, 100), pad=0.1)
    # margin = 0.1 x the object's longer side (100) = 10; the invisible eye at (0, 0) is ignored
    assert boxes.tolist() == [[20, 10, 60, 50], [80, 80, 100, 100], [0, 0, 120, 100]]  # clipped to the image
    assert visible.tolist() == [True, True, True]


def test_a_group_with_no_visible_keypoint_is_absent():
    s = _sample([(30, 40, False), (50, 20, False), (90, 90, True), (0, 0, False)])
    boxes, visible = part_boxes(s, NAMES, {"head": ["beak", "crown"], "tail": ["tail"]}, (200, 100), pad=0.0)
    assert visible.tolist() == [False, True]
    assert boxes[1].tolist() == [90, 90, 90, 90]  # no object box: margin from the image's longer side x 0


def test_part_groups_are_checked_against_the_dataset():
    with pytest.raises(DataError, match="use 'wsdan'"):
        check_part_groups({"head": ["beak"]}, None, "birds")
    with pytest.raises(ConfigError, match="unknown keypoint.*wing"):
        check_part_groups({"head": ["beak", "wing"]}, NAMES, "birds")


def test_part_boxes_follow_the_image_through_flip_and_crop(cub):
    index = load_dataset(cub)
    s = index.samples[0]  # beak at (10, 12), visible; tail invisible; bbox (4, 5, 40, 30); image 64 x 64
    groups = {"head": ["beak"], "tail": ["tail"]}
    flip = v2.Compose([v2.RandomHorizontalFlip(1.0), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    ds = ImageDataset([s], flip, part_groups=groups, part_names=index.part_names, part_pad=0.1)
    _, _, t = ds[0]
    # margin 0.1 x 40 = 4: box (6, 8, 14, 16) mirrored in a 64-px image -> (50, 8, 58, 16)
    assert torch.allclose(t["part_boxes"][0], torch.tensor([50, 8, 58, 16]) / 64)
    assert t["part_visible"].tolist() == [True, False]
    crop = v2.Compose([v2.CenterCrop(32), v2.ToImage(), v2.ClampBoundingBoxes()])
    _, _, t = ImageDataset([s], crop, part_groups={"head": ["beak"]}, part_names=index.part_names)[0]
    assert t["part_visible"].tolist() == [False]  # the beak box lies outside the central 32 px


def test_threshold_box_crop_and_drop_on_a_hand_made_attention_map():
    att = torch.full((1, 8, 8), 0.2)
    att[0, 2:5, 3:7] = 1.0  # rows 2-4, columns 3-6
    att[0, 3, 4] = 2.0
    box = threshold_boxes(att, 0.4)
    assert box.tolist() == [[3 / 8, 2 / 8, 7 / 8, 5 / 8]]
    assert threshold_boxes(att, 0.75).tolist() == [[4 / 8, 3 / 8, 5 / 8, 4 / 8]]  # only the peak
    x = torch.rand(1, 3, 8, 8)
    crops, boxes = attention_crop(x, att, 0.4, pad=0.0)
    assert torch.equal(boxes, box)
    ref = F.interpolate(x[..., 2:5, 3:7], size=8, mode="bilinear", align_corners=False)
    assert torch.allclose(crops[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)  # borders: edge clamping
    dropped = attention_drop(x, att, 0.4)
    region = att[0] >= 0.4 * 2.0
    assert (dropped[0][:, region] == 0).all() and torch.equal(dropped[0][:, ~region], x[0][:, ~region])


def test_thresholds_can_differ_per_image_and_the_box_is_padded_inside_the_image():
    att = torch.zeros(2, 4, 4)
    att[:, 0, 0], att[:, 3, 3] = 1.0, 0.5
    boxes = threshold_boxes(att, torch.tensor([0.4, 0.6]), pad=0.25)
    assert boxes.tolist() == [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]


def test_crop_resize_of_the_whole_image_is_the_identity_and_iou_is_right():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(crop_resize(x, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)), x, atol=1e-6)
    a, b = torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    assert box_iou(a, b).item() == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))


def test_bilinear_attention_pooling_is_the_normalised_attention_weighted_mean():
    feats, att = torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2, 2)
    att[0, 0, 0, 0], att[0, 1] = 4.0, 1.0  # part 0: one location; part 1: everywhere
    parts = bilinear_attention_pool(feats, att, scale=1.0).view(2, 3)
    raw = torch.stack([feats[0, :, 0, 0], feats[0].mean((1, 2))])  # 4 / (h w) = 1 at one location; the mean
    expected = raw.sqrt() / raw.sqrt().norm()
    assert torch.allclose(parts, expected, atol=1e-5)


def test_centre_heatmap_expectation_is_the_box_centre():
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.4], [0.0, 0.0, 0.05, 0.05]]])
    t = centre_heatmap(boxes, 4, 8)
    assert torch.allclose(t.sum((-1, -2)), torch.ones(1, 2))
    xs, ys = (torch.arange(8) + 0.5) / 8, (torch.arange(4) + 0.5) / 4
    assert (t[0, 0].sum(0) * xs).sum().item() == pytest.approx(0.3)
    assert (t[0, 0].sum(1) * ys).sum().item() == pytest.approx(0.3)
    assert t[0, 1, 0, 0].item() == 1.0  # a centre outside the cell centres goes to the nearest cell


def test_localisation_loss_prefers_the_truth_and_ignores_absent_parts():
    target = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.6, 0.6, 0.7, 0.7]]])
    visible = torch.tensor([[True, False]])
    heat = torch.zeros(1, 2, 4, 4)
    right = heat.clone()
    right[0, 0, 1, 0] = 10.0  # the cell around the true centre (0.25, 0.3)
    wrong = heat.clone()
    wrong[0, 0, 3, 3] = 10.0
    wrong[0, 1, 1, 0] = 10.0
    vis_logit = torch.tensor([[20.0, -20.0]])
    good = localisation_loss(target.clone(), vis_logit, right, target, visible)
    bad_box = localisation_loss(torch.tensor([[[0.5, 0.5, 0.9, 0.9], [0.6, 0.6, 0.7, 0.7]]]), vis_logit, right,
                                target, visible)  # fmt: skip
    assert good < localisation_loss(target.clone(), vis_logit, wrong, target, visible) and good < bad_box
    absent = localisation_loss(target.clone(), vis_logit, right, torch.rand(1, 2, 4).sort(-1).values, visible)
    assert absent > good  # the absent part's box and heat never count, the visible one does


@pytest.mark.parametrize(
    "method, kwargs", [("wsdan", {"num_maps": 4}), ("parts", {"part_groups": {"head": ["beak"], "tail": ["tail"]}})]
)
def test_save_reload_gives_identical_outputs_and_boxes(tmp_path, method, kwargs):
    ckpt, a = make_checkpoint(tmp_path / "m.pt", method, return_model=True, **kwargs)  # a: the model as saved
    b = Checkpoint.load(ckpt).build_model().eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(a(x), b(x))
    for ba, bb in zip(a.attention_boxes(x), b.attention_boxes(x), strict=True):
        assert torch.equal(ba, bb) and ba.shape == (2, 4) and ((ba >= 0) & (ba <= 1)).all()
    if method == "wsdan":
        assert a.attention_maps(x).shape == (2, 4, 2, 2)


def test_wsdan_training_step_uses_three_views_and_moves_the_centres():
    model = create_model("wsdan", num_classes=3, pretrained=False, num_maps=4).train()
    out = model(torch.randn(4, 3, 64, 64))
    assert {k: v.shape for k, v in out.items() if k.endswith("logits")} == {
        "logits": (4, 3), "crop_logits": (4, 3), "drop_logits": (4, 3)
    }  # fmt: skip
    loss, _ = model.compute_loss(out, torch.tensor([0, 1, 2, 0]), torch.nn.CrossEntropyLoss())
    loss.backward()
    assert model.attention[0].weight.grad.abs().sum() > 0
    assert model.center.seen.tolist() == [True, True, True]


@pytest.fixture(scope="module")
def pattern_cub(tmp_path_factory):
    return made_once(tmp_path_factory, "parts", lambda folder: make_part_cub(folder / "cub"))


def _train_and_test(data, method: str, tmp_path, **model_kwargs) -> dict:
    """The shared budget: frozen ImageNet lite0 at 160 px (a 5 x 5 feature grid), 10 epochs at lr 3e-3."""
    cfg = TrainConfig().replace(
        data=str(data), method=method, model_kwargs=model_kwargs, input_size=160, epochs=10, batch_size=16, lr=3e-3,
        workers=0, amp="none", cache_features=False, val_fraction=0.0, run_dir=str(tmp_path / method),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    return evaluate_checkpoint(fit(cfg.validate()).run_dir / "last.pt", workers=0)


@pytest.fixture(scope="module")
def pattern_baseline(pattern_cub, tmp_path_factory) -> dict:
    return made_once(tmp_path_factory, "baseline", lambda folder: _train_and_test(pattern_cub, "baseline", folder))


@pytest.mark.slow
def test_parts_beat_the_baseline_where_a_small_pattern_on_a_part_decides(pattern_cub, pattern_baseline, tmp_path):
    """3 classes, 26 training images each: the colour of a small square on the 'head' (a black disc) decides;
    squares of the other colours lie elsewhere, so a global average of the image cannot tell. Same budget."""
    parts = _train_and_test(pattern_cub, "parts", tmp_path, part_groups={"head": ["head"]})
    head = parts["part_localisation"]["head"]
    # a box of the true size at the image centre: what knowing nothing of where the head is gives
    index = load_dataset(pattern_cub)
    truth = torch.stack([
        part_boxes(s, index.part_names, {"head": ["head"]}, (128, 128))[0][0] / 128 for s in index.split("test")
    ])  # fmt: skip
    half = (truth[:, 2:] - truth[:, :2]) / 2
    centred = torch.cat([0.5 - half, 0.5 + half], 1)
    blind = box_iou(centred, truth).mean().item()
    base = pattern_baseline["top1"]
    print(f"baseline {base:.3f} parts {parts['top1']:.3f} head IoU {head['mean_iou']:.3f} blind {blind:.3f}")
    assert parts["top1"] >= base + 0.1
    assert head["n"] == len(truth) and head["mean_iou"] > max(0.2, 2 * blind)


@pytest.mark.slow
def test_wsdan_beats_the_baseline_without_part_labels(pattern_cub, pattern_baseline, tmp_path):
    """The same task with no part annotation used: WS-DAN's attention maps must find the head by themselves."""
    wsdan = _train_and_test(pattern_cub, "wsdan", tmp_path, num_maps=8)
    print(f"baseline {pattern_baseline['top1']:.3f} wsdan {wsdan['top1']:.3f}")
    assert wsdan["top1"] >= pattern_baseline["top1"] + 0.1
