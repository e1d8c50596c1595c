"""The fast paths of the ConvNorm math equal the step-by-step pipeline to round-off.

The reference is the pipeline of Appendix B written with the public building blocks: full
conv -> ``normalize_circular`` (rfft2, multiply, irfft2) -> affine depthwise conv on the
zero-extended signal -> crop -> stride -> biases. Against it, in float64 and with
gradients:

* the spectral algorithm (the whole site in the frequency domain, from the input), with
  DFT matrices and with FFTs, in one block and in several blocks of output channels;
* the direct algorithm's fused stage (``conv_norm_stage`` on a full conv output);
* the 1x1 path that folds the flat preconditioner into the conv weight;
* the Gram-matrix kernel autocorrelation;
* the module's ``forward_from_input`` and the straightforward Algorithm 1 baseline of
  ``benchmarks/naive_convnorm.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from convnorm_fx import ConvNormConv2d, conv_norm2d, dft, ops, pipeline, spectral, spectrum
from convnorm_fx import geometry as geometry_module
from helpers import assert_close_scaled
from tolerances import tolerance
from strategies import conv_geometries, seeds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.naive_convnorm import naive_conv_norm2d  # noqa: E402

#: Small geometries: gradients of a float64 reference are taken for every draw.
geometries = conv_geometries(max_kernel=5, max_stride=3, max_dilation=2, max_channels=3, max_groups=2, max_extra_size=5)


def _spy(monkeypatch, module, name):
    """Count the calls of ``module.name`` (a route's own function), so that a test can check
    that the route it forces is the one taken: a patch without effect then fails the test."""
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(name) or original(*args, **kwargs))
    return calls


def _force_routes(monkeypatch, route, kernel_route):
    """Force signal transforms by DFT matrices or FFTs, and kernels to the grid by phase
    tables or FFTs; return the spies that show which ran."""
    monkeypatch.setattr(dft, "DFT_MAX_GRID", 64 if route == "dft" else 0)
    monkeypatch.setattr(spectral, "KERNEL_FFT_FACTOR", 1e9 if kernel_route == "table" else 0.0)
    monkeypatch.setattr(spectral, "KERNEL_FFT_MIN_TAPS", 0)
    return _spy(monkeypatch, dft, "half_forward_table"), _spy(monkeypatch, spectral, "_tap_table")


def _in_layout(t, layout):
    """``t`` in the memory layout a test runs in."""
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _spy_layout_routes(monkeypatch):
    """Spies on the transforms that keep the channels innermost (channels_last signals)."""
    return _spy(monkeypatch, dft, "_to_spectrum_channels_last"), _spy(monkeypatch, dft, "_from_spectrum_channels_last")


def _assert_layout(out, signal, layout, route, layout_spies):
    """A channels_last site gives a channels_last output, by the channels-innermost transforms
    where the signal is unambiguously laid out that way and transformed by DFT matrices."""
    if layout != "channels_last" or not geometry_module.is_channels_last(signal):
        return  # (one channel, or a 1x1 signal: both layouts at once, and the output is contiguous)
    assert out.is_contiguous(memory_format=torch.channels_last)
    if route == "dft":
        assert layout_spies[0] and layout_spies[1], "the channels_last transforms did not run"


def _assert_routes(spies, route, kernel_route, kernels_used=True):
    dft_calls, table_calls = spies
    assert bool(dft_calls) == (route == "dft"), f"signal transforms did not take the {route} route"
    if kernels_used:
        assert bool(table_calls) == (kernel_route == "table"), f"kernels did not take the {kernel_route} route"


def _signal_and_pads(geometry, x):
    """The signal the conv sees (mode padding applied) and its zero padding."""
    pads = geometry.explicit_padding()
    if geometry.padding_mode != "zeros":
        return ops.pad_for_mode(x, pads, geometry.padding_mode), (0, 0, 0, 0)
    return x, pads


def _reference(geometry, x, w, b, affine_w, affine_b, eps=1e-5):
    """Appendix B step by step, from the public building blocks."""
    signal, pads = _signal_and_pads(geometry, x)
    full = ops.full_padding(geometry.kernel, geometry.dilation)
    y = F.conv2d(signal, w, None, 1, full, geometry.dilation, geometry.groups)
    inv = ops.preconditioner_spectrum(w, y.shape[-2:], geometry.dilation, eps)
    z = ops.normalize_circular(y, inv)
    if affine_w is not None:
        k, s, d = geometry.kernel, geometry.stride, geometry.dilation
        out = pipeline.affine_crop_downsample(z, k, s, pads, d, affine_w, affine_b)
    else:
        out = ops.crop_and_downsample(z, geometry.kernel, geometry.stride, pads, geometry.dilation)
        if affine_b is not None:
            out = out + affine_b.reshape(1, -1, 1, 1)
    return out if b is None else out + b.reshape(1, -1, 1, 1)


def _affine(geometry, seed, dtype=torch.float64, device="cpu", bias=True):
    gen = torch.Generator().manual_seed(seed + 7)
    weight = torch.randn(geometry.out_channels, 1, *geometry.kernel, generator=gen, dtype=torch.float64)
    offset = torch.randn(geometry.out_channels, generator=gen, dtype=torch.float64) if bias else None
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(weight), move(offset)


def _values_and_grads(fn, leaves, seed):
    """Output of ``fn(*leaves)`` and the gradients of a fixed random projection of it."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out * weights.to(out)).sum(), present)
    return out, grads


def _assert_same(fast, reference, tol=None, grad_tol=None):
    out, grads = fast
    ref_out, ref_grads = reference
    assert out.shape == ref_out.shape
    tol = tolerance(torch.float64) if tol is None else tol
    grad_tol = tolerance(torch.float64) if grad_tol is None else grad_tol
    assert_close_scaled(out, ref_out, tol=tol)
    for mine, theirs in zip(grads, ref_grads):
        assert_close_scaled(mine, theirs, tol=grad_tol)


def _spectral_applies(geometry, x, w, affine_w) -> bool:
    signal, pads = _signal_and_pads(geometry, x)
    plan = ops.resolve_algorithm(
        "spectral", signal, w, geometry.stride, pads, geometry.dilation, geometry.groups, affine_w, True
    )
    return plan is not None


def _check_spectral_site(geometry, seed, with_affine, layout="contiguous"):
    """Values and gradients of ``conv_norm2d(algorithm='spectral')`` against the reference;
    returns the output."""
    x, w, b = geometry.tensors(seed)
    affine_w, affine_b = _affine(geometry, seed) if with_affine else (None, None)
    assume(geometry.kernel != (1, 1) and _spectral_applies(geometry, x, w, affine_w))

    def fast(x, w, b, affine_w, affine_b):
        return conv_norm2d(
            _in_layout(x, layout), w, b, geometry.stride, geometry.padding, geometry.dilation, geometry.groups, geometry.padding_mode,
            affine_weight=affine_w, affine_bias=affine_b, algorithm="spectral",
        )

    leaves = [x, w, b, affine_w, affine_b]
    reference = _values_and_grads(lambda *t: _reference(geometry, *t), leaves, seed)
    fast_values = _values_and_grads(fast, leaves, seed)
    _assert_same(fast_values, reference)
    return fast_values[0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel_route", ["table", "kernel-fft"])
@pytest.mark.parametrize("route", ["dft", "fft"])
@given(geometry=geometries, seed=seeds, with_affine=st.booleans())
def test_spectral_algorithm_equals_reference(geometry, seed, with_affine, route, kernel_route, layout, monkeypatch):
    """Values and gradients (input, weight, bias, affine kernel and bias) of the spectral algorithm,
    with signals transformed by DFT matrices or FFTs, kernels (forward) and their gradients
    (backward) by phase tables or FFTs, on contiguous and channels_last inputs."""
    spies = _force_routes(monkeypatch, route, kernel_route)
    layout_spies = _spy_layout_routes(monkeypatch)
    out = _check_spectral_site(geometry, seed, with_affine, layout)
    _assert_routes(spies, route, kernel_route)
    signal, _ = _signal_and_pads(geometry, _in_layout(geometry.tensors(seed)[0], layout))
    _assert_layout(out, signal, layout, route, layout_spies)


@pytest.mark.parametrize("forward_blocks", ["frequency", "channel"])
@given(geometry=conv_geometries(max_kernel=3, max_stride=2, max_dilation=1, max_channels=4, max_groups=1), seed=seeds)
def test_spectral_algorithm_in_channel_blocks(geometry, seed, forward_blocks, monkeypatch):
    """Building the kernel spectrum in blocks of output channels or of frequencies, forward
    and backward, changes nothing (values and every gradient against the reference)."""
    monkeypatch.setattr(spectral, "KERNEL_BLOCK_BYTES", 1)  # one output channel (or frequency) per block
    monkeypatch.setattr(spectral, "FREQUENCY_BLOCKS_FACTOR", 0.0 if forward_blocks == "frequency" else float("inf"))
    blocks, frequency_blocks = [], []
    original, original_frequencies = spectral._channel_blocks, spectral._frequency_blocks
    monkeypatch.setattr(spectral, "_channel_blocks", lambda *a: blocks.append(original(*a)) or blocks[-1])
    monkeypatch.setattr(
        spectral, "_frequency_blocks", lambda *a: frequency_blocks.append(original_frequencies(*a)) or frequency_blocks[-1]
    )
    _check_spectral_site(geometry, seed, with_affine=True)
    if forward_blocks == "frequency":
        # Forward and backward both, F > 1 for every kernel > 1x1.
        assert len(frequency_blocks) == 2 and all(len(b) > 1 for b in frequency_blocks) and not blocks
    else:
        assert not frequency_blocks
        assert any(len(b) == geometry.out_channels > 1 for b in blocks) or geometry.out_channels == 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel_route", ["table", "kernel-fft"])
@pytest.mark.parametrize("route", ["dft", "fft"])
@given(geometry=geometries, seed=seeds, with_affine=st.booleans())
def test_direct_stage_equals_reference(geometry, seed, with_affine, route, kernel_route, layout, monkeypatch):
    """``conv_norm_stage`` on a full conv output (normalization, affine, crop, stride fused), in
    both memory layouts."""
    spies = _force_routes(monkeypatch, route, kernel_route)
    layout_spies = _spy_layout_routes(monkeypatch)
    x, w, b = geometry.tensors(seed)
    affine_w, affine_b = _affine(geometry, seed) if with_affine else (None, None)
    _, pads = _signal_and_pads(geometry, x)
    feed_stride, feed_padding = ops.feeding_conv_args(geometry.kernel, geometry.stride, pads, geometry.dilation)

    def fast(x, w, b, affine_w, affine_b):
        signal, _ = _signal_and_pads(geometry, x)
        y = _in_layout(F.conv2d(signal, w, None, feed_stride, feed_padding, geometry.dilation, geometry.groups), layout)
        return ops.conv_norm_stage(
            y, w, b, geometry.stride, pads, geometry.dilation, affine_weight=affine_w, affine_bias=affine_b
        )

    leaves = [x, w, b, affine_w, affine_b]
    reference = _values_and_grads(lambda *t: _reference(geometry, *t), leaves, seed)
    for spy in (*spies, *layout_spies):
        spy.clear()
    fast_values = _values_and_grads(fast, leaves, seed)
    _assert_same(fast_values, reference)
    if geometry.kernel != (1, 1) and _stage_is_fused(geometry, x, affine_w):
        # The fused stage transforms the conv output; kernels go to the grid only for the affine kernel.
        _assert_routes(spies, route, kernel_route, kernels_used=affine_w is not None)
        signal, _ = _signal_and_pads(geometry, x)
        y = F.conv2d(signal, w, None, feed_stride, feed_padding, geometry.dilation, geometry.groups)
        _assert_layout(fast_values[0], _in_layout(y, layout), layout, route, layout_spies)


def _stage_is_fused(geometry, x, affine_w) -> bool:
    signal, pads = _signal_and_pads(geometry, x)
    return spectral.spectral_plan(
        signal, signal.shape[-2:], geometry.kernel, geometry.stride, pads, geometry.dilation, 1, affine_w, x.dtype
    ) is not None


@given(geometry=conv_geometries(max_kernel=1), seed=seeds, stop_gradient=st.booleans())
def test_1x1_weight_folding_equals_reference(geometry, seed, stop_gradient):
    """1x1: the preconditioner and the affine scale folded into the conv weight, with gradients."""
    x, w, b = geometry.tensors(seed)
    affine_w, affine_b = _affine(geometry, seed)

    def fast(x, w, b, affine_w, affine_b):
        return conv_norm2d(
            x, w, b, geometry.stride, geometry.padding, geometry.dilation, geometry.groups, geometry.padding_mode,
            stop_gradient=stop_gradient, affine_weight=affine_w, affine_bias=affine_b,
        )

    def reference(x, w, b, affine_w, affine_b):
        signal, pads = _signal_and_pads(geometry, x)
        y = F.conv2d(signal, w, None, geometry.stride, (pads[0], pads[2]), geometry.dilation, geometry.groups)
        out = pipeline.scale_1x1(y, w, 1e-5, stop_gradient, affine_w, affine_b, None)
        return out if b is None else out + b.reshape(1, -1, 1, 1)

    leaves = [x, w, b, affine_w, affine_b]
    # Without stop-gradient the weight gradient of a 1x1 site nearly cancels (ConvNorm is
    # scale invariant): what is left can be 1e-10 of its terms, so compare it less tightly.
    _assert_same(_values_and_grads(fast, leaves, seed), _values_and_grads(reference, leaves, seed), grad_tol=100 * tolerance(torch.float64))


@pytest.mark.parametrize("route", ["gram", "fft"])
@given(geometry=conv_geometries(), seed=seeds)
def test_gram_autocorrelation_equals_grouped_conv(geometry, seed, route, monkeypatch):
    """``kernel_autocorrelation`` (Gram matrices of the taps, or FFTs on the (2k-1)-grid for
    large kernels) == its definition as a grouped conv."""
    monkeypatch.setattr(spectrum, "AUTOCORRELATION_FFT_TAPS", 10**9 if route == "gram" else 0)
    calls = _spy(monkeypatch, spectrum, f"autocorrelation_by_{route}")
    _, w, _ = geometry.tensors(seed)
    c_out, c_in, kh, kw = w.shape
    definition = F.conv2d(w.reshape(1, c_out * c_in, kh, kw), w, padding=(kh - 1, kw - 1), groups=c_out)[0]
    assert_close_scaled(ops.kernel_autocorrelation(w), definition)
    assert calls, f"the {route} route was not taken"


@pytest.mark.parametrize("algorithm", ["direct", "spectral"])
@given(geometry=geometries, seed=seeds)
def test_module_site_equals_stage_call(geometry, seed, algorithm):
    """``ConvNormConv2d`` (one-call site) == full conv + its ``ConvNorm2d`` stage called on it."""
    torch.manual_seed(seed % 1000)
    conv = ConvNormConv2d.from_conv(geometry.conv(), affine_init="default", algorithm=algorithm)
    x = geometry.tensors(seed)[0]
    signal, _ = _signal_and_pads(geometry, x)
    stage = conv.norm
    y = F.conv2d(signal, conv.weight, None, stage.feeding_stride, stage.feeding_padding, conv.dilation, conv.groups)
    for training in (True, False):
        conv.train(training)
        assert_close_scaled(conv(x), conv.norm(y, conv.weight, conv.bias), tol=tolerance(torch.float64))


def test_module_keeps_the_stage_call_for_hooks():
    """A forward hook on the stage sees the full conv output, as before."""
    conv = ConvNormConv2d(3, 4, 3, padding=1).double()
    seen = []
    conv.norm.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = conv(x)
    assert seen == [(2, 4, 10, 10)]
    conv.norm._forward_pre_hooks.clear()
    assert_close_scaled(conv(x), out, tol=tolerance(torch.float64))


@given(geometry=geometries, seed=seeds)
def test_naive_baseline_equals_library(geometry, seed):
    """The Algorithm 1 baseline of the benchmarks computes the library's numbers."""
    x, w, b = geometry.tensors(seed)
    affine_w, affine_b = _affine(geometry, seed)
    signal, pads = _signal_and_pads(geometry, x)
    naive = naive_conv_norm2d(
        signal, w, b, geometry.stride, pads, geometry.dilation, geometry.groups, 1e-5, affine_w, affine_b
    )
    assert_close_scaled(naive, _reference(geometry, x, w, b, affine_w, affine_b), tol=tolerance(torch.float64))


@pytest.mark.parametrize("algorithm", ["direct", "spectral"])
def test_float64_stays_float64_and_bf16_autocast(algorithm, device):
    x = torch.randn(2, 6, 11, 9, device=device)
    conv = ConvNormConv2d(6, 8, 3, stride=2, padding=1, affine_init="default", algorithm=algorithm).to(device)
    reference = conv(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = conv(x)
    assert mixed.dtype == torch.bfloat16 and torch.isfinite(mixed).all()
    assert_close_scaled(mixed.float(), reference, tol=tolerance(torch.bfloat16))
    mixed.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()
    conv = conv.double()
    x64 = x.double().requires_grad_(True)
    out = conv(x64)
    out.sum().backward()
    assert out.dtype == torch.float64 and x64.grad.dtype == torch.float64 and conv.weight.grad.dtype == torch.float64


@pytest.mark.parametrize("algorithm", ["direct", "spectral"])
def test_channels_last_in_channels_last_out(algorithm, device):
    conv = ConvNormConv2d(5, 7, 3, padding=1, affine_init="default", algorithm=algorithm).to(device).double()
    x = torch.randn(2, 5, 9, 10, device=device, dtype=torch.float64)
    expected = conv(x)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = conv(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(out, expected, tol=tolerance(torch.float64))
    out.sum().backward()
    assert x_cl.grad is not None and torch.isfinite(x_cl.grad).all()


@given(geometry=conv_geometries(max_channels=2), seed=seeds)
def test_spectral_on_device_matches_cpu(geometry, seed, device):
    """The spectral algorithm on every device agrees with the CPU float64 reference (float32 there)."""
    x, w, b = geometry.tensors(seed)
    affine_w, affine_b = _affine(geometry, seed)
    assume(geometry.kernel != (1, 1) and _spectral_applies(geometry, x, w, affine_w))
    # float32 needs a well-conditioned kernel: a dominant centre tap keeps |A_k0| >= 1 at
    # every frequency, so the spectrum S_k is bounded away from zero.
    centre = ((geometry.kernel[0] - 1) // 2, (geometry.kernel[1] - 1) // 2)
    w[:, 0, centre[0], centre[1]] += 1.0 + w[:, 0].abs().sum(dim=(1, 2))
    expected = _reference(geometry, x, w, b, affine_w, affine_b)
    xs, bs = geometry.tensors(seed, dtype=torch.float32, device=device)[::2]
    ws = w.to(device=device, dtype=torch.float32)
    aws, abs_ = _affine(geometry, seed, dtype=torch.float32, device=device)
    actual = conv_norm2d(
        xs, ws, bs, geometry.stride, geometry.padding, geometry.dilation, geometry.groups, geometry.padding_mode,
        affine_weight=aws, affine_bias=abs_, algorithm="spectral",
    )
    assert_close_scaled(actual.cpu().double(), expected, tol=5 * tolerance(torch.float32))


def test_select_algorithm():
    assert ops.select_algorithm((8, 16, 32, 32), (16, 16, 1, 1)) == "direct"
    for training in (True, False):
        assert ops.select_algorithm((32, 64, 32, 32), (64, 64, 3, 3), training=training) in ("direct", "spectral")
    direct, spectral = ops.site_costs((32, 64, 32, 32), (128, 64, 3, 3), stride=2)
    assert direct > 0 and spectral > 0
    with pytest.raises(ValueError, match="algorithm"):
        conv_norm2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), algorithm="fastest")
