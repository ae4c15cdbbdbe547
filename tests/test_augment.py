import json

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from finegrain.checkpoint import Checkpoint
from finegrain.config import AUTO_AUGMENT, TrainConfig
from finegrain.data.augment import MixStyle, _low_band, fourier_mix, fourier_mix_batch, jigsaw
from finegrain.data.transforms import AUTO_AUGMENT_POLICIES, Preprocess, train_transform
from finegrain.engine import recipe
from finegrain.engine.addons.style import MixStyleAddOn
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.models import create_model


def test_random_erasing_changes_only_the_chosen_rectangle():
    erasing = train_transform(Preprocess(input_size=32), erasing=1.0, erasing_fill="mean").transforms[-1]
    x = torch.rand(3, 32, 32) + 1  # never 0, so erased (mean-filled: 0) pixels are recognisable
    for seed in range(5):
        torch.manual_seed(seed)
        changed = (erasing(x) != x).any(0)
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        i, j, h, w = rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[i : i + h, j : j + w] = True
        assert torch.equal(changed, inside)  # one solid rectangle, nothing outside it
        assert 0.02 * 32 * 32 <= h * w <= 0.25 * 32 * 32 + 32  # within the configured area range
        torch.manual_seed(seed)
        assert torch.equal(erasing(x)[:, inside], torch.zeros(3, int(h * w)))


def test_fourier_mix_keeps_phase_and_takes_the_target_low_band_amplitude():
    torch.manual_seed(0)
    x, other = torch.rand(3, 32, 32), torch.rand(3, 32, 32) * 2
    out = fourier_mix(x, other, lam=1.0, beta=0.1)
    f = lambda t: torch.fft.fftshift(torch.fft.fft2(t.double()), dim=(-2, -1))  # noqa: E731
    band = _low_band(32, 32, 0.1, "cpu")
    assert torch.allclose(f(out).abs()[:, band], f(other).abs()[:, band], atol=1e-3)  # target amplitude
    assert torch.allclose(f(out).abs()[:, ~band], f(x).abs()[:, ~band], atol=1e-3)  # the rest untouched
    strong = f(x).abs() > 1e-3  # phase is defined where there is amplitude
    dphase = torch.remainder(f(out).angle() - f(x).angle() + torch.pi, 2 * torch.pi) - torch.pi
    assert dphase[strong].abs().max() < 1e-3
    half = fourier_mix(x, other, lam=0.5, beta=0.1)
    expected = 0.5 * (f(x).abs() + f(other).abs())
    assert torch.allclose(f(half).abs()[:, band], expected[:, band], atol=1e-3)


def test_fourier_mix_batch_with_zero_probability_is_the_identity():
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(fourier_mix_batch(x, 0.0), x)
    assert not torch.allclose(fourier_mix_batch(x, 1.0, max_lam=1.0), x)


def test_mixstyle_is_identity_in_eval_and_mixes_statistics_in_training():
    torch.manual_seed(0)
    x = torch.randn(6, 8, 5, 5) * torch.rand(6, 8, 1, 1) * 3 + torch.randn(6, 8, 1, 1)
    ms = MixStyle(p=1.0)
    assert torch.equal(ms.eval()(x), x)
    perm, lam = torch.tensor([1, 0, 3, 2, 5, 4]), torch.full((6,), 0.3)
    out = ms.train()(x, perm=perm, lam=lam)
    mu, sig = x.mean((2, 3)), x.var((2, 3)).add(1e-6).sqrt()
    assert torch.allclose(out.mean((2, 3)), 0.3 * mu + 0.7 * mu[perm], atol=1e-5)
    assert torch.allclose(out.var((2, 3)).add(1e-6).sqrt(), 0.3 * sig + 0.7 * sig[perm], rtol=1e-2)  # eps aside
    # the batch's overall per-channel mean is preserved (pairs swap: lam and 1 - lam average out per pair)
    assert torch.allclose(out.mean((0, 2, 3)), x.mean((0, 2, 3)), atol=1e-5)


def test_mixstyle_hooks_act_in_training_only():
    model = create_model("baseline", num_classes=3, pretrained=False)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    ref = model(x)
    MixStyleAddOn.add_to(model, p=1.0)
    assert torch.equal(model.eval()(x), ref)
    model.train()
    model.head[0].p = 0.0  # no dropout: any difference is MixStyle's
    assert not torch.allclose(model(x), ref, atol=1e-4)


