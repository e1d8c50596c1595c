"""The spectral algorithm: a ConvNorm site computed in the frequency domain.

Two ``torch.autograd.Function``s compute the same numbers as the step-by-step pipeline
(:mod:`convnorm_fx.pipeline`), to round-off, for a constant preconditioner (stop-gradient).
Their backward passes are written by hand and are ``once_differentiable``: a second
derivative through them (a gradient penalty) raises a clear error. The step-by-step pipeline,
which runs whenever the preconditioner is not a constant (``stop_gradient=False``), is plain
autograd and supports double backward.

* :class:`SpectralConvNorm`: the whole site from the conv's input, with no full conv at all:
  the DFT of the input, a per-frequency ``C_out x C_in`` complex product with
  ``v_k R_k conj(A_kj)``, and the inverse at the kept samples; backward needs only the
  input, which the layer before keeps anyway;
* :class:`SpectralStage`: the stage on a full conv output, with normalization, affine
  transform, crop and stride fused into one transform and one inverse at the kept samples.

A :class:`SpectralPlan` says where a site's outputs sit on the circular grid; it is
``None`` where the frequency-domain computation does not apply (an affine halo that leaves
the grid). This module changes for speed, never for results: correctness is defined by
:mod:`convnorm_fx.pipeline` and checked against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dft import (
    Samples,
    cached_table,
    from_spectrum,
    hermitian_weights,
    phase,
    to_spectrum,
)
from .geometry import is_channels_last
from .precision import autocast_disabled, complex_dtype, compute_dtype, spectral_dtypes


__all__ = [
    "FREQUENCY_BLOCKS_FACTOR",
    "KERNEL_BLOCK_BYTES",
    "KERNEL_FFT_FACTOR",
    "KERNEL_FFT_MIN_TAPS",
    "AxisPlan",
    "SpectralConvNorm",
    "SpectralPlan",
    "SpectralStage",
    "eval_operator",
    "fused_paths_allowed",
    "grid_samples",
    "grouped_matmul",
    "input_samples",
    "kept_samples",
    "kernel_by_fft",
    "kernel_dft",
    "kernel_taps",
    "spectral_from_operator",
    "spectral_plan",
    "taps_by_fft",
]


@dataclass(frozen=True)
class AxisPlan:
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
class SpectralPlan:
    """Everything the spectral algorithm needs besides tensors (hashable, no tensors)."""

    rows: AxisPlan
    cols: AxisPlan
    groups: int
    out_dtype: torch.dtype
    channels_last: bool

    @property
    def grid(self) -> tuple[int, int]:
        """``(M_h, M_w)``."""
        return self.rows.grid, self.cols.grid

    @property
    def frequencies(self) -> int:
        return self.rows.grid * self.cols.half

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the site's input, which its output and input gradient keep."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


def _axis_plan(
    size: int, kernel: int, dilation: int, before: int, after: int, stride: int, affine: int,
) -> AxisPlan | None:
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
    return AxisPlan(
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


def _affine_fits(axis: AxisPlan) -> bool:
    """The affine kernel's halo around every output stays on the grid: its "same" linear conv
    on the zero-extended signal then equals a circular one, a product in the frequency domain."""
    inside = axis.before == 0 and axis.after == 0
    return inside and axis.start + axis.halo[0] >= 0 and axis.stop - 1 + axis.halo[-1] < axis.grid


def spectral_plan(
    reference: Tensor, input_size: Sequence[int], kernel_size: tuple[int, int], stride: tuple[int, int],
    pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int, affine_weight: Tensor | None,
    out_dtype: torch.dtype,
) -> SpectralPlan | None:
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
    return SpectralPlan(rows, cols, groups, out_dtype, is_channels_last(reference))


def fused_paths_allowed(reference: Tensor) -> bool:
    """Whether the custom autograd functions may run: not on MPS (no complex matmuls), and not
    under ``torch.export``, whose consumers (ONNX) know FFT ops but not complex matmuls, so an
    exported model keeps the step-by-step pipeline."""
    return reference.device.type != "mps" and not torch.compiler.is_exporting()


def input_samples(axis: AxisPlan) -> Samples:
    return (0, axis.size, 1)


def grid_samples(axis: AxisPlan) -> Samples:
    return (0, axis.grid, 1)


def kept_samples(axis: AxisPlan) -> Samples:
    return (axis.start, len(range(axis.start, axis.stop, axis.step)), axis.step)


@cached_table
def _tap_table(plan: SpectralPlan, complex_dtype: torch.dtype, device: torch.device, affine: bool) -> Tensor:
    """``exp(+2 pi i <w, o_t> / M)`` for every half-plane frequency ``w`` and kernel tap ``t``: ``(F, k_h k_w)``.

    ``o_t`` is the tap's offset on the grid: ``d t - f`` for the conv kernel, ``t - (r - 1) // 2``
    for the "same" affine kernel."""
    rows, cols = plan.rows, plan.cols
    ph = phase(rows.grid, rows.grid, rows.halo if affine else rows.taps, complex_dtype, device)  # (M_h, k_h)
    pw = phase(cols.half, cols.grid, cols.halo if affine else cols.taps, complex_dtype, device)  # (W_f, k_w)
    return (ph[:, None, :, None] * pw[None, :, None, :]).reshape(plan.frequencies, -1)


#: Kernels go to the grid by FFT when they have more taps than this many times log2 of the
#: grid's size, else by the phase-table matmul (whose cost grows with the taps). Measured on
#: CPU: the matmul is 2-4x faster for 3x3 to 7x7 kernels on every ResNet grid and 2x faster
#: for 16x16 patches, the FFT 3x faster for a 32x32 patchify kernel on a 255x255 grid.
KERNEL_FFT_FACTOR = 4.0


#: ... and more than this many taps: the matmul still wins for 16x16 patch kernels on a 239x239 grid.
KERNEL_FFT_MIN_TAPS = 256


def kernel_by_fft(taps: int, grid_points: int) -> bool:
    """Whether a kernel of ``taps`` taps goes to and from a grid of ``grid_points`` points by
    FFT rather than by the phase-table matmul (see :data:`KERNEL_FFT_FACTOR`)."""
    return taps > max(KERNEL_FFT_MIN_TAPS, KERNEL_FFT_FACTOR * math.log2(grid_points))


def taps_by_fft(plan: SpectralPlan, affine: bool) -> bool:
    """:func:`kernel_by_fft` for the site's conv kernel (or its affine kernel)."""
    rows, cols = plan.rows, plan.cols
    taps = len(rows.halo) * len(cols.halo) if affine else len(rows.taps) * len(cols.taps)
    return kernel_by_fft(taps, rows.grid * cols.grid)


