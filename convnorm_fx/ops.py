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

Precision: the spectrum and the FFTs always run in float32 (float64 stays float64) with
autocast disabled, because cuFFT's half precision needs power-of-two sizes and there is no
bfloat16 FFT; results are cast back to the dtype of the conv output.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
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
    It is one small grouped conv instead of ``C_out * C_in`` zero-padded FFTs.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``(C_out, 2 k_h - 1, 2 k_w - 1)``
    """
    c_out, c_in, kh, kw = weight.shape
    w = weight.to(_compute_dtype(weight.dtype))
    # Each output channel correlates its own kernels with themselves: a grouped conv with
    # one group per output channel, "full" padding for all lags.
    lags = F.conv2d(w.reshape(1, c_out * c_in, kh, kw), w, padding=(kh - 1, kw - 1), groups=c_out)
    return lags[0]


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
    # Re[(C_h - i S_h) R (C_w - i S_w)^T] = C_h R C_w^T - S_h R S_w^T
    spectrum = cos_h @ r @ cos_w.T - sin_h @ r @ sin_w.T
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

    feed_stride, feed_padding = feeding_conv_args(kernel_size, stride_hw, pads, dilation_hw)
    y = F.conv2d(x, weight, None, feed_stride, feed_padding, dilation_hw, groups)
    return conv_norm_stage(
        y,
        weight,
        bias,
        stride_hw,
        pads,
        dilation_hw,
        eps,
        stop_gradient,
        affine_weight=affine_weight,
        affine_bias=affine_bias,
        inv_sqrt=inv_sqrt,
        normalize=normalize,
    )


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
    conv.

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
    out = y * scale.to(y.dtype).reshape(1, -1, 1, 1)
    if affine_bias is not None:
        out = out + affine_bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out
