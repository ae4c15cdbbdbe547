import pytest
import torch
import torch.nn.functional as F

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data import ImageDataset, load_dataset
from finegrain.data.parts import part_boxes
from finegrain.data.transforms import eval_transform
from finegrain.engine.train import fit
from finegrain.losses import pairwise_ranking_loss
from finegrain.models import create_model
from finegrain.models.racnn import peak_boxes, zoom
from finegrain.models.regions import box_intersection, box_iou
from finegrain.report.evaluation import evaluate_checkpoint

from .conftest import make_checkpoint, make_part_cub


def test_whole_image_box_reproduces_the_input():
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(zoom(x, torch.tensor([[0.0, 0.0, 1.0]] * 2)), x, atol=1e-6)


def test_zoomed_crop_matches_a_reference_crop():
    x = torch.rand(1, 3, 32, 32)
    got = zoom(x, torch.tensor([[-0.5, -0.5, 0.5]]))  # the top-left quadrant, enlarged 2x
    ref = F.interpolate(x[..., :16, :16], size=32, mode="bilinear", align_corners=False)
    # identical except the last row/column, where the reference clamps at the crop edge and zoom reads on
    assert torch.allclose(got[..., :-1, :-1], ref[..., :-1, :-1], atol=1e-5)


def test_crop_is_differentiable_in_tx_ty_tl():
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32) * torch.linspace(0, 1, 32).view(1, 1, 32, 1) ** 2
    box = torch.tensor([[0.1, -0.2, 0.4]], requires_grad=True)
    zoom(x.expand(1, 3, 32, 32), box).pow(2).sum().backward()
    assert torch.isfinite(box.grad).all() and (box.grad.abs() > 1e-4).all()


def test_ranking_loss_on_hand_made_probabilities():
    coarse, fine = torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.5, 0.8, 0.52])
    # max(0, .9-.5+.05)=.45, max(0, .2-.8+.05)=0, max(0, .5-.52+.05)=.03
    assert pairwise_ranking_loss(coarse, fine, 0.05).item() == pytest.approx((0.45 + 0 + 0.03) / 3)


def test_peak_box_sits_on_the_strongest_response_and_inside_the_image():
    energy = torch.zeros(1, 8, 8)
    energy[0, 1, 6] = 5.0  # row 1, column 6
    cx, cy, half = peak_boxes(energy)[0].tolist()
    assert half == 0.5 and cx == pytest.approx(0.5) and cy == pytest.approx(-0.5)  # x clamped to stay inside


def test_alternating_steps_route_gradients():
    model = create_model("racnn", num_classes=3, pretrained=False, freeze_backbone=False, apn_start=1).train()
    model(torch.randn(1, 3, 64, 64))  # the one classification-only step before alternation
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    for apn_step in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(x)
        assert out["apn_step"] == apn_step
        loss, logits = model.compute_loss(out, y, torch.nn.CrossEntropyLoss())
        loss.backward()
        apn = any(p.grad is not None for p in model.apns.parameters())
        cls = any(p.grad is not None for p in model.heads.parameters())
        assert (apn, cls) == (apn_step, not apn_step) and logits.shape == (2, 3)
    assert all(p.requires_grad for p in model.parameters())  # restored after the APN step


def test_save_reload_gives_identical_logits_and_boxes(tmp_path):
    ckpt, a = make_checkpoint(tmp_path / "r.pt", "racnn", return_model=True, scales=3)  # a: the model as saved
    b = Checkpoint.load(ckpt).build_model().eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(a(x), b(x))
    for ba, bb in zip(a.attention_boxes(x), b.attention_boxes(x), strict=True):
        assert torch.equal(ba, bb) and ((ba >= 0) & (ba <= 1)).all()


def test_with_a_scale_size_the_zoom_reads_the_full_resolution_input():
    """A 1-pixel checkerboard averages to flat grey at half resolution (what the first scale sees); the zoom,
    cropped from the full-resolution input, must still contain it."""
    model = create_model("racnn", num_classes=3, pretrained=False, scale_size=32).eval()
    views = []
    forward_features = model.backbone.forward_features
    model.backbone.forward_features = lambda v: views.append(v) or forward_features(v)
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2.0 - 1
    with torch.no_grad():
        model(board.expand(2, 3, 64, 64).contiguous())
    assert [v.shape[-1] for v in views] == [32, 32]
    assert views[0].abs().max() < 1e-6 and views[1].std() > 0.3


def test_init_from_a_baseline_gives_every_scale_its_classifier(tmp_path, imagefolder, tiny_config):
    base = fit(tiny_config(imagefolder, epochs=3, run_dir=str(tmp_path / "base"))).run_dir
    cfg = tiny_config(
        imagefolder, method="racnn", init_from=str(base / "best.pt"), epochs=1, cache_features=False,
        run_dir=str(tmp_path / "racnn"), lr=1e-9,  # (almost) no learning: the start is what is compared
    )  # fmt: skip
    model = fit(cfg).model.eval()
    baseline = Checkpoint.load(base / "best.pt").build_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_scales(x)[0][0], baseline(x), atol=1e-4)
    for head in model.heads:
        assert torch.allclose(head[-1].weight, baseline.head[-1].weight, atol=1e-6)


def _covered(boxes: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Share of each patch's area inside the matching box."""
    return box_intersection(boxes, patch) / (patch[:, 2:] - patch[:, :2]).prod(1)


@pytest.mark.slow
def test_attended_boxes_find_the_small_patch_that_decides_the_class(tmp_path):
    """Generated scenes: the colour of a small square on a black disc at a random position decides the class;
    squares of the other colours lie elsewhere. After training (lite0 fine-tuned, as in the paper), the first
    zoom must cover the disc's region far more often than random boxes of the same sizes do."""
    data = make_part_cub(tmp_path / "cub")
    cfg = TrainConfig().replace(
        data=str(data), method="racnn", model_kwargs={"apn_start": 15}, freeze_backbone=False, input_size=128,
        epochs=8, batch_size=16, lr=1e-3, workers=0, amp="none", cache_features=False, val_fraction=0.0,
        run_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    run = fit(cfg.validate()).run_dir
    assert evaluate_checkpoint(run / "last.pt", workers=0)["top1"] > 0.9
    ckpt = Checkpoint.load(run / "last.pt")
    index = load_dataset(data)
    test = index.split("test")
    dataset = ImageDataset(test, eval_transform(ckpt.preprocess))
    boxes = ckpt.build_model().eval().attention_boxes(torch.stack([dataset[i][0] for i in range(len(test))]))[0]
    # the disc's annotated region (keypoint box, padded), in [0, 1] image coordinates
    patch = torch.stack([part_boxes(s, index.part_names, {"head": ["head"]}, (128, 128))[0][0] / 128 for s in test])
    side = boxes[:, 2:] - boxes[:, :2]
    g = torch.Generator().manual_seed(0)
    random = [torch.cat([lt := torch.rand(len(side), 2, generator=g) * (1 - side), lt + side], 1) for _ in range(20)]
    hit = (_covered(boxes, patch) >= 0.5).float().mean().item()
    hit_random = torch.stack([(_covered(r, patch) >= 0.5).float().mean() for r in random]).mean().item()
    iou = box_iou(boxes, patch).mean().item()
    iou_random = torch.stack([box_iou(r, patch).mean() for r in random]).mean().item()
    print(f"patch half covered: attended {hit:.2f} random {hit_random:.2f}; IoU {iou:.3f} random {iou_random:.3f}")
    assert hit >= max(0.35, 2 * hit_random)
    assert iou >= 1.5 * iou_random
