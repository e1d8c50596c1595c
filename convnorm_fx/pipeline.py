"""The ConvNorm stage step by step, as Appendix B writes it (the reference pipeline).

On the full conv output ``y``: the preconditioner as a circular filter (rfft2 -> multiply
by ``(S_k + eps)^{-1/2}`` -> irfft2), the affine transform ``r_k`` ("same" depthwise conv,
§3.3), the crop to the original conv's window and the stride. 1x1 kernels have a flat
spectrum: the preconditioner and the affine transform are per-channel scales. The fused
frequency-domain paths (:mod:`convnorm_fx.spectral`) compute the same numbers faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import crop_and_downsample, full_padding, memory_format_of
from .precision import autocast_disabled, compute_dtype, spectrum_dtype
from .spectrum import inverse_sqrt_spectrum


__all__ = [
    "affine_crop_downsample",
    "finish_stage",
    "normalize_circular",
    "scale_1x1",
    "scale_1x1_factor",
    "stage_step_by_step",
]


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
    compute = compute_dtype(y.dtype)
    with autocast_disabled(y.device):
        spectrum = torch.fft.rfft2(y.to(compute))
        filtered = torch.fft.irfft2(spectrum * inv_sqrt.to(compute), s=(mh, mw))
    return filtered.to(y.dtype)


def affine_crop_downsample(
    y: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
    dilation: tuple[int, int], affine_weight: Tensor, affine_bias: Tensor | None,
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


def scale_1x1_factor(
    weight: Tensor, eps: float, stop_gradient: bool, affine_weight: Tensor | None, inv_sqrt: Tensor | None,
) -> Tensor:
    """Per-channel factor of a 1x1 site: ``(||a_k||^2 + eps)^{-1/2}`` times the affine scale, ``(C_out,)``."""
    c_out = weight.shape[0]
    compute = compute_dtype(weight.dtype)
    if inv_sqrt is None:
        source = weight.detach() if stop_gradient else weight
        with autocast_disabled(weight.device):
            energy = source.to(spectrum_dtype(weight.device)).reshape(c_out, -1).square().sum(dim=1)
            scale = inverse_sqrt_spectrum(energy, eps).to(compute)
    else:
        scale = inv_sqrt.reshape(c_out, -1)[:, 0].to(compute)
    if affine_weight is not None:
        scale = scale * affine_weight.reshape(c_out).to(compute)
    return scale


def scale_1x1(
    y: Tensor, weight: Tensor, eps: float, stop_gradient: bool, affine_weight: Tensor | None,
    affine_bias: Tensor | None, inv_sqrt: Tensor | None,
) -> Tensor:
    """1x1 fast path: ConvNorm is the per-channel scale ``1 / sqrt(||a_k||^2 + eps)``.

    A flat spectrum means ``P_k`` is a scalar, and a 1x1 affine transform is a per-channel
    scale and shift; both commute with the stride and the crop, so no FFT is needed.
    """
    scale = scale_1x1_factor(weight, eps, stop_gradient, affine_weight, inv_sqrt)
    out = y * scale.to(y.dtype).reshape(1, -1, 1, 1)
    if affine_bias is not None:
        out = out + affine_bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def finish_stage(
    z: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
    dilation: tuple[int, int], bias: Tensor | None, affine_weight: Tensor | None = None,
    affine_bias: Tensor | None = None, memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """Everything after the preconditioner: affine transform ``r_k`` (if ``affine_weight``),
    crop, stride, affine bias and conv bias, as a dense tensor in ``memory_format``.

    The crop is a strided view; downstream reductions (BatchNorm in training) sum a view in
    another order than a dense tensor, so a dense tensor is handed out.

    Shape:
        - z: ``(N, C, M_h, M_w)``, the normalized full conv output
        - output: ``(N, C, H_out, W_out)``
    """
    if affine_weight is not None:
        out = affine_crop_downsample(z, kernel_size, stride, pads, dilation, affine_weight, affine_bias)
    else:
        out = crop_and_downsample(z, kernel_size, stride, pads, dilation)
        if affine_bias is not None:
            out = out + affine_bias.to(out.dtype).reshape(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out.contiguous(memory_format=memory_format)


def stage_step_by_step(
    y: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
    dilation: tuple[int, int], bias: Tensor | None, inv_sqrt: Tensor | None, affine_weight: Tensor | None = None,
    affine_bias: Tensor | None = None,
) -> Tensor:
    """The stage of a ``k_h x k_w`` site (not 1x1) on its full conv output, step by step.

    ``inv_sqrt`` is the preconditioner's DFT (:func:`convnorm_fx.spectrum.preconditioner_spectrum`),
    or ``None`` to skip the preconditioner (bypass: then pass no affine transform either).

    Shape:
        - y: ``(N, C, M_h, M_w)``
        - inv_sqrt: ``(C, M_h, M_w // 2 + 1)``
        - output: ``(N, C, H_out, W_out)``, in ``y``'s memory format
    """
    layout = memory_format_of(y)
    z = y if inv_sqrt is None else normalize_circular(y, inv_sqrt)
    return finish_stage(z, kernel_size, stride, pads, dilation, bias, affine_weight, affine_bias, layout)
