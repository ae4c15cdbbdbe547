import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from finegrain.cli import main
from finegrain.data.transforms import Preprocess
from finegrain.explain.cam import grad_cam, normalise, occlusion
from finegrain.explain.render import model_view_box, overlay

from .conftest import make_checkpoint, make_imagefolder


class PooledLinear(nn.Module):
    """A hand-made 'backbone' (1x1 conv + ReLU: a map that lights up where the input is bright) + GAP + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        with torch.no_grad():
            self.backbone[0].weight.fill_(1.0)
            self.backbone[0].bias.fill_(-1.0)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]))

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))

    def explain_layer(self):  # the method contract's defaults (finegrain.models.base): the last spatial map
        return None

    def activation_map(self, output):
        return output


def bright_square(top: int, left: int, size: int = 32, side: int = 8) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    x[..., top : top + side, left : left + side] = 1.0
    return x


@pytest.mark.parametrize("top, left", [(2, 3), (20, 18)])
def test_grad_cam_peaks_on_the_evidence(top, left):
    x = bright_square(top, left)
    cam, logits = grad_cam(PooledLinear(), x)
    assert cam.shape == (1, 32, 32) and logits.argmax(1).item() == 0
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    inside = cam[0, top : top + 8, left : left + 8].mean()
    outside = (cam[0].sum() - cam[0, top : top + 8, left : left + 8].sum()) / (32 * 32 - 64)
    assert inside > 5 * outside
    # for the other class the evidence counts against it: the map is empty there
    cam_other, _ = grad_cam(PooledLinear(), x, target=torch.tensor([1]))
    assert cam_other[0, top : top + 8, left : left + 8].max() < 0.05


def test_occlusion_finds_the_region_a_black_box_model_uses():
    def model(x):  # class 0 iff the top-left quadrant is bright: no gradients needed
        score = x[:, :, :16, :16].mean((1, 2, 3)) * 10
        return torch.stack([score, torch.zeros_like(score)], 1)

    cam, _ = occlusion(model, bright_square(4, 4), grid=4)
    assert cam[0, :16, :16].mean() > 3 * cam[0, 16:, 16:].mean()


def test_normalise_keeps_zero_maps_zero():
    out = normalise(torch.stack([torch.zeros(4, 4), torch.arange(16.0).view(4, 4)]))
    assert out[0].abs().max() == 0 and out[1].max() == 1 and out[1].min() == 0


def test_view_box_is_the_centre_crop_eval_sees():
    assert model_view_box((400, 300), Preprocess(crop_pct=1.0)) == (50, 0, 350, 300)
    assert model_view_box((200, 200), Preprocess(crop_pct=0.5)) == (50, 50, 150, 150)
    cam = np.zeros((64, 64))
    pic = overlay(Image.new("RGB", (1000, 500), "white"), cam, Preprocess(), max_side=400)
    assert pic.size == (400, 200)
    # outside the model's view the photo is dimmed, inside (a zero map) it is untouched
    assert pic.getpixel((10, 100))[0] < 200 and pic.getpixel((200, 100)) == (255, 255, 255)


def test_cli_explain_writes_a_picture_per_image(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", classes=[f"class_{i}" for i in range(4)])
    images = make_imagefolder(tmp_path / "images", per_class=2)
    assert main(["explain", str(ckpt), str(images), "--out", str(tmp_path / "out")]) == 0
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 8 and pngs[0].relative_to(tmp_path / "out").parts[0] == "class_0"
    with Image.open(pngs[0]) as im:
        assert im.width > 64  # the photo plus the panel of top-k bars
