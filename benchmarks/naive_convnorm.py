"""A straightforward ConvNorm written from the paper's Algorithm 1, as the speed baseline.

Liu et al., "Convolutional Normalization", NeurIPS 2021, Algorithm 1 with the adaptation of
Appendix B.2-B.4: full conv (stride 1, padding ``d (k - 1)``) -> complex ``fft2`` of the
whole output -> multiply by ``v_k = (sum_j |FFT(a_kj)|^2 + eps)^{-1/2}``, the spectrum
recomputed on every call from zero-padded ``fft2`` of all ``C_out * C_in`` kernels (under
stop-gradient) -> ``ifft2`` and real part -> affine depthwise conv ``r_k`` with "same"
output on the whole grid -> crop to the original conv's window -> stride -> conv bias.

Nothing is cached and there are no fast paths: 1x1 kernels take the same FFT route. It
computes the same numbers as :func:`convnorm_fx.conv_norm2d` (checked in
``tests/test_fast_paths.py``), so timing it next to the library shows what the library's
fast paths buy.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnorm_fx import ops
from convnorm_fx.geometry import pair
from convnorm_fx.modules import ConvNormConv2d

__all__ = ["naive_conv_norm2d", "naive_forward", "use_naive"]


def naive_conv_norm2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: ops.IntOrPair = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: ops.IntOrPair = 1,
    groups: int = 1,
    eps: float = ops.DEFAULT_EPS,
    affine_weight: Tensor | None = None,
    affine_bias: Tensor | None = None,
) -> Tensor:
    """Conv + ConvNorm by Algorithm 1, step by step.

    Args:
        x: input ``(N, C_in, H, W)`` (already padded for non-zero padding modes).
        weight: ``(C_out, C_in / groups, k_h, k_w)``.
        bias: optional ``(C_out,)``, added last.
        stride, dilation, groups: as in ``nn.Conv2d``.
        padding: explicit zero padding ``(top, bottom, left, right)`` of the original conv.
        eps: added to the power spectrum.
        affine_weight, affine_bias: the affine transform ``r_k`` ``(C_out, 1, k_h, k_w)`` and its bias.

    Returns:
        ``(N, C_out, H_out, W_out)``, as the original conv.
    """
    kh, kw = weight.shape[-2:]
    dh, dw = pair(dilation, "dilation")
    full = ops.full_padding((kh, kw), (dh, dw))
    y = F.conv2d(x, weight, None, 1, full, (dh, dw), groups)  # (N, C_out, M_h, M_w)
    mh, mw = y.shape[-2:]
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    with torch.autocast(y.device.type, enabled=False):
        kernels = weight.detach().to(compute)
        stuffed = kernels.new_zeros(*kernels.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        stuffed[:, :, ::dh, ::dw] = kernels
        power = torch.fft.fft2(stuffed, s=(mh, mw)).abs().square().sum(dim=1)  # (C_out, M_h, M_w)
        v = (power + eps).rsqrt()
        z = torch.fft.ifft2(torch.fft.fft2(y.to(compute)) * v).real.to(y.dtype)
    if affine_weight is not None:
        # Padding beyond the full padding reaches outside the grid, where z is zero: extend
        # it there first, so that the "same" affine conv sees the zero-extended signal.
        top, bottom, left, right = padding
        extra = (max(0, left - full[1]), max(0, right - full[1]), max(0, top - full[0]), max(0, bottom - full[0]))
        z = F.conv2d(F.pad(z, extra), affine_weight.to(z.dtype), None, 1, "same", 1, z.shape[1])
        padding = (top - extra[2], bottom - extra[3], left - extra[0], right - extra[1])
    out = ops.crop_and_downsample(z, (kh, kw), stride, padding, (dh, dw))
    if affine_bias is not None:
        out = out + affine_bias.to(out.dtype).reshape(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def naive_forward(self: ConvNormConv2d, input: Tensor) -> Tensor:  # noqa: A002 - nn.Conv2d's argument name
    """``ConvNormConv2d.forward`` computed by :func:`naive_conv_norm2d` (same Parameters)."""
    stage = self.norm
    x = input
    padding = stage.padding
    if self.padding_mode != "zeros":
        x = ops.pad_for_mode(x, self._mode_padding, self.padding_mode)
    out = naive_conv_norm2d(
        x,
        self.weight,
        self.bias,
        stage.stride,
        padding,
        stage.dilation,
        self.groups,
        stage.eps,
        stage.affine_weight,
        stage.affine_bias,
    )
    return stage.bn(out) if stage.bn is not None else out


@contextlib.contextmanager
def use_naive(model: nn.Module) -> Iterator[nn.Module]:
    """Run every :class:`ConvNormConv2d` of ``model`` by Algorithm 1 inside the ``with`` block.

    Example:
        >>> with use_naive(model):
        ...     loss = model(x).sum()
    """
    convs = [m for m in model.modules() if isinstance(m, ConvNormConv2d)]
    for conv in convs:
        conv.forward = types.MethodType(naive_forward, conv)
    try:
        yield model
    finally:
        for conv in convs:
            del conv.forward