def _tap_positions(plan: SpectralPlan, affine: bool) -> tuple[list[int], list[int]]:
    """Grid rows and columns of the kernel taps (offsets modulo the grid)."""
    rows, cols = plan.rows, plan.cols
    row_offsets, col_offsets = (rows.halo, cols.halo) if affine else (rows.taps, cols.taps)
    return [o % rows.grid for o in row_offsets], [o % cols.grid for o in col_offsets]


def kernel_taps(weight: Tensor, complex_dtype: torch.dtype) -> Tensor:
    """The kernels' taps as the right factor of :func:`kernel_dft`'s matmul: ``(k_h k_w, C_out C_in)``."""
    c_out, c_in, kh, kw = weight.shape
    return weight.reshape(c_out * c_in, kh * kw).T.to(complex_dtype)


def kernel_dft(
    weight: Tensor,
    plan: SpectralPlan,
    complex_dtype: torch.dtype,
    affine: bool = False,
    frequencies: slice | None = None,
    taps: Tensor | None = None,
) -> Tensor:
    """DFT of each kernel placed on the grid at its tap offsets, ``(F, C_out, C_in / g)``.

    ``sum_t a[t] exp(+2 pi i <w, d t - f> / M)``: the conjugate of the kernel's DFT, because
    a cross-correlation multiplies the input spectrum by it (``y = a (star) x`` gives
    ``Y = conj(A) X``). With ``affine`` the offsets are those of the "same" affine conv.
    One matmul of the phase table with the taps, or for large kernels an ``rfft2`` of the
    kernels placed on the grid (see :func:`taps_by_fft`). ``frequencies`` (a slice of the
    ``F`` half-plane frequencies) computes only those; ``taps`` (:func:`kernel_taps`) saves
    the cast of the weight when several blocks of frequencies are computed.
    """
    c_out, c_in, kh, kw = weight.shape
    if taps_by_fft(plan, affine):
        rows, cols = plan.rows, plan.cols
        row_pos, col_pos = _tap_positions(plan, affine)
        real = torch.float64 if complex_dtype == torch.complex128 else torch.float32
        placed = weight.new_zeros(c_out * c_in, rows.grid, cols.grid, dtype=real)
        index_r = torch.tensor(row_pos, device=weight.device)[:, None]
        index_c = torch.tensor(col_pos, device=weight.device)[None, :]
        placed[:, index_r, index_c] = weight.reshape(c_out * c_in, kh, kw).to(real)
        spectrum = torch.fft.rfft2(placed).conj()  # (C_out C_in, M_h, W_f)
        spectrum = spectrum.reshape(c_out * c_in, plan.frequencies).T.reshape(plan.frequencies, c_out, c_in)
        return spectrum if frequencies is None else spectrum[frequencies]
    table = _tap_table(plan, complex_dtype, weight.device, affine)
    if frequencies is not None:
        table = table[frequencies]
    taps = kernel_taps(weight, complex_dtype) if taps is None else taps  # (k_h k_w, C_out C_in)
    return torch.matmul(table, taps).view(table.shape[0], c_out, c_in)


