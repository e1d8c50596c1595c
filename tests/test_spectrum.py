"""The kernel power spectrum, the preconditioner, and the tight-frame property (§3.2, eq. 6-7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from convnorm_fx import ops
from helpers import assert_close_scaled
from oracles import correlation_matrix, inverse_sqrt_psd, preconditioned_operator
from strategies import conv_geometries, seeds, tiny_geometries


def _stuffed_fft2(weight: torch.Tensor, grid: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Full-plane DFT of every (dilated) kernel, written out independently of ops."""
    c_out, c_in, kh, kw = weight.shape
    canvas = torch.zeros(c_out, c_in, *grid, dtype=weight.dtype)
    for t in range(kh):
        for u in range(kw):
            canvas[:, :, t * dilation[0], u * dilation[1]] = weight[:, :, t, u]
    return torch.fft.fft2(canvas)


@given(geometry=conv_geometries(), seed=seeds, extra=st.integers(0, 5))
def test_autocorrelation_spectrum_equals_direct_fft(geometry, seed, extra):
    """Wiener-Khinchin path == sum of |zero-padded FFT|^2, on any grid (aliasing included)."""
    _, w, _ = geometry.tensors(seed)
    eh = geometry.dilation[0] * (geometry.kernel[0] - 1) + 1
    ew = geometry.dilation[1] * (geometry.kernel[1] - 1) + 1
    grid = (eh + extra, ew + geometry.height % 4)
    direct = ops.kernel_power_spectrum(w, grid, geometry.dilation)
    via_lags = ops.power_spectrum_from_autocorrelation(ops.kernel_autocorrelation(w), grid, geometry.dilation)
    reference = _stuffed_fft2(w, grid, geometry.dilation).abs().square().sum(1)[..., : grid[1] // 2 + 1]
    assert_close_scaled(direct, reference)
    assert_close_scaled(via_lags, reference)


@given(geometry=tiny_geometries, seed=seeds)
def test_spectrum_matches_dense_eigenvalues(geometry, seed):
    """The eigenvalues of A_k A_k^T are exactly the power spectrum S_k on the grid."""
    _, w, _ = geometry.tensors(seed)
    grid = (geometry.height + geometry.dilation[0] * (geometry.kernel[0] - 1),
            geometry.width + geometry.dilation[1] * (geometry.kernel[1] - 1))
    a = correlation_matrix(w.numpy(), geometry.groups, grid, geometry.dilation)
    rows = grid[0] * grid[1]
    power = _stuffed_fft2(w, grid, geometry.dilation).abs().square().sum(1)
    assert_close_scaled(ops.kernel_power_spectrum(w, grid, geometry.dilation), power[..., : grid[1] // 2 + 1])
    for k in range(w.shape[0]):
        block = a[k * rows : (k + 1) * rows]
        eig = np.sort(np.linalg.eigvalsh(block @ block.T))
        np.testing.assert_allclose(eig, np.sort(power[k].flatten().numpy()), rtol=1e-9, atol=1e-9 * eig.max())


@given(geometry=conv_geometries(), seed=seeds)
def test_spectrum_is_flip_invariant(geometry, seed):
    """|DFT(a)| = |DFT(flipped a)|: the preconditioner of W and of W flipped in both axes agree."""
    _, w, _ = geometry.tensors(seed)
    grid = (geometry.height + geometry.dilation[0] * (geometry.kernel[0] - 1),
            geometry.width + geometry.dilation[1] * (geometry.kernel[1] - 1))
    flipped = w.flip(2, 3)
    assert_close_scaled(
        ops.preconditioner_spectrum(flipped, grid, geometry.dilation, eps=0.0),
        ops.preconditioner_spectrum(w, grid, geometry.dilation, eps=0.0),
    )


def test_dilation_changes_the_spectrum():
    """A dilated kernel is zero-stuffed: its spectrum is the undilated one at scaled frequencies."""
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    grid = (12, 12)
    s1 = ops.kernel_power_spectrum(w, grid, 1)
    s2 = ops.kernel_power_spectrum(w, grid, 2)
    assert not torch.allclose(s1, s2)
    # S_d(w) = S_1(d w mod M): frequency 1 of the dilated kernel is frequency 2 of the plain one.
    torch.testing.assert_close(s2[:, 1, 0], s1[:, 2, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spectrum_dtype", [torch.float32, torch.float64])
@given(geometry=conv_geometries(max_channels=4), seed=seeds)
def test_tight_frame_spectral_identity(spectrum_dtype, geometry, seed):
    """sum_j |DFT(v_k * a_kj)|^2 = 1 at every frequency, and ||Q|| <= sqrt(C_out) (Prop. 3.1)."""
    _, w, _ = geometry.tensors(seed, dtype=spectrum_dtype)
    grid = (geometry.height + geometry.dilation[0] * (geometry.kernel[0] - 1),
            geometry.width + geometry.dilation[1] * (geometry.kernel[1] - 1))
    power = ops.kernel_power_spectrum(w, grid, geometry.dilation)
    assume(float(power.min()) > 1e-3 * float(power.max()))  # well away from spectral nulls
    v_hat = ops.preconditioner_spectrum(w, grid, geometry.dilation, eps=0.0)  # (C_out, M_h, M_w//2+1)
    a_hat = _stuffed_fft2(w.to(torch.float64), grid, geometry.dilation)[..., : grid[1] // 2 + 1]
    q_hat = v_hat.to(torch.float64)[:, None] * a_hat  # (C_out, C_in/g, M_h, M_w//2+1)
    tol = 1e-10 if spectrum_dtype == torch.float64 else 1e-5
    energy = q_hat.abs().square().sum(1)
    torch.testing.assert_close(energy, torch.ones_like(energy), rtol=0, atol=tol)
    # Layer operator per frequency: block-diagonal over groups, C_out x C_in.
    per_group = []
    out_g = w.shape[0] // geometry.groups
    for g in range(geometry.groups):
        block = q_hat[g * out_g : (g + 1) * out_g].permute(2, 3, 0, 1)  # (freq, freq, out_g, in_g)
        per_group.append(torch.linalg.matrix_norm(block, ord=2).max())
    assert float(max(per_group)) <= (w.shape[0]) ** 0.5 + tol


@given(geometry=tiny_geometries, seed=seeds)
def test_tight_frame_dense(geometry, seed):
    """Q_k Q_k^T = I for every channel, from dense matrices (float64, <= 1e-10)."""
    _, w, _ = geometry.tensors(seed)
    grid = (geometry.height + geometry.dilation[0] * (geometry.kernel[0] - 1),
            geometry.width + geometry.dilation[1] * (geometry.kernel[1] - 1))
    power = ops.kernel_power_spectrum(w, grid, geometry.dilation)
    assume(float(power.min()) > 1e-6)
    _, q = preconditioned_operator(w.numpy(), geometry.groups, grid, geometry.dilation)
    rows = grid[0] * grid[1]
    for k in range(w.shape[0]):
        qk = q[k * rows : (k + 1) * rows]
        np.testing.assert_allclose(qk @ qk.T, np.eye(rows), atol=1e-10)
    assert np.linalg.norm(q, 2) <= np.sqrt(w.shape[0]) + 1e-10


def test_inverse_sqrt_eps_bounds_the_gain_and_zero_stays_finite():
    power = torch.tensor([0.0, 1e-12, 1e-3, 1.0, 100.0], dtype=torch.float64)
    eps = 1e-4
    v = ops.inverse_sqrt_spectrum(power, eps)
    assert float(v.max()) <= eps**-0.5 + 1e-9
    torch.testing.assert_close(v, (power + eps).rsqrt())
    exact = ops.inverse_sqrt_spectrum(power, 0.0)
    assert torch.isfinite(exact).all()
    assert exact[0] == 0  # pseudo-inverse at an exact null
    torch.testing.assert_close(exact[1:], power[1:].rsqrt())
    # The backward of the exact form stays finite at the null.
    p = power.clone().requires_grad_()
    ops.inverse_sqrt_spectrum(p, 0.0).sum().backward()
    assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_inverse_sqrt_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        ops.inverse_sqrt_spectrum(torch.ones(3), eps)


def test_dense_inverse_sqrt_oracle_is_sane():
    """The oracle itself: (A A^T)^{-1/2} squared and applied to A A^T gives the identity."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal((5, 7))
    g = m @ m.T
    p = inverse_sqrt_psd(g)
    np.testing.assert_allclose(p @ g @ p, np.eye(5), atol=1e-10)


def test_spectrum_dtype_rules(device):
    w = torch.randn(3, 2, 3, 3, device=device)
    assert ops.kernel_power_spectrum(w, (6, 6)).dtype == torch.float32
    assert ops.kernel_power_spectrum(w.double(), (6, 6)).dtype == torch.float64
    assert ops.kernel_power_spectrum(w.bfloat16(), (6, 6)).dtype == torch.float32  # FFTs never run in half
    assert ops.preconditioner_spectrum(w.half(), (6, 6)).dtype == torch.float32
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.kernel_power_spectrum(w, (2, 6))
