"""Style augmentations against lighting and background shifts: one on images, one on feature maps.

- :func:`fourier_mix`: swap/mix the low-frequency Fourier *amplitude* of an image with another's, keeping its
  phase (FDA / amplitude mix): colour, lighting and texture statistics change, shapes and parts stay.
- :class:`MixStyle`: mix per-sample channel means and standard deviations of feature maps between samples of
  a batch during training (Zhou et al., ICLR 2021); the identity in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _low_band(h: int, w: int, beta: float, device) -> torch.Tensor:
    """Mask of the centred (fftshift-ed) low-frequency square of side 2*floor(beta*min(h, w)) + 1."""
    b = int(beta * min(h, w))
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    ch, cw = h // 2, w // 2
    mask[ch - b : ch + b + 1, cw - b : cw + b + 1] = True
    return mask


def fourier_mix(x: torch.Tensor, other: torch.Tensor, lam: float | torch.Tensor = 1.0, beta: float = 0.1):
    """``x`` with the amplitude of its low frequencies moved ``lam`` of the way to ``other``'s (lam=1: swapped);
    the phase, and the amplitude outside the band, stay ``x``'s. Works on (..., H, W) tensors."""
    fx = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    fo = torch.fft.fftshift(torch.fft.fft2(other.float()), dim=(-2, -1))
    amp, phase = fx.abs(), fx.angle()
    lam = torch.as_tensor(lam, dtype=amp.dtype, device=x.device)
    lam = lam.view(-1, *([1] * (x.dim() - 1))) if lam.dim() else lam
    mixed = (1 - lam) * amp + lam * fo.abs()
    amp = torch.where(_low_band(*x.shape[-2:], beta, x.device), mixed, amp)
    out = torch.fft.ifft2(torch.fft.ifftshift(torch.polar(amp, phase), dim=(-2, -1))).real
    return out.to(x.dtype)


def fourier_mix_batch(x: torch.Tensor, p: float, beta: float = 0.1, max_lam: float = 1.0) -> torch.Tensor:
    """Training-time augmentation: each image, with probability ``p``, takes low-frequency amplitude from
    another image of the batch, ``lam ~ U(0, max_lam)``."""
    if p <= 0 or len(x) < 2:
        return x
    chosen = torch.rand(len(x), device=x.device) < p
    if not chosen.any():
        return x
    other = x[torch.randperm(len(x), device=x.device)]
    lam = torch.rand(len(x), device=x.device) * max_lam * chosen
    return fourier_mix(x, other, lam, beta)


class MixStyle(nn.Module):
    """With probability ``p`` per batch, normalise each sample's feature map by its own channel statistics and
    re-style it with ``lam * own + (1 - lam) * other's`` statistics, lam ~ Beta(alpha, alpha) per sample."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eps = p, eps
        self.beta = torch.distributions.Beta(alpha, alpha)

    def forward(self, x: torch.Tensor, perm: torch.Tensor | None = None, lam: torch.Tensor | None = None):
        if not self.training or len(x) < 2 or (perm is None and torch.rand(()) > self.p):
            return x
        mu = x.mean((2, 3), keepdim=True)
        sig = (x.var((2, 3), keepdim=True) + self.eps).sqrt()
        perm = torch.randperm(len(x), device=x.device) if perm is None else perm
        lam = self.beta.sample((len(x), 1, 1, 1)).to(x) if lam is None else lam.view(-1, 1, 1, 1).to(x)
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sig_mix = lam * sig + (1 - lam) * sig[perm]
        return (x - mu.detach()) / sig.detach() * sig_mix + mu_mix


def jigsaw(x: torch.Tensor, n: int) -> torch.Tensor:
    """PMG's jigsaw patches (Du et al., ECCV 2020): cut each image into an ``n`` x ``n`` grid and shuffle the
    cells (a different order per image), so only local parts, not the global layout, carry the class. Sides
    that do not divide by ``n`` keep their last few rows/columns in place. ``n`` = 1 is the identity."""
    if n <= 1:
        return x
    b, c, h, w = x.shape
    ph, pw = h // n, w // n
    out = x.clone()
    cells = (
        x[..., : ph * n, : pw * n].reshape(b, c, n, ph, n, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, ph, pw)
    )
    order = torch.argsort(torch.rand(b, n * n, device=x.device), dim=1)
    cells = cells[torch.arange(b, device=x.device)[:, None], order]
    grid = cells.reshape(b, n, n, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * n, pw * n)
    out[..., : ph * n, : pw * n] = grid
    return out
