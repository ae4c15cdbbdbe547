"""Resume is exact for every registered method, with DataLoader workers (the default), fine-tuning on images."""

import pytest
import torch

import finegrain.engine.train as train_module
from finegrain.engine.train import fit
from finegrain.models import list_models

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
    real_epoch = train_module.train_one_epoch

    def killed_in_epoch_2(*args, **kwargs):
        if args[8] == 1:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(config("killed"))
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    resumed = fit(None, resume=tmp_path / "killed")
    assert [r["epoch"] for r in resumed.history] == [2]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ after resume, e.g. {different[:3]}"
    if method == "racnn":
        assert int(b["steps"]) == int(a["steps"]) > 0
