"""The ConvNorm math at the paper's level (Liu et al., NeurIPS 2021), and which path computes it.

Everything here is a pure function of tensors: no ``nn.Module``, no caches, no graph code.
The notation follows the paper (Sections 3.2-3.3, Appendix B):

* ``a_kj`` is the kernel from input channel ``j`` to output channel ``k`` (``weight[k, j]``);
* the conv is computed "full" (stride 1, padding ``d (k - 1)``); on its ``M = H + d (k - 1)``
  grid the layer is a circular correlation of the zero-embedded input (Appendix B.2,
  :mod:`convnorm_fx.geometry`);
* per output channel, the preconditioner ``P_k`` has DFT ``(S_k + eps)^{-1/2}`` with
  ``S_k = sum_j |DFT_M(a_kj)|^2`` (eq. 6, :mod:`convnorm_fx.spectrum`), so that
  ``Q_k = P_k A_k`` is a tight frame;
* the normalized output is cropped to the original conv's window and downsampled by the
  stride (Appendix B.3-B.4).

The files below this one, bottom up: :mod:`~convnorm_fx.geometry` and
:mod:`~convnorm_fx.precision` (sizes, paddings, dtypes), :mod:`~convnorm_fx.dft` (DFT tables
and transforms), :mod:`~convnorm_fx.spectrum` (the kernel spectrum and the preconditioner);
then, side by side, :mod:`~convnorm_fx.pipeline` (the stage step by step, the reference) and
:mod:`~convnorm_fx.spectral` (the same numbers in the frequency domain, fast); then
:mod:`~convnorm_fx.cost` (which of the two is cheaper). This module chooses the path:

* ``'direct'``: the full conv, then the stage (:func:`conv_norm_stage`), which filters its
  DFT by ``v_k R_k`` and inverse-transforms only the kept samples where it can
  (:class:`~convnorm_fx.spectral.SpectralStage`), and goes step by step otherwise;
* ``'spectral'``: no full conv at all (:class:`~convnorm_fx.spectral.SpectralConvNorm`).

The public math of the files below is re-exported here, so ``ops.kernel_power_spectrum``
and the like keep working.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .cost import select_algorithm, site_costs
from .geometry import (
    PADDING_MODES,
    IntOrPair,
    PaddingArg,
    check_conv_input,
    check_positive,
    conv_output_size,
    crop_and_downsample,
    explicit_padding,
    feeding_conv_args,
    full_padding,
    grid_size,
    memory_format_of,
    pad_for_mode,
    pair,
)
from .pipeline import normalize_circular, scale_1x1, scale_1x1_factor, stage_step_by_step
from .precision import conv_out_dtype
from .validation import ALGORITHMS
from .spectral import (
    SpectralConvNorm,
    SpectralPlan,
    SpectralStage,
    fused_paths_allowed,
    spectral_from_operator,
    spectral_plan,
)
from .spectrum import (
    DEFAULT_EPS,
    inverse_sqrt_spectrum,
    kernel_autocorrelation,
    kernel_power_spectrum,
    power_spectrum_from_autocorrelation,
    preconditioner_spectrum,
)

__all__ = [
    # This module: the whole site, and which path computes it.
    "ALGORITHMS", "conv_norm2d", "conv_norm_from_input", "conv_norm_stage", "resolve_algorithm",
    # The math of the modules below, importable from here too.
    "DEFAULT_EPS", "kernel_power_spectrum", "kernel_autocorrelation", "power_spectrum_from_autocorrelation",
    "inverse_sqrt_spectrum", "preconditioner_spectrum", "normalize_circular", "select_algorithm", "site_costs",
    "IntOrPair", "PaddingArg", "full_padding", "grid_size", "explicit_padding", "pad_for_mode", "feeding_conv_args",
    "conv_output_size", "crop_and_downsample",
]  # fmt: skip


def conv_norm2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: IntOrPair = 1, padding: PaddingArg = 0,
    dilation: IntOrPair = 1, groups: int = 1, padding_mode: str = "zeros", eps: float = DEFAULT_EPS,
    stop_gradient: bool = True, *, affine_weight: Tensor | None = None, affine_bias: Tensor | None = None,
    inv_sqrt: Tensor | None = None, normalize: bool = True, algorithm: str = "auto",
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
    check_conv_input(x, weight, groups)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    stride_hw, dilation_hw = pair(stride, "stride"), pair(dilation, "dilation")
    check_positive(stride_hw, "stride")
    check_positive(dilation_hw, "dilation")
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
        return conv_norm_from_input(
            x, weight, bias, stride_hw, pads, dilation_hw, groups, eps, stop_gradient,
            affine_weight, affine_bias, inv_sqrt, algorithm,
        )
    feed_stride, feed_padding = feeding_conv_args(kernel_size, stride_hw, pads, dilation_hw)
    y = F.conv2d(x, weight, None, feed_stride, feed_padding, dilation_hw, groups)
    return conv_norm_stage(y, weight, bias, stride_hw, pads, dilation_hw, eps, stop_gradient, normalize=False)


def conv_norm_stage(
    y: Tensor, weight: Tensor, bias: Tensor | None = None, stride: IntOrPair = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0), dilation: IntOrPair = 1, eps: float = DEFAULT_EPS,
    stop_gradient: bool = True, *, affine_weight: Tensor | None = None, affine_bias: Tensor | None = None,
    inv_sqrt: Tensor | None = None, normalize: bool = True,
) -> Tensor:
    """Everything after the conv: preconditioner, affine, crop, stride, bias.

    ``y`` is the output of the conv described by :func:`feeding_conv_args` (the full conv,
    or for 1x1 kernels the strided conv itself). Arguments are as in :func:`conv_norm2d`;
    ``padding`` is the explicit zero padding ``(top, bottom, left, right)`` of the original
    conv. With a constant preconditioner, normalization, affine transform, crop and stride
    run as one frequency-domain step (``SpectralStage``) wherever the affine halo stays on
    the grid; otherwise step by step.

    Shape:
        - y: ``(N, C_out, M_h, M_w)`` (1x1: ``(N, C_out, H_out, W_out)``)
        - output: ``(N, C_out, H_out, W_out)``
    """
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    stride_hw, dilation_hw = pair(stride, "stride"), pair(dilation, "dilation")
    if kernel_size == (1, 1):
        layout = memory_format_of(y)
        out = scale_1x1(y, weight, eps, stop_gradient, affine_weight, affine_bias, inv_sqrt) if normalize else y
        if bias is not None:
            out = out + bias.to(out.dtype).reshape(1, -1, 1, 1)
        return out.contiguous(memory_format=layout)
    fh, fw = full_padding(kernel_size, dilation_hw)
    top, bottom, left, right = padding
    if y.shape[-2] - 2 * fh + top + bottom < 1 or y.shape[-1] - 2 * fw + left + right < 1:
        raise ValueError(
            f"input of spatial size {(y.shape[-2] - fh, y.shape[-1] - fw)} with padding {padding} is "
            f"smaller than the kernel {kernel_size} with dilation {dilation_hw}; use a larger input or more padding"
        )
    if not normalize:
        return stage_step_by_step(y, kernel_size, stride_hw, padding, dilation_hw, bias, None)
    if inv_sqrt is None:
        inv_sqrt = preconditioner_spectrum(weight, y.shape[-2:], dilation_hw, eps, stop_gradient)
    if not (inv_sqrt.requires_grad and torch.is_grad_enabled()) and fused_paths_allowed(y):
        size = (y.shape[-2] - fh, y.shape[-1] - fw)
        plan = spectral_plan(y, size, kernel_size, stride_hw, padding, dilation_hw, 1, affine_weight, y.dtype)
        if plan is not None:
            # Normalization, affine, crop and stride as one frequency-domain step.
            out = SpectralStage.apply(y, affine_weight, inv_sqrt.detach(), plan)
            shift = _sum_optional(affine_bias, bias)
            return out if shift is None else out + shift.to(out.dtype).reshape(1, -1, 1, 1)
    return stage_step_by_step(
        y, kernel_size, stride_hw, padding, dilation_hw, bias, inv_sqrt, affine_weight, affine_bias
    )


def resolve_algorithm(
    algorithm: str, x: Tensor, weight: Tensor, stride: tuple[int, int], pads: tuple[int, int, int, int],
    dilation: tuple[int, int], groups: int, affine_weight: Tensor | None, constant_spectrum: bool,
    kernel_cached: bool = False,
) -> SpectralPlan | None:
    """The spectral plan if the site runs spectrally, else ``None`` (direct algorithm).
    ``kernel_cached``: an eval pass would reuse a kept operator (``eval_kernel_cache``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "direct" or not constant_spectrum or not fused_paths_allowed(x):
        return None
    if tuple(weight.shape[2:]) == (1, 1):
        return None
    if algorithm == "auto":
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        picked = select_algorithm(x.shape, weight.shape, stride, dilation, groups, training, kernel_cached)
        if picked != "spectral":
            return None
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    out_dtype = conv_out_dtype(x)
    return spectral_plan(x, x.shape[-2:], kernel_size, stride, pads, dilation, groups, affine_weight, out_dtype)


def conv_norm_from_input(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], pads: tuple[int, int, int, int],
    dilation: tuple[int, int], groups: int, eps: float, stop_gradient: bool, affine_weight: Tensor | None,
    affine_bias: Tensor | None, inv_sqrt: Tensor | None, algorithm: str,
    kept_operator: Callable[[Tensor, SpectralPlan], Tensor] | None = None,
) -> Tensor:
    """A normalized site from its (mode-padded) input, by the algorithm ``algorithm`` resolves to.

    ``inv_sqrt`` is computed here when not given. 1x1 kernels fold the flat preconditioner
    and the affine scale into the conv weight, so nothing but the conv's own input is kept
    for backward. ``kept_operator(x, plan)``, when given, returns the spectral algorithm's
    per-frequency operator (:func:`convnorm_fx.spectral.eval_operator`) kept between calls
    (:meth:`ConvNorm2d.operator_keeper`); it is used when no gradient is needed."""
    kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
    if kernel_size == (1, 1):
        scale = scale_1x1_factor(weight, eps, stop_gradient, affine_weight, inv_sqrt)
        shift = _sum_optional(bias, affine_bias)
        scaled = weight * scale.to(weight.dtype).reshape(-1, 1, 1, 1)
        shift = None if shift is None else shift.to(weight.dtype)
        return F.conv2d(x, scaled, shift, stride, (pads[0], pads[2]), dilation, groups)
    if inv_sqrt is None:
        grid = grid_size(x.shape[-2:], kernel_size, dilation)
        inv_sqrt = preconditioner_spectrum(weight, grid, dilation, eps, stop_gradient)
    constant = not (inv_sqrt.requires_grad and torch.is_grad_enabled())
    inputs = (x, weight) if affine_weight is None else (x, weight, affine_weight)
    reuse = kept_operator is not None and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
    plan = resolve_algorithm(algorithm, x, weight, stride, pads, dilation, groups, affine_weight, constant, reuse)
    if plan is None:
        feed_stride, feed_padding = feeding_conv_args(kernel_size, stride, pads, dilation)
        y = F.conv2d(x, weight, None, feed_stride, feed_padding, dilation, groups)
        return conv_norm_stage(
            y, weight, bias, stride, pads, dilation, eps, stop_gradient,
            affine_weight=affine_weight, affine_bias=affine_bias, inv_sqrt=inv_sqrt,
        )
    if reuse:
        operator = kept_operator(x, plan)
        out = spectral_from_operator(x, operator, plan)
    else:
        out = SpectralConvNorm.apply(x, weight, affine_weight, inv_sqrt.detach(), plan)
    shift = _sum_optional(bias, affine_bias)
    if shift is not None:
        out = out + shift.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def _sum_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
