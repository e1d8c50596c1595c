"""Read-only spectral measures of conv layers with and without ConvNorm (Liu et al. 2021).

What is measured
----------------
Every function here measures the *unstrided circular* operator of a conv layer on an
``M_h x M_w`` grid, the domain on which ConvNorm normalizes (Appendix B.2): for a signal of
size ``H`` and a kernel of dilated extent ``e = d (k - 1) + 1`` the grid is
``M = H + d (k - 1)`` (:func:`convnorm_fx.ops.grid_size`), and the "full" conv is exactly a
circular cross-correlation of the zero-embedded input on it.

* ``A`` is the ``(C_out M_h M_w) x (C_in M_h M_w)`` matrix of that correlation, made of
  ``C_out x C_in`` circulant blocks ``C_{a_kj}`` (block diagonal over groups); ``A_k`` is its
  block row for output channel ``k`` (Section 3.2).
* ``Q`` stacks the normalized rows ``Q_k = (A_k A_k^T + eps I)^{-1/2} A_k`` (eqs. 6-8); with
  ``eps = 0`` each ``Q_k`` is a tight frame, ``Q_k Q_k^T = I``.

Both are block circulant, so the 2-D DFT block-diagonalizes them (Sedghi, Gupta & Long,
"The Singular Values of Convolutional Layers", ICLR 2019): the singular values of ``A`` are
the union over all ``M_h M_w`` frequencies ``w`` of the singular values of the
``C_out x C_in`` matrix ``A_hat(w)[k, j] = DFT_M(a_kj)(w)`` (one block per group), and those
of ``Q`` come from ``diag(v(w)) A_hat(w)`` with ``v_k(w) = (S_k(w) + eps)^{-1/2}`` and
``S_k(w) = sum_j |A_hat(w)[k, j]|^2``.

The layer as it runs is ``D_s o crop o A o embed`` (zero-embedding of the input, crop to the
output window, downsampling by the stride ``s``); embed is an isometry and crop and ``D_s``
are coordinate projections of norm at most 1, so the spectral norm of the real layer is at
most that of ``A`` (:func:`strided_spectral_norm_upper_bound`). Nothing finer is claimed:
the strided, cropped operator is not block circulant and its singular values are not
computed here. ConvNorm's learned affine transform ``r_k`` and an optional BatchNorm are
not part of ``Q``.

Numerically zero spectrum
-------------------------
A frequency where a channel's power spectrum vanishes makes ``A_k A_k^T`` singular: with
``eps = 0`` the preconditioner does not exist there. In floating point such a null comes out
as round-off (``~1e-32`` in float64), not as an exact zero, so ``S_k(w)`` is treated as zero
when it is below ``(16 u ||a_k||_1)^2`` (``u`` the unit round-off of the compute dtype,
``||a_k||_1`` the sum of the channel's absolute weights, which bounds ``|A_hat(w)[k, j]|``).
At such frequencies ``A_k`` has a zero singular value (condition number ``inf``) and, as in
:func:`convnorm_fx.ops.inverse_sqrt_spectrum`, the eps-free preconditioner has gain 0
(the pseudo-inverse) instead of infinity.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .dft import phase
from .geometry import IntOrPair, pair
from .modules import ConvNorm2d
from .recording import record_stage_calls

__all__ = [
    "SpectralReport",
    "SpectralRow",
    "channel_condition_numbers",
    "conv_singular_values",
    "conv_spectral_norm",
    "normalized_singular_values",
    "normalized_spectral_norm",
    "proposition31_bound",
    "spectral_report",
    "strided_spectral_norm_upper_bound",
]

#: Kernel DFT entries held in memory at once (complex numbers), so huge layers on large
#: grids are processed in chunks of frequencies instead of one ``C_out x C_in x M_h x M_w``
#: tensor.
_CHUNK_ENTRIES = 1 << 21

#: Multiple of the unit round-off below which a normalized power spectrum counts as zero.
_NULL_FACTOR = 16.0


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(
            f"conv weight must be 4-D (C_out, C_in / groups, k_h, k_w), got shape {tuple(weight.shape)}; "
            "for a single kernel use weight.reshape(1, 1, k_h, k_w)"
        )
    if weight.is_complex() or not weight.is_floating_point():
        raise TypeError(f"conv weight must be a real floating-point tensor, got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"conv weight is empty (shape {tuple(weight.shape)}); every dimension must be >= 1")


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _check_grid(grid: Sequence[int], weight: Tensor, dilation: tuple[int, int]) -> tuple[int, int]:
    try:
        mh, mw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair of ints (M_h, M_w), got {grid!r}") from None
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if mh < eh or mw < ew:
        raise ValueError(
            f"grid {(mh, mw)} is smaller than the dilated kernel {(eh, ew)}; use the full-conv size "
            f"M = H + d (k - 1), e.g. convnorm_fx.ops.grid_size((H, W), {(kh, kw)}, {dilation})"
        )
    return mh, mw


def _check_dilation(dilation: IntOrPair) -> tuple[int, int]:
    dilation_hw = pair(dilation, "dilation")
    if min(dilation_hw) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    return dilation_hw


def _check_groups(groups: int, weight: Tensor) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if weight.shape[0] % groups != 0:
        raise ValueError(
            f"groups={groups} does not divide C_out={weight.shape[0]}; pass the groups of the conv "
            "that owns this weight (nn.Conv2d.groups)"
        )
    return groups


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


class _Arguments(NamedTuple):
    weight: Tensor  # detached, in the compute dtype
    grid: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    eps: float


def _prepare(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair, dtype: torch.dtype, groups: int = 1, eps: float = 0.0
) -> _Arguments:
    """Check the arguments every measure takes, and put the weight in the compute dtype."""
    _check_weight(weight)
    dtype = _check_dtype(dtype)
    dilation_hw = _check_dilation(dilation)
    grid_hw = _check_grid(grid, weight, dilation_hw)
    return _Arguments(weight.detach().to(dtype), grid_hw, dilation_hw, _check_groups(groups, weight), _check_eps(eps))


# --------------------------------------------------------------------------------------
# Kernel DFT at every frequency, in chunks
# --------------------------------------------------------------------------------------


def _tap_phases(size: int, n_freq: int, taps: int, step: int, complex_dtype: torch.dtype, device: Any) -> Tensor:
    """``exp(-2 pi i w t step / size)`` for frequencies ``w < n_freq`` and taps ``t < taps``: ``(n_freq, taps)``."""
    return phase(n_freq, size, tuple(t * step for t in range(taps)), complex_dtype, device, -1)


def _kernel_dft_chunks(
    weight: Tensor, grid: tuple[int, int], dilation: tuple[int, int], onesided: bool
) -> Iterator[Tensor]:
    """Yield ``A_hat(w)`` for consecutive frequencies ``w``, row-major over ``(w_h, w_w)``.

    ``A_hat(w)[k, j] = sum_{t,u} a_kj[t, u] exp(-2 pi i (w_h t d_h / M_h + w_w u d_w / M_w))``
    is the 2-D DFT of the zero-stuffed (dilated) kernel on the grid, the same numbers as
    ``fft2(stuffed, s=grid)``, evaluated only at the ``k_h k_w`` taps and a bounded number
    of frequencies at a time. ``onesided`` keeps the ``w_w <= M_w // 2`` half plane
    (enough for anything that is invariant under ``A_hat(-w) = conj(A_hat(w))``).

    Shape:
        - weight: ``(C_out, C_in_g, k_h, k_w)``, real
        - each chunk: ``(F, C_out, C_in_g)``, complex, ``F`` frequencies
    """
    c_out, c_in_g, kh, kw = weight.shape
    mh, mw = grid
    nq = mw // 2 + 1 if onesided else mw
    complex_dtype = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
    phase_h = _tap_phases(mh, mh, kh, dilation[0], complex_dtype, weight.device)  # (M_h, k_h)
    phase_w = _tap_phases(mw, nq, kw, dilation[1], complex_dtype, weight.device)  # (nq, k_w)
    taps = weight.reshape(c_out * c_in_g, kh * kw).T.to(complex_dtype)  # (k_h k_w, C_out C_in_g)
    n_freq = mh * nq
    chunk = max(1, _CHUNK_ENTRIES // (c_out * c_in_g))
    for start in range(0, n_freq, chunk):
        index = torch.arange(start, min(start + chunk, n_freq), device=weight.device)
        basis = phase_h[index // nq][:, :, None] * phase_w[index % nq][:, None, :]  # (F, k_h, k_w)
        yield (basis.reshape(-1, kh * kw) @ taps).reshape(-1, c_out, c_in_g)


def _null_floor(weight: Tensor) -> Tensor:
    """Per-channel level ``(16 u ||a_k||_1)^2`` below which ``S_k(w)`` is round-off (module doc)."""
    unit = torch.finfo(weight.dtype).eps
    l1 = weight.abs().flatten(1).sum(dim=1)  # (C_out,)
    return (_NULL_FACTOR * unit * l1).square()


def _power(dft: Tensor, floor: Tensor) -> Tensor:
    """``S_k(w) = sum_j |A_hat(w)[k, j]|^2`` with round-off nulls set to exactly zero.

    Shape:
        - dft: ``(F, C_out, C_in_g)``; floor: ``(C_out,)``
        - output: ``(F, C_out)``
    """
    power = dft.abs().square().sum(dim=-1)
    return torch.where(power > floor, power, torch.zeros_like(power))


def _gain(power: Tensor, eps: float) -> Tensor:
    """Preconditioner DFT ``(S_k + eps)^{-1/2}``; gain 0 at exact nulls when ``eps = 0``."""
    return ops.inverse_sqrt_spectrum(power, eps)


def _per_group(dft: Tensor, groups: int) -> Tensor:
    """View ``(F, C_out, C_in_g)`` as ``(F, groups, C_out / groups, C_in_g)``: the diagonal blocks."""
    n_freq, c_out, c_in_g = dft.shape
    return dft.reshape(n_freq, groups, c_out // groups, c_in_g)


# --------------------------------------------------------------------------------------
# Singular values of A and Q
# --------------------------------------------------------------------------------------


def conv_singular_values(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1, groups: int = 1, *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """All singular values of the conv's circular operator ``A`` on an ``M_h x M_w`` grid.

    Exact (Sedghi et al. 2019): at each of the ``M_h M_w`` frequencies of the full 2-D DFT,
    the singular values of every group's ``C_out/g x C_in/g`` matrix of kernel DFTs. The
    returned multiset is that of the dense ``(C_out M_h M_w) x (C_in M_h M_w)`` matrix,
    structural zeros included. The operator is the unstrided circular correlation, i.e. the
    "full" conv on ``M = H + d (k - 1)`` (see the module docstring for how it relates to the
    strided layer).

    Args:
        weight: conv weight ``(C_out, C_in / groups, k_h, k_w)``, any real float dtype.
        grid: ``(M_h, M_w)``, at least the dilated kernel; usually
            :func:`convnorm_fx.ops.grid_size` of the input.
        dilation: the conv's dilation (the kernel is zero-stuffed).
        groups: the conv's groups; ``A`` is block diagonal with one block per group.
        dtype: compute and result dtype (float64 by default, for exactness).

    Returns:
        1-D tensor of ``M_h M_w min(C_out, C_in)`` singular values sorted in descending
        order, on the device of ``weight``.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``(M_h * M_w * g * min(C_out / g, C_in / g),)``

    Example:
        >>> w = torch.randn(8, 3, 3, 3)
        >>> conv_singular_values(w, (10, 10)).shape
        torch.Size([300])
    """
    w, grid_hw, dilation_hw, groups, _ = _prepare(weight, grid, dilation, dtype, groups)
    values = [
        torch.linalg.svdvals(_per_group(dft, groups)).flatten()
        for dft in _kernel_dft_chunks(w, grid_hw, dilation_hw, onesided=False)
    ]
    return torch.cat(values).sort(descending=True).values


def _largest_singular_value(x: Tensor) -> Tensor:
    """Largest singular value of each matrix in a batch, from the smaller Gram matrix.

    ``eigvalsh`` of ``X X^H`` is several times faster than an SVD, and its largest
    eigenvalue keeps full relative accuracy (only the small singular values lose it).
    """
    rows, cols = x.shape[-2:]
    gram = x @ x.mH if rows <= cols else x.mH @ x
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()


def conv_spectral_norm(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1, groups: int = 1, *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Largest singular value ``||A||`` of the conv's circular operator (see :func:`conv_singular_values`).

    Only the half plane ``w_w <= M_w // 2`` is visited: for a real kernel
    ``A_hat(-w) = conj(A_hat(w))`` has the same singular values.

    Returns:
        0-d tensor in ``dtype`` on the device of ``weight``.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``()``
    """
    w, grid_hw, dilation_hw, groups, _ = _prepare(weight, grid, dilation, dtype, groups)
    best = w.new_zeros(())
    for dft in _kernel_dft_chunks(w, grid_hw, dilation_hw, onesided=True):
        best = torch.maximum(best, _largest_singular_value(_per_group(dft, groups)).max())
    return best