def _channel_gain(
    inv_sqrt: Tensor, affine_weight: Tensor | None, plan: SpectralPlan, complex_dtype: torch.dtype
) -> Tensor:
    """Per-channel factor ``v_k`` (times the affine kernel's DFT ``R_k``): ``(F, C_out)``."""
    gain = inv_sqrt.permute(1, 2, 0).reshape(plan.frequencies, -1).to(complex_dtype)
    if affine_weight is not None:
        gain = gain * kernel_dft(affine_weight, plan, complex_dtype, affine=True)[..., 0]
    return gain


def grouped_matmul(a: Tensor, b: Tensor, groups: int) -> Tensor:
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


def _pad_outside(out: Tensor, plan: SpectralPlan) -> Tensor:
    """Zero outputs before and after the grid (padding beyond the full padding sees no input)."""
    rows, cols = plan.rows, plan.cols
    if rows.before or rows.after or cols.before or cols.after:
        out = F.pad(out, (cols.before, cols.after, rows.before, rows.after))
    return out


def _kept_output(spectrum: Tensor, plan: SpectralPlan, dtype: torch.dtype) -> Tensor:
    """A site's output from its ``(F, N, C)`` spectrum: the inverse at the kept samples, zeros
    outside the grid, in ``dtype`` and in the layout of the site's input."""
    rows, cols = plan.rows, plan.cols
    out = from_spectrum(spectrum, plan.grid, kept_samples(rows), kept_samples(cols), 1, plan.channels_last)
    return _pad_outside(out, plan).to(dtype).contiguous(memory_format=plan.memory_format)


def _inner_window(grad: Tensor, plan: SpectralPlan) -> Tensor:
    """The part of an output gradient ``(N, C, H_out, W_out)`` that lies on the grid."""
    rows, cols = plan.rows, plan.cols
    h_out, w_out = grad.shape[-2:]
    return grad[..., rows.before : h_out - rows.after, cols.before : w_out - cols.after]


