"""The add-on contract, over every registered add-on (``finegrain.engine.addons.ADDONS``), as test_contract.py runs
over every model: each can be switched on from its options, a run killed between epochs resumes to the same weights
as one that was not, and a run writes no file in its run directory beyond the run layout's and the add-ons' own
(``AddOn.files``). A new add-on without an entry in ``SWITCH_ON`` fails ``test_every_addon_has_a_way_to_switch_it_on``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finegrain.cli import main
from finegrain.engine.addons import ADDONS, build_addons
from finegrain.engine.train import fit
from finegrain.run_layout import RunDir

from .conftest import fit_killed_in_epoch, make_checkpoint, make_imagefolder, write_images

CLASSES = [f"class_{c}" for c in range(4)]


def _unlabeled(tmp_path):
    folder = tmp_path / "unlabelled"
    for c in range(4):
        write_images(folder, c, 2, np.random.default_rng(100 + c), start=50 * c)
    return {"unlabeled": str(folder), "pseudo_fraction": 1.0}


def _teacher(tmp_path):
    return {"teachers": [str(make_checkpoint(tmp_path / "teacher.pt", classes=CLASSES))], "kd_alpha": 0.5}


def _sr_model(tmp_path):
    run = tmp_path / "sr"
    args = ["sr", "train", str(tmp_path / "data"), "--steps", "3", "--patch", "32", "--max-images", "8",
            "--eval-images", "2", "--batch-size", "4", "--run-dir", str(run)]  # fmt: skip
    assert main([*args, "--quiet"]) == 0
    return {"sr_aug": 0.5, "sr_model": str(run / "sr.pt"), "cache_features": False}


#: add-on name -> the options that switch it on for a 2-epoch tiny run (a callable of the test folder where it needs
#: files: unlabelled images, a teacher, a super-resolution model)
SWITCH_ON = {
    "label_noise": lambda tmp: {"label_noise": "prune"},
    "train_on_val": lambda tmp: {"train_on_val": True, "freeze_backbone": False},
    "unlabeled": _unlabeled,
    "consistency": lambda tmp: {
        **_unlabeled(tmp),
        "consistency": 1.0,
        "consistency_threshold": 0.3,
        "freeze_backbone": False,
        "train_stages": 2,
        "map_views": 2,
    },
    "qat": lambda tmp: {"qat": True, "freeze_backbone": False, "calib_images": 4, "batch_size": 16},
    "mixstyle": lambda tmp: {"mixstyle": 0.5, "freeze_backbone": False},
    "sr_aug": _sr_model,
    "fourier_mix": lambda tmp: {"fourier_mix": 0.5, "cache_features": False},
    "cutmix": lambda tmp: {"cutmix": 1.0, "freeze_backbone": False},
    "progressive": lambda tmp: {
        "stages": [{"epochs": 1, "input_size": 48}, {"epochs": 1, "input_size": 64}],
        "cache_features": False,
    },  # fmt: skip
    "distill": _teacher,
    "center": lambda tmp: {"center_loss": 0.5, "freeze_backbone": False},
    "mirror_check": lambda tmp: {"mirror_check": True, "freeze_backbone": False},
    "low_res": lambda tmp: {"low_res_share": 0.5, "freeze_backbone": False},  # killed in the full-size epoch
}


def test_every_addon_has_a_way_to_switch_it_on():
    assert sorted(SWITCH_ON) == sorted(a.name for a in ADDONS)


@pytest.mark.slow
@pytest.mark.parametrize("addon", [a.name for a in ADDONS])
def test_addon_switches_on_resumes_exactly_and_writes_only_its_files(addon, tmp_path, tiny_config, monkeypatch):
    data = make_imagefolder(tmp_path / "data", num_classes=4, per_class=12)
    options = {"pretrained": False, "epochs": 2, "batch_size": 8, "lr": 3e-3} | SWITCH_ON[addon](tmp_path)
    config = lambda run: tiny_config(data, run_dir=str(tmp_path / run), **options)  # noqa: E731
    assert addon in [a.name for a in build_addons(config("straight"))]
    straight = fit(config("straight"))
    fit_killed_in_epoch(monkeypatch, 1, config("killed"))
    resumed = fit(None, resume=tmp_path / "killed")
    assert [r["epoch"] for r in resumed.history] == [2]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{addon}: {len(different)} of {len(a)} tensors differ after resume, e.g. {different[:3]}"
    allowed = set(RunDir.STAGE_FILES) | {name for a in ADDONS for name in a.files}
    written = {p.name for p in (tmp_path / "straight").iterdir() if p.is_file()}
    assert written <= allowed, f"{addon} wrote files no one declared: {sorted(written - allowed)}"
