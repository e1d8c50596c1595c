"""Discrete Fourier transforms as tables: phase tables, DFT matrices and the transforms
between real signals on a grid and their half-plane spectra.

A small grid is transformed fastest by products with DFT matrices, computed only at the
samples that are needed (a crop and a stride keep few); a large one by FFTs. Tables depend
only on the geometry and are cached (:func:`cached_table`). The spectra here are laid out
frequency-major, ``(M_h (M_w // 2 + 1), N, C)``, ready for per-frequency matmuls.

Used by the spectral algorithm (:mod:`convnorm_fx.spectral`), the kernel spectrum
(:mod:`convnorm_fx.spectrum`), the spectral analysis and the frozen deploy stage.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor
from torch._guards import detect_fake_mode

from .precision import complex_dtype, compute_dtype


__all__ = [
    "DFT_MAX_GRID",
    "Samples",
    "cached_table",
    "dft_table",
    "from_spectrum",
    "half_forward_table",
    "half_inverse_table",
    "hermitian_weights",
    "phase",
    "samples_slice",
    "to_spectrum",
]


def cached_table(build: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Cache a table that depends only on hashable geometry arguments (DFT and phase tables).

    The cache is bypassed while tracing (``torch.compile``, ``torch.export``, fake tensors),
    where the tensors built are not real ones and must not outlive the trace. At most 1,024
    tables are kept per function; the cache then starts afresh."""
    cache: dict[tuple, Tensor] = {}

    @functools.wraps(build)
    def cached(*args):
        if torch.compiler.is_compiling() or detect_fake_mode() is not None:
            return build(*args)
        table = cache.get(args)
        if table is None:
            if len(cache) >= 1024:
                cache.clear()
            table = cache[args] = build(*args)
        return table

    return cached


@cached_table
def phase(
    count: int, size: int, offsets: tuple[int, ...], dtype: torch.dtype, device: torch.device, sign: int = 1
) -> Tensor:
    """``exp(sign 2 pi i w o / size)`` for frequencies ``w < count`` and offsets ``o``: ``(count, len(offsets))``.

    Built in float64 from the integer phase reduced modulo ``size``, then cast. Cached: the
    tables depend only on the geometry."""
    freqs = torch.arange(count, dtype=torch.float64, device=device)[:, None]
    lags = torch.tensor(offsets, dtype=torch.float64, device=device)[None, :]
    angle = torch.remainder(freqs * lags, size) * (sign * 2 * math.pi / size)
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


