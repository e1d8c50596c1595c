"""Tests of convnorm_fx.analysis against dense matrices built from the definitions.

The oracle builds the circular cross-correlation ``A`` entry by entry with explicit loops
(no FFT), the preconditioner ``P_k = (A_k A_k^T + eps I)^{-1/2}`` by an eigendecomposition
(eq. 6) and ``Q`` by stacking ``P_k A_k`` (eq. 8); singular values then come from
``np.linalg.svd``. Nothing here shares code with the FFT implementation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convnorm_fx import ConvNorm2d, ConvNormConv2d, ops
from tolerances import tolerance
from convnorm_fx.analysis import (
    SpectralReport,
    channel_condition_numbers,
    conv_singular_values,
    conv_spectral_norm,
    normalized_singular_values,
    normalized_spectral_norm,
    proposition31_bound,
    spectral_report,
    strided_spectral_norm_upper_bound,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {"rtol": tolerance(torch.float64), "atol": tolerance(torch.float64)}


# --------------------------------------------------------------------------------------
# Dense oracle
# --------------------------------------------------------------------------------------


def dense_correlation(weight: np.ndarray, groups: int, grid: tuple[int, int], dilation: tuple[int, int]) -> np.ndarray:
    """``(C_out M_h M_w) x (C_in M_h M_w)`` matrix of the circular cross-correlation.

    ``y[k, i, j] = sum_{c, t, u} w[k, c, t, u] x[c, (i + t d_h) % M_h, (j + u d_w) % M_w]``
    over the input channels ``c`` of output channel ``k``'s group.
    """
    c_out, c_in_g, kh, kw = weight.shape
    mh, mw = grid
    dh, dw = dilation
    out_per_group = c_out // groups
    a = np.zeros((c_out, mh, mw, c_in_g * groups, mh, mw))
    for k in range(c_out):
        for cl in range(c_in_g):
            c = (k // out_per_group) * c_in_g + cl
            for t in range(kh):
                for u in range(kw):
                    for i in range(mh):
                        for j in range(mw):
                            a[k, i, j, c, (i + t * dh) % mh, (j + u * dw) % mw] += weight[k, cl, t, u]
    return a.reshape(c_out * mh * mw, c_in_g * groups * mh * mw)


def dense_preconditioned_rows(a: np.ndarray, c_out: int, eps: float) -> tuple[list[np.ndarray], float]:
    """``[Q_k = (A_k A_k^T + eps I)^{-1/2} A_k]`` and the smallest eigenvalue of any ``A_k A_k^T``."""
    rows = np.split(a, c_out, axis=0)
    q_rows, smallest = [], math.inf
    for a_k in rows:
        vals, vecs = np.linalg.eigh(a_k @ a_k.T)
        smallest = min(smallest, vals.min())
        shifted = np.clip(vals + eps, 1e-300, None)
        q_rows.append(((vecs / np.sqrt(shifted)) @ vecs.T) @ a_k)
    return q_rows, smallest


def svd_sorted(matrix: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.linalg.svd(matrix, compute_uv=False))[::-1].copy())


def cond(matrix: np.ndarray) -> float:
    s = np.linalg.svd(matrix, compute_uv=False)
    return float(s.max() / s.min())


@st.composite
def layers(draw: st.DrawFn) -> dict:
    """A tiny conv layer: weight, groups, dilation, a grid that holds the dilated kernel, eps."""
    groups = draw(st.integers(1, 2))
    c_out_g, c_in_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    grid = (draw(st.integers(eh, 6)), draw(st.integers(ew, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = rng.standard_normal((groups * c_out_g, c_in_g, kh, kw))
    float32 = draw(st.booleans())
    if float32:
        weight = weight.astype(np.float32).astype(np.float64)  # exactly the float32 values
    return {
        "weight": weight,
        "float32": float32,
        "groups": groups,
        "dilation": (dh, dw),
        "grid": grid,
        "eps": draw(st.sampled_from([0.0, 0.05])),
    }


def _torch_weight(layer: dict) -> torch.Tensor:
    w = torch.from_numpy(layer["weight"])
    return w.float() if layer["float32"] else w


# --------------------------------------------------------------------------------------
# Pure functions against the dense oracle
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(layers())
def test_conv_singular_values_match_dense(layer: dict) -> None:
    w, groups, dilation, grid = _torch_weight(layer), layer["groups"], layer["dilation"], layer["grid"]
    expected = svd_sorted(dense_correlation(layer["weight"], groups, grid, dilation))

    got = conv_singular_values(w, grid, dilation, groups)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(conv_spectral_norm(w, grid, dilation, groups), expected[0], **TOL)
    torch.testing.assert_close(strided_spectral_norm_upper_bound(w, grid, dilation, groups), expected[0], **TOL)


@settings(max_examples=25, deadline=None)
@given(layers())
def test_normalized_operator_matches_dense(layer: dict) -> None:
    w, groups, dilation, grid, eps = (
        _torch_weight(layer),
        layer["groups"],
        layer["dilation"],
        layer["grid"],
        layer["eps"],
    )
    c_out = w.shape[0]
    a = dense_correlation(layer["weight"], groups, grid, dilation)
    q_rows, smallest = dense_preconditioned_rows(a, c_out, eps)
    if eps == 0.0:
        # P_k exists only for a non-singular A_k A_k^T; keep it well conditioned so the dense
        # eigendecomposition itself is accurate to ~1e-12.
        assume(smallest > 1e-3)
    q = np.concatenate(q_rows, axis=0)
    expected = svd_sorted(q)

    torch.testing.assert_close(normalized_singular_values(w, grid, dilation, groups, eps), expected, **TOL)
    torch.testing.assert_close(normalized_spectral_norm(w, grid, dilation, groups, eps), expected[0], **TOL)
    torch.testing.assert_close(
        strided_spectral_norm_upper_bound(w, grid, dilation, groups, normalized=True, eps=eps), expected[0], **TOL
    )

    # Per-channel condition numbers (Figure 2, left) and the tight frame property (eq. 7).
    cond_a, cond_q = channel_condition_numbers(w, grid, dilation, eps)
    a_rows = np.split(a, c_out, axis=0)
    dense_cond_a = torch.tensor([cond(a_k) for a_k in a_rows], dtype=torch.float64)
    dense_cond_q = torch.tensor([cond(q_k) for q_k in q_rows], dtype=torch.float64)
    torch.testing.assert_close(cond_a, dense_cond_a, rtol=100 * tolerance(torch.float64), atol=0.0)
    torch.testing.assert_close(cond_q, dense_cond_q, rtol=100 * tolerance(torch.float64), atol=0.0)
    if eps == 0.0:
        m = grid[0] * grid[1]
        for q_k in q_rows:
            np.testing.assert_allclose(q_k @ q_k.T, np.eye(m), rtol=0, atol=tolerance(torch.float64))
        torch.testing.assert_close(cond_q, torch.ones(c_out, dtype=torch.float64), rtol=0, atol=tolerance(torch.float64))

    # Proposition 3.1: ||Q|| <= sqrt(sum_k ||Q_k||^2), = sqrt(C_out) for exact ConvNorm.
    bound = proposition31_bound(w, grid, dilation, eps)
    dense_bound = math.sqrt(sum(np.linalg.norm(q_k, 2) ** 2 for q_k in q_rows))
    torch.testing.assert_close(bound, torch.tensor(dense_bound, dtype=torch.float64), **TOL)
    assert expected[0].item() <= bound.item() + 1e-10
    if eps == 0.0:
        torch.testing.assert_close(bound, torch.tensor(math.sqrt(c_out), dtype=torch.float64), **TOL)
    else:
        assert bound.item() < math.sqrt(c_out)  # eps shrinks every ||Q_k|| below 1


def test_one_by_one_kernel_has_a_flat_spectrum() -> None:
    w = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    per_frequency = torch.linalg.svdvals(w[:, :, 0, 0])
    expected = per_frequency.repeat(12).sort(descending=True).values
    torch.testing.assert_close(conv_singular_values(w, (3, 4)), expected, **TOL)
    torch.testing.assert_close(conv_spectral_norm(w, (1, 1)), conv_spectral_norm(w, (3, 4)), **TOL)
    cond_a, _ = channel_condition_numbers(w, (3, 4))
    torch.testing.assert_close(cond_a, torch.ones(5, dtype=torch.float64), rtol=0, atol=tolerance(torch.float64) / 100)


def test_spectral_nulls_and_zero_channels() -> None:
    # Channel 0: [1, 1] has an exact null at the Nyquist frequency of an even grid.
    # Channel 1: all zero. Channel 2: a delta, flat spectrum.
    w = torch.zeros(3, 1, 1, 2, dtype=torch.float64)
    w[0, 0, 0] = torch.tensor([1.0, 1.0])
    w[2, 0, 0, 0] = 1.0
    grid = (1, 4)
    cond_a, cond_q = channel_condition_numbers(w, grid)
    assert math.isinf(cond_a[0]) and math.isinf(cond_a[1]) and cond_a[2].item() == pytest.approx(1.0)
    assert math.isinf(cond_q[0]) and math.isinf(cond_q[1]) and cond_q[2].item() == pytest.approx(1.0)
    q = normalized_singular_values(w, grid)
    assert torch.isfinite(q).all()
    # Per frequency Q_hat is a 3x1 column with entries of modulus 1 (or 0 at nulls / the zero
    # channel): channel 0 contributes 1 except at its null, channel 2 always 1.
    expected = torch.tensor([math.sqrt(2)] * 3 + [1.0], dtype=torch.float64)
    torch.testing.assert_close(q, expected, **TOL)
    # The all-zero channel has ||Q_k|| = 0, so the bound is sqrt(2) rather than sqrt(3).
    torch.testing.assert_close(proposition31_bound(w, grid), torch.tensor(math.sqrt(2), dtype=torch.float64), **TOL)


def test_float32_compute_dtype_and_inputs() -> None:
    w = torch.randn(4, 3, 3, 3)
    reference = conv_singular_values(w.double(), (7, 6), 1, 1)
    single = conv_singular_values(w, (7, 6), dtype=torch.float32)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), reference, rtol=tolerance(torch.float32), atol=tolerance(torch.float32))
    # float32 weights are computed in float64 by default.
    assert conv_singular_values(w, (7, 6)).dtype == torch.float64
    torch.testing.assert_close(conv_singular_values(w, (7, 6)), reference, rtol=0, atol=0)


def test_weights_are_not_modified_and_no_graph_is_built() -> None:
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    before = w.detach().clone()
    s = conv_spectral_norm(w, (6, 6))
    assert not s.requires_grad
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_results_stay_on_the_weight_device(device: str) -> None:
    w = torch.randn(4, 2, 3, 3, device=device)
    grid = (6, 5)
    outputs = [
        conv_singular_values(w, grid),
        conv_spectral_norm(w, grid),
        normalized_singular_values(w, grid),
        proposition31_bound(w, grid),
        *channel_condition_numbers(w, grid),
    ]
    assert all(out.device.type == device for out in outputs)
    torch.testing.assert_close(outputs[1].cpu(), conv_spectral_norm(w.cpu(), grid), rtol=tolerance(torch.float64) / 100, atol=tolerance(torch.float64) / 100)


def test_memory_chunks_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    import convnorm_fx.analysis as analysis

    w = torch.randn(6, 4, 3, 2, dtype=torch.float64)
    grid, dilation, groups = (7, 5), (2, 1), 2
    whole = conv_singular_values(w, grid, dilation, groups)
    whole_q = normalized_singular_values(w, grid, dilation, groups)
    whole_cond = channel_condition_numbers(w, grid, dilation)[0]
    monkeypatch.setattr(analysis, "_CHUNK_ENTRIES", 7)  # one frequency per chunk, many chunks
    torch.testing.assert_close(conv_singular_values(w, grid, dilation, groups), whole, **TOL)
    torch.testing.assert_close(normalized_singular_values(w, grid, dilation, groups), whole_q, **TOL)
    torch.testing.assert_close(conv_spectral_norm(w, grid, dilation, groups), whole[0], **TOL)
    torch.testing.assert_close(channel_condition_numbers(w, grid, dilation)[0], whole_cond, **TOL)


# --------------------------------------------------------------------------------------
# The bound against the layers as they run (stride, padding, crop)
# --------------------------------------------------------------------------------------


def _dense_of(function, n_inputs: int) -> np.ndarray:
    basis = torch.eye(n_inputs, dtype=torch.float64)
    return torch.stack([function(e).flatten() for e in basis], dim=1).numpy()


@pytest.mark.parametrize("stride,padding,dilation", [(2, 1, 1), (1, 0, 1), (2, 2, 2), (1, "same", 1)])
def test_strided_layers_are_bounded_by_the_circular_operator(stride, padding, dilation) -> None:
    torch.manual_seed(1)
    c_in, c_out, size = 2, 3, (5, 6)
    w = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64)
    grid = ops.grid_size(size, 3, dilation)

    def plain(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v.reshape(1, c_in, *size), w, stride=stride, padding=padding, dilation=dilation)

    def normalized(v: torch.Tensor) -> torch.Tensor:
        x = v.reshape(1, c_in, *size)
        return ops.conv_norm2d(x, w, stride=stride, padding=padding, dilation=dilation, eps=0.0)

    n = c_in * size[0] * size[1]
    plain_norm = np.linalg.norm(_dense_of(plain, n), 2)
    normalized_norm = np.linalg.norm(_dense_of(normalized, n), 2)
    assert plain_norm <= strided_spectral_norm_upper_bound(w, grid, dilation).item() + 1e-10
    assert normalized_norm <= strided_spectral_norm_upper_bound(w, grid, dilation, normalized=True).item() + 1e-10


# --------------------------------------------------------------------------------------
# spectral_report
# --------------------------------------------------------------------------------------


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        ConvNormConv2d(3, 8, 3, padding=1, eps=0.0),
        nn.ReLU(),
        ConvNormConv2d(8, 8, 3, stride=2, padding=1, groups=2, eps=0.0),
        ConvNormConv2d(8, 4, 1, eps=0.0),
    )


def test_spectral_report_rows_match_the_pure_functions() -> None:
    net = _small_net()
    net.train()
    net[2].eval()  # mixed modes must come back as they were
    modes = {name: m.training for name, m in net.named_modules()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    seen: list[tuple[bool, bool]] = []
    net[0].norm.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))

    report = spectral_report(net, (3, 8, 8), batch_size=2)

    assert seen == [(False, False)]  # one pass, in eval mode, without autograd
    assert {name: m.training for name, m in net.named_modules()} == modes
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)

    stages = [name for name, m in net.named_modules() if isinstance(m, ConvNorm2d)]
    assert [row.name for row in report.rows] == stages == ["0.norm", "2.norm", "3.norm"]
    assert report.not_called == []
    # Full-conv grids M = H + d (k - 1); the 1x1 stage has a flat spectrum.
    assert [row.grid for row in report.rows] == [(10, 10), (10, 10), (1, 1)]
    assert [row.groups for row in report.rows] == [1, 2, 1]
    assert [row.stride for row in report.rows] == [(1, 1), (2, 2), (1, 1)]
    assert [(row.in_channels, row.out_channels) for row in report.rows] == [(3, 8), (8, 8), (8, 4)]

    convs = [net[0], net[2], net[3]]
    for row, conv in zip(report.rows, convs):
        w, grid, d, g = conv.weight, row.grid, conv.dilation, conv.groups
        cond_a, cond_q = channel_condition_numbers(w, grid, d, 0.0)
        expected = {
            "spectral_norm_before": conv_spectral_norm(w, grid, d, g),
            "spectral_norm_after": normalized_spectral_norm(w, grid, d, g, 0.0),
            "cond_mean_before": cond_a.mean(),
            "cond_max_before": cond_a.max(),
            "cond_mean_after": cond_q.mean(),
            "cond_max_after": cond_q.max(),
            "bound_after": proposition31_bound(w, grid, d, 0.0),
        }
        for field_name, value in expected.items():
            torch.testing.assert_close(getattr(row, field_name), value.item(), rtol=tolerance(torch.float64) / 100, atol=tolerance(torch.float64) / 100)
        # Exact ConvNorm: every channel a tight frame, ||Q|| <= sqrt(C_out) (Proposition 3.1).
        assert row.eps == 0.0
        torch.testing.assert_close(row.cond_max_after, 1.0, rtol=0, atol=10 * tolerance(torch.float64))
        torch.testing.assert_close(row.bound_after, math.sqrt(row.out_channels), rtol=tolerance(torch.float64) / 100, atol=tolerance(torch.float64) / 100)
        assert row.spectral_norm_after <= math.sqrt(row.out_channels) + 1e-9
        assert row.cond_max_before > 1.0 or row.kernel_size == (1, 1)

    # The grouped layer is measured as grouped: treating its weight as an ungrouped conv
    # would describe a different operator.
    ungrouped = conv_spectral_norm(net[2].weight, (10, 10), 1, 1).item()
    assert abs(report.rows[1].spectral_norm_before - ungrouped) > 1e-6

    table = report.format_table()
    assert str(report) == table
    assert all(name in table for name in stages)
    assert len(table.splitlines()) == 2 + len(stages)
    decoded = json.loads(report.to_json())
    assert [row["name"] for row in decoded["rows"]] == stages
    assert decoded["input_size"] == [3, 8, 8] and decoded["batch_size"] == 2


class _FunctionalSite(nn.Module):
    """A stage fed by F.conv2d, as a graph rewrite produces, called twice with keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.stage = ConvNorm2d(8, 3, padding=1, groups=2, eps=1e-3)
        self.unused = ConvNormConv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            y = F.conv2d(x, self.weight, padding=2, groups=2)
            x = self.stage(y, weight=self.weight)
        return x


