"""Which algorithm computes a site: a cost model of the direct and the spectral algorithm.

Costs are counted in multiply-adds of a conv (which runs near the machine's peak), with
memory traffic converted at :data:`BYTE_COST` and complex matmuls weighted by their
efficiency. The constants were fitted to CPU timings of ``benchmarks/bench_layer.py``; the
choice only affects speed, never results.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from . import dft
from .geometry import IntOrPair, conv_output_size, pair
from .spectral import kernel_by_fft


__all__ = [
    "BYTE_COST",
    "COMPLEX_MATMUL_COST",
    "DEPTHWISE_COST",
    "FFT_COST",
    "TYPICAL_BATCH",
    "Operations",
    "select_algorithm",
    "site_costs",
    "site_operations",
]


def select_algorithm(
    input_shape: Sequence[int], weight_shape: Sequence[int], stride: IntOrPair = 1, dilation: IntOrPair = 1,
    groups: int = 1, training: bool = True, kernel_cached: bool = False,
) -> str:
    """Pick ``'direct'`` or ``'spectral'`` for one site by a cost model of both.

    Costs are counted in multiply-adds of a conv (which runs near the machine's peak), with
    memory traffic converted at ``BYTE_COST`` and complex matmuls weighted by
    :func:`_matmul_cost` (see :func:`site_costs`). The constants were fitted to CPU timings
    of ``benchmarks/bench_layer.py``; the choice only affects speed, never results.

    Args:
        input_shape: ``(N, C_in, H, W)`` after mode padding.
        weight_shape: ``(C_out, C_in / g, k_h, k_w)``.
        stride, dilation, groups: as in ``nn.Conv2d``.
        training: count backward too (a gradient will be taken), else forward only.
        kernel_cached: the spectral algorithm's kernel spectrum is kept between calls
            (``eval_kernel_cache``, eval mode): its cost is not counted.

    Returns:
        ``'direct'`` or ``'spectral'`` (``'direct'`` for 1x1 kernels, which need neither).
    """
    if tuple(int(v) for v in weight_shape[2:]) == (1, 1):
        return "direct"
    direct, spectral = site_costs(input_shape, weight_shape, stride, dilation, groups, training, kernel_cached)
    return "spectral" if spectral < direct else "direct"


def site_costs(
    input_shape: Sequence[int], weight_shape: Sequence[int], stride: IntOrPair = 1, dilation: IntOrPair = 1,
    groups: int = 1, training: bool = True, kernel_cached: bool = False,
) -> tuple[float, float]:
    """Estimated cost ``(direct, spectral)`` of one site, in conv multiply-adds.

    * direct: the full conv ``N C_out C_in/g k_h k_w M_h M_w`` (three of them with backward),
      and the stage: a transform of the conv output on the grid, a product, an inverse at
      the kept samples (and their adjoints in backward);
    * spectral: a transform of the input, the kernel spectrum ``(F, C_out, C_in/g)``, the
      per-frequency products ``4 F N C_out C_in/g`` (``F = M_h (M_w // 2 + 1)``), an inverse
      at the kept samples; backward transforms the gradient and the input again, rebuilds
      the kernel spectrum and runs two more products. With ``kernel_cached`` (and not
      ``training``) the kernel spectrum costs nothing.
    """
    # A symbolic batch (torch.export, dynamic shapes) is not specialized: the choice is made
    # for a typical batch instead.
    n = input_shape[0] if isinstance(input_shape[0], int) else TYPICAL_BATCH
    c_in, h, w = (int(v) for v in input_shape[1:])
    c_out, c_in_g, kh, kw = (int(v) for v in weight_shape)
    dh, dw = pair(dilation, "dilation")
    sh, sw = pair(stride, "stride")
    mh, mw = h + dh * (kh - 1), w + dw * (kw - 1)
    freqs = mh * (mw // 2 + 1)
    kept_h, kept_w = min(h, -(-mh // sh)), min(w, -(-mw // sw))
    passes = 3 if training else 1
    depthwise = c_in_g == 1
    conv = n * c_out * c_in_g * kh * kw * mh * mw * (DEPTHWISE_COST if depthwise else 1.0)
    pass_cost = 16 * BYTE_COST * freqs * n  # one read-write pass over an (F, N, 1) complex tensor
    # Direct: full conv(s), y's transform and inverse (their adjoints in backward), gain passes.
    stage = _transform_cost(n * c_out, mh, mw, mh, mw) + _transform_cost(n * c_out, kept_h, kept_w, mh, mw)
    direct = passes * conv + stage * (2.5 if training else 1.0) + pass_cost * c_out * (3 if training else 1)
    # Spectral: input transform, products, inverse; backward adds 2 transforms + 2 products.
    if kernel_cached and not training:
        kernel = 0.0
    elif kernel_by_fft(kh * kw, mh * mw):
        kernel = c_out * c_in_g * (FFT_COST * mh * mw * math.log2(mh * mw) + 16 * BYTE_COST * freqs)
    else:
        kernel = freqs * c_out * c_in_g * (4 * kh * kw + 8 * BYTE_COST)
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


class Operations(NamedTuple):
    """What a piece of a site does: real multiply-adds, and bytes read and written."""

    macs: float
    bytes: float


def site_operations(
    input_shape: Sequence[int], weight_shape: Sequence[int], stride: IntOrPair = 1, padding: IntOrPair = 0,
    dilation: IntOrPair = 1, groups: int = 1, itemsize: int = 4,
) -> dict[str, Operations]:
    """Operation counts of one site's eval forward, piece by piece, for a roofline.

    ``"conv"`` is the plain (strided) conv the site replaces. The spectral algorithm's pieces
    are ``"sp: input transform"``, ``"sp: kernel dft"``, ``"sp: products"`` and ``"sp: inverse"``;
    the direct algorithm's are ``"full conv"``, ``"stage transform"``, ``"stage gain"`` and
    ``"stage inverse"``; ``"spectrum"`` is the preconditioner's (Gram matrices of the taps). A
    complex multiply-add is 4 real ones; bytes count each tensor read or written once
    (``itemsize`` per real number), an ideal that caches do not always reach.

    Shape:
        - input_shape: ``(N, C_in, H, W)``; weight_shape: ``(C_out, C_in / g, k_h, k_w)``
    """
    n, c_in, h, w = (int(v) for v in input_shape)
    c_out, c_in_g, kh, kw = (int(v) for v in weight_shape)
    dh, dw = pair(dilation, "dilation")
    sh, sw = pair(stride, "stride")
    mh, mw = h + dh * (kh - 1), w + dw * (kw - 1)
    wf = mw // 2 + 1
    freqs = mh * wf
    ph, pw = pair(padding, "padding")
    out_h, out_w = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, ph, pw, pw), (dh, dw))
    kept_h, kept_w = min(h, -(-mh // sh)), min(w, -(-mw // sw))
    real, cplx = itemsize, 2 * itemsize

    def transform(batch: int, p: int, q: int) -> float:
        """Real multiply-adds between ``p x q`` samples and the half plane (either direction)."""
        if max(mh, mw) <= dft.DFT_MAX_GRID:
            return batch * (p * q * 2 * wf + 4 * mh * p * wf)
        return batch * 2.5 * mh * mw * math.log2(mh * mw)  # a radix-2 FFT's real multiply-adds

    weight_bytes = c_out * c_in_g * kh * kw * real
    return {
        "conv": Operations(
            n * c_out * c_in_g * kh * kw * out_h * out_w,
            n * c_in * h * w * real + weight_bytes + n * c_out * out_h * out_w * real,
        ),
        "spectrum": Operations(c_out * c_in_g * (kh * kw) ** 2, weight_bytes + c_out * freqs * real),
        "sp: input transform": Operations(transform(n * c_in, h, w), n * c_in * (h * w * real + freqs * cplx)),
        "sp: kernel dft": Operations(
            4 * freqs * c_out * c_in_g * kh * kw, weight_bytes + freqs * c_out * c_in_g * cplx
        ),
        "sp: products": Operations(
            4 * freqs * n * c_out * c_in_g, freqs * (n * c_in + c_out * c_in_g + n * c_out) * cplx
        ),
        "sp: inverse": Operations(
            transform(n * c_out, kept_h, kept_w), n * c_out * (freqs * cplx + out_h * out_w * real)
        ),
        "full conv": Operations(
            n * c_out * c_in_g * kh * kw * mh * mw, n * c_in * h * w * real + weight_bytes + n * c_out * mh * mw * real
        ),
        "stage transform": Operations(transform(n * c_out, mh, mw), n * c_out * (mh * mw * real + freqs * cplx)),
        "stage gain": Operations(4 * freqs * n * c_out, 2 * freqs * n * c_out * cplx),
        "stage inverse": Operations(
            transform(n * c_out, kept_h, kept_w), n * c_out * (freqs * cplx + out_h * out_w * real)
        ),
    }


def _transform_cost(batch: int, p: int, q: int, mh: int, mw: int) -> float:
    """Cost of one transform between ``p x q`` samples and the ``M_h x M_w`` half plane, per
    :func:`to_spectrum` / :func:`from_spectrum` (either direction)."""
    wf = mw // 2 + 1
    layout = 16 * BYTE_COST * batch * p * wf  # the permute between the two steps
    if max(mh, mw) <= dft.DFT_MAX_GRID:
        return batch * (p * q * 2 * wf + 4 * mh * p * wf) + layout
    return FFT_COST * batch * mh * mw * math.log2(mh * mw) + layout + 16 * BYTE_COST * batch * mh * wf


def _matmul_cost(batch: int, c_in: int, c_out: int) -> float:
    """Cost of a complex-matmul real multiply-add relative to a conv's: small matrices run slower."""
    narrow = max(min(batch, c_in, c_out), 1)
    return COMPLEX_MATMUL_COST * max(1.0, (32 / narrow) ** 0.5)


# Fitted by benchmarks/fit_cost_model.py to bench_layer.py's full grid on a 2-core AVX2 CPU
# (float32, 2 threads, contiguous inputs), where the model picks the faster algorithm at 40
# of 42 (site, train/eval) points and loses 0.5 % of the total time; on the channels_last run,
# held out, 39 of 42 and 0.5 % (the earlier constants: 2.3 % and 2.8 %). GPUs have other
# ratios (see benchmarks/README.md).
#: Conv multiply-adds that one byte of memory traffic costs.
BYTE_COST = 6.0


#: A batched complex matmul's real multiply-add, relative to a conv's.
COMPLEX_MATMUL_COST = 3.0


#: An FFT's cost per point and log2 of the size, relative to a conv's multiply-add.
FFT_COST = 2.5


#: A depthwise conv's multiply-add (memory bound), relative to a dense conv's.
DEPTHWISE_COST = 10.0


#: Batch size assumed when the batch is symbolic.
TYPICAL_BATCH = 32