@cached_table
def hermitian_weights(size: int, device: torch.device) -> Tensor:
    """How often each half-plane frequency of a real signal of length ``size`` counts in a
    sum over all frequencies: 1 for DC (and Nyquist when ``size`` is even), 2 for the others,
    which stand for a conjugate pair. ``(size // 2 + 1,)``, float64."""
    weights = torch.full((size // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    weights[0] = 1.0
    if size % 2 == 0:
        weights[-1] = 1.0
    return weights


#: Grids up to this size on both axes are transformed by products with DFT matrices (one
#: large matmul per axis, and only the samples that are needed), larger ones by FFTs.
DFT_MAX_GRID = 64


#: Sample positions on one axis: ``start, start + step, ...``, ``count`` of them.
Samples = tuple[int, int, int]


def samples_slice(samples: Samples) -> slice:
    start, count, step = samples
    return slice(start, start + (count - 1) * step + 1, step)


@cached_table
def dft_table(size: int, samples: Samples, sign: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``exp(sign 2 pi i w p / size)`` for all ``size`` frequencies ``w`` and the positions ``p``: ``(size, count)``."""
    start, count, step = samples
    return phase(size, size, tuple(range(start, start + count * step, step)), dtype, device, sign)


@cached_table
def half_forward_table(size: int, samples: Samples, sign: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Real ``(count, 2 (size // 2 + 1))`` matrix: ``x @ T`` is the half-plane DFT ``sum_p x[p] exp(sign i theta)``
    with real and imaginary parts interleaved, i.e. a complex tensor viewed as real."""
    start, count, step = samples
    cplx = complex_dtype(dtype)
    phases = phase(size // 2 + 1, size, tuple(range(start, start + count * step, step)), cplx, device, sign)
    return torch.view_as_real(phases.T.contiguous()).reshape(count, -1).to(dtype)


@cached_table
def half_inverse_table(size: int, samples: Samples, sign: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Real ``(2 (size // 2 + 1), count)`` matrix: interleaved half-plane ``S @ T`` is
    ``Re (1 / size) sum_w c_w S(w) exp(sign i theta)`` at the positions, with ``c_w = 2`` for
    the frequencies that stand for a conjugate pair and 1 for DC and Nyquist."""
    start, count, step = samples
    half = size // 2 + 1
    cplx = complex_dtype(dtype)
    phases = phase(half, size, tuple(range(start, start + count * step, step)), cplx, device, sign)  # (W_f, count)
    weights = hermitian_weights(size, device)[:, None] / size
    # Re(S e^{i t}) = S_re cos t - S_im sin t, with the sign already in the phase.
    table = torch.stack([phases.real, -phases.imag], dim=1) * weights[:, :, None].to(phases.real.dtype)
    return table.reshape(2 * half, count).to(dtype)


def to_spectrum(signal: Tensor, grid: tuple[int, int], rows: Samples, cols: Samples, sign: int) -> Tensor:
    """Half-plane 2-D DFT ``sum_p s[p] exp(sign 2 pi i <w, p> / M)`` of a real signal at the given
    grid positions (zero elsewhere), laid out for per-frequency matmuls: ``(F, N, C)`` complex.

    ``sign = -1`` is ``rfft2``; ``sign = +1`` its conjugate (used for adjoints). ``grid`` is
    ``(M_h, M_w)``; ``rows`` and ``cols`` are the signal's positions on it.

    Shape:
        - signal: ``(N, C, rows count, cols count)``
        - output: ``(M_h (M_w // 2 + 1), N, C)``
    """
    n, c, p, q = signal.shape
    mh, mw = grid
    wf = mw // 2 + 1
    if max(mh, mw) <= DFT_MAX_GRID and c > 1 and signal.stride(1) == 1:  # channels innermost (any crop)
        return _to_spectrum_channels_last(signal, grid, rows, cols, sign)
    if max(mh, mw) <= DFT_MAX_GRID:
        cplx = complex_dtype(signal.dtype)
        table = half_forward_table(mw, cols, sign, signal.dtype, signal.device)  # (Q, 2 W_f)
        along_w = torch.matmul(signal.reshape(n * c * p, q), table)
        along_w = torch.view_as_complex(along_w.view(n, c, p, wf, 2)).permute(2, 3, 0, 1).reshape(p, wf * n * c)
        return torch.matmul(dft_table(mh, rows, sign, cplx, signal.device), along_w).view(mh * wf, n, c)
    if rows == (0, p, 1) and cols == (0, q, 1):
        placed = signal
    else:
        placed = signal.new_zeros(n, c, mh, mw)
        placed[..., samples_slice(rows), samples_slice(cols)] = signal
    if sign < 0:
        spectrum = torch.fft.rfft2(placed, s=(mh, mw))
    else:
        spectrum = torch.fft.ihfft2(placed, s=(mh, mw), norm="forward")  # conj(rfft2)
    # Frequency-major and contiguous: batched matmuls over strided batches fall back to slow loops.
    return spectrum.permute(2, 3, 0, 1).contiguous().view(mh * wf, n, c)


@cached_table
def _block_forward_table(size: int, samples: Samples, sign: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Real ``(2 size, 2 count)`` matrix of the complex DFT along one axis for split parts.

    Rows are ``(part, w)``, columns ``(position, part)``: applied to a signal whose real and
    imaginary parts are interleaved per position, it gives the parts of the DFT one after the
    other (``[[cos, -sin], [sin, cos]]`` blocks of ``exp(sign i theta)``)."""
    table = dft_table(size, samples, sign, complex_dtype(dtype), device)  # (size, count)
    re, im = table.real, table.imag
    block = torch.stack([torch.stack([re, -im], dim=-1), torch.stack([im, re], dim=-1)], dim=0)  # (2, size, count, 2)
    return block.reshape(2 * size, 2 * samples[1]).to(dtype)


def _to_spectrum_channels_last(
    signal: Tensor, grid: tuple[int, int], rows: Samples, cols: Samples, sign: int
) -> Tensor:
    """:func:`to_spectrum` of a signal laid out ``(N, H, W, C)`` in memory (or a window of one):
    every copy keeps the channels innermost, so none is a strided gather (the transposes of
    the contiguous layout are)."""
    n, c, p, q = signal.shape
    mh, mw = grid
    wf = mw // 2 + 1
    by_row = signal.permute(2, 3, 0, 1).reshape(p, q, n * c)  # (P, Q, N C): blocks of C move
    table = half_forward_table(mw, cols, sign, signal.dtype, signal.device)  # (Q, 2 W_f), columns (w, part)
    table = table.view(q, wf, 2).transpose(0, 2).reshape(2 * wf, q)  # rows (part, w)
    along_w = torch.matmul(table, by_row)  # (P, 2 W_f, N C): rows (p, part, w)
    block = _block_forward_table(mh, rows, sign, signal.dtype, signal.device)  # (2 M_h, 2 P)
    parts = torch.matmul(block, along_w.view(2 * p, wf * n * c)).view(2, mh * wf, n, c)
    return torch.complex(parts[0], parts[1])


def _from_spectrum_channels_last(
    spectrum: Tensor, grid: tuple[int, int], rows: Samples, cols: Samples, sign: int
) -> Tensor:
    """:func:`from_spectrum` into an ``(N, H, W, C)``-laid-out result, channels innermost throughout."""
    _, n, c = spectrum.shape
    mh, mw = grid
    wf = mw // 2 + 1
    p, q = rows[1], cols[1]
    real = compute_dtype(spectrum.real.dtype)
    inverse_h = dft_table(mh, rows, sign, spectrum.dtype, spectrum.device).T / mh  # (P, M_h)
    along_h = torch.matmul(inverse_h, spectrum.view(mh, wf * n * c))  # (P, W_f N C) complex
    parts = torch.view_as_real(along_h).view(p, wf, n * c, 2).permute(0, 3, 1, 2).reshape(p, 2 * wf, n * c)
    table = half_inverse_table(mw, cols, sign, real, spectrum.device)  # (2 W_f, Q), rows (w, part)
    table = table.view(wf, 2, q).transpose(0, 1).reshape(2 * wf, q)  # rows (part, w)
    out = torch.matmul(table.T, parts).view(p, q, n, c)  # (P, Q, N, C)
    return out.permute(2, 3, 0, 1).contiguous(memory_format=torch.channels_last)


def from_spectrum(
    spectrum: Tensor, grid: tuple[int, int], rows: Samples, cols: Samples, sign: int, channels_last: bool = False
) -> Tensor:
    """Real inverse of :func:`to_spectrum`'s layout at the given grid positions only.

    ``sign = +1`` is ``irfft2`` (``(1 / M) sum_w S(w) exp(+2 pi i <w, p> / M)`` over the full
    plane); ``sign = -1`` is ``irfft2(conj(S))`` (for adjoints). The rows are transformed
    first and only the needed ones kept, so cropped and strided outputs cost less.

    ``channels_last`` asks for a result laid out ``(N, H, W, C)`` in memory, computed without
    transposing the channels away from the innermost dimension (on grids transformed by FFTs,
    by converting the result).

    Shape:
        - spectrum: ``(M_h (M_w // 2 + 1), N, C)``
        - output: ``(N, C, rows count, cols count)``
    """
    _, n, c = spectrum.shape
    mh, mw = grid
    wf = mw // 2 + 1
    if max(mh, mw) <= DFT_MAX_GRID and channels_last:
        return _from_spectrum_channels_last(spectrum, grid, rows, cols, sign)
    if max(mh, mw) <= DFT_MAX_GRID:
        cplx = spectrum.dtype
        real = compute_dtype(spectrum.real.dtype)
        inverse_h = dft_table(mh, rows, sign, cplx, spectrum.device).T / mh  # (P, M_h)
        along_h = torch.matmul(inverse_h, spectrum.view(mh, wf * n * c)).view(rows[1], wf, n, c)
        along_h = torch.view_as_real(along_h.permute(2, 3, 0, 1).contiguous()).view(n * c * rows[1], 2 * wf)
        out = torch.matmul(along_h, half_inverse_table(mw, cols, sign, real, spectrum.device))
        return out.view(n, c, rows[1], cols[1])
    plane = spectrum.view(mh, wf, n, c)
    if sign > 0:
        kept = torch.fft.ifft(plane, dim=0)[samples_slice(rows)]
        out = torch.fft.irfft(kept, n=mw, dim=1)[:, samples_slice(cols)]
    else:
        # irfft2(conj S) = hfft2(S) / M: fft along the rows, keep them, hfft along the columns.
        kept = torch.fft.fft(plane, dim=0, norm="forward")[samples_slice(rows)]
        out = torch.fft.hfft(kept, n=mw, dim=1, norm="forward")[:, samples_slice(cols)]
    out = out.permute(2, 3, 0, 1)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
