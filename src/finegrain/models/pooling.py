"""Second-order pooling of convolutional feature maps: bilinear (B-CNN) and its compact sketches.

All poolings take maps ``a`` (B, c1, h, w) and ``b`` (B, c2, h, w) at the same spatial size and return the
descriptor (B, D) after signed square root and L2 normalisation (Lin et al. 2015; Gao et al. 2016).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def signed_sqrt_l2(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sign(x)·sqrt(|x| + eps), then L2 normalisation: tames the bursty, heavy-tailed second-order statistics."""
    x = torch.sign(x) * torch.sqrt(x.abs() + eps)
    return F.normalize(x, dim=1)


class BilinearPool(nn.Module):
    """(1/hw)·Σ_p a_p b_pᵀ, flattened to c1·c2."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, c1, h, w = a.shape
        outer = torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (h * w)
        return signed_sqrt_l2(outer.flatten(1))


class _SketchPool(nn.Module):
    """Sketch every location's a_p ⊗ b_p (``sketch`` of subclasses), average over locations, normalise."""

    dim: int

    def sketch(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        rows_a = a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])
        rows_b = b.flatten(2).transpose(1, 2).reshape(-1, b.shape[1])
        return signed_sqrt_l2(self.sketch(rows_a, rows_b).view(n, -1, self.dim).mean(1))


class TensorSketchPool(_SketchPool):
    """Compact bilinear pooling with Tensor Sketch (Gao et al. 2016): ⟨TS(x), TS(y)⟩ ≈ ⟨x, y⟩².

    TS(a⊗b) = IFFT(FFT(CS₁(a)) · FFT(CS₂(b))); the sketch is linear in a⊗b, so sketching each location and
    averaging equals sketching the bilinear matrix. The random hashes are buffers drawn from ``seed``: they are
    saved in checkpoints, so a reloaded model reproduces exactly. FFT does not export to ONNX: use
    :class:`RandomMaclaurinPool` (``pooling="rm"``) where an exportable model is needed.
    """

    def __init__(self, c1: int, c2: int, dim: int = 8192, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        for i, c in ((1, c1), (2, c2)):  # count sketch i: input channel k goes to bin hash[k] with sign[k]
            self.register_buffer(f"hash{i}", torch.randint(dim, (c,), generator=g))
            self.register_buffer(f"sign{i}", torch.randint(2, (c,), generator=g).float() * 2 - 1)

    def count_sketch(self, x: torch.Tensor, hashes: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.dim).index_add_(1, hashes, x * signs)

    def spectrum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = torch.fft.rfft(self.count_sketch(a.float(), self.hash1, self.sign1), dim=-1)
        fb = torch.fft.rfft(self.count_sketch(b.float(), self.hash2, self.sign2), dim=-1)
        return fa * fb

    def sketch(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Tensor Sketch of a_i ⊗ b_i for vectors a (N, c1), b (N, c2) -> (N, dim)."""
        return torch.fft.irfft(self.spectrum(a, b), n=self.dim, dim=-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # The inverse FFT is linear: average the locations' spectra, then invert once per image.
        n = a.shape[0]
        rows_a = a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])
        rows_b = b.flatten(2).transpose(1, 2).reshape(-1, b.shape[1])
        mean_spectrum = self.spectrum(rows_a, rows_b).view(n, -1, self.dim // 2 + 1).mean(1)
        return signed_sqrt_l2(torch.fft.irfft(mean_spectrum, n=self.dim, dim=-1))


class RandomMaclaurinPool(_SketchPool):
    """Compact bilinear pooling with Random Maclaurin features (Gao et al. 2016): (W₁a ∘ W₂b)/√d.

    Only matrix products and element-wise products: exports to ONNX, unlike the FFT of Tensor Sketch.
    """

    def __init__(self, c1: int, c2: int, dim: int = 8192, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.register_buffer("proj1", torch.randint(2, (c1, dim), generator=g).float() * 2 - 1)
        self.register_buffer("proj2", torch.randint(2, (c2, dim), generator=g).float() * 2 - 1)

    def sketch(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.float() @ self.proj1) * (b.float() @ self.proj2) / self.dim**0.5