def _lag_values(spectrum: Tensor, plan: SpectralPlan, affine: bool, gain: Tensor | None = None) -> Tensor:
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
    if taps_by_fft(plan, affine):
        # irfft2 sums the half plane with the same weights (and takes the real part).
        if gain is not None:
            spectrum = spectrum * gain[:, :, None]
        plane = spectrum.reshape(rows.grid, cols.half, a * b).permute(2, 0, 1)
        circular = torch.fft.irfft2(plane, s=(rows.grid, cols.grid))  # (A B, M_h, M_w)
        row_pos, col_pos = _tap_positions(plan, affine)
        index_r = torch.tensor(row_pos, device=spectrum.device)[:, None]
        index_c = torch.tensor(col_pos, device=spectrum.device)[None, :]
        return circular[:, index_r, index_c].reshape(a, b, kh, kw).contiguous()
    return _lag_sums(spectrum, plan, affine, gain).real.reshape(a, b, kh, kw).contiguous()


def _lag_sums(
    spectrum: Tensor, plan: SpectralPlan, affine: bool, gain: Tensor | None = None, frequencies: slice | None = None
) -> Tensor:
    """The phase-table route of :func:`_lag_values` before the real part, over ``frequencies``
    only (``spectrum`` and ``gain`` hold those): blocks of frequencies add up.

    Shape:
        - spectrum: ``(F_block, A, B)``; gain: ``(F_block, A)``
        - output: ``(A, B, k_h k_w)`` complex
    """
    rows, cols = plan.rows, plan.cols
    freqs, a, b = spectrum.shape
    weights = (hermitian_weights(cols.grid, spectrum.device) / (rows.grid * cols.grid)).repeat(rows.grid)
    weights = weights.to(spectrum.dtype)  # (F,)
    table = _tap_table(plan, spectrum.dtype, spectrum.device, affine) * weights[:, None]  # (F, T)
    if frequencies is not None:
        table = table[frequencies]
    taps = table.shape[1]
    if gain is None:
        lags = torch.matmul(spectrum.reshape(freqs, a * b).T, table)  # (A B, T)
    elif b < taps:
        # Fewer input channels than taps: scaling the spectrum is cheaper than A phase tables.
        lags = torch.matmul((spectrum * gain[:, :, None]).reshape(freqs, a * b).T, table)
    else:
        tables = gain.T[:, :, None] * table[None]  # (A, F, T)
        lags = torch.bmm(spectrum.permute(1, 2, 0), tables)  # (A, B, T)
    return lags.reshape(a, b, taps)


#: The kernel spectrum of a site, ``(F, C_out, C_in)`` complex, is built in blocks of output
#: channels of about this size, each consumed right away: blocks stay in cache, and never
#: reach the sizes the allocator serves with fresh memory (page faults on every call).
KERNEL_BLOCK_BYTES = 8 * 2**20


#: The forward pass builds the kernel spectrum in blocks of frequencies when the input
#: spectrum, which blocks of output channels read once each, is larger than this many
#: times the taps, which blocks of frequencies read once each: ``F N > factor k_h k_w C_out``.
#: Measured on CPU (batch 32, eval): frequency blocks win at 64 channels on 32x32 and 256 on
#: 8x8 (ratio 0.83; no strided copies of the result), channel blocks at 512 on 4x4 (ratio
#: 0.17, where the taps are 19 MB and there are 24 frequencies).
FREQUENCY_BLOCKS_FACTOR = 0.4


def _blocks_by_frequency(plan: SpectralPlan, batch: int, weight_shape: Sequence[int]) -> bool:
    """Whether the forward pass blocks the kernel spectrum by frequencies (else by output channels)."""
    c_out, _, kh, kw = weight_shape
    return plan.frequencies * batch > FREQUENCY_BLOCKS_FACTOR * kh * kw * c_out


def _frequency_blocks(plan: SpectralPlan, c_out: int, c_in_g: int, groups: int, itemsize: int) -> list[slice]:
    """Blocks of frequencies for the kernel spectrum in the forward pass: each block's
    products fill a contiguous slice of the ``(F, N, C_out)`` result, in place. One block
    when the kernels go to the grid by FFT (which makes every frequency at once) or the
    conv is grouped."""
    freqs = plan.frequencies
    if groups != 1 or taps_by_fft(plan, affine=False):
        return [slice(0, freqs)]
    return _even_blocks(freqs, freqs * c_out * c_in_g * itemsize)


