import torch
import torch.nn as nn

from finegrain.engine.depthwise import fp32_depthwise, large_depthwise
from finegrain.models import create_model

CPU = torch.device("cpu")


def _dtypes(module: nn.Module, run) -> dict[nn.Module, tuple[torch.dtype, tuple]]:
    """The output dtype and shape of every convolution of ``module`` while ``run()`` runs."""
    seen: dict[nn.Module, tuple[torch.dtype, tuple]] = {}
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (o.dtype, o.shape))) for c in convs]
    run()
    for h in hooks:
        h.remove()
    assert len(seen) == len(convs)
    return seen


def test_large_depthwise_convolutions_train_in_fp32_within_a_bf16_step_and_nowhere_else():
    """lite0's last two stages (timm's 'same'-padded 5x5 depthwise convolutions): inside the block those compute in
    fp32 and every other convolution in bf16, the output is fp32's within bf16's rounding (the padding kept), and
    gradients reach the fp32 ones; after it, and without bf16, the modules are as they were."""
    torch.manual_seed(0)
    _, upper = create_model("baseline", num_classes=5).split_stages(2)
    upper.eval()  # dropout off, so outputs compare
    convs = set(large_depthwise(upper))
    assert len(convs) >= 4 and {max(c.kernel_size) for c in convs} == {5}
    x = torch.randn(2, 112, 14, 14)
    with torch.no_grad():
        reference = upper(x)  # fp32 throughout

    def bf16_step(patched: bool, amp: str = "bf16"):
        with fp32_depthwise(upper, CPU, amp if patched else "none"), torch.autocast("cpu", dtype=torch.bfloat16):
            out = upper(x)
        out.float().sum().backward()
        return out

    out: list[torch.Tensor] = []
    inside = _dtypes(upper, lambda: out.append(bf16_step(True)))
    assert {inside[c][0] for c in convs} == {torch.float32}
    assert {d for m, (d, _) in inside.items() if m not in convs} == {torch.bfloat16}
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)
    assert not any("forward" in vars(c) for c in convs)  # restored: checkpoints and exports see plain modules
    assert nn.functional.cosine_similarity(out[0].float().flatten(), reference.flatten(), dim=0) > 0.98
    outside = _dtypes(upper, lambda: bf16_step(False))
    assert {d for d, _ in outside.values()} == {torch.bfloat16}
    assert all(outside[c][1] == inside[c][1] for c in convs)  # the same maps: the padding kept
    with fp32_depthwise(upper, CPU, "none"):  # an fp32 run: nothing to change
        assert not any("forward" in vars(c) for c in convs)
    with fp32_depthwise(upper, CPU, "bf16"):
        assert all("forward" in vars(c) for c in convs)