@pytest.mark.usefixtures("budget_clock_stopped")
def test_image_augmentations_need_image_training_and_a_budget_gives_them_to_its_fine_tuning(
    imagefolder, tiny_config, monkeypatch
):
    with pytest.raises(ConfigError, match="no-cache-features"):
        fit(tiny_config(imagefolder, random_erasing=0.5))
    TrainConfig().replace(random_erasing=0.5, cache_features=False).check_images_for_augmentation()
    # under a budget the head on cached features goes without them and the whole-network fine-tuning (a mocked fast
    # machine plans it) has them; before 2026-12-05 no budgeted run could have them (the first error)
    monkeypatch.setattr(recipe, "finetune_speed", lambda *a, train_stages=0, **k: 1e6 if not train_stages else 1e-9)
    run = imagefolder.parent / "budget"
    recipe.train_within_budget(tiny_config(imagefolder, budget=0.2, random_erasing=0.5, run_dir=str(run)))
    assert Checkpoint.load(run / "head" / "best.pt").train_config().augment.random_erasing == 0
    assert Checkpoint.load(run / "finetune" / "last.pt").train_config().augment.random_erasing == 0.5


def test_auto_augment_adds_torchvision_policy_and_is_refused_where_part_boxes_would_not_follow(cub, tiny_config):
    img = Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy())
    assert set(AUTO_AUGMENT_POLICIES) == set(AUTO_AUGMENT)  # what the command line offers is what is built
    for name, policy in (("trivial", v2.TrivialAugmentWide), ("rand", v2.RandAugment)):
        tf = train_transform(Preprocess(input_size=32), auto_augment=name)
        assert isinstance(tf.transforms[2], policy)
        torch.manual_seed(0)
        outs = [tf.transforms[2](img) for _ in range(20)]
        assert sum(o.tobytes() != img.tobytes() for o in outs) >= 10  # it acts (identity is one op of many)
    assert isinstance(train_transform(Preprocess(input_size=32)).transforms[2], v2.ColorJitter)  # off by default
    with pytest.raises(ConfigError, match="auto-augment must be one of trivial, rand"):
        TrainConfig().replace(auto_augment="autoaugment", cache_features=False).validate()
    with pytest.raises(ConfigError, match="--auto-augment augment training images"):
        TrainConfig().replace(auto_augment="trivial").check_images_for_augmentation()
    cfg = tiny_config(cub, method="parts", model_kwargs={"part_groups": {"head": ["beak"], "tail": ["tail"]}},
                      cache_features=False, auto_augment="rand", epochs=1)  # fmt: skip
    with pytest.raises(ConfigError, match="drop --auto-augment"):
        fit(cfg)


def test_training_with_every_style_augmentation_learns(imagefolder, tiny_config):
    cfg = tiny_config(
        imagefolder,
        epochs=4,
        lr=3e-3,
        cache_features=False,
        random_erasing=0.5,
        fourier_mix=0.5,
        mixstyle=0.5,
        auto_augment="trivial",
    )
    assert fit(cfg).history[-1]["val_top1"] >= 0.75  # 4 classes: chance is 0.25


def test_jigsaw_shuffles_whole_cells_and_n1_is_the_identity():
    x = torch.arange(2 * 1 * 6 * 7, dtype=torch.float32).view(2, 1, 6, 7)
    assert torch.equal(jigsaw(x, 1), x)
    torch.manual_seed(0)
    y = jigsaw(x, 3)  # 2x2 cells; the 7th column does not divide by 3 and stays
    assert torch.equal(y[..., 6], x[..., 6])

    def cells(t: torch.Tensor, b: int) -> list:
        return sorted(t[b, 0, i : i + 2, j : j + 2].flatten().tolist() for i in (0, 2, 4) for j in (0, 2, 4))

    assert all(cells(y, b) == cells(x, b) for b in range(2))  # the same cells, each intact
    assert not torch.equal(y, x)


def test_hflip_sets_how_often_training_images_are_mirrored(imagefolder, tiny_config):
    x = torch.arange(32.0).repeat(3, 32, 1)
    never, always = (train_transform(Preprocess(input_size=32), hflip=p).transforms[1] for p in (0.0, 1.0))
    assert all(torch.equal(never(x), x) and torch.equal(always(x), x.flip(-1)) for _ in range(20))
    with pytest.raises(ConfigError, match="hflip"):
        TrainConfig().replace(hflip=1.5).validate()
    # --hflip 0 reaches the cached-feature head too: no mirrored copies of the training images
    for hflip, mirrored in ((0.5, True), (0.0, False)):
        cfg = tiny_config(imagefolder, head="probe", hflip=hflip, run_dir=str(imagefolder.parent / f"run{hflip}"))
        probe = json.loads((fit(cfg).run_dir / "probe.json").read_text())
        assert probe["views"][0]["mirrored_too"] is mirrored
