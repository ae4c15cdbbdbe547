"""Resume is exact for every registered method, with DataLoader workers (the default), fine-tuning on images."""

import pytest
import torch

from finegrain.engine.train import fit
from finegrain.models import list_models

from .conftest import fit_killed_in_epoch

#: small settings per method; every registered method must appear (a new method gets its resume test here)
METHOD_KWARGS = {
    "baseline": {},
    "bcnn": {"reduce_dim": 16},
    "cbcnn": {"reduce_dim": 16, "sketch_dim": 256, "pooling": "rm"},
    "parts": {"part_groups": {"head": ["beak"], "body": ["tail"]}},
    "racnn": {"scales": 2, "apn_start": 1, "alternate": 1},  # the APN schedule starts inside the killed epoch
    "wsdan": {"num_maps": 4},
}


def test_every_registered_method_has_a_resume_case():
    assert sorted(METHOD_KWARGS) == list_models()


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_KWARGS))
def test_killed_and_resumed_run_ends_with_identical_weights(method, cub, tiny_config, tmp_path, monkeypatch):
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
