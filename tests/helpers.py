"""Assertion helpers shared by the tests."""

from __future__ import annotations

import torch

from tolerances import tolerance


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None, scale: float | None = None
) -> None:
    """``assert_close`` with an absolute tolerance scaled by the largest expected magnitude.

    ConvNorm amplifies weak frequencies, so absolute errors grow with the output's scale;
    comparing relative to ``max |expected|`` keeps one tolerance per dtype meaningful. Pass
    ``scale`` where the expected values may cancel to almost nothing (round-off then scales
    with the inputs, not with the result).
    """
    if tol is None:
        tol = tolerance(actual.dtype)
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach(), expected.detach().to(actual.dtype), rtol=tol, atol=tol * max(scale, 1e-30))
