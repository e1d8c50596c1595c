"""The hand-written backward passes, checked directly: ``torch.autograd.gradcheck`` in float64 of
each custom ``autograd.Function`` of :mod:`convnorm_fx.spectral`, and the double-backward policy.

``fast_mode`` checks the Jacobian along random directions instead of column by column: as
strict a test of a wrong backward, at a fraction of the cost.

``gradcheck`` through :func:`convnorm_fx.conv_norm2d` with ``stop_gradient=False`` never reaches
these Functions (the preconditioner is then not a constant, and the plain autograd pipeline
runs), so they are called here as the library calls them: with the preconditioner's DFT as a
constant input.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings

from convnorm_fx import conv_norm2d, dft, ops, spectral
from strategies import conv_geometries, seeds

#: Small geometries: gradcheck evaluates a numerical Jacobian column by column.
geometries = conv_geometries(max_kernel=3, max_stride=2, max_dilation=2, max_channels=2, max_groups=2, max_extra_size=3)


def _affine(out_channels, kernel, seed):
    gen = torch.Generator().manual_seed(seed + 3)
    return torch.randn(out_channels, 1, *kernel, generator=gen, dtype=torch.float64)


def _site(geometry, seed, with_affine):
    """Inputs of a site as the library feeds the Functions: mode-padded input, zero padding."""
    x, w, _ = geometry.tensors(seed)
    pads = geometry.explicit_padding()
    if geometry.padding_mode != "zeros":
        x, pads = ops.pad_for_mode(x, pads, geometry.padding_mode), (0, 0, 0, 0)
    affine_w = _affine(w.shape[0], geometry.kernel, seed) if with_affine else None
    return x, w, affine_w, pads


@pytest.mark.parametrize("route", ["dft", "fft"])
@settings(max_examples=10, deadline=None)
@given(geometry=geometries, seed=seeds)
def test_spectral_conv_norm_gradcheck(geometry, seed, route, monkeypatch):
    """``SpectralConvNorm``: gradients of the input, the conv weight and the affine kernel."""
    monkeypatch.setattr(dft, "DFT_MAX_GRID", 64 if route == "dft" else 0)
    assume(geometry.kernel != (1, 1))
    for with_affine in (False, True):
        x, w, affine_w, pads = _site(geometry, seed, with_affine)
        plan = spectral.spectral_plan(
            x, x.shape[-2:], geometry.kernel, geometry.stride, pads, geometry.dilation, geometry.groups, affine_w, x.dtype
        )
        assume(plan is not None)
        grid = ops.grid_size(x.shape[-2:], geometry.kernel, geometry.dilation)
        inv_sqrt = ops.preconditioner_spectrum(w, grid, geometry.dilation, 1e-3)
        leaves = [t.requires_grad_(True) for t in (x, w, affine_w) if t is not None]

        def site(*tensors):
            x_, w_, *rest = tensors
            return spectral.SpectralConvNorm.apply(x_, w_, rest[0] if rest else None, inv_sqrt, plan)

        assert torch.autograd.gradcheck(site, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("route", ["dft", "fft"])
@settings(max_examples=10, deadline=None)
@given(geometry=geometries, seed=seeds)
def test_spectral_stage_gradcheck(geometry, seed, route, monkeypatch):
    """``SpectralStage``: gradients of the full conv output and the affine kernel."""
    monkeypatch.setattr(dft, "DFT_MAX_GRID", 64 if route == "dft" else 0)
    assume(geometry.kernel != (1, 1))
    x, w, affine_w, pads = _site(geometry, seed, with_affine=True)
    feed_stride, feed_padding = ops.feeding_conv_args(geometry.kernel, geometry.stride, pads, geometry.dilation)
    y = torch.nn.functional.conv2d(x, w, None, feed_stride, feed_padding, geometry.dilation, geometry.groups)
    plan = spectral.spectral_plan(y, x.shape[-2:], geometry.kernel, geometry.stride, pads, geometry.dilation, 1, affine_w, y.dtype)
    assume(plan is not None)
    inv_sqrt = ops.preconditioner_spectrum(w, y.shape[-2:], geometry.dilation, 1e-3)
    leaves = [y.detach().requires_grad_(True), affine_w.requires_grad_(True)]
    assert torch.autograd.gradcheck(
        lambda y_, r_: spectral.SpectralStage.apply(y_, r_, inv_sqrt, plan), leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize("algorithm", ["direct", "spectral"])
def test_second_derivatives_through_the_fused_paths_are_refused(algorithm):
    """Double-backward policy, part 1: the hand-written backward passes are once-differentiable,
    so a gradient penalty through them raises instead of giving a wrong second derivative."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out = conv_norm2d(x, w, padding=1, affine_weight=_affine(4, (3, 3), 0), algorithm=algorithm)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.square().sum().backward()


def test_second_derivatives_without_stop_gradient_are_exact():
    """Double-backward policy, part 2: with ``stop_gradient=False`` every path is plain autograd,
    and second derivatives (of the spectrum too) pass ``gradgradcheck``."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    affine_w = _affine(2, (3, 3), 1).requires_grad_(True)

    def site(x_, w_, r_):
        return conv_norm2d(x_, w_, stride=2, padding=1, eps=1e-2, stop_gradient=False, affine_weight=r_)

    assert torch.autograd.gradgradcheck(site, (x, w, affine_w), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
