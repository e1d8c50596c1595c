"""Precision of the ConvNorm math: which dtype each step runs in, with autocast off.

The spectrum and the transforms always run in float32 (float64 stays float64) with autocast
disabled, because cuFFT's half precision needs power-of-two sizes and there is no bfloat16
FFT; results are cast back to the dtype of the conv output. The kernel spectrum itself is
computed in float64, where it is tiny next to the activations.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


__all__ = [
    "autocast_disabled",
    "complex_dtype",
    "compute_dtype",
    "conv_out_dtype",
    "spectral_dtypes",
    "spectrum_dtype",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def complex_dtype(real: torch.dtype) -> torch.dtype:
    """The complex dtype with parts of the real dtype ``real`` (float64 or float32)."""
    return torch.complex128 if real == torch.float64 else torch.complex64


def spectrum_dtype(device: torch.device) -> torch.dtype:
    """The kernel spectrum is tiny next to the activations, so it is computed in float64:
    at weak frequencies ``S_k`` is a small difference of large sums, and float32 would lose
    the relative accuracy that ``S_k^{-1/2}`` needs there. MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def spectral_dtypes(x: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """Real and complex compute dtypes: float64 when the site is float64, else float32."""
    real = torch.float64 if x.dtype == weight.dtype == torch.float64 else torch.float32
    return real, complex_dtype(real)


def conv_out_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.conv2d`` returns for ``x`` under the current autocast state (devices
    without autocast, such as meta, return ``x``'s dtype)."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):
        return x.dtype
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``; nothing to switch off where autocast does not exist (meta)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