def test_spectral_report_on_functional_sites() -> None:
    torch.manual_seed(0)
    model = _FunctionalSite()
    report = spectral_report(model, (8, 6, 5))
    assert [row.name for row in report.rows] == ["stage", "stage[1]"]
    assert report.not_called == ["unused.norm"]
    row = report.rows[0]
    assert row.groups == 2 and row.grid == (8, 7) and row.eps == 1e-3
    torch.testing.assert_close(
        row.spectral_norm_after,
        normalized_spectral_norm(model.weight, (8, 7), 1, 2, 1e-3).item(),
        rtol=tolerance(torch.float64) / 100,
        atol=tolerance(torch.float64) / 100,
    )
    # eps > 0 keeps each Q_k slightly below a tight frame.
    assert row.cond_max_before > row.cond_max_after > 1.0
    assert row.bound_after < math.sqrt(8)
    assert "unused.norm" in report.format_table()


def test_spectral_report_with_infinite_condition_writes_strict_json() -> None:
    conv = ConvNormConv2d(1, 2, (1, 2), eps=0.0, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 1.0]]], [[[1.0, 0.5]]]]))
    report = spectral_report(conv, (1, 1, 3))  # grid (1, 4): [1, 1] has an exact null
    assert math.isinf(report.rows[0].cond_max_before)
    decoded = json.loads(report.to_json())
    assert decoded["rows"][0]["cond_max_before"] == "inf"
    assert isinstance(report, SpectralReport)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: conv_singular_values(torch.randn(4, 3, 3), (5, 5)), id="weight-3d"),
        pytest.param(lambda: conv_singular_values(torch.randn(4, 3, 3, 3), (2, 5)), id="grid-smaller-than-kernel"),
        pytest.param(lambda: conv_spectral_norm(torch.randn(4, 3, 3, 3), (4, 4), dilation=2), id="grid-vs-dilation"),
        pytest.param(lambda: conv_singular_values(torch.randn(4, 3, 3, 3), (5,)), id="grid-one-number"),
        pytest.param(lambda: conv_singular_values(torch.randn(4, 3, 3, 3), (5, 5), groups=3), id="groups-not-dividing"),
        pytest.param(lambda: conv_spectral_norm(torch.randn(4, 3, 3, 3), (5, 5), groups=0), id="groups-zero"),
        pytest.param(lambda: normalized_singular_values(torch.randn(4, 3, 3, 3), (5, 5), eps=-1.0), id="eps-negative"),
        pytest.param(lambda: channel_condition_numbers(torch.randn(4, 3, 3, 3), (5, 5), dilation=0), id="dilation-0"),
        pytest.param(lambda: proposition31_bound(torch.randn(0, 3, 3, 3), (5, 5)), id="empty-weight"),
        pytest.param(lambda: spectral_report(_small_net(), (3, 0, 8)), id="report-input-size"),
        pytest.param(lambda: spectral_report(_small_net(), (3, 8, 8), batch_size=0), id="report-batch"),
    ],
)
def test_bad_arguments_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_bad_types_raise_type_error() -> None:
    with pytest.raises(TypeError):
        conv_singular_values(torch.ones(2, 2, 3, 3, dtype=torch.int64), (5, 5))
    with pytest.raises(TypeError):
        conv_singular_values(torch.randn(2, 2, 3, 3), (5, 5), dtype=torch.float16)
