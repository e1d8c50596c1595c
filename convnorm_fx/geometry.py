"""Where things sit: the geometry of a conv site (Liu et al. 2021, Appendix B.2-B.4).

The conv of a signal of size ``H`` with a kernel of dilated extent ``e = d (k - 1) + 1`` is
computed "full" (stride 1, padding ``e - 1`` on both sides); its ``M = H + e - 1`` outputs
hold the whole linear correlation, so on the circular domain of size ``M`` the layer is
exactly a circular cross-correlation of the zero-embedded input (Appendix B.2). The original
conv's outputs are a window of that domain, downsampled by the stride (B.3-B.4). This module
holds that arithmetic: pairs, paddings, sizes, the conv that feeds a stage, and the crop.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


__all__ = [
    "PADDING_MODES",
    "IntOrPair",
    "PaddingArg",
    "check_conv_input",
    "check_positive",
    "conv_output_size",
    "crop_and_downsample",
    "explicit_padding",
    "feeding_conv_args",
    "full_padding",
    "grid_size",
    "is_channels_last",
    "memory_format_of",
    "pad_for_mode",
    "pair",
]


IntOrPair = Union[int, Sequence[int]]
PaddingArg = Union[str, int, Sequence[int]]


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def pair(value: IntOrPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def full_padding(kernel_size: IntOrPair, dilation: IntOrPair = 1) -> tuple[int, int]:
    """Padding ``d (k - 1)`` per axis that makes a stride-1 conv compute the full correlation.

    Args:
        kernel_size: ``k`` or ``(k_h, k_w)``.
        dilation: ``d`` or ``(d_h, d_w)``.

    Returns:
        ``(f_h, f_w)`` with ``f = d (k - 1)``.
    """
    kh, kw = pair(kernel_size, "kernel_size")
    dh, dw = pair(dilation, "dilation")
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
    ph, pw = pair(padding, "padding")
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
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    top, bottom, left, right = padding
    out_h = (int(input_size[0]) + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (int(input_size[1]) + left + right - dw * (kw - 1) - 1) // sw + 1
    return out_h, out_w


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
    kh, kw = pair(kernel_size, "kernel_size")
    if (kh, kw) == (1, 1):
        top, bottom, left, right = padding
        if top != bottom or left != right:
            raise ValueError(f"a 1x1 conv takes symmetric padding, got {padding}")
        return pair(stride, "stride"), (top, left)
    return (1, 1), full_padding((kh, kw), dilation)


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
    sh, sw = pair(stride, "stride")
    top, bottom, left, right = padding
    # F.pad crops where the amount is negative and zero-fills where it is positive.
    window = F.pad(y, (left - fw, right - fw, top - fh, bottom - fh))
    if sh == 1 and sw == 1:
        return window
    return window[..., ::sh, ::sw]


def check_conv_input(x: Tensor, weight: Tensor, groups: int) -> None:
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


def check_positive(pair: tuple[int, int], name: str) -> None:
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {pair}")


def is_channels_last(tensor: Tensor) -> bool:
    """Whether a 4-D tensor is laid out ``(N, H, W, C)`` in memory (and not also contiguous)."""
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def memory_format_of(tensor: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a tensor laid out that way, else ``torch.contiguous_format``:
    the layout a stage gives its output (the layout of its input, as a conv does)."""
    return torch.channels_last if is_channels_last(tensor) else torch.contiguous_format
