import pytest
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.compress.prune import prune_checkpoint
from finegrain.data.calibration import calibration_loader
from finegrain.engine.train import fit
from finegrain.export import export_onnx

from .conftest import make_checkpoint


def test_pruned_checkpoint_is_smaller_reloads_and_exports(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", "bcnn", reduce_dim=16, layers=[3, "final"])
    r = prune_checkpoint(ckpt, 0.5, importance="magnitude")  # no dataset behind this checkpoint
    assert r["params_after"] < 0.75 * r["params_before"]
    pruned = Checkpoint.load(r["path"])  # weights_only load: the structure is plain numbers
    model = pruned.build_model()
    assert sum(p.numel() for p in model.parameters()) == r["params_after"]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert model(x).shape == (2, 3)
    assert export_onnx(r["path"], tmp_path / "p.onnx")["max_abs_diff"] < 1e-3


def test_taylor_pruning_then_fine_tuning_learns(cub, tiny_config):
    base = fit(tiny_config(cub, epochs=6, lr=3e-3))
    r = prune_checkpoint(base.run_dir / "best.pt", 0.3, importance="taylor")
    assert r["params_after"] < r["params_before"]
    tuned = fit(
        tiny_config(cub, epochs=2, init_from=r["path"], freeze_backbone=False, lr=1e-4, run_dir=r["path"] + ".ft")
    )
    assert tuned.history[-1]["val_top1"] >= 0.75
    reloaded = Checkpoint.load(tuned.run_dir / "last.pt").build_model()
    assert sum(p.numel() for p in reloaded.parameters()) == r["params_after"]


@pytest.mark.slow
def test_activation_pruning_keeps_a_real_model_working_before_fine_tuning(cub10_checkpoint, tmp_path):
    """30% of lite0's expansion channels removed from a model trained on 10 cub100 species: ranked by their
    share of the block output, with their mean contribution folded back, the model still classifies (measured
    2026-11-27 on cub100: weight magnitude without that fold left 1% top-1, i.e. chance)."""
    test = Checkpoint.load(cub10_checkpoint).dataset().split("test")[::3]
    pre = Checkpoint.load(cub10_checkpoint).preprocess
    x, y = (torch.cat(t) for t in zip(*calibration_loader(test, pre, 32), strict=True))

    def accuracy(path) -> float:
        with torch.inference_mode():
            return (Checkpoint.load(path).build_model().eval()(x).argmax(1) == y).float().mean().item()

    base = accuracy(cub10_checkpoint)
    pruned = prune_checkpoint(cub10_checkpoint, 0.3, tmp_path / "p.pt")
    assert pruned["params_after"] < 0.85 * pruned["params_before"]
    assert accuracy(pruned["path"]) >= base - 0.25 and base > 0.8
