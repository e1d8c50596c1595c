"""Stateless tensor math of Convolutional Normalization (Liu et al., NeurIPS 2021).

Everything here is a pure function of tensors: no ``nn.Module``, no caches, no graph code.
The notation follows the paper (Sections 3.2-3.3, Appendix B):

* ``a_kj`` is the kernel from input channel ``j`` to output channel ``k`` (``weight[k, j]``);
* the conv of a signal of size ``H`` with a kernel of dilated extent ``e = d (k - 1) + 1``
  is computed "full" (stride 1, padding ``e - 1`` on both sides); its ``M = H + e - 1``
  outputs hold the whole linear correlation, so on the circular domain of size ``M`` the
  layer is exactly a circular cross-correlation of the zero-embedded input (Appendix B.2);
* per output channel, the power spectrum ``S_k = sum_j |DFT_M(a_kj)|^2`` defines the
  preconditioner ``P_k = (A_k A_k^T)^{-1/2}`` whose DFT is ``S_k^{-1/2}`` (eq. 6), so that
  ``Q_k = P_k A_k`` is a tight frame: ``Q_k Q_k^T = I`` (eq. 7);
* the normalized output is cropped to the window the original conv produces and then
  downsampled by the stride (Appendix B.3-B.4).

Two algorithms compute the same numbers (to round-off) for a site with a constant
preconditioner (stop-gradient, the default):

* ``'direct'``: the full conv, then the stage (``conv_norm_stage``), which filters its DFT by
  ``v_k R_k`` (the affine transform is circular where its halo stays on the grid) and
  inverse-transforms only the samples that crop and stride keep, as one autograd function
  that keeps nothing of the transforms for backward;
* ``'spectral'``: no full conv at all: the DFT of the input, a per-frequency
  ``C_out x C_in`` complex product with ``v_k R_k conj(A_kj)``, and the inverse at the kept
  samples; backward needs only the input, which the layer before keeps anyway.

:func:`select_algorithm` picks one per site by a cost model. Grids up to 64 per axis are
transformed by products with DFT matrices, larger ones by FFTs. 1x1 kernels fold the flat
preconditioner into the conv weight. Other cases (``stop_gradient=False``, affine halos
that leave the grid, MPS, ``torch.export``) run the step-by-step pipeline.

Precision: the spectrum and the transforms always run in float32 (float64 stays float64)
with autocast disabled, because cuFFT's half precision needs power-of-two sizes and there
is no bfloat16 FFT; results are cast back to the dtype of the conv output.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ALGORITHMS",
    "DEFAULT_EPS",
    "IntOrPair",
    "PaddingArg",
    "conv_norm2d",
    "conv_norm_stage",
    "conv_output_size",
    "crop_and_downsample",
    "explicit_padding",
    "feeding_conv_args",
    "full_padding",
    "grid_size",
    "inverse_sqrt_spectrum",
    "kernel_autocorrelation",
    "kernel_power_spectrum",
    "normalize_circular",
    "pad_for_mode",
    "power_spectrum_from_autocorrelation",
    "preconditioner_spectrum",
    "select_algorithm",
    "site_costs",
]

IntOrPair = Union[int, Sequence[int]]
PaddingArg = Union[str, int, Sequence[int]]

#: Default ``eps`` added to the kernel power spectrum before the inverse square root.
#: Like BatchNorm's ``eps`` on the variance it bounds the gain of the preconditioner by
#: ``eps ** -0.5`` (about 316) at frequencies where the kernel has (almost) no energy.
DEFAULT_EPS = 1e-5

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``; nothing to switch off where autocast does not exist (meta)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _complex_dtype(real: torch.dtype) -> torch.dtype:
    """The complex dtype with parts of the real dtype ``real`` (float64 or float32)."""
    return torch.complex128 if real == torch.float64 else torch.complex64


def _spectrum_dtype(device: torch.device) -> torch.dtype:
    """The kernel spectrum is tiny next to the activations, so it is computed in float64:
    at weak frequencies ``S_k`` is a small difference of large sums, and float32 would lose
    the relative accuracy that ``S_k^{-1/2}`` needs there. MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def full_padding(kernel_size: IntOrPair, dilation: IntOrPair = 1) -> tuple[int, int]:
    """Padding ``d (k - 1)`` per axis that makes a stride-1 conv compute the full correlation.

    Args:
        kernel_size: ``k`` or ``(k_h, k_w)``.
        dilation: ``d`` or ``(d_h, d_w)``.

    Returns:
        ``(f_h, f_w)`` with ``f = d (k - 1)``.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    dh, dw = _pair(dilation, "dilation")
    return dh * (kh - 1), dw * (kw - 1)


def grid_size(input_size: Sequence[int], kernel_size: IntOrPair, dilation: IntOrPair = 1) -> tuple[int, int]:
    """Size ``M = H + d (k - 1)`` of the circular domain of a conv on an ``H x W`` signal.

    The full linear correlation has exactly ``M`` outputs, so a circular correlation on a
    grid of that size never wraps input samples onto each other (Appendix B.2).
    """
    fh, fw = full_padding(kernel_size, dilation)
    return int(input_size[0]) + fh, int(input_size[1]) + fw


def explicit_padding(
    padding: PaddingArg, kernel_size: IntOrPair, dilation: IntOrPair = 1
) -> tuple[int, int, int, int]:
    """Resolve a ``nn.Conv2d`` padding argument to ``(top, bottom, left, right)``.

    ``'same'`` splits the total padding ``d (k - 1)`` as PyTorch does: the smaller half
    before, the larger after. ``'valid'`` is no padding.
    """
    fh, fw = full_padding(kernel_size, dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            return fh // 2, fh - fh // 2, fw // 2, fw - fw // 2
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return ph, ph, pw, pw


def pad_for_mode(x: Tensor, padding: tuple[int, int, int, int], padding_mode: str) -> Tensor:
    """Pad ``x`` explicitly for a non-zero padding mode; the padded input becomes the signal.

    Args:
        x: input of shape ``(N, C, H, W)``.
        padding: ``(top, bottom, left, right)``.
        padding_mode: ``'reflect'``, ``'replicate'`` or ``'circular'``.
    """
    top, bottom, left, right = padding
    return F.pad(x, (left, right, top, bottom), mode=padding_mode)


def conv_output_size(
    input_size: Sequence[int],
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: IntOrPair = 1,
) -> tuple[int, int]:
    """Spatial output size of a conv, as ``F.conv2d`` computes it."""
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    top, bottom, left, right = padding
    out_h = (int(input_size[0]) + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (int(input_size[1]) + left + right - dw * (kw - 1) - 1) // sw + 1
    return out_h, out_w


# --------------------------------------------------------------------------------------
# Kernel spectrum
# --------------------------------------------------------------------------------------


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
    dh, dw = _pair(dilation, "dilation")
    mh, mw = int(grid[0]), int(grid[1])
    c_out, c_in, kh, kw = weight.shape
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if eh > mh or ew > mw:
        raise ValueError(f"grid {(mh, mw)} is smaller than the dilated kernel {(eh, ew)}")
    w = weight.to(_compute_dtype(weight.dtype))
    stuffed = w.new_zeros(c_out, c_in, eh, ew)
    stuffed[:, :, ::dh, ::dw] = w  # the dilated kernel has zeros between its taps
    spectrum = torch.fft.rfft2(stuffed, s=(mh, mw))
    return spectrum.abs().square().sum(dim=1)


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
    c_out, c_in, kh, kw = weight.shape
    lh, lw = 2 * kh - 1, 2 * kw - 1
    if kh * kw > _AUTOCORRELATION_FFT_TAPS:
        # Large kernels (patchify convs): the Gram matrices grow as (k_h k_w)^2; the power
        # spectrum on the (2 k - 1)-grid, where the circular autocorrelation is the linear one,
        # costs a few FFTs per kernel.
        spectrum = torch.fft.rfft2(weight.to(_compute_dtype(weight.dtype)), s=(lh, lw))
        power = (spectrum.real.square() + spectrum.imag.square()).sum(dim=1)
        circular = torch.fft.irfft2(power, s=(lh, lw))  # lag t at index t mod (2 k - 1)
        return torch.roll(circular, shifts=(kh - 1, kw - 1), dims=(-2, -1))
    w = weight.to(_compute_dtype(weight.dtype)).reshape(c_out, c_in, kh * kw)
    gram = torch.bmm(w.transpose(1, 2), w)  # (C_out, P, P), P = k_h k_w taps
    rows = torch.arange(kh, device=w.device).repeat_interleave(kw)  # tap p -> (row, col)
    cols = torch.arange(kw, device=w.device).repeat(kh)
    # Lag of the pair (p, q) is (row_q - row_p, col_q - col_p), stored at offset (k_h - 1, k_w - 1).
    lag = (rows[None, :] - rows[:, None] + kh - 1) * lw + (cols[None, :] - cols[:, None] + kw - 1)  # (P, P)
    lags = gram.new_zeros(c_out, lh * lw).index_add_(1, lag.reshape(-1), gram.reshape(c_out, -1))
    return lags.reshape(c_out, lh, lw)


#: Kernels with more taps than this get their autocorrelation by FFT instead of Gram matrices.
_AUTOCORRELATION_FFT_TAPS = 64


def _dft_tables(size: int, lags: Tensor, half: bool) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables ``cos/sin(2 pi w t / size)`` for frequencies ``w`` and lags ``t``."""
    n_freq = size // 2 + 1 if half else size
    freqs = torch.arange(n_freq, dtype=lags.dtype, device=lags.device)
    # Reduce the integer phase modulo size first so that large lags keep full precision.
    phase = torch.remainder(freqs[:, None] * lags[None, :], size) * (2 * math.pi / size)
    return torch.cos(phase), torch.sin(phase)


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
    dh, dw = _pair(dilation, "dilation")
    mh, mw = int(grid[0]), int(grid[1])
    r = autocorrelation
    lh, lw = r.shape[-2:]
    lags_h = (torch.arange(lh, device=r.device, dtype=r.dtype) - (lh - 1) // 2) * dh
    lags_w = (torch.arange(lw, device=r.device, dtype=r.dtype) - (lw - 1) // 2) * dw
    cos_h, sin_h = _dft_tables(mh, lags_h, half=False)  # (M_h, L_h)
    cos_w, sin_w = _dft_tables(mw, lags_w, half=True)  # (M_w//2+1, L_w)
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
    with _autocast_disabled(weight.device):
        exact = source.to(_spectrum_dtype(weight.device))
        power = power_spectrum_from_autocorrelation(kernel_autocorrelation(exact), grid, dilation)
        return inverse_sqrt_spectrum(power, eps).to(_compute_dtype(weight.dtype))


def normalize_circular(y: Tensor, inv_sqrt: Tensor) -> Tensor:
    """Filter each channel of ``y`` circularly by the preconditioner with DFT ``inv_sqrt``.

    ``y`` is the full conv output, whose ``M_h x M_w`` extent is the circular domain.
    Computed as rfft2 -> multiply -> irfft2 in the compute dtype; the result has the dtype
    of ``y``.

    Shape:
        - y: ``(N, C_out, M_h, M_w)``
        - inv_sqrt: ``(C_out, M_h, M_w // 2 + 1)``
        - output: ``(N, C_out, M_h, M_w)``
    """
    mh, mw = y.shape[-2:]
    if tuple(inv_sqrt.shape[-2:]) != (mh, mw // 2 + 1):
        raise ValueError(
            f"spectrum of shape {tuple(inv_sqrt.shape)} does not match a conv output of "
            f"shape {tuple(y.shape)}; expected (..., {mh}, {mw // 2 + 1})"
        )
    compute = _compute_dtype(y.dtype)
    with _autocast_disabled(y.device):
        spectrum = torch.fft.rfft2(y.to(compute))
        filtered = torch.fft.irfft2(spectrum * inv_sqrt.to(compute), s=(mh, mw))
    return filtered.to(y.dtype)


def crop_and_downsample(
    y: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: IntOrPair = 1,
) -> Tensor:
    """Cut the original conv's output window out of a full-conv output and apply the stride.

    Full output index ``i`` corresponds to the original (stride-1) output index
    ``o = i - f + p`` with ``f = d (k - 1)`` and ``p`` the leading padding (Appendix B.3);
    padding beyond ``f`` reaches positions that see no input, filled with zeros as the plain
    conv does. The stride then keeps every ``s``-th sample (Appendix B.4).

    Shape:
        - y: ``(N, C, M_h, M_w)``
        - output: ``(N, C, H_out, W_out)`` with ``H_out = (M_h - f_h + p_t + p_b - 1) // s_h + 1``
    """
    fh, fw = full_padding(kernel_size, dilation)
    sh, sw = _pair(stride, "stride")
    top, bottom, left, right = padding
    # F.pad crops where the amount is negative and zero-fills where it is positive.
    window = F.pad(y, (left - fw, right - fw, top - fh, bottom - fh))
    if sh == 1 and sw == 1:
        return window
    return window[..., ::sh, ::sw]


# --------------------------------------------------------------------------------------
# The whole site
# --------------------------------------------------------------------------------------


def _check_conv_input(x: Tensor, weight: Tensor, groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"conv_norm2d expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if weight.dim() != 4:
        raise ValueError(f"conv weight must be 4-D (C_out, C_in / groups, k_h, k_w), got {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups != 0:
        raise ValueError(f"groups={groups} must be >= 1 and divide C_out={weight.shape[0]}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels but the weight expects "
            f"{weight.shape[1] * groups} (= {weight.shape[1]} per group x {groups} groups)"
        )


def _check_positive(pair: tuple[int, int], name: str) -> None:
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {pair}")


def conv_norm2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: PaddingArg = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    eps: float = DEFAULT_EPS,
    stop_gradient: bool = True,
    *,
    affine_weight: Tensor | None = None,
    affine_bias: Tensor | None = None,
    inv_sqrt: Tensor | None = None,
    normalize: bool = True,
    algorithm: str = "auto",
) -> Tensor:
    """A 2-D convolution followed by ConvNorm, exactly as Appendix B prescribes.

    The pipeline is: pad with ``padding_mode`` if it is not ``'zeros'`` (the padded input is
    then the signal) -> "full" conv at stride 1 with padding ``d (k - 1)``, whose output
    covers the circular domain ``M = H + d (k - 1)`` -> per-output-channel preconditioner
    ``P_k`` (rfft2 -> multiply by ``(S_k + eps)^{-1/2}`` -> irfft2) -> optional affine
    transform ``r_k`` (a depthwise conv of the kernel's size with "same" output, §3.3) ->
    crop to the window of the original conv (any padding, ``'same'``, ``'valid'``) ->
    downsample by the stride -> add the conv bias.

    The conv bias is added after the normalization: the paper normalizes the linear
    operator ``A_k``, and a bias is not part of it. For 1x1 kernels the spectrum is flat,
    ``P_k`` is the scale ``(||a_k||^2 + eps)^{-1/2}``, which commutes with the stride, so the
    strided conv runs directly without any FFT.

    Args:
        x: input ``(N, C_in, H, W)``.
        weight: ``(C_out, C_in / groups, k_h, k_w)``.
        bias: optional ``(C_out,)``, added last.
        stride, padding, dilation, groups, padding_mode: as in ``nn.Conv2d``.
        eps: added to the power spectrum; ``0.0`` is the exact operator (see
            :func:`inverse_sqrt_spectrum`).
        stop_gradient: treat the preconditioner as a constant in backward (paper §3.3).
            ``False`` differentiates through the spectrum as well.
        affine_weight: optional ``(C_out, 1, k_h, k_w)`` depthwise kernels ``r_k``.
        affine_bias: optional ``(C_out,)`` bias of the affine transform.
        inv_sqrt: a precomputed ``(C_out, M_h, M_w // 2 + 1)`` preconditioner spectrum (for
            caches); ``eps`` and ``stop_gradient`` are then not used.
        normalize: ``False`` skips the preconditioner and the affine transform (bypass), so
            the pipeline reproduces ``F.conv2d``.
        algorithm: ``'direct'`` (the pipeline above, step by step), ``'spectral'`` (the
            same numbers computed in the frequency domain from the input, see
            :func:`select_algorithm`) or ``'auto'`` (the cheaper one by a cost model).
            The spectral algorithm needs a constant preconditioner (``stop_gradient``) and,
            with an affine transform, outputs whose affine halo stays on the grid; other
            sites run directly whatever is asked.

    Returns:
        Tensor of the shape and dtype ``F.conv2d`` would return.

    Shape:
        - x: ``(N, C_in, H, W)``
        - output: ``(N, C_out, H_out, W_out)`` with
          ``H_out = (H + p_t + p_b - d_h (k_h - 1) - 1) // s_h + 1`` (likewise ``W_out``).

    Example:
        >>> x = torch.randn(2, 3, 16, 16)
        >>> w = torch.randn(8, 3, 3, 3)
        >>> conv_norm2d(x, w, stride=2, padding=1).shape
        torch.Size([2, 8, 8, 8])
    """
    _check_conv_input(x, weight, groups)
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    stride_hw, dilation_hw = _pair(stride, "stride"), _pair(dilation, "dilation")
    _check_positive(stride_hw, "stride")
    _check_positive(dilation_hw, "dilation")
    if isinstance(padding, str) and padding == "same" and stride_hw != (1, 1):
        raise ValueError("padding='same' is not supported for strided convolutions; pass explicit padding")
    pads = explicit_padding(padding, kernel_size, dilation_hw)
    if padding_mode != "zeros":
        x = pad_for_mode(x, pads, padding_mode)
        pads = (0, 0, 0, 0)
    out_size = conv_output_size(x.shape[-2:], kernel_size, stride_hw, pads, dilation_hw)
    if min(out_size) < 1:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[-2:])} (after padding {pads}) is smaller than the "
            f"dilated kernel {kernel_size} with dilation {dilation_hw}; use a larger input or more padding"
        )

    if normalize:
        return _conv_norm_from_input(
            x, weight, bias, stride_hw, pads, dilation_hw, groups, eps, stop_gradient,
            affine_weight, affine_bias, inv_sqrt, algorithm,
        )
    feed_stride, feed_padding = feeding_conv_args(kernel_size, stride_hw, pads, dilation_hw)
    y = F.conv2d(x, weight, None, feed_stride, feed_padding, dilation_hw, groups)
    return conv_norm_stage(y, weight, bias, stride_hw, pads, dilation_hw, eps, stop_gradient, normalize=False)


def feeding_conv_args(
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: IntOrPair = 1,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Stride and padding of the conv that feeds :func:`conv_norm_stage`.

    For kernels larger than 1x1 this is the unstrided "full" conv (stride 1, padding
    ``d (k - 1)``). A 1x1 kernel has a flat spectrum, so its preconditioner commutes with
    the stride and the crop: the conv runs with its own stride and padding (padding of a
    1x1 kernel is always symmetric, as ``'same'`` means none).
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    if (kh, kw) == (1, 1):
        top, bottom, left, right = padding
        if top != bottom or left != right:
            raise ValueError(f"a 1x1 conv takes symmetric padding, got {padding}")
        return _pair(stride, "stride"), (top, left)
    return (1, 1), full_padding((kh, kw), dilation)


def conv_norm_stage(
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: IntOrPair = 1,
    eps: float = DEFAULT_EPS,
    stop_gradient: bool = True,
    *,
    affine_weight: Tensor | None = None,
    affine_bias: Tensor | None = None,
    inv_sqrt: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """Everything after the conv: preconditioner, affine, crop, stride, bias.

    ``y`` is the output of the conv described by :func:`feeding_conv_args` (the full conv,
    or for 1x1 kernels the strided conv itself). Arguments are as in :func:`conv_norm2d`;
    ``padding`` is the explicit zero padding ``(top, bottom, left, right)`` of the original
    conv. With a constant preconditioner, normalization, affine transform, crop and stride
    run as one frequency-domain step (``_SpectralStage``) wherever the affine halo stays on
    the grid; otherwise step by step.

    Shape:
        - y: ``(N, C_out, M_h, M_w)`` (1x1: ``(N, C_out, H_out, W_out)``)
        - output: ``(N, C_out, H_out, W_out)``
    """
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    stride_hw, dilation_hw = _pair(stride, "stride"), _pair(dilation, "dilation")
    channels_last = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if kernel_size == (1, 1):
        out = _scale_1x1(y, weight, eps, stop_gradient, affine_weight, affine_bias, inv_sqrt) if normalize else y
    else:
        fh, fw = full_padding(kernel_size, dilation_hw)
        top, bottom, left, right = padding
        if y.shape[-2] - 2 * fh + top + bottom < 1 or y.shape[-1] - 2 * fw + left + right < 1:
            raise ValueError(
                f"input of spatial size {(y.shape[-2] - fh, y.shape[-1] - fw)} with padding {padding} is "
                f"smaller than the kernel {kernel_size} with dilation {dilation_hw}; use a larger input or more padding"
            )
        if normalize:
            if inv_sqrt is None:
                inv_sqrt = preconditioner_spectrum(weight, y.shape[-2:], dilation_hw, eps, stop_gradient)
            plan = None
            if not (inv_sqrt.requires_grad and torch.is_grad_enabled()) and _fused_paths_allowed(y):
                size = (y.shape[-2] - fh, y.shape[-1] - fw)
                plan = _spectral_plan(y, size, kernel_size, stride_hw, padding, dilation_hw, 1, affine_weight, y.dtype)
            if plan is not None:
                # Normalization, affine, crop and stride as one frequency-domain step.
                out = _SpectralStage.apply(y, affine_weight, inv_sqrt.detach(), plan)
                shift = _sum_optional(affine_bias, bias)
                return out if shift is None else out + shift.to(out.dtype).reshape(1, -1, 1, 1)
            y = normalize_circular(y, inv_sqrt)
        if normalize and affine_weight is not None:
            out = _affine_crop_downsample(y, kernel_size, stride_hw, padding, dilation_hw, affine_weight, affine_bias)
        else:
            out = crop_and_downsample(y, kernel_size, stride_hw, padding, dilation_hw)
            if normalize and affine_bias is not None:
                out = out + affine_bias.to(out.dtype).reshape(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(1, -1, 1, 1)
    # The crop is a strided view; downstream reductions (BatchNorm in training) sum a view
    # in another order than a dense tensor, so hand out a dense tensor in the conv's layout.
    return out.contiguous(memory_format=layout)


def _affine_crop_downsample(
    y: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
    affine_weight: Tensor,
    affine_bias: Tensor | None,
) -> Tensor:
    """Affine transform with "same" output on the zero-extended normalized signal, then crop and stride.

    Cropping to the window plus the affine kernel's halo and running the depthwise conv
    'valid' at the conv's stride gives the same numbers as the "same" conv on the whole
    domain followed by crop and stride, at the cost of the output window only.
    """
    fh, fw = full_padding(kernel_size, dilation)
    rh, rw = affine_weight.shape[-2:]
    # PyTorch's 'same' puts the smaller half of the halo before the sample.
    halo = ((rh - 1) // 2, rh - 1 - (rh - 1) // 2, (rw - 1) // 2, rw - 1 - (rw - 1) // 2)
    top, bottom, left, right = pads
    window = F.pad(
        y,
        (left - fw + halo[2], right - fw + halo[3], top - fh + halo[0], bottom - fh + halo[1]),
    )
    r = affine_weight.to(y.dtype)
    rb = None if affine_bias is None else affine_bias.to(y.dtype)
    return F.conv2d(window, r, rb, stride, 0, 1, y.shape[1])


def _scale_1x1_factor(
    weight: Tensor,
    eps: float,
    stop_gradient: bool,
    affine_weight: Tensor | None,
    inv_sqrt: Tensor | None,
) -> Tensor:
    """Per-channel factor of a 1x1 site: ``(||a_k||^2 + eps)^{-1/2}`` times the affine scale, ``(C_out,)``."""
    c_out = weight.shape[0]
    compute = _compute_dtype(weight.dtype)
    if inv_sqrt is None:
        source = weight.detach() if stop_gradient else weight
        with _autocast_disabled(weight.device):
            energy = source.to(_spectrum_dtype(weight.device)).reshape(c_out, -1).square().sum(dim=1)
            scale = inverse_sqrt_spectrum(energy, eps).to(compute)
    else:
        scale = inv_sqrt.reshape(c_out, -1)[:, 0].to(compute)
    if affine_weight is not None:
        scale = scale * affine_weight.reshape(c_out).to(compute)
    return scale


def _scale_1x1(
    y: Tensor,
    weight: Tensor,
    eps: float,
    stop_gradient: bool,
    affine_weight: Tensor | None,
    affine_bias: Tensor | None,
    inv_sqrt: Tensor | None,
) -> Tensor:
    """1x1 fast path: ConvNorm is the per-channel scale ``1 / sqrt(||a_k||^2 + eps)``.

    A flat spectrum means ``P_k`` is a scalar, and a 1x1 affine transform is a per-channel
    scale and shift; both commute with the stride and the crop, so no FFT is needed.
    """
    scale = _scale_1x1_factor(weight, eps, stop_gradient, affine_weight, inv_sqrt)
    out = y * scale.to(y.dtype).reshape(1, -1, 1, 1)
    if affine_bias is not None:
        out = out + affine_bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


# --------------------------------------------------------------------------------------
# The spectral algorithm: the whole site in the frequency domain
# --------------------------------------------------------------------------------------

#: How a site is computed. ``'direct'``: the full conv, then the stage (FFT normalization,
#: affine depthwise conv, crop, stride). ``'spectral'``: one transform of the input, a
#: per-frequency ``C_out x C_in`` product with the normalized kernel spectrum, one inverse
#: transform of the kept output samples. ``'auto'``: :func:`select_algorithm`.
ALGORITHMS = ("auto", "direct", "spectral")


@dataclass(frozen=True)
class _AxisPlan:
    """One spatial axis of a site computed in the frequency domain."""

    size: int  # input samples on this axis (after mode padding)
    grid: int  # circular domain M = size + d (k - 1)
    taps: tuple[int, ...]  # grid offset d t - f of each conv kernel tap
    halo: tuple[int, ...]  # grid offset t - (r - 1) // 2 of each affine kernel tap
    start: int  # grid samples kept by crop and stride: start, start + step, ... < stop
    stop: int
    step: int
    before: int  # outputs before / after the grid see no input: zeros
    after: int

    @property
    def kept(self) -> slice:
        return slice(self.start, self.stop, self.step)

    @property
    def half(self) -> int:
        return self.grid // 2 + 1


@dataclass(frozen=True)
class _SpectralPlan:
    """Everything the spectral algorithm needs besides tensors (hashable, no tensors)."""

    rows: _AxisPlan
    cols: _AxisPlan
    groups: int
    out_dtype: torch.dtype
    channels_last: bool

    @property
    def frequencies(self) -> int:
        return self.rows.grid * self.cols.half


def _axis_plan(
    size: int, kernel: int, dilation: int, before: int, after: int, stride: int, affine: int
) -> _AxisPlan | None:
    """Where the outputs of one axis sit on the circular grid; ``None`` if none of them does."""
    full = dilation * (kernel - 1)
    grid = size + full
    length = size + before + after - full  # stride-1 output samples of the original conv
    if length < 1:
        return None
    count = (length - 1) // stride + 1
    # Output o sits at grid index o * stride + full - before (Appendix B.3-B.4).
    first = max(0, -((full - before) // stride))
    last = min(count - 1, (grid - 1 - full + before) // stride)
    if first > last:
        return None
    halo = (affine - 1) // 2
    return _AxisPlan(
        size=size,
        grid=grid,
        taps=tuple(dilation * t - full for t in range(kernel)),
        halo=tuple(t - halo for t in range(affine)),
        start=first * stride + full - before,
        stop=last * stride + full - before + 1,
        step=stride,
        before=first,
        after=count - 1 - last,
    )


def _affine_fits(axis: _AxisPlan) -> bool:
    """The affine kernel's halo around every output stays on the grid: its "same" linear conv
    on the zero-extended signal then equals a circular one, a product in the frequency domain."""
    inside = axis.before == 0 and axis.after == 0
    return inside and axis.start + axis.halo[0] >= 0 and axis.stop - 1 + axis.halo[-1] < axis.grid


def _spectral_plan(
    reference: Tensor,
    input_size: Sequence[int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    affine_weight: Tensor | None,
    out_dtype: torch.dtype,
) -> _SpectralPlan | None:
    """The plan of a site with input size ``input_size``, or ``None`` where the frequency-domain
    computation does not apply. ``reference`` (input or full conv output) gives the layout."""
    kh, kw = kernel_size
    rh, rw = (1, 1) if affine_weight is None else (int(affine_weight.shape[2]), int(affine_weight.shape[3]))
    rows = _axis_plan(int(input_size[0]), kh, dilation[0], pads[0], pads[1], stride[0], rh)
    cols = _axis_plan(int(input_size[1]), kw, dilation[1], pads[2], pads[3], stride[1], rw)
    if rows is None or cols is None:
        return None
    if affine_weight is not None and not (_affine_fits(rows) and _affine_fits(cols)):
        return None
    channels_last = not reference.is_contiguous() and reference.is_contiguous(memory_format=torch.channels_last)
    return _SpectralPlan(rows, cols, groups, out_dtype, channels_last)


def _conv_out_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.conv2d`` returns for ``x`` under the current autocast state."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cached_table(build):
    """Cache a table that depends only on hashable geometry arguments (DFT and phase tables).

    The cache is bypassed while tracing (``torch.compile``, ``torch.export``, fake tensors),
    where the tensors built are not real ones and must not outlive the trace."""
    cache: dict[tuple, Tensor] = {}

    @functools.wraps(build)
    def cached(*args):
        if torch.compiler.is_compiling() or type(torch.empty(0)) is not Tensor:
            return build(*args)
        table = cache.get(args)
        if table is None:
            if len(cache) >= 1024:
                cache.clear()
            table = cache[args] = build(*args)
        return table

    return cached


@_cached_table
def _phase(
    count: int, size: int, offsets: tuple[int, ...], dtype: torch.dtype, device: torch.device, sign: int = 1
) -> Tensor:
    """``exp(sign 2 pi i w o / size)`` for frequencies ``w < count`` and offsets ``o``: ``(count, len(offsets))``.

    Built in float64 from the integer phase reduced modulo ``size``, then cast. Cached: the
    tables depend only on the geometry."""
    freqs = torch.arange(count, dtype=torch.float64, device=device)[:, None]
    lags = torch.tensor(offsets, dtype=torch.float64, device=device)[None, :]
    angle = torch.remainder(freqs * lags, size) * (sign * 2 * math.pi / size)
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


@_cached_table
def _tap_table(plan: _SpectralPlan, complex_dtype: torch.dtype, device: torch.device, affine: bool) -> Tensor:
    """``exp(+2 pi i <w, o_t> / M)`` for every half-plane frequency ``w`` and kernel tap ``t``: ``(F, k_h k_w)``.

    ``o_t`` is the tap's offset on the grid: ``d t - f`` for the conv kernel, ``t - (r - 1) // 2``
    for the "same" affine kernel."""
    rows, cols = plan.rows, plan.cols
    ph = _phase(rows.grid, rows.grid, rows.halo if affine else rows.taps, complex_dtype, device)  # (M_h, k_h)
    pw = _phase(cols.half, cols.grid, cols.halo if affine else cols.taps, complex_dtype, device)  # (W_f, k_w)
    return (ph[:, None, :, None] * pw[None, :, None, :]).reshape(plan.frequencies, -1)


#: Kernels go to the grid by FFT when they have more taps than this many times log2 of the
#: grid's size, else by the phase-table matmul (whose cost grows with the taps). Measured on
#: CPU: the matmul is 2-4x faster for 3x3 to 7x7 kernels on every ResNet grid and 2x faster
#: for 16x16 patches, the FFT 3x faster for a 32x32 patchify kernel on a 255x255 grid.
_KERNEL_FFT_FACTOR = 4.0
#: ... and more than this many taps: the matmul still wins for 16x16 patch kernels on a 239x239 grid.
_KERNEL_FFT_MIN_TAPS = 256


def _taps_by_fft(plan: _SpectralPlan, affine: bool) -> bool:
    """Whether kernels go to and from the grid by FFT rather than by the phase-table matmul."""
    rows, cols = plan.rows, plan.cols
    taps = len(rows.halo) * len(cols.halo) if affine else len(rows.taps) * len(cols.taps)
    return taps > max(_KERNEL_FFT_MIN_TAPS, _KERNEL_FFT_FACTOR * math.log2(rows.grid * cols.grid))


def _tap_positions(plan: _SpectralPlan, affine: bool) -> tuple[list[int], list[int]]:
    """Grid rows and columns of the kernel taps (offsets modulo the grid)."""
    rows, cols = plan.rows, plan.cols
    row_offsets, col_offsets = (rows.halo, cols.halo) if affine else (rows.taps, cols.taps)
    return [o % rows.grid for o in row_offsets], [o % cols.grid for o in col_offsets]


def _kernel_dft(weight: Tensor, plan: _SpectralPlan, complex_dtype: torch.dtype, affine: bool = False) -> Tensor:
    """DFT of each kernel placed on the grid at its tap offsets, ``(F, C_out, C_in / g)``.

    ``sum_t a[t] exp(+2 pi i <w, d t - f> / M)``: the conjugate of the kernel's DFT, because
    a cross-correlation multiplies the input spectrum by it (``y = a (star) x`` gives
    ``Y = conj(A) X``). With ``affine`` the offsets are those of the "same" affine conv.
    One matmul of the phase table with the taps, or for large kernels an ``rfft2`` of the
    kernels placed on the grid (see :func:`_taps_by_fft`).
    """
    c_out, c_in, kh, kw = weight.shape
    if _taps_by_fft(plan, affine):
        rows, cols = plan.rows, plan.cols
        row_pos, col_pos = _tap_positions(plan, affine)
        real = torch.float64 if complex_dtype == torch.complex128 else torch.float32
        placed = weight.new_zeros(c_out * c_in, rows.grid, cols.grid, dtype=real)
        index_r = torch.tensor(row_pos, device=weight.device)[:, None]
        index_c = torch.tensor(col_pos, device=weight.device)[None, :]
        placed[:, index_r, index_c] = weight.reshape(c_out * c_in, kh, kw).to(real)
        spectrum = torch.fft.rfft2(placed).conj()  # (C_out C_in, M_h, W_f)
        return spectrum.reshape(c_out * c_in, plan.frequencies).T.reshape(plan.frequencies, c_out, c_in)
    table = _tap_table(plan, complex_dtype, weight.device, affine)
    taps = weight.reshape(c_out * c_in, kh * kw).T.to(complex_dtype)  # (k_h k_w, C_out C_in)
    return torch.matmul(table, taps).view(plan.frequencies, c_out, c_in)


def _channel_gain(
    inv_sqrt: Tensor, affine_weight: Tensor | None, plan: _SpectralPlan, complex_dtype: torch.dtype
) -> Tensor:
    """Per-channel factor ``v_k`` (times the affine kernel's DFT ``R_k``): ``(F, C_out)``."""
    gain = inv_sqrt.permute(1, 2, 0).reshape(plan.frequencies, -1).to(complex_dtype)
    if affine_weight is not None:
        gain = gain * _kernel_dft(affine_weight, plan, complex_dtype, affine=True)[..., 0]
    return gain


def _grouped_matmul(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``out[f, n, g, p] = sum_q a[f, n, g, q] b[f, g, p, q]``.

    Shape:
        - a: ``(F, N, G * Q)``
        - b: ``(F, G, P, Q)`` (any strides)
        - output: ``(F, N, G * P)``
    """
    freqs, batch = a.shape[:2]
    _, _, p, q = b.shape
    if groups == 1:
        return torch.matmul(a, b[:, 0].transpose(1, 2))
    if q == 1:  # depthwise: a broadcast product, no matmul
        return (a.view(freqs, batch, groups, 1) * b.reshape(freqs, 1, groups, p)).reshape(freqs, batch, groups * p)
    if p == 1:
        return (a.view(freqs, batch, groups, q) * b.reshape(freqs, 1, groups, q)).sum(-1)
    out = torch.matmul(a.view(freqs, batch, groups, q).transpose(1, 2), b.transpose(2, 3))  # (F, G, N, P)
    return out.transpose(1, 2).reshape(freqs, batch, groups * p)


def _grouped_gram(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``out[f, g, p, q] = sum_n a[f, n, g, p] b[f, n, g, q]``: ``(F, N, G P), (F, N, G Q) -> (F, G, P, Q)``."""
    freqs, batch = a.shape[:2]
    p, q = a.shape[2] // groups, b.shape[2] // groups
    if groups == 1:
        return torch.bmm(a.transpose(1, 2), b).unsqueeze(1)
    if p == 1 or q == 1:
        return (a.view(freqs, batch, groups, p, 1) * b.view(freqs, batch, groups, 1, q)).sum(1)
    a = a.view(freqs, batch, groups, p).permute(0, 2, 3, 1)  # (F, G, P, N)
    return torch.matmul(a, b.view(freqs, batch, groups, q).transpose(1, 2))


#: Grids up to this size on both axes are transformed by products with DFT matrices (one
#: large matmul per axis, and only the samples that are needed), larger ones by FFTs.
_DFT_MAX_GRID = 64

#: Sample positions on one axis: ``start, start + step, ...``, ``count`` of them.
_Samples = tuple[int, int, int]


def _input_samples(axis: _AxisPlan) -> _Samples:
    return (0, axis.size, 1)


def _grid_samples(axis: _AxisPlan) -> _Samples:
    return (0, axis.grid, 1)


def _kept_samples(axis: _AxisPlan) -> _Samples:
    return (axis.start, len(range(axis.start, axis.stop, axis.step)), axis.step)


def _slice(samples: _Samples) -> slice:
    start, count, step = samples
    return slice(start, start + (count - 1) * step + 1, step)


@_cached_table
def _dft_table(size: int, samples: _Samples, sign: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``exp(sign 2 pi i w p / size)`` for all ``size`` frequencies ``w`` and the positions ``p``: ``(size, count)``."""
    start, count, step = samples
    return _phase(size, size, tuple(range(start, start + count * step, step)), dtype, device, sign)


@_cached_table
def _half_forward_table(size: int, samples: _Samples, sign: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Real ``(count, 2 (size // 2 + 1))`` matrix: ``x @ T`` is the half-plane DFT ``sum_p x[p] exp(sign i theta)``
    with real and imaginary parts interleaved, i.e. a complex tensor viewed as real."""
    start, count, step = samples
    cplx = _complex_dtype(dtype)
    phases = _phase(size // 2 + 1, size, tuple(range(start, start + count * step, step)), cplx, device, sign)
    return torch.view_as_real(phases.T.contiguous()).reshape(count, -1).to(dtype)


@_cached_table
def _half_inverse_table(size: int, samples: _Samples, sign: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Real ``(2 (size // 2 + 1), count)`` matrix: interleaved half-plane ``S @ T`` is
    ``Re (1 / size) sum_w c_w S(w) exp(sign i theta)`` at the positions, with ``c_w = 2`` for
    the frequencies that stand for a conjugate pair and 1 for DC and Nyquist."""
    start, count, step = samples
    half = size // 2 + 1
    cplx = _complex_dtype(dtype)
    phases = _phase(half, size, tuple(range(start, start + count * step, step)), cplx, device, sign)  # (W_f, count)
    weights = torch.full((half, 1), 2.0 / size, dtype=torch.float64, device=device)
    weights[0] = 1.0 / size
    if size % 2 == 0:
        weights[-1] = 1.0 / size
    # Re(S e^{i t}) = S_re cos t - S_im sin t, with the sign already in the phase.
    table = torch.stack([phases.real, -phases.imag], dim=1) * weights[:, :, None].to(phases.real.dtype)
    return table.reshape(2 * half, count).to(dtype)


def _to_spectrum(signal: Tensor, plan: _SpectralPlan, rows: _Samples, cols: _Samples, sign: int) -> Tensor:
    """Half-plane 2-D DFT ``sum_p s[p] exp(sign 2 pi i <w, p> / M)`` of a real signal at the given
    grid positions (zero elsewhere), laid out for per-frequency matmuls: ``(F, N, C)`` complex.

    ``sign = -1`` is ``rfft2``; ``sign = +1`` its conjugate (used for adjoints).

    Shape:
        - signal: ``(N, C, rows count, cols count)``
        - output: ``(M_h (M_w // 2 + 1), N, C)``
    """
    n, c, p, q = signal.shape
    mh, mw, wf = plan.rows.grid, plan.cols.grid, plan.cols.half
    if max(mh, mw) <= _DFT_MAX_GRID:
        cplx = _complex_dtype(signal.dtype)
        table = _half_forward_table(mw, cols, sign, signal.dtype, signal.device)  # (Q, 2 W_f)
        along_w = torch.matmul(signal.reshape(n * c * p, q), table)
        along_w = torch.view_as_complex(along_w.view(n, c, p, wf, 2)).permute(2, 3, 0, 1).reshape(p, wf * n * c)
        return torch.matmul(_dft_table(mh, rows, sign, cplx, signal.device), along_w).view(mh * wf, n, c)
    if rows == (0, p, 1) and cols == (0, q, 1):
        grid = signal
    else:
        grid = signal.new_zeros(n, c, mh, mw)
        grid[..., _slice(rows), _slice(cols)] = signal
    if sign < 0:
        spectrum = torch.fft.rfft2(grid, s=(mh, mw))
    else:
        spectrum = torch.fft.ihfft2(grid, s=(mh, mw), norm="forward")  # conj(rfft2)
    # Frequency-major and contiguous: batched matmuls over strided batches fall back to slow loops.
    return spectrum.permute(2, 3, 0, 1).contiguous().view(mh * wf, n, c)


def _from_spectrum(spectrum: Tensor, plan: _SpectralPlan, rows: _Samples, cols: _Samples, sign: int) -> Tensor:
    """Real inverse of :func:`_to_spectrum`'s layout at the given grid positions only.

    ``sign = +1`` is ``irfft2`` (``(1 / M) sum_w S(w) exp(+2 pi i <w, p> / M)`` over the full
    plane); ``sign = -1`` is ``irfft2(conj(S))`` (for adjoints). The rows are transformed
    first and only the needed ones kept, so cropped and strided outputs cost less.

    Shape:
        - spectrum: ``(M_h (M_w // 2 + 1), N, C)``
        - output: ``(N, C, rows count, cols count)``
    """
    _, n, c = spectrum.shape
    mh, mw, wf = plan.rows.grid, plan.cols.grid, plan.cols.half
    if max(mh, mw) <= _DFT_MAX_GRID:
        cplx = spectrum.dtype
        real = _compute_dtype(spectrum.real.dtype)
        inverse_h = _dft_table(mh, rows, sign, cplx, spectrum.device).T / mh  # (P, M_h)
        along_h = torch.matmul(inverse_h, spectrum.view(mh, wf * n * c)).view(rows[1], wf, n, c)
        along_h = torch.view_as_real(along_h.permute(2, 3, 0, 1).contiguous()).view(n * c * rows[1], 2 * wf)
        out = torch.matmul(along_h, _half_inverse_table(mw, cols, sign, real, spectrum.device))
        return out.view(n, c, rows[1], cols[1])
    grid = spectrum.view(mh, wf, n, c)
    if sign > 0:
        kept = torch.fft.ifft(grid, dim=0)[_slice(rows)]
        out = torch.fft.irfft(kept, n=mw, dim=1)[:, _slice(cols)]
    else:
        # irfft2(conj S) = hfft2(S) / M: fft along the rows, keep them, hfft along the columns.
        kept = torch.fft.fft(grid, dim=0, norm="forward")[_slice(rows)]
        out = torch.fft.hfft(kept, n=mw, dim=1, norm="forward")[:, _slice(cols)]
    return out.permute(2, 3, 0, 1)


def _pad_outside(out: Tensor, plan: _SpectralPlan) -> Tensor:
    """Zero outputs before and after the grid (padding beyond the full padding sees no input)."""
    rows, cols = plan.rows, plan.cols
    if rows.before or rows.after or cols.before or cols.after:
        out = F.pad(out, (cols.before, cols.after, rows.before, rows.after))
    return out


def _inner_window(grad: Tensor, plan: _SpectralPlan) -> Tensor:
    """The part of an output gradient ``(N, C, H_out, W_out)`` that lies on the grid."""
    rows, cols = plan.rows, plan.cols
    h_out, w_out = grad.shape[-2:]
    return grad[..., rows.before : h_out - rows.after, cols.before : w_out - cols.after]


def _lag_values(spectrum: Tensor, plan: _SpectralPlan, affine: bool, gain: Tensor | None = None) -> Tensor:
    """Real circular correlation at the kernel's tap offsets, from its half-plane spectrum.

    ``c[s] = (1 / M_h M_w) sum_w C(w) exp(+2 pi i <w, s> / M)`` over the full plane; the half
    plane holds every frequency but those of the DC and Nyquist columns twice (Hermitian
    symmetry). ``gain`` (``(F, A)``, optional) multiplies the spectrum first, folded into
    one phase table per ``a`` so that the spectrum is read once.

    Shape:
        - spectrum: ``(F, A, B)``
        - output: ``(A, B, k_h, k_w)`` (``k`` of the conv kernel, or of the affine kernel)
    """
    rows, cols = plan.rows, plan.cols
    freqs, a, b = spectrum.shape
    kh, kw = (len(rows.halo), len(cols.halo)) if affine else (len(rows.taps), len(cols.taps))
    if _taps_by_fft(plan, affine):
        # irfft2 sums the half plane with the same weights (and takes the real part).
        if gain is not None:
            spectrum = spectrum * gain[:, :, None]
        plane = spectrum.reshape(rows.grid, cols.half, a * b).permute(2, 0, 1)
        circular = torch.fft.irfft2(plane, s=(rows.grid, cols.grid))  # (A B, M_h, M_w)
        row_pos, col_pos = _tap_positions(plan, affine)
        index_r = torch.tensor(row_pos, device=spectrum.device)[:, None]
        index_c = torch.tensor(col_pos, device=spectrum.device)[None, :]
        return circular[:, index_r, index_c].reshape(a, b, kh, kw).contiguous()
    weights = torch.full((cols.half,), 2.0, dtype=torch.float64, device=spectrum.device)
    weights[0] = 1.0
    if cols.grid % 2 == 0:
        weights[-1] = 1.0
    weights = (weights / (rows.grid * cols.grid)).repeat(rows.grid).to(spectrum.dtype)  # (F,)
    table = _tap_table(plan, spectrum.dtype, spectrum.device, affine) * weights[:, None]  # (F, T)
    if gain is None:
        lags = torch.matmul(spectrum.reshape(freqs, a * b).T, table)  # (A B, T)
    elif b < kh * kw:
        # Fewer input channels than taps: scaling the spectrum is cheaper than A phase tables.
        lags = torch.matmul((spectrum * gain[:, :, None]).reshape(freqs, a * b).T, table)
    else:
        tables = gain.T[:, :, None] * table[None]  # (A, F, T)
        lags = torch.bmm(spectrum.permute(1, 2, 0), tables)  # (A, B, T)
    return lags.real.reshape(a, b, kh, kw).contiguous()


#: The kernel spectrum of a site, ``(F, C_out, C_in)`` complex, is built in blocks of output
#: channels of about this size, each consumed right away: blocks stay in cache, and never
#: reach the sizes the allocator serves with fresh memory (page faults on every call).
_KERNEL_BLOCK_BYTES = 8 * 2**20


def _channel_blocks(freqs: int, c_out: int, c_in_g: int, groups: int, itemsize: int) -> list[slice]:
    """Blocks of output channels for the kernel spectrum (one block for grouped convs)."""
    if groups != 1:
        return [slice(0, c_out)]
    count = -(-freqs * c_out * c_in_g * itemsize // _KERNEL_BLOCK_BYTES)  # ceil
    per_block = -(-c_out // max(count, 1))  # equal blocks, the last one at most as large
    return [slice(start, min(start + per_block, c_out)) for start in range(0, c_out, per_block)]


class _SpectralConvNorm(torch.autograd.Function):
    """Conv -> ConvNorm preconditioner -> affine -> crop -> stride, in the frequency domain.

    Forward: ``U_k = R_k v_k sum_j conj(A_kj) X_j`` per frequency, inverse-transformed at
    the kept samples. The preconditioner is a constant (stop-gradient, §3.3). Backward
    recomputes the input spectrum instead of saving it, so the site keeps only the input,
    which the conv before it keeps anyway. The per-channel factors ``R_k v_k`` are applied
    to the ``(F, N, C_out)`` activations, never to the ``(F, C_out, C_in)`` kernel spectrum,
    which is built in blocks of output channels (:data:`_KERNEL_BLOCK_BYTES`).
    """

    @staticmethod
    def forward(ctx, x, weight, affine_weight, inv_sqrt, plan):  # type: ignore[override]
        ctx.plan = plan
        ctx.save_for_backward(x, weight, affine_weight, inv_sqrt)
        compute, cplx = _spectral_dtypes(x, weight)
        rows, cols, groups, freqs = plan.rows, plan.cols, plan.groups, plan.frequencies
        c_out, c_in_g = weight.shape[:2]
        with _autocast_disabled(x.device):
            spectrum = _to_spectrum(x.to(compute), plan, _input_samples(rows), _input_samples(cols), -1)  # (F, N, C_in)
            blocks = _channel_blocks(freqs, c_out, c_in_g, groups, spectrum.element_size())
            if len(blocks) == 1:
                kernel = _kernel_dft(weight, plan, cplx).view(freqs, groups, c_out // groups, c_in_g)
                u = _grouped_matmul(spectrum, kernel, groups)  # (F, N, C_out)
            else:
                u = spectrum.new_empty(freqs, x.shape[0], c_out)
                for block in blocks:
                    kernel = _kernel_dft(weight[block], plan, cplx)
                    u[:, :, block] = torch.bmm(spectrum, kernel.transpose(1, 2))
            u = u.mul_(_channel_gain(inv_sqrt, affine_weight, plan, cplx).unsqueeze(1))
            del spectrum, kernel  # free before the inverse: it allocates its own work space
            out = _pad_outside(_from_spectrum(u, plan, _kept_samples(rows), _kept_samples(cols), 1), plan)
        memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
        return out.to(plan.out_dtype).contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, affine_weight, inv_sqrt = ctx.saved_tensors
        plan: _SpectralPlan = ctx.plan
        need_x, need_w, need_r = ctx.needs_input_grad[:3]
        compute, cplx = _spectral_dtypes(x, weight)
        rows, cols, groups, freqs = plan.rows, plan.cols, plan.groups, plan.frequencies
        c_out, c_in_g, kh, kw = weight.shape
        grad_x = grad_w = grad_r = None
        with _autocast_disabled(x.device):
            inner = _inner_window(grad.to(compute), plan)
            # conj(G): (F, N, C_out)
            grad_spectrum = _to_spectrum(inner, plan, _kept_samples(rows), _kept_samples(cols), 1)
            inv = inv_sqrt.permute(1, 2, 0).reshape(freqs, 1, c_out).to(cplx)
            affine = None
            if affine_weight is not None:
                affine = _kernel_dft(affine_weight, plan, cplx, affine=True).view(freqs, 1, c_out)
            need_gram = need_w or need_r
            if need_gram:
                # T = v sum_n conj(G_k) X_j: the batch reduction that all parameter gradients share.
                spectrum = _to_spectrum(x.to(compute), plan, _input_samples(rows), _input_samples(cols), -1)
                z_gram = grad_spectrum.new_empty(freqs, c_out) if need_r else None
                grad_w = weight.new_empty(c_out, c_in_g, kh, kw) if need_w else None
            if need_x:
                # conj of the input gradient's DFT: sum_k conj(G_k) R_k v_k conj(A_kj).
                x_gain = (inv if affine is None else inv * affine).view(freqs, 1, c_out)
                adjoint = None
            for block in _channel_blocks(freqs, c_out, c_in_g, groups, grad_spectrum.element_size()):
                kernel = _kernel_dft(weight[block], plan, cplx)  # (F, block, C_in / g)
                if need_gram:
                    gram = _grouped_gram(grad_spectrum[:, :, block], spectrum, groups).reshape(freqs, -1, c_in_g)
                    gram = gram.mul_(inv.view(freqs, c_out, 1)[:, block])
                    if need_r:
                        # dL/dr_k: correlation of g with the normalized signal z = v conj(A) x.
                        z_gram[:, block] = torch.einsum("fkj,fkj->fk", kernel, gram)
                    if need_w:
                        # dL/da_kj: correlation of the preconditioned, affine-adjoint gradient with x.
                        block_affine = None if affine is None else affine[:, 0, block]
                        grad_w[block] = _lag_values(gram, plan, affine=False, gain=block_affine).to(weight.dtype)
                if need_x:
                    if groups != 1:
                        kernel = kernel.view(freqs, groups, c_out // groups, c_in_g).transpose(2, 3)
                        adjoint = _grouped_matmul(grad_spectrum.mul_(x_gain), kernel, groups)
                    elif adjoint is None:
                        adjoint = torch.bmm(grad_spectrum[:, :, block].mul_(x_gain[:, :, block]), kernel)
                    else:
                        adjoint = adjoint.baddbmm_(grad_spectrum[:, :, block].mul_(x_gain[:, :, block]), kernel)
            # Free the spectra before the inverse, which allocates its own work space.
            del grad_spectrum, kernel
            if need_gram:
                del spectrum, gram
            if need_r:
                grad_r = _lag_values(z_gram.unsqueeze(-1), plan, affine=True).to(affine_weight.dtype)
            if need_x:
                grad_x = _from_spectrum(adjoint, plan, _input_samples(rows), _input_samples(cols), -1)
                memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
                grad_x = grad_x.to(x.dtype).contiguous(memory_format=memory_format)
        return grad_x, grad_w, grad_r, None, None


def _spectral_dtypes(x: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """Real and complex compute dtypes: float64 when the site is float64, else float32."""
    real = torch.float64 if x.dtype == weight.dtype == torch.float64 else torch.float32
    return real, _complex_dtype(real)


class _SpectralStage(torch.autograd.Function):
    """The ConvNorm stage on a full conv output ``y``, with crop and stride fused in.

    The DFT of ``y`` is multiplied by ``v_k`` and the affine kernel's DFT ``R_k`` (the "same"
    affine conv is circular where its halo stays on the grid) and inverse-transformed at
    the kept samples only. The filter is real and even in ``v_k``, so backward applies the
    conjugate factor to the gradient's spectrum; nothing of the transforms is kept for
    backward, and ``y`` only when the affine kernel needs a gradient.
    """

    @staticmethod
    def forward(ctx, y, affine_weight, inv_sqrt, plan):  # type: ignore[override]
        ctx.plan = plan
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, affine_weight, inv_sqrt)
        compute = _compute_dtype(y.dtype)
        rows, cols = plan.rows, plan.cols
        with _autocast_disabled(y.device):
            spectrum = _to_spectrum(y.to(compute), plan, _grid_samples(rows), _grid_samples(cols), -1)  # (F, N, C)
            spectrum = spectrum.mul_(_stage_gain(inv_sqrt, affine_weight, plan).unsqueeze(1))
            out = _pad_outside(_from_spectrum(spectrum, plan, _kept_samples(rows), _kept_samples(cols), 1), plan)
        memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
        return out.to(y.dtype).contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y, affine_weight, inv_sqrt = ctx.saved_tensors
        plan: _SpectralPlan = ctx.plan
        need_y, need_r = ctx.needs_input_grad[:2]
        grad_y = grad_r = None
        compute = _compute_dtype(grad.dtype)
        rows, cols = plan.rows, plan.cols
        with _autocast_disabled(grad.device):
            inner = _inner_window(grad.to(compute), plan)
            grad_spectrum = _to_spectrum(inner, plan, _kept_samples(rows), _kept_samples(cols), 1)  # conj(G): (F, N, C)
            if need_r:
                # dL/dr_k: correlation of g with z = irfft2(v Y), summed over the batch.
                spectrum = _to_spectrum(y.to(compute), plan, _grid_samples(rows), _grid_samples(cols), -1)
                z_gram = torch.einsum("fnc,fnc->fc", grad_spectrum, spectrum)
                z_gram = z_gram.mul_(inv_sqrt.permute(1, 2, 0).reshape(plan.frequencies, -1).to(z_gram.dtype))
                grad_r = _lag_values(z_gram.unsqueeze(-1), plan, affine=True).to(affine_weight.dtype)
            if need_y:
                # irfft2(conj(gain) G) = irfft2(conj(gain conj(G))).
                adjoint = grad_spectrum.mul_(_stage_gain(inv_sqrt, affine_weight, plan).unsqueeze(1))
                grad_y = _from_spectrum(adjoint, plan, _grid_samples(rows), _grid_samples(cols), -1)
                memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
                grad_y = grad_y.to(grad.dtype).contiguous(memory_format=memory_format)
        return grad_y, grad_r, None, None


def _stage_gain(inv_sqrt: Tensor, affine_weight: Tensor | None, plan: _SpectralPlan) -> Tensor:
    """``v_k R_k`` on the half plane, ``(F, C)`` (complex)."""
    return _channel_gain(inv_sqrt, affine_weight, plan, _complex_dtype(inv_sqrt.dtype))


def select_algorithm(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: IntOrPair = 1,
    dilation: IntOrPair = 1,
    groups: int = 1,
    training: bool = True,
) -> str:
    """Pick ``'direct'`` or ``'spectral'`` for one site by a cost model of both.

    Costs are counted in multiply-adds of a conv (which runs near the machine's peak), with
    memory traffic converted at ``_BYTE_COST`` and complex matmuls weighted by
    :func:`_matmul_cost` (see :func:`site_costs`). The constants were fitted to CPU timings
    of ``benchmarks/bench_layer.py``; the choice only affects speed, never results.

    Args:
        input_shape: ``(N, C_in, H, W)`` after mode padding.
        weight_shape: ``(C_out, C_in / g, k_h, k_w)``.
        stride, dilation, groups: as in ``nn.Conv2d``.
        training: count backward too (a gradient will be taken), else forward only.

    Returns:
        ``'direct'`` or ``'spectral'`` (``'direct'`` for 1x1 kernels, which need neither).
    """
    if tuple(int(v) for v in weight_shape[2:]) == (1, 1):
        return "direct"
    direct, spectral = site_costs(input_shape, weight_shape, stride, dilation, groups, training)
    return "spectral" if spectral < direct else "direct"


def site_costs(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: IntOrPair = 1,
    dilation: IntOrPair = 1,
    groups: int = 1,
    training: bool = True,
) -> tuple[float, float]:
    """Estimated cost ``(direct, spectral)`` of one site, in conv multiply-adds.

    * direct: the full conv ``N C_out C_in/g k_h k_w M_h M_w`` (three of them with backward),
      and the stage: a transform of the conv output on the grid, a product, an inverse at
      the kept samples (and their adjoints in backward);
    * spectral: a transform of the input, the kernel spectrum ``(F, C_out, C_in/g)``, the
      per-frequency products ``4 F N C_out C_in/g`` (``F = M_h (M_w // 2 + 1)``), an inverse
      at the kept samples; backward transforms the gradient and the input again, rebuilds
      the kernel spectrum and runs two more products.
    """
    # A symbolic batch (torch.export, dynamic shapes) is not specialized: the choice is made
    # for a typical batch instead.
    n = input_shape[0] if isinstance(input_shape[0], int) else _TYPICAL_BATCH
    c_in, h, w = (int(v) for v in input_shape[1:])
    c_out, c_in_g, kh, kw = (int(v) for v in weight_shape)
    dh, dw = _pair(dilation, "dilation")
    sh, sw = _pair(stride, "stride")
    mh, mw = h + dh * (kh - 1), w + dw * (kw - 1)
    freqs = mh * (mw // 2 + 1)
    kept_h, kept_w = min(h, -(-mh // sh)), min(w, -(-mw // sw))
    passes = 3 if training else 1
    depthwise = c_in_g == 1
    conv = n * c_out * c_in_g * kh * kw * mh * mw * (_DEPTHWISE_COST if depthwise else 1.0)
    pass_cost = 16 * _BYTE_COST * freqs * n  # one read-write pass over an (F, N, 1) complex tensor
    # Direct: full conv(s), y's transform and inverse (their adjoints in backward), gain passes.
    stage = _transform_cost(n * c_out, mh, mw, mh, mw) + _transform_cost(n * c_out, kept_h, kept_w, mh, mw)
    direct = passes * conv + stage * (2.5 if training else 1.0) + pass_cost * c_out * (3 if training else 1)
    # Spectral: input transform, products, inverse; backward adds 2 transforms + 2 products.
    if kh * kw > max(_KERNEL_FFT_MIN_TAPS, _KERNEL_FFT_FACTOR * math.log2(mh * mw)):  # see _taps_by_fft
        kernel = c_out * c_in_g * (_FFT_COST * mh * mw * math.log2(mh * mw) + 16 * _BYTE_COST * freqs)
    else:
        kernel = freqs * c_out * c_in_g * (4 * kh * kw + 8 * _BYTE_COST)
    if depthwise:
        products = pass_cost * c_out * (c_out // groups)
    else:
        products = 4 * freqs * n * c_out * c_in_g * _matmul_cost(n, c_in_g, c_out // groups)
    x_transform = _transform_cost(n * c_in, h, w, mh, mw)
    out_transform = _transform_cost(n * c_out, kept_h, kept_w, mh, mw)
    spectral = x_transform + out_transform + kernel + products + pass_cost * c_out
    if training:
        spectral += 2 * x_transform + out_transform + kernel + 2 * products + 2 * pass_cost * c_out
    return direct, spectral


def _transform_cost(batch: int, p: int, q: int, mh: int, mw: int) -> float:
    """Cost of one transform between ``p x q`` samples and the ``M_h x M_w`` half plane, per
    :func:`_to_spectrum` / :func:`_from_spectrum` (either direction)."""
    wf = mw // 2 + 1
    layout = 16 * _BYTE_COST * batch * p * wf  # the permute between the two steps
    if max(mh, mw) <= _DFT_MAX_GRID:
        return batch * (p * q * 2 * wf + 4 * mh * p * wf) + layout
    return _FFT_COST * batch * mh * mw * math.log2(mh * mw) + layout + 16 * _BYTE_COST * batch * mh * wf


def _matmul_cost(batch: int, c_in: int, c_out: int) -> float:
    """Cost of a complex-matmul real multiply-add relative to a conv's: small matrices run slower."""
    narrow = max(min(batch, c_in, c_out), 1)
    return _COMPLEX_MATMUL_COST * max(1.0, (32 / narrow) ** 0.5)


# Fitted to bench_layer.py's full grid on a 2-core AVX-512 CPU (float32, 2 threads), where
# the cost model picks the faster algorithm at 40 of 42 (site, train/eval) points and costs
# at most 6% at the other two; GPUs have other ratios (see benchmarks/README.md).
#: Conv multiply-adds that one byte of memory traffic costs.
_BYTE_COST = 4.0
#: A batched complex matmul's real multiply-add, relative to a conv's.
_COMPLEX_MATMUL_COST = 3.5
#: An FFT's cost per point and log2 of the size, relative to a conv's multiply-add.
_FFT_COST = 2.5
#: A depthwise conv's multiply-add (memory bound), relative to a dense conv's.
_DEPTHWISE_COST = 6.0
#: Batch size assumed when the batch is symbolic.
_TYPICAL_BATCH = 32


def _fused_paths_allowed(reference: Tensor) -> bool:
    """Whether the custom autograd functions may run: not on MPS (no complex matmuls), and not
    under ``torch.export``, whose consumers (ONNX) know FFT ops but not complex matmuls, so an
    exported model keeps the step-by-step pipeline."""
    return reference.device.type != "mps" and not torch.compiler.is_exporting()


def _resolve_algorithm(
    algorithm: str,
    x: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    affine_weight: Tensor | None,
    constant_spectrum: bool,
) -> _SpectralPlan | None:
    """The spectral plan if the site runs spectrally, else ``None`` (direct algorithm)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "direct" or not constant_spectrum or not _fused_paths_allowed(x):
        return None
    if tuple(weight.shape[2:]) == (1, 1):
        return None
    if algorithm == "auto":
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if select_algorithm(x.shape, weight.shape, stride, dilation, groups, training) != "spectral":
            return None
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    out_dtype = _conv_out_dtype(x)
    return _spectral_plan(x, x.shape[-2:], kernel_size, stride, pads, dilation, groups, affine_weight, out_dtype)


def _conv_norm_from_input(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    eps: float,
    stop_gradient: bool,
    affine_weight: Tensor | None,
    affine_bias: Tensor | None,
    inv_sqrt: Tensor | None,
    algorithm: str,
) -> Tensor:
    """A normalized site from its (mode-padded) input, by the algorithm ``algorithm`` resolves to.

    ``inv_sqrt`` is computed here when not given. 1x1 kernels fold the flat preconditioner
    and the affine scale into the conv weight, so nothing but the conv's own input is kept
    for backward."""
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    if kernel_size == (1, 1):
        scale = _scale_1x1_factor(weight, eps, stop_gradient, affine_weight, inv_sqrt)
        shift = _sum_optional(bias, affine_bias)
        scaled = weight * scale.to(weight.dtype).reshape(-1, 1, 1, 1)
        shift = None if shift is None else shift.to(weight.dtype)
        return F.conv2d(x, scaled, shift, stride, (pads[0], pads[2]), dilation, groups)
    if inv_sqrt is None:
        grid = grid_size(x.shape[-2:], kernel_size, dilation)
        inv_sqrt = preconditioner_spectrum(weight, grid, dilation, eps, stop_gradient)
    constant = not (inv_sqrt.requires_grad and torch.is_grad_enabled())
    plan = _resolve_algorithm(algorithm, x, weight, stride, pads, dilation, groups, affine_weight, constant)
    if plan is None:
        feed_stride, feed_padding = feeding_conv_args(kernel_size, stride, pads, dilation)
        y = F.conv2d(x, weight, None, feed_stride, feed_padding, dilation, groups)
        return conv_norm_stage(
            y, weight, bias, stride, pads, dilation, eps, stop_gradient,
            affine_weight=affine_weight, affine_bias=affine_bias, inv_sqrt=inv_sqrt,
        )
    out = _SpectralConvNorm.apply(x, weight, affine_weight, inv_sqrt.detach(), plan)
    shift = _sum_optional(bias, affine_bias)
    if shift is not None:
        out = out + shift.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def _sum_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
