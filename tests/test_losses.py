import pytest
import torch
import torch.nn.functional as F

from finegrain.losses import CenterLoss, distillation_loss


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
