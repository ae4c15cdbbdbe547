import pytest
import torch
import torch.nn.functional as F

from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.data import load_dataset
from finegrain.engine.addons.distill import DistillAddOn
from finegrain.engine.train import fit
from finegrain.errors import CheckpointError, ConfigError
from finegrain.losses import CenterLoss, distillation_loss
from finegrain.predict import Predictor

from .conftest import fit_killed_in_epoch, make_checkpoint


def test_kd_loss_is_cross_entropy_for_a_one_hot_teacher_at_t1():
    torch.manual_seed(0)
    student, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    one_hot = F.one_hot(y, 5).float()
    kd = distillation_loss(student, one_hot, y, temperature=1.0, alpha=1.0, teacher_probs=True)
    assert kd.item() == pytest.approx(F.cross_entropy(student, y).item(), abs=1e-5)
    # and alpha=0 is plain cross-entropy whatever the teacher says
    assert distillation_loss(student, torch.randn(8, 5), y, alpha=0.0).item() == pytest.approx(
        F.cross_entropy(student, y).item(), abs=1e-6
    )


def test_kd_loss_is_zero_soft_term_when_student_equals_teacher():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert distillation_loss(logits, logits, y, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_center_loss_falls_and_classes_tighten_on_a_toy_problem():
    torch.manual_seed(0)
    centres = torch.randn(3, 16)
    y = torch.arange(3).repeat(40)
    features = torch.nn.Parameter(centres[y] + torch.randn(120, 16) * 0.7)
    loss_fn = CenterLoss(3, 16, beta=0.2)
    opt = torch.optim.SGD([features], lr=50.0)  # the loss averages over 120 features

    def spread() -> float:
        f = F.normalize(features.detach(), dim=1)
        return sum(f[y == c].var(0).sum().item() for c in range(3))

    first, before = None, spread()
    for _ in range(60):
        loss = loss_fn(features, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first and spread() < 0.3 * before


@pytest.mark.parametrize("targets", ["cached", "cached_fixed", "online", "fixed"])
def test_distillation_student_follows_its_teacher_not_the_labels(tmp_path, imagefolder, tiny_config, targets,
                                                                 monkeypatch):  # fmt: skip
    """A teacher that systematically answers the *next* class: a student taught by it alone (kd_alpha=1) must
    learn the teacher's mapping, which proves the soft labels, not the true ones, drive its training: on cached
    features (each view's soft labels, or each image's for both: fixed), and on images with the teacher run on
    every batch (online) or once per image (fixed: never per batch)."""
    if targets == "fixed":
        monkeypatch.setattr(DistillAddOn, "_soft_labels", lambda self, x: pytest.fail("teacher run on a batch"))
    teacher = fit(tiny_config(imagefolder, epochs=6, lr=3e-3, run_dir=str(tmp_path / "teacher"))).run_dir
    ckpt = Checkpoint.load(teacher / "best.pt")
    for key in ("head.1.weight", "head.1.bias"):
        ckpt.state_dict[key] = ckpt.state_dict[key].roll(1, dims=0)  # logit of c+1 <- evidence of c
    ckpt.save(tmp_path / "shifted.pt")
    student = fit(
        tiny_config(
            imagefolder, epochs=5, lr=3e-3, teachers=[str(tmp_path / "shifted.pt")], kd_alpha=1.0,
            kd_temperature=1.0, cache_features=targets.startswith("cached"), run_dir=str(tmp_path / "student"),
            input_size=48, kd_targets="fixed" if targets.endswith("fixed") else "auto",
        )  # the teacher sees 64 px, the student 48: images are resized for the teacher
    )  # fmt: skip
    val = load_dataset(imagefolder, val_fraction=0.2).split("val")
    paths, labels = [s.path for s in val], torch.tensor([s.label for s in val])
    # last.pt: best.pt is picked by validation accuracy against the true labels, which this student must not learn
    pred = Predictor.load(student.run_dir / "last.pt").probabilities_for(paths).argmax(1)
    teacher_pred = Predictor.load(tmp_path / "shifted.pt").probabilities_for(paths).argmax(1)
    assert (teacher_pred == (labels + 1) % 4).float().mean() >= 0.75  # the teacher is shifted as intended
    assert (pred == teacher_pred).float().mean() >= 0.75 and (pred == labels).float().mean() <= 0.25


def test_cli_distill_needs_a_teacher(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--epochs", "1"])
    assert "--teacher" in capsys.readouterr().err


def test_a_teacher_of_other_classes_is_refused_before_training(tmp_path, imagefolder, tiny_config):
    teacher = make_checkpoint(tmp_path / "t.pt", classes=("a", "b", "c"))
    with pytest.raises(CheckpointError, match="other classes"):
        fit(tiny_config(imagefolder, teachers=[str(teacher)]))


@pytest.mark.parametrize("cached", [True, False])
def test_center_loss_on_features_that_cannot_move_is_refused(imagefolder, tiny_config, cached):
    """Measured on cub100: with a frozen backbone, runs with and without center loss were identical to the last
    digit (the loss cannot change what a linear head reads); the option now says so instead."""
    with pytest.raises(ConfigError, match="no-freeze-backbone"):
        fit(tiny_config(imagefolder, center_loss=0.5, cache_features=cached))


def test_center_loss_option_trains_and_its_centres_survive_resume(tmp_path, imagefolder, tiny_config, monkeypatch):
    """A run killed after its first epoch and resumed ends with the same centres as an uninterrupted run."""

    def cfg(run: str):
        return tiny_config(imagefolder, epochs=2, lr=1e-3, center_loss=0.5, freeze_backbone=False,
                           run_dir=str(tmp_path / run))  # fmt: skip

    straight = fit(cfg("straight"))
    assert straight.history[-1]["val_top1"] >= 0.75
    centres = Checkpoint.load(straight.run_dir / "last.pt").resume["addons"]["center"]["centers"]
    assert centres.shape[0] == 4 and torch.allclose(centres.norm(dim=1), torch.ones(4), atol=0.2)  # unit features
    fit_killed_in_epoch(monkeypatch, 1, cfg("killed"))
    first = Checkpoint.load(tmp_path / "killed" / "last.pt").resume["addons"]["center"]["centers"]
    assert not torch.equal(first, centres)  # the second epoch moves them: resume has something to restore
    resumed = fit(None, resume=tmp_path / "killed")
    assert [r["epoch"] for r in resumed.history] == [2]
    again = Checkpoint.load(tmp_path / "killed" / "last.pt").resume["addons"]["center"]["centers"]
    torch.testing.assert_close(again, centres, rtol=0, atol=0)
