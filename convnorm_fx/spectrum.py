"""The kernel spectrum and the preconditioner (Liu et al. 2021, §3.2, eq. 6).

Per output channel, the power spectrum ``S_k = sum_j |DFT_M(a_kj)|^2`` of the kernels
``a_kj`` defines the preconditioner ``P_k = (A_k A_k^T)^{-1/2}`` whose DFT is ``S_k^{-1/2}``,
so that ``Q_k = P_k A_k`` is a tight frame: ``Q_k Q_k^T = I`` (eq. 7). ``S_k`` is computed
as the DFT of the channel-summed kernel autocorrelation (Wiener-Khinchin), in float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .dft import phase
from .geometry import IntOrPair, pair
from .precision import autocast_disabled, complex_dtype, compute_dtype, spectrum_dtype


__all__ = [
    "AUTOCORRELATION_FFT_TAPS",
    "DEFAULT_EPS",
    "autocorrelation_by_fft",
    "autocorrelation_by_gram",
    "inverse_sqrt_spectrum",
    "kernel_autocorrelation",
    "kernel_power_spectrum",
    "power_spectrum_from_autocorrelation",
    "preconditioner_spectrum",
]


#: Default ``eps`` added to the kernel power spectrum before the inverse square root.
#: Like BatchNorm's ``eps`` on the variance it bounds the gain of the preconditioner by
#: ``eps ** -0.5`` (about 316) at frequencies where the kernel has (almost) no energy.
DEFAULT_EPS = 1e-5


def kernel_power_spectrum(weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1) -> Tensor:
    """Per-output-channel power spectrum ``S_k = sum_j |DFT_M(a_kj)|^2`` by zero-padded FFTs.

    This is the direct form of eq. (6); it takes one FFT per kernel pair and serves as the
    reference for :func:`kernel_autocorrelation` + :func:`power_spectrum_from_autocorrelation`,
    which give the same numbers at a fraction of the cost.

    Args:
        weight: conv weight ``(C_out, C_in / groups, k_h, k_w)``. Groups need no special
            care: each output channel only has kernels for the inputs of its own group.
        grid: FFT grid ``(M_h, M_w)``; must hold the dilated kernel.
        dilation: the conv's dilation; the kernel is zero-stuffed accordingly.

    Returns:
        Real tensor ``(C_out, M_h, M_w // 2 + 1)`` (rFFT half plane), in the compute dtype
        (float32, or float64 for float64 weights).

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``(C_out, M_h, M_w // 2 + 1)``
    """
    dh, dw = pair(dilation, "dilation")
    mh, mw = int(grid[0]), int(grid[1])
    c_out, c_in, kh, kw = weight.shape
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if eh > mh or ew > mw:
        raise ValueError(f"grid {(mh, mw)} is smaller than the dilated kernel {(eh, ew)}")
    w = weight.to(compute_dtype(weight.dtype))
    stuffed = w.new_zeros(c_out, c_in, eh, ew)
    stuffed[:, :, ::dh, ::dw] = w  # the dilated kernel has zeros between its taps
    spectrum = torch.fft.rfft2(stuffed, s=(mh, mw))
    return spectrum.abs().square().sum(dim=1)


#: Kernels with more taps than this get their autocorrelation by FFT instead of Gram matrices.
AUTOCORRELATION_FFT_TAPS = 64


def kernel_autocorrelation(weight: Tensor) -> Tensor:
    """Channel-summed autocorrelation ``R_k = sum_j a_kj (star) a_kj`` of each output channel.

    ``R_k`` has ``(2 k_h - 1) x (2 k_w - 1)`` lags, centred at index ``(k_h - 1, k_w - 1)``, and
    does not depend on the input size: its DFT on any grid is the power spectrum ``S_k``
    (Wiener-Khinchin), which makes it a resolution-independent summary of the kernel.

    It is computed from the per-channel Gram matrices ``G_k = A_k^T A_k`` of the kernel taps
    (``A_k`` is ``C_in x k_h k_w``): one batched matmul of ``C_out * C_in * (k_h k_w)^2``
    multiply-adds, then each tap pair ``(p, q)`` adds ``G_k[p, q]`` to the lag ``q - p``.
    This replaces a grouped conv with one group per output channel, which on CPU (and for
    float64 everywhere) runs as ``C_out`` separate small convs.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``(C_out, 2 k_h - 1, 2 k_w - 1)``
    """
    kh, kw = weight.shape[2:]
    if kh * kw > AUTOCORRELATION_FFT_TAPS:
        return autocorrelation_by_fft(weight)
    return autocorrelation_by_gram(weight)


def autocorrelation_by_gram(weight: Tensor) -> Tensor:
    """:func:`kernel_autocorrelation` from the Gram matrices of the taps (small kernels)."""
    c_out, c_in, kh, kw = weight.shape
    lh, lw = 2 * kh - 1, 2 * kw - 1
    w = weight.to(compute_dtype(weight.dtype)).reshape(c_out, c_in, kh * kw)
    gram = torch.bmm(w.transpose(1, 2), w)  # (C_out, P, P), P = k_h k_w taps
    rows = torch.arange(kh, device=w.device).repeat_interleave(kw)  # tap p -> (row, col)
    cols = torch.arange(kw, device=w.device).repeat(kh)
    # Lag of the pair (p, q) is (row_q - row_p, col_q - col_p), stored at offset (k_h - 1, k_w - 1).
    lag = (rows[None, :] - rows[:, None] + kh - 1) * lw + (cols[None, :] - cols[:, None] + kw - 1)  # (P, P)
    lags = gram.new_zeros(c_out, lh * lw).index_add_(1, lag.reshape(-1), gram.reshape(c_out, -1))
    return lags.reshape(c_out, lh, lw)


def autocorrelation_by_fft(weight: Tensor) -> Tensor:
    """:func:`kernel_autocorrelation` by FFTs (large kernels, such as patchify convs, whose
    Gram matrices grow as ``(k_h k_w)^2``): the power spectrum on the ``(2 k - 1)``-grid, where
    the circular autocorrelation is the linear one, costs a few FFTs per kernel."""
    kh, kw = weight.shape[2:]
    lh, lw = 2 * kh - 1, 2 * kw - 1
    spectrum = torch.fft.rfft2(weight.to(compute_dtype(weight.dtype)), s=(lh, lw))
    power = (spectrum.real.square() + spectrum.imag.square()).sum(dim=1)
    circular = torch.fft.irfft2(power, s=(lh, lw))  # lag t at index t mod (2 k - 1)
    return torch.roll(circular, shifts=(kh - 1, kw - 1), dims=(-2, -1))


def power_spectrum_from_autocorrelation(
    autocorrelation: Tensor, grid: Sequence[int], dilation: IntOrPair = 1
) -> Tensor:
    """Power spectrum on an ``M_h x M_w`` rFFT grid from the channel-summed autocorrelation.

    Evaluates ``S_k(w) = sum_t R_k(t) exp(-2 pi i <w, t d> / M)`` with small DFT matrices, so
    lags that wrap around a grid smaller than the autocorrelation alias exactly as a
    circular correlation does. The imaginary part vanishes because ``R_k(t) = R_k(-t)``.

    Args:
        autocorrelation: output of :func:`kernel_autocorrelation`.
        grid: ``(M_h, M_w)``.
        dilation: the conv's dilation (lags are multiples of it).

    Shape:
        - autocorrelation: ``(C_out, 2 k_h - 1, 2 k_w - 1)``
        - output: ``(C_out, M_h, M_w // 2 + 1)``
    """
    dh, dw = pair(dilation, "dilation")
    mh, mw = int(grid[0]), int(grid[1])
    r = autocorrelation
    lh, lw = r.shape[-2:]
    cplx = complex_dtype(r.dtype)
    table_h = phase(mh, mh, tuple((t - (lh - 1) // 2) * dh for t in range(lh)), cplx, r.device)  # (M_h, L_h)
    table_w = phase(mw // 2 + 1, mw, tuple((t - (lw - 1) // 2) * dw for t in range(lw)), cplx, r.device)
    cos_h, sin_h = table_h.real, table_h.imag  # cos and sin of 2 pi w t / M
    cos_w, sin_w = table_w.real, table_w.imag  # (M_w//2+1, L_w)
    # Re[(C_h - i S_h) R (C_w - i S_w)^T] = C_h R C_w^T - S_h R S_w^T, as two matmuls over all
    # channels at once (batches of tiny matmuls are slow): lags along w first, then along h.
    c = r.shape[:-2].numel()
    along_w = (r.reshape(c * lh, lw) @ torch.cat([cos_w, sin_w]).T).view(c, lh, 2, -1)  # (C, L_h, 2, W_f)
    along_w = along_w.permute(2, 1, 0, 3).reshape(2 * lh, -1)  # rows: (cos|sin, lag h)
    spectrum = (torch.cat([cos_h, -sin_h], dim=1) @ along_w).view(mh, c, -1).transpose(0, 1)
    spectrum = spectrum.reshape(*r.shape[:-2], mh, -1)
    return spectrum.clamp_min(0.0)  # round-off can dip below zero at spectral nulls


def inverse_sqrt_spectrum(power: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """DFT of the preconditioner ``v_k``: ``(S_k + eps)^{-1/2}`` (Algorithm 1).

    With ``eps = 0`` this is the exact operator of the paper, except at frequencies where
    ``S_k`` is exactly zero (an all-zero channel), which get gain 0 instead of infinity:
    the Moore-Penrose form ``(A_k A_k^T)^{+1/2}``, so outputs stay finite. With ``eps > 0``
    the gain is at most ``eps ** -0.5``.
    """
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if eps > 0:
        return torch.rsqrt(power + eps)
    positive = power > 0
    # Feed rsqrt a safe value where the spectrum is zero so its backward stays finite.
    safe = torch.where(positive, power, torch.ones_like(power))
    return torch.where(positive, torch.rsqrt(safe), torch.zeros_like(power))


def preconditioner_spectrum(
    weight: Tensor,
    grid: Sequence[int],
    dilation: IntOrPair = 1,
    eps: float = DEFAULT_EPS,
    stop_gradient: bool = True,
) -> Tensor:
    """DFT ``(S_k + eps)^{-1/2}`` of every channel's preconditioner on an ``M_h x M_w`` grid.

    The spectrum is computed in float64 with autocast disabled (it costs about
    ``C_out * C_in * k^4`` multiply-adds, negligible next to the conv) and returned in the
    compute dtype: float32, or float64 for float64 weights.

    Args:
        weight: conv weight ``(C_out, C_in / g, k_h, k_w)``.
        grid: ``(M_h, M_w)``, the size of the full conv output.
        dilation: the conv's dilation.
        eps: see :func:`inverse_sqrt_spectrum`.
        stop_gradient: detach the weight, so the preconditioner is a constant in backward.

    Shape:
        - output: ``(C_out, M_h, M_w // 2 + 1)``
    """
    source = weight.detach() if stop_gradient else weight
    with autocast_disabled(weight.device):
        exact = source.to(spectrum_dtype(weight.device))
        power = power_spectrum_from_autocorrelation(kernel_autocorrelation(exact), grid, dilation)
        return inverse_sqrt_spectrum(power, eps).to(compute_dtype(weight.dtype))
