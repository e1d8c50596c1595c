"""Round-off tolerances per dtype: the one table every test compares with.

Each is relative to the scale of the expected tensor (see ``helpers.assert_close_scaled``).
ConvNorm amplifies weak frequencies by up to ``eps ** -0.5``, so errors scale with the output,
not with each element. Tests that need a different bound say why next to it, as a multiple of
these.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "tolerance"]

TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    # One bfloat16 mantissa has 8 bits: a few units in the last place of an O(1) output.
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    """The round-off tolerance of ``dtype`` (float32's for other dtypes)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])
