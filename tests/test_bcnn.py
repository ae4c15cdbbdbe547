import pytest
import torch
import torch.nn.functional as F

from finegrain.checkpoint import Checkpoint
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.models import create_model
from finegrain.models.pooling import BilinearPool, RandomMaclaurinPool, TensorSketchPool, signed_sqrt_l2


def test_bilinear_pool_equals_explicit_outer_product_sum():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    expected = []
    for n in range(2):
        acc = torch.zeros(3, 6)
        for y in range(4):
            for x in range(5):
                acc += torch.outer(a[n, :, y, x], b[n, :, y, x])
        acc /= 20
        v = acc.flatten()
        v = torch.sign(v) * torch.sqrt(v.abs() + 1e-8)
        expected.append(v / v.norm())
    torch.testing.assert_close(BilinearPool()(a, b), torch.stack(expected))


def test_bilinear_pool_gradcheck():
    a = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BilinearPool(), (a, b))


def test_signed_sqrt_is_finite_at_zero():
    x = torch.zeros(1, 4, requires_grad=True)
    signed_sqrt_l2(x + torch.tensor([[0.0, 1.0, -1.0, 0.5]])).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("pool_cls", [TensorSketchPool, RandomMaclaurinPool])
def test_sketch_inner_product_approximates_squared_inner_product(pool_cls):
    torch.manual_seed(0)
    x, y = F.normalize(torch.randn(200, 32), dim=1), F.normalize(torch.randn(200, 32), dim=1)
    y = F.normalize(x + 0.7 * y, dim=1)  # correlated pairs: ⟨x, y⟩² spans a useful range
    target = (x * y).sum(1) ** 2
    errors = []
    for d in (256, 4096):
        errs = []
        for seed in range(4):
            pool = pool_cls(32, 32, dim=d, seed=seed)
            approx = (pool.sketch(x, x) * pool.sketch(y, y)).sum(1)
            errs.append((approx - target).abs().mean())
        errors.append(torch.stack(errs).mean().item())
    assert errors[1] < errors[0] / 2.5, errors  # error shrinks ~1/sqrt(d): 16x the dim, ~4x less error
    assert errors[1] < 0.1


def test_sketch_is_seeded_and_saved():
    a, b = TensorSketchPool(8, 8, 64, seed=1), TensorSketchPool(8, 8, 64, seed=1)
    torch.testing.assert_close(a.hash1, b.hash1)
    assert "hash1" in a.state_dict() and not torch.equal(a.hash1, TensorSketchPool(8, 8, 64, seed=2).hash1)


@pytest.mark.parametrize(
    "method, kwargs, dim",
    [
        ("bcnn", {"reduce_dim": 16}, 256),
        ("bcnn", {"reduce_dim": 16, "layers": [3, "final"]}, 256),
        ("cbcnn", {"reduce_dim": 16, "sketch_dim": 512}, 512),
        ("cbcnn", {"reduce_dim": 16, "sketch_dim": 512, "pooling": "rm"}, 512),
    ],
)
def test_models_shapes_and_descriptor_size(method, kwargs, dim):
    model = create_model(method, num_classes=5, pretrained=False, **kwargs).eval()
    assert model.descriptor_dim == dim
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_bad_options_are_clear():
    with pytest.raises(ConfigError, match="unknown pooling"):
        create_model("bcnn", num_classes=3, pretrained=False, pooling="max")
    with pytest.raises(ConfigError, match="stage index"):
        create_model("bcnn", num_classes=3, pretrained=False, layers=[9, "final"])
    with pytest.raises(ConfigError, match="reduce_dim"):
        create_model("bcnn", num_classes=3, pretrained=False, reduce_dim=None)  # 1280² = 1.6M-dim descriptor
    with pytest.raises(ConfigError, match="compact"):
        create_model("cbcnn", num_classes=3, pretrained=False, pooling="bilinear")


@pytest.mark.parametrize("method", ["bcnn", "cbcnn"])
def test_trains_on_cached_maps_and_reloads_identically(cub, tiny_config, method):
    cfg = tiny_config(cub, method=method, epochs=12, lr=3e-3, model_kwargs={"reduce_dim": 32, "sketch_dim": 1024})
    result = fit(cfg)
    assert result.history[-1]["val_top1"] >= 0.75  # chance 0.25
    ckpt = Checkpoint.load(result.run_dir / "last.pt")
    rebuilt = ckpt.build_model().to(memory_format=torch.channels_last)  # the trained model's layout
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), result.model.eval()(x), atol=0, rtol=0)


def test_methods_sharing_a_cache_dir_get_their_own_features(cub, tiny_config):
    fit(tiny_config(cub, epochs=1))  # baseline: pooled vectors
    result = fit(tiny_config(cub, method="bcnn", epochs=1, model_kwargs={"reduce_dim": 8}))  # maps, same cache
    assert len(result.history) == 1