def _channel_blocks(freqs: int, c_out: int, c_in_g: int, groups: int, itemsize: int) -> list[slice]:
    """Blocks of output channels for the kernel spectrum (one block for grouped convs)."""
    if groups != 1:
        return [slice(0, c_out)]
    return _even_blocks(c_out, freqs * c_out * c_in_g * itemsize)


def _even_blocks(length: int, total_bytes: int) -> list[slice]:
    """``range(length)`` in equal slices (the last one at most as large), enough of them that
    each holds at most :data:`KERNEL_BLOCK_BYTES` of the ``total_bytes``."""
    count = -(-total_bytes // KERNEL_BLOCK_BYTES)  # ceil
    per_block = -(-length // max(count, 1))
    return [slice(start, min(start + per_block, length)) for start in range(0, length, per_block)]


class SpectralConvNorm(torch.autograd.Function):
    """Conv -> ConvNorm preconditioner -> affine -> crop -> stride, in the frequency domain.

    Forward: ``U_k = R_k v_k sum_j conj(A_kj) X_j`` per frequency, inverse-transformed at
    the kept samples. The preconditioner is a constant (stop-gradient, §3.3). Backward
    recomputes the input spectrum instead of saving it, so the site keeps only the input,
    which the conv before it keeps anyway. The per-channel factors ``R_k v_k`` are applied
    to the ``(F, N, C_out)`` activations, never to the ``(F, C_out, C_in)`` kernel spectrum,
    which is built in blocks (:data:`KERNEL_BLOCK_BYTES`) of frequencies, whose products fill
    contiguous slices of the result in place (and whose weight-gradient lags add up), or of
    output channels, over which the input gradient sums: whichever reads less
    (:data:`FREQUENCY_BLOCKS_FACTOR`).
    """

    @staticmethod
    def forward(ctx, x, weight, affine_weight, inv_sqrt, plan):  # type: ignore[override]
        ctx.plan = plan
        ctx.save_for_backward(x, weight, affine_weight, inv_sqrt)
        compute, cplx = spectral_dtypes(x, weight)
        rows, cols, groups, freqs = plan.rows, plan.cols, plan.groups, plan.frequencies
        c_out, c_in_g = weight.shape[:2]
        with autocast_disabled(x.device):
            spectrum = to_spectrum(x.to(compute), plan.grid, input_samples(rows), input_samples(cols), -1)  # (F, N, C_in)
            by_frequency = _blocks_by_frequency(plan, x.shape[0], weight.shape)
            itemsize = spectrum.element_size()
            if by_frequency:
                blocks = _frequency_blocks(plan, c_out, c_in_g, groups, itemsize)
            else:
                blocks = _channel_blocks(freqs, c_out, c_in_g, groups, itemsize)
            if len(blocks) == 1:
                kernel = kernel_dft(weight, plan, cplx).view(freqs, groups, c_out // groups, c_in_g)
                u = grouped_matmul(spectrum, kernel, groups)  # (F, N, C_out)
            elif by_frequency:
                u = spectrum.new_empty(freqs, x.shape[0], c_out)
                taps = kernel_taps(weight, cplx)  # cast once for all blocks
                for block in blocks:
                    kernel = kernel_dft(weight, plan, cplx, frequencies=block, taps=taps)
                    torch.bmm(spectrum[block], kernel.transpose(1, 2), out=u[block])
            else:
                u = spectrum.new_empty(freqs, x.shape[0], c_out)
                for block in blocks:
                    kernel = kernel_dft(weight[block], plan, cplx)
                    u[:, :, block] = torch.bmm(spectrum, kernel.transpose(1, 2))
            u = u.mul_(_channel_gain(inv_sqrt, affine_weight, plan, cplx).unsqueeze(1))
            del spectrum, kernel  # free before the inverse: it allocates its own work space
            return _kept_output(u, plan, plan.out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, affine_weight, inv_sqrt = ctx.saved_tensors
        plan: SpectralPlan = ctx.plan
        need_x, need_w, need_r = ctx.needs_input_grad[:3]
        compute, cplx = spectral_dtypes(x, weight)
        rows, cols, groups, freqs = plan.rows, plan.cols, plan.groups, plan.frequencies
        c_out, c_in_g, kh, kw = weight.shape
        grad_x = grad_w = grad_r = None
        with autocast_disabled(x.device):
            inner = _inner_window(grad.to(compute), plan)
            # conj(G): (F, N, C_out)
            grad_spectrum = to_spectrum(inner, plan.grid, kept_samples(rows), kept_samples(cols), 1)
            inv = inv_sqrt.permute(1, 2, 0).reshape(freqs, 1, c_out).to(cplx)
            affine = None
            if affine_weight is not None:
                affine = kernel_dft(affine_weight, plan, cplx, affine=True).view(freqs, 1, c_out)
            need_gram = need_w or need_r
            if need_gram:
                # T = v sum_n conj(G_k) X_j: the batch reduction that all parameter gradients share.
                spectrum = to_spectrum(x.to(compute), plan.grid, input_samples(rows), input_samples(cols), -1)
                z_gram = grad_spectrum.new_empty(freqs, c_out) if need_r else None
                grad_w = weight.new_empty(c_out, c_in_g, kh, kw) if need_w else None
            if need_x:
                # conj of the input gradient's DFT: sum_k conj(G_k) R_k v_k conj(A_kj).
                x_gain = (inv if affine is None else inv * affine).view(freqs, 1, c_out)
                adjoint = None
            by_frequency = groups == 1 and not taps_by_fft(plan, affine=False)
            if by_frequency and _blocks_by_frequency(plan, x.shape[0], weight.shape):
                # Blocks of frequencies: products into contiguous slices, weight lags summed over blocks.
                blocks = _frequency_blocks(plan, c_out, c_in_g, groups, grad_spectrum.element_size())
                adjoint = grad_spectrum.new_empty(freqs, x.shape[0], c_in_g) if need_x else None
                lags = None
                taps = kernel_taps(weight, cplx)  # cast once for all blocks
                for block in blocks:
                    kernel = kernel_dft(weight, plan, cplx, frequencies=block, taps=taps)  # (F_b, C_out, C_in)
                    g = grad_spectrum[block]  # (F_b, N, C_out), contiguous
                    if need_gram:
                        gram = torch.bmm(g.transpose(1, 2), spectrum[block]).mul_(inv[block].transpose(1, 2))
                        if need_r:
                            z_gram[block] = torch.einsum("fkj,fkj->fk", kernel, gram)
                        if need_w:
                            part = _lag_sums(gram, plan, False, None if affine is None else affine[block, 0], block)
                            lags = part if lags is None else lags.add_(part)
                    if need_x:
                        torch.bmm(g.mul_(x_gain[block]), kernel, out=adjoint[block])
                if need_w:
                    grad_w.copy_(lags.real.reshape(c_out, c_in_g, kh, kw))
                channel_blocks = []
            else:
                channel_blocks = _channel_blocks(freqs, c_out, c_in_g, groups, grad_spectrum.element_size())
            for block in channel_blocks:
                kernel = kernel_dft(weight[block], plan, cplx)  # (F, block, C_in / g)
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
                        adjoint = grouped_matmul(grad_spectrum.mul_(x_gain), kernel, groups)
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
                grad_x = from_spectrum(
                    adjoint, plan.grid, input_samples(rows), input_samples(cols), -1, plan.channels_last
                )
                memory_format = plan.memory_format
                grad_x = grad_x.to(x.dtype).contiguous(memory_format=memory_format)
        return grad_x, grad_w, grad_r, None, None


def eval_operator(
    weight: Tensor, affine_weight: Tensor | None, inv_sqrt: Tensor, plan: SpectralPlan, cplx: torch.dtype
) -> Tensor:
    """The site's per-frequency operator ``R_k v_k conj(A_kj)``, ``(F, C_out, C_in / g)`` in the
    complex dtype ``cplx``: the kernel spectrum with the per-channel factors folded in, so that
    a forward pass is one product per frequency (:func:`spectral_from_operator`)."""
    with torch.no_grad(), autocast_disabled(weight.device):
        kernel = kernel_dft(weight, plan, cplx)
        return kernel.mul_(_channel_gain(inv_sqrt, affine_weight, plan, cplx).unsqueeze(-1))


def spectral_from_operator(x: Tensor, operator: Tensor, plan: SpectralPlan) -> Tensor:
    """The spectral algorithm's forward pass with its operator given (:func:`eval_operator`):
    the input's DFT, one product per frequency, the inverse at the kept samples. No autograd.

    Shape:
        - x: ``(N, C_in, H, W)``
        - operator: ``(F, C_out, C_in / g)``
        - output: ``(N, C_out, H_out, W_out)``
    """
    rows, cols, groups, freqs = plan.rows, plan.cols, plan.groups, plan.frequencies
    c_out, c_in_g = operator.shape[1:]
    compute = compute_dtype(operator.real.dtype)
    with torch.no_grad(), autocast_disabled(x.device):
        spectrum = to_spectrum(x.to(compute), plan.grid, input_samples(rows), input_samples(cols), -1)
        u = grouped_matmul(spectrum, operator.view(freqs, groups, c_out // groups, c_in_g), groups)
        del spectrum
        return _kept_output(u, plan, plan.out_dtype)


class SpectralStage(torch.autograd.Function):
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
        compute = compute_dtype(y.dtype)
        rows, cols = plan.rows, plan.cols
        with autocast_disabled(y.device):
            spectrum = to_spectrum(y.to(compute), plan.grid, grid_samples(rows), grid_samples(cols), -1)  # (F, N, C)
            spectrum = spectrum.mul_(_stage_gain(inv_sqrt, affine_weight, plan).unsqueeze(1))
            return _kept_output(spectrum, plan, y.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        y, affine_weight, inv_sqrt = ctx.saved_tensors
        plan: SpectralPlan = ctx.plan
        need_y, need_r = ctx.needs_input_grad[:2]
        grad_y = grad_r = None
        compute = compute_dtype(grad.dtype)
        rows, cols = plan.rows, plan.cols
        with autocast_disabled(grad.device):
            inner = _inner_window(grad.to(compute), plan)
            grad_spectrum = to_spectrum(inner, plan.grid, kept_samples(rows), kept_samples(cols), 1)  # conj(G): (F, N, C)
            if need_r:
                # dL/dr_k: correlation of g with z = irfft2(v Y), summed over the batch.
                spectrum = to_spectrum(y.to(compute), plan.grid, grid_samples(rows), grid_samples(cols), -1)
                z_gram = torch.einsum("fnc,fnc->fc", grad_spectrum, spectrum)
                z_gram = z_gram.mul_(inv_sqrt.permute(1, 2, 0).reshape(plan.frequencies, -1).to(z_gram.dtype))
                grad_r = _lag_values(z_gram.unsqueeze(-1), plan, affine=True).to(affine_weight.dtype)
            if need_y:
                # irfft2(conj(gain) G) = irfft2(conj(gain conj(G))).
                adjoint = grad_spectrum.mul_(_stage_gain(inv_sqrt, affine_weight, plan).unsqueeze(1))
                grad_y = from_spectrum(
                    adjoint, plan.grid, grid_samples(rows), grid_samples(cols), -1, plan.channels_last
                )
                memory_format = plan.memory_format
                grad_y = grad_y.to(grad.dtype).contiguous(memory_format=memory_format)
        return grad_y, grad_r, None, None


def _stage_gain(inv_sqrt: Tensor, affine_weight: Tensor | None, plan: SpectralPlan) -> Tensor:
    """``v_k R_k`` on the half plane, ``(F, C)`` (complex)."""
    return _channel_gain(inv_sqrt, affine_weight, plan, complex_dtype(inv_sqrt.dtype))