def _normalized_chunks(
    w: Tensor, grid_hw: tuple[int, int], dilation_hw: tuple[int, int], eps: float, onesided: bool
) -> Iterator[Tensor]:
    """Yield ``Q_hat(w) = diag(v(w)) A_hat(w)``, chunk by chunk (see :func:`_kernel_dft_chunks`)."""
    floor = _null_floor(w)
    for dft in _kernel_dft_chunks(w, grid_hw, dilation_hw, onesided):
        gain = _gain(_power(dft, floor), eps)  # (F, C_out)
        yield dft * gain[..., None].to(dft.dtype)


def normalized_singular_values(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1, groups: int = 1, eps: float = 0.0, *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """All singular values of the ConvNorm operator ``Q`` (eq. 8) on an ``M_h x M_w`` grid.

    ``Q`` stacks ``Q_k = (A_k A_k^T + eps I)^{-1/2} A_k`` (eqs. 6-7): at frequency ``w`` row
    ``k`` of each group's kernel-DFT matrix is scaled by ``v_k(w) = (S_k(w) + eps)^{-1/2}``.
    With the default ``eps = 0`` this is the paper's exact operator; frequencies where
    ``S_k`` is (numerically) zero get gain 0, as in
    :func:`convnorm_fx.ops.inverse_sqrt_spectrum`. The learned affine transform is not
    included. Arguments and layout of the result are those of :func:`conv_singular_values`.

    Args:
        weight: conv weight ``(C_out, C_in / groups, k_h, k_w)``.
        grid: ``(M_h, M_w)``.
        dilation: the conv's dilation.
        groups: the conv's groups.
        eps: added to the power spectrum, as ``ConvNorm2d.eps``.
        dtype: compute and result dtype.

    Returns:
        1-D tensor of singular values in descending order.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``(M_h * M_w * g * min(C_out / g, C_in / g),)``
    """
    w, grid_hw, dilation_hw, groups, eps = _prepare(weight, grid, dilation, dtype, groups, eps)
    values = [
        torch.linalg.svdvals(_per_group(q, groups)).flatten()
        for q in _normalized_chunks(w, grid_hw, dilation_hw, eps, onesided=False)
    ]
    return torch.cat(values).sort(descending=True).values


def normalized_spectral_norm(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1, groups: int = 1, eps: float = 0.0, *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Largest singular value ``||Q||`` of the ConvNorm operator (see :func:`normalized_singular_values`).

    Returns:
        0-d tensor; at most :func:`proposition31_bound`, i.e. ``sqrt(C_out)`` for exact ConvNorm.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``()``
    """
    w, grid_hw, dilation_hw, groups, eps = _prepare(weight, grid, dilation, dtype, groups, eps)
    best = w.new_zeros(())
    for q in _normalized_chunks(w, grid_hw, dilation_hw, eps, onesided=True):
        best = torch.maximum(best, _largest_singular_value(_per_group(q, groups)).max())
    return best


def strided_spectral_norm_upper_bound(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1, groups: int = 1, *, normalized: bool = False,
    eps: float = 0.0, dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Upper bound on the spectral norm of the conv layer as it runs (any stride and padding).

    The layer is ``D_s o crop o A o embed`` (``Q`` instead of ``A`` with ConvNorm): embedding
    the input into the zero-padded grid is an isometry, and cropping to the output window
    and keeping every ``s``-th sample are coordinate projections with norm at most 1, so
    ``||D_s crop A embed|| <= ||A||``. This function returns exactly that bound,
    :func:`conv_spectral_norm` (or :func:`normalized_spectral_norm` when ``normalized``); it
    is not the norm of the strided operator itself, which may be smaller. The stride does
    not enter the bound, so it is not an argument.

    Args:
        weight, grid, dilation, groups, dtype: as in :func:`conv_spectral_norm`; ``grid`` is
            the full-conv size ``M = H + d (k - 1)`` of the layer's (padded) input.
        normalized: bound the ConvNorm layer (``Q``, without its affine transform).
        eps: ConvNorm's ``eps``, used when ``normalized``.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``()``
    """
    if normalized:
        return normalized_spectral_norm(weight, grid, dilation, groups, eps, dtype=dtype)
    return conv_spectral_norm(weight, grid, dilation, groups, dtype=dtype)


# --------------------------------------------------------------------------------------
# Per-channel measures: condition numbers (Figure 2, left) and Proposition 3.1
# --------------------------------------------------------------------------------------


def _channel_power_range(
    w: Tensor, grid_hw: tuple[int, int], dilation_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """``(min_w S_k(w), max_w S_k(w))`` per channel, round-off nulls set to zero.

    ``S_k(-w) = S_k(w)`` for a real kernel, so the half plane covers every value.
    """
    floor = _null_floor(w)
    low = torch.full((w.shape[0],), math.inf, dtype=w.dtype, device=w.device)
    high = torch.zeros((w.shape[0],), dtype=w.dtype, device=w.device)
    for dft in _kernel_dft_chunks(w, grid_hw, dilation_hw, onesided=True):
        power = _power(dft, floor)  # (F, C_out)
        low = torch.minimum(low, power.min(dim=0).values)
        high = torch.maximum(high, power.max(dim=0).values)
    return low, high


def _ratio_sqrt(high: Tensor, low: Tensor) -> Tensor:
    """``sqrt(high / low)``, ``inf`` where ``low`` is zero (also for an all-zero channel)."""
    safe = torch.where(low > 0, low, torch.ones_like(low))
    return torch.where(low > 0, (high / safe).sqrt(), torch.full_like(low, math.inf))


def _normalized_gain_squared(power: Tensor, eps: float) -> Tensor:
    """Squared singular values ``S / (S + eps)`` of ``Q_k`` at a frequency (0 at nulls)."""
    return power * _gain(power, eps).square()


def channel_condition_numbers(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1, eps: float = 0.0, *,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Condition numbers of every channel's block row ``A_k`` and of its normalized ``Q_k``.

    ``A_k = [C_{a_k1} ... C_{a_kC_in}]`` is an ``M x (C_in M)`` wide matrix (``M = M_h M_w``);
    ``A_k A_k^T`` is circulant with eigenvalues ``S_k(w)``, so the ``M`` singular values of
    ``A_k`` are ``sqrt(S_k(w))`` over all frequencies and its condition number is
    ``sqrt(max_w S_k / min_w S_k)`` (Figure 2, left). ``Q_k`` has singular values
    ``sqrt(S_k / (S_k + eps))``: with ``eps = 0`` every one is 1 (tight frame), so its
    condition number is exactly 1; with ``eps > 0`` it is slightly above 1. A channel whose
    spectrum has a (numerical) null has condition number ``inf`` for both (with ``eps = 0``,
    ConvNorm gives that frequency gain 0); an all-zero channel also reports ``inf``.

    Groups do not enter: each channel's kernels only see the inputs of its own group, and
    the other blocks of ``A_k`` are zero.

    Args:
        weight: conv weight ``(C_out, C_in / groups, k_h, k_w)``.
        grid: ``(M_h, M_w)``.
        dilation: the conv's dilation.
        eps: ConvNorm's ``eps`` for ``Q_k``; ``0.0`` (default) is the exact operator.
        dtype: compute and result dtype.

    Returns:
        ``(cond_A, cond_Q)``, both always returned.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - cond_A, cond_Q: ``(C_out,)``
    """
    w, grid_hw, dilation_hw, _, eps = _prepare(weight, grid, dilation, dtype, eps=eps)
    low, high = _channel_power_range(w, grid_hw, dilation_hw)
    # S / (S + eps) increases with S, so its extremes sit at the extremes of S.
    cond_a = _ratio_sqrt(high, low)
    cond_q = _ratio_sqrt(_normalized_gain_squared(high, eps), _normalized_gain_squared(low, eps))
    return cond_a, cond_q


def proposition31_bound(
    weight: Tensor, grid: Sequence[int], dilation: IntOrPair = 1, eps: float = 0.0, *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Proposition 3.1: ``||Q|| <= sqrt(sum_k ||Q_k||^2)``; returns the right-hand side.

    ``||Q_k||^2 = max_w S_k / (S_k + eps)``, so for exact ConvNorm (``eps = 0``) and no
    all-zero channel the bound is ``sqrt(C_out)``. It holds for any ``groups`` (``Q`` is then
    block diagonal, which only makes ``||Q||`` smaller), so ``groups`` is not an argument.

    Args:
        weight: conv weight ``(C_out, C_in / groups, k_h, k_w)``.
        grid: ``(M_h, M_w)``.
        dilation: the conv's dilation.
        eps: ConvNorm's ``eps``.
        dtype: compute and result dtype.

    Shape:
        - weight: ``(C_out, C_in / g, k_h, k_w)``
        - output: ``()``
    """
    w, grid_hw, dilation_hw, _, eps = _prepare(weight, grid, dilation, dtype, eps=eps)
    _, high = _channel_power_range(w, grid_hw, dilation_hw)
    return _normalized_gain_squared(high, eps).sum().sqrt()


# --------------------------------------------------------------------------------------
# Whole-model report
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralRow:
    """Spectral measures of one ConvNorm stage, before (``A``) and after (``Q``) normalization.

    "Before" is the same conv weight without normalization; "after" is the exact ConvNorm
    operator ``Q`` of that weight with the stage's ``eps`` (without the affine transform and
    BatchNorm, and computed from the weight even when the stage is bypassed or evaluates a
    running-average spectrum). All are measured on the unstrided circular operator on
    ``grid`` (module docstring); for the layer as it runs they are upper bounds on the norm.
    """

    name: str  #: fully qualified name of the stage (``model.named_modules()``)
    in_channels: int  #: ``C_in`` of the conv, ``weight.shape[1] * groups``
    out_channels: int  #: ``C_out``
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    grid: tuple[int, int]  #: ``(M_h, M_w)``; ``(1, 1)`` for 1x1 kernels, whose spectrum is flat
    eps: float  #: the stage's eps, used for every "after" number
    bypassed: bool  #: the stage was bypassed during the pass (numbers are still ConvNorm's)
    spectral_norm_before: float  #: ``||A||``
    spectral_norm_after: float  #: ``||Q||``
    cond_mean_before: float  #: mean over channels of ``cond(A_k)``
    cond_max_before: float  #: max over channels of ``cond(A_k)``
    cond_mean_after: float  #: mean over channels of ``cond(Q_k)``
    cond_max_after: float  #: max over channels of ``cond(Q_k)``
    bound_after: float  #: Proposition 3.1 bound ``sqrt(sum_k ||Q_k||^2)``


_COLUMNS = (
    ("name", "name"),
    ("C_in", "in_channels"),
    ("C_out", "out_channels"),
    ("k", "kernel_size"),
    ("s", "stride"),
    ("d", "dilation"),
    ("g", "groups"),
    ("grid", "grid"),
    ("||A||", "spectral_norm_before"),
    ("||Q||", "spectral_norm_after"),
    ("bound", "bound_after"),
    ("cond A mean", "cond_mean_before"),
    ("cond A max", "cond_max_before"),
    ("cond Q mean", "cond_mean_after"),
    ("cond Q max", "cond_max_after"),
)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become the strings ``'inf'``, ``'-inf'``, ``'nan'`` (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class SpectralReport:
    """Result of :func:`spectral_report`: one :class:`SpectralRow` per ConvNorm stage call.

    Rows are in the order the stages ran. A stage called more than once in the pass gets
    one row per call, named ``fqn``, ``fqn[1]``, ``fqn[2]``, ...; stages that did not run
    are listed in ``not_called``.
    """

    input_size: tuple[int, ...]
    batch_size: int
    rows: list[SpectralRow] = field(default_factory=list)
    not_called: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python containers (tuples become lists in JSON); floats may be ``inf``."""
        return {
            "input_size": list(self.input_size),
            "batch_size": self.batch_size,
            "rows": [asdict(row) for row in self.rows],
            "not_called": list(self.not_called),
        }

    def to_json(self, **kwargs: Any) -> str:
        """Strict JSON of :meth:`to_dict`; ``inf`` condition numbers are written as ``"inf"``.

        Args:
            **kwargs: passed to ``json.dumps`` (e.g. ``indent=2``).
        """
        return json.dumps(_json_safe(self.to_dict()), allow_nan=False, **kwargs)

    def format_table(self) -> str:
        """Plain-text table with one aligned line per row (nothing is printed)."""
        header = [title for title, _ in _COLUMNS]
        body = [[_cell(getattr(row, attr)) for _, attr in _COLUMNS] for row in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def render(line: list[str]) -> str:
            # Names left-aligned, numbers right-aligned so their magnitudes line up.
            cells = [line[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(line[1:], widths[1:])]
            return "  ".join(cells).rstrip()

        lines = [render(header), "  ".join("-" * wd for wd in widths)]
        lines += [render(line) for line in body]
        if self.not_called:
            lines.append(f"not called: {', '.join(self.not_called)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


def _measure(name: str, stage: ConvNorm2d, weight: Tensor, grid: tuple[int, int], groups: int) -> SpectralRow:
    w = weight.detach()
    if w.dim() != 4 or w.shape[0] % groups != 0:
        raise ValueError(
            f"stage {name!r}: weight of shape {tuple(w.shape)} does not fit groups={groups}; "
            "set the stage's `groups` attribute to the groups of its conv"
        )
    dilation = tuple(stage.dilation)
    eps = float(stage.eps)
    cond_a, cond_q = channel_condition_numbers(w, grid, dilation, eps)
    return SpectralRow(
        name=name,
        in_channels=int(w.shape[1]) * groups,
        out_channels=int(w.shape[0]),
        kernel_size=tuple(stage.kernel_size),
        stride=tuple(stage.stride),
        dilation=dilation,
        groups=groups,
        grid=grid,
        eps=eps,
        bypassed=bool(stage.bypassed),
        spectral_norm_before=conv_spectral_norm(w, grid, dilation, groups).item(),
        spectral_norm_after=normalized_spectral_norm(w, grid, dilation, groups, eps).item(),
        cond_mean_before=cond_a.mean().item(),
        cond_max_before=cond_a.max().item(),
        cond_mean_after=cond_q.mean().item(),
        cond_max_after=cond_q.max().item(),
        bound_after=proposition31_bound(w, grid, dilation, eps).item(),
    )


def _default_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def spectral_report(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> SpectralReport:
    """Measure every :class:`~convnorm_fx.ConvNorm2d` stage of ``model`` in one forward pass.

    Runs ``model`` once in eval mode under ``torch.no_grad()`` on an all-zero input of shape
    ``(batch_size, *input_size)`` (zeros keep the global RNG untouched; the values do not
    matter, only the shapes each stage sees). A forward pre-hook on each stage records the
    conv weight it normalizes and the size of the feeding conv's output ``y``, which for
    kernels larger than 1x1 is the circular grid ``M = H + d (k - 1)``; 1x1 kernels have a
    flat spectrum and use grid ``(1, 1)``, whose singular values are those on any grid. The
    training flag of every submodule is restored afterwards, and the hooks are removed,
    also after an error. Parameters and buffers are not changed (an eval-mode stage may fill
    its non-persistent spectrum cache).

    Groups are the stage's ``groups`` attribute (:class:`~convnorm_fx.ConvNormConv2d` sets
    it from its conv; 1 if absent); only the spectral norms depend on them.

    Args:
        model: any module containing ConvNorm stages.
        input_size: input shape without the batch dimension, e.g. ``(3, 32, 32)``.
        batch_size: batch size of the probe input.
        device: device of the probe input; defaults to that of the model's first floating
            parameter or buffer (CPU if there is none). Its dtype is taken from the same
            tensor.

    Returns:
        A :class:`SpectralReport` with one row per stage call.

    Shape:
        - probe input: ``(batch_size, *input_size)``

    Example:
        >>> from convnorm_fx import ConvNormConv2d
        >>> net = nn.Sequential(ConvNormConv2d(3, 8, 3, padding=1), nn.ReLU(), ConvNormConv2d(8, 4, 1))
        >>> [row.name for row in spectral_report(net, (3, 16, 16)).rows]
        ['0.norm', '2.norm']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    size = tuple(int(s) for s in input_size)
    if not size or min(size) < 1:
        raise ValueError(f"input_size must be a non-empty shape of positive ints without the batch, got {input_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    default_device, dtype = _default_device_and_dtype(model)
    probe = torch.zeros((batch_size, *size), device=device if device is not None else default_device, dtype=dtype)

    names = {id(m): name for name, m in model.named_modules() if isinstance(m, ConvNorm2d)}
    report = SpectralReport(input_size=size, batch_size=batch_size)
    seen = set()
    with torch.no_grad():
        for call in record_stage_calls(model, probe, cond_convs=False):
            seen.add(id(call.stage))
            name = call.name if call.index == 0 else f"{call.name}[{call.index}]"
            report.rows.append(_measure(name, call.stage, call.weight, call.grid, int(call.stage.groups)))
    report.not_called = [name for key, name in names.items() if key not in seen]
    return report
