"""The whole site pipeline ``conv_norm2d``: dense oracle, padding/stride/bypass equivalences,
1x1 fast path, gradients, mixed precision, degenerate weights, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from convnorm_fx import conv_norm2d, ops
from helpers import assert_close_scaled
from tolerances import tolerance
from oracles import conv_norm2d_dense
from strategies import conv_geometries, seeds, tiny_geometries


def _call(geometry, x, w, b, **kwargs):
    return conv_norm2d(
        x, w, b, geometry.stride, geometry.padding, geometry.dilation, geometry.groups, geometry.padding_mode, **kwargs
    )


def _plain_conv(geometry, x, w, b):
    return geometry.conv(dtype=x.dtype, device=x.device.type)._conv_forward(x, w, b)


def _spectrum_floor_ratio(geometry, w):
    """Smallest over largest kernel power on a fine grid (which samples the spectrum densely)."""
    grid = (geometry.height + 64, geometry.width + 64)
    power = ops.kernel_power_spectrum(w, grid, geometry.dilation)
    return float(power.min()) / max(float(power.max()), 1e-300)


def _well_conditioned(geometry, w, floor=1e-3):
    """Skip draws whose spectrum has a near-null: exact ConvNorm is ill-posed there."""
    return _spectrum_floor_ratio(geometry, w) > floor


@given(geometry=tiny_geometries, seed=seeds)
def test_matches_dense_oracle(geometry, seed):
    """Whole pipeline == independent dense construction (pad mode, embed, P A, crop, stride, bias)."""
    x, w, b = geometry.tensors(seed)
    expected = conv_norm2d_dense(geometry, x.numpy(), w.numpy(), None if b is None else b.numpy(), eps=1e-3)
    actual = _call(geometry, x, w, b, eps=1e-3)
    assert_close_scaled(actual, torch.from_numpy(expected))


@given(geometry=tiny_geometries, seed=seeds, algorithm=st.sampled_from(["direct", "spectral"]))
def test_matches_dense_oracle_with_the_affine_transform(geometry, seed, algorithm):
    """The affine transform r_k (§3.3, a "same" depthwise correlation of the kernel's size on the
    zero-extended normalized signal) and its bias, against the dense construction, by both algorithms."""
    x, w, b = geometry.tensors(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    affine_w = torch.randn(w.shape[0], 1, *geometry.kernel, generator=gen, dtype=torch.float64)
    affine_b = torch.randn(w.shape[0], generator=gen, dtype=torch.float64)
    expected = conv_norm2d_dense(
        geometry, x.numpy(), w.numpy(), None if b is None else b.numpy(), 1e-3, affine_w.numpy(), affine_b.numpy()
    )
    actual = _call(geometry, x, w, b, eps=1e-3, affine_weight=affine_w, affine_bias=affine_b, algorithm=algorithm)
    assert_close_scaled(actual, torch.from_numpy(expected))


@given(geometry=tiny_geometries, seed=seeds)
def test_matches_dense_oracle_exact_operator(geometry, seed):
    """eps=0 is the paper's exact operator."""
    x, w, b = geometry.tensors(seed)
    assume(_well_conditioned(geometry, w))
    expected = conv_norm2d_dense(geometry, x.numpy(), w.numpy(), None if b is None else b.numpy(), eps=0.0)
    # eps = 0: the gain reaches 1 / sqrt(min S_k), up to 30x on the draws kept, so round-off grows alike.
    assert_close_scaled(_call(geometry, x, w, b, eps=0.0), torch.from_numpy(expected), tol=100 * tolerance(torch.float64))


@given(geometry=conv_geometries(), seed=seeds)
def test_bypass_reproduces_plain_conv(geometry, seed, dtype):
    """Identity preconditioner: full conv -> crop -> stride -> bias == F.conv2d / nn.Conv2d."""
    x, w, b = geometry.tensors(seed, dtype=dtype)
    expected = _plain_conv(geometry, x, w, b)
    actual = _call(geometry, x, w, b, normalize=False)
    assert actual.shape == expected.shape
    assert_close_scaled(actual, expected)


@given(geometry=conv_geometries(), seed=seeds)
def test_stride_equals_sliced_unstrided_output(geometry, seed):
    """Strided output == stride-1 output sliced (Appendix B.4), affine transform included."""
    assume(geometry.stride != (1, 1))
    x, w, b = geometry.tensors(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    affine_w = torch.randn(w.shape[0], 1, *geometry.kernel, generator=gen, dtype=w.dtype)
    affine_b = torch.randn(w.shape[0], generator=gen, dtype=w.dtype)
    kwargs = dict(affine_weight=affine_w, affine_bias=affine_b)
    strided = _call(geometry, x, w, b, **kwargs)
    unstrided = conv_norm2d(x, w, b, 1, geometry.padding, geometry.dilation, geometry.groups, geometry.padding_mode, **kwargs)
    assert_close_scaled(strided, unstrided[..., :: geometry.stride[0], :: geometry.stride[1]])


@given(geometry=conv_geometries(padding_modes=("zeros",)), seed=seeds)
def test_padding_equivalence_circular_form(geometry, seed):
    """Appendix B.2: zero-embed x in the M-grid, circular cross-correlation, P_k, crop.

    Built from circular padding + a valid conv + full-plane FFTs, a different route from
    the library's full conv + rfft2."""
    x, w, b = geometry.tensors(seed)
    (kh, kw), (dh, dw) = geometry.kernel, geometry.dilation
    fh, fw = dh * (kh - 1), dw * (kw - 1)
    mh, mw = geometry.height + fh, geometry.width + fw
    embedded = F.pad(x, (0, fw, 0, fh))
    wrapped = F.pad(embedded, (fw, 0, fh, 0), mode="circular") if fh or fw else embedded
    circular = F.conv2d(wrapped, w, None, 1, 0, geometry.dilation, geometry.groups)  # (N, C_out, M_h, M_w)
    power = ops.kernel_power_spectrum(w, (mh, mw), geometry.dilation)
    z = torch.fft.irfft2(torch.fft.rfft2(circular) * (power + 1e-5).rsqrt(), s=(mh, mw))
    top, bottom, left, right = geometry.explicit_padding()
    out_h = geometry.height + top + bottom - fh
    out_w = geometry.width + left + right - fw
    window = torch.zeros(*z.shape[:2], out_h, out_w, dtype=z.dtype)
    for o in range(out_h):
        i = o + fh - top
        if 0 <= i < mh:
            lo, hi = max(0, left - fw), min(out_w, mw - fw + left)
            window[:, :, o, lo:hi] = z[:, :, i, lo + fw - left : hi + fw - left]
    expected = window[..., :: geometry.stride[0], :: geometry.stride[1]]
    if b is not None:
        expected = expected + b.reshape(1, -1, 1, 1)
    assert_close_scaled(_call(geometry, x, w, b, eps=1e-5), expected)


@given(geometry=conv_geometries(), seed=seeds)
def test_flipped_kernel_gives_the_same_normalization(geometry, seed):
    """Normalizing a conv output with the preconditioner of the flipped kernel changes nothing."""
    x, w, b = geometry.tensors(seed)
    assume(geometry.kernel != (1, 1))
    top, bottom, left, right = geometry.explicit_padding()
    fh, fw = ops.full_padding(geometry.kernel, geometry.dilation)
    if geometry.padding_mode != "zeros":
        x = ops.pad_for_mode(x, (top, bottom, left, right), geometry.padding_mode)
        top = bottom = left = right = 0
    y = F.conv2d(x, w, None, 1, (fh, fw), geometry.dilation, geometry.groups)
    pads = (top, bottom, left, right)
    flipped = ops.preconditioner_spectrum(w.flip(2, 3), y.shape[-2:], geometry.dilation)
    reference = ops.conv_norm_stage(y, w, b, geometry.stride, pads, geometry.dilation)
    assert_close_scaled(ops.conv_norm_stage(y, w, b, geometry.stride, pads, geometry.dilation, inv_sqrt=flipped), reference)


@given(geometry=conv_geometries(max_kernel=1), seed=seeds)
def test_1x1_fast_path_equals_general_path(geometry, seed):
    """The 1x1 shortcut (scale, strided conv) == full conv + FFT normalization + crop + stride."""
    x, w, b = geometry.tensors(seed)
    signal = x
    top, bottom, left, right = geometry.explicit_padding()
    if geometry.padding_mode != "zeros":
        signal = ops.pad_for_mode(x, (top, bottom, left, right), geometry.padding_mode)
        top = bottom = left = right = 0
    y = F.conv2d(signal, w, None, 1, 0, 1, geometry.groups)
    power = ops.kernel_power_spectrum(w, y.shape[-2:])
    general = ops.crop_and_downsample(
        ops.normalize_circular(y, ops.inverse_sqrt_spectrum(power, 1e-5)), 1, geometry.stride, (top, bottom, left, right)
    )
    if b is not None:
        general = general + b.reshape(1, -1, 1, 1)
    assert_close_scaled(_call(geometry, x, w, b), general)


@pytest.mark.parametrize("kernel", [(1, 3), (3, 1), (1, 5)])
def test_1xk_and_kx1_take_the_general_path(kernel, monkeypatch):
    """Only kernels that are 1 on both sides have a flat spectrum."""
    def _forbidden(*args, **kwargs):
        raise AssertionError("1x1 fast path taken for a non-1x1 kernel")

    monkeypatch.setattr(ops, "scale_1x1", _forbidden)  # the stage's 1x1 path
    monkeypatch.setattr(ops, "scale_1x1_factor", _forbidden)  # the site's 1x1 weight folding
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 3, *kernel, dtype=torch.float64)
    out = conv_norm2d(x, w, padding=(kernel[0] // 2, kernel[1] // 2))
    flat = F.conv2d(x, w, padding=(kernel[0] // 2, kernel[1] // 2)) * w.square().sum((1, 2, 3)).add(1e-5).rsqrt().reshape(1, -1, 1, 1)
    assert not torch.allclose(out, flat, atol=1e-3)


def _reference_pipeline(geometry, x, w, b, detach):
    """Independent autograd reference: direct FFT spectrum, full-plane FFTs, slicing crop."""
    top, bottom, left, right = geometry.explicit_padding()
    if geometry.padding_mode != "zeros":
        x = ops.pad_for_mode(x, (top, bottom, left, right), geometry.padding_mode)
        top = bottom = left = right = 0
    fh, fw = ops.full_padding(geometry.kernel, geometry.dilation)
    y = F.conv2d(x, w, None, 1, (fh, fw), geometry.dilation, geometry.groups)
    mh, mw = y.shape[-2:]
    source = w.detach() if detach else w
    rows = torch.arange(geometry.kernel[0]) * geometry.dilation[0]
    cols = torch.arange(geometry.kernel[1]) * geometry.dilation[1]
    canvas = torch.zeros(*source.shape[:2], mh, mw, dtype=source.dtype)
    canvas[:, :, rows[:, None], cols[None, :]] = source  # the zero-stuffed (dilated) kernel
    power = torch.fft.fft2(canvas).abs().square().sum(1)
    z = torch.fft.ifft2(torch.fft.fft2(y) * (power + 1e-5).rsqrt()).real
    z = F.pad(z, (left - fw, right - fw, top - fh, bottom - fh))[..., :: geometry.stride[0], :: geometry.stride[1]]
    return z if b is None else z + b.reshape(1, -1, 1, 1)


@given(geometry=conv_geometries(max_channels=2), seed=seeds, stop_gradient=st.booleans())
def test_gradients_match_independent_reference(geometry, seed, stop_gradient):
    """Weight/input/bias gradients equal autograd through an independent implementation,
    with the spectrum detached (stop-gradient, §3.3) or not."""
    x, w, b = geometry.tensors(seed)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    grad_out = torch.randn_like(_call(geometry, x, w, b))
    ours = torch.autograd.grad((_call(geometry, *leaves[:2], leaves[2] if b is not None else None, stop_gradient=stop_gradient) * grad_out).sum(), leaves)
    leaves_ref = [t.clone().requires_grad_() for t in leaves]
    ref_out = _reference_pipeline(geometry, leaves_ref[0], leaves_ref[1], leaves_ref[2] if b is not None else None, stop_gradient)
    theirs = torch.autograd.grad((ref_out * grad_out).sum(), leaves_ref)
    for mine, ref in zip(ours, theirs):
        assert_close_scaled(mine, ref, tol=100 * tolerance(torch.float64))


def test_gradcheck_full_gradient():
    """Without stop-gradient the gradient through the spectrum passes float64 gradcheck."""
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: conv_norm2d(x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2), stop_gradient=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    w1 = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    fn1 = lambda x, w: conv_norm2d(x, w, stride=2, stop_gradient=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn1, (x, w1))


def test_stop_gradient_differs_from_full_gradient():
    """The two gradient modes really are different (so the tests above can tell them apart)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g_stop, = torch.autograd.grad(conv_norm2d(x, w, padding=1).square().sum(), w)
    g_full, = torch.autograd.grad(conv_norm2d(x, w, padding=1, stop_gradient=False).square().sum(), w)
    assert not torch.allclose(g_stop, g_full, rtol=1e-3)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_zero_channels_stay_finite(kernel, eps):
    x = torch.randn(2, 3, 7, 7)
    w = torch.randn(4, 3, kernel, kernel)
    w[1] = 0.0
    b = torch.randn(4)
    out = conv_norm2d(x, w, b, padding=kernel // 2, eps=eps)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], b[1].expand_as(out[:, 1]))
    out_zero = conv_norm2d(x, torch.zeros_like(w), padding=kernel // 2, eps=eps)
    assert torch.isfinite(out_zero).all() and out_zero.abs().max() == 0


def test_eps_bounds_the_gain_for_tiny_channel_energy():
    """A channel with tiny energy is amplified by at most eps ** -0.5 (in l2 over the grid)."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64) * 1e-8
    eps = 1e-4
    y = F.conv2d(x, w, padding=2)
    z = ops.normalize_circular(y, ops.preconditioner_spectrum(w, y.shape[-2:], eps=eps))
    gain = z.flatten(2).norm(dim=2) / y.flatten(2).norm(dim=2)
    assert float(gain.max()) <= eps**-0.5 * (1 + 1e-9)
    # With a 1e-8 kernel, S ~ 1e-15 << eps: the gain sits right at the bound, not above it.
    assert float(gain.min()) > 0.9 * eps**-0.5
    assert torch.isfinite(z).all()


def test_dtype_in_equals_dtype_out(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    assert conv_norm2d(x, w, padding=1).dtype == torch.float32
    assert conv_norm2d(x.double(), w.double(), padding=1).dtype == torch.float64
    assert conv_norm2d(x.bfloat16(), w.bfloat16(), padding=1).dtype == torch.bfloat16


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 2)])
def test_bf16_autocast_cpu_within_tolerance(kernel, stride):
    """Under CPU bf16 autocast the conv runs in bf16 and the FFT in float32; the result comes
    back in bf16 within 3e-2 (relative to the output's scale) of the float32 result."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 12, 12)
    w = torch.randn(8, 16, kernel, kernel) * 0.1
    b = torch.randn(8)
    reference = conv_norm2d(x, w, b, stride, kernel // 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = conv_norm2d(x, w, b, stride, kernel // 2)
    assert mixed.dtype == torch.bfloat16
    assert torch.isfinite(mixed).all()
    assert_close_scaled(mixed.float(), reference, tol=tolerance(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_autocast_cuda_within_tolerance():
    x = torch.randn(4, 16, 13, 11, device="cuda")
    w = torch.randn(8, 16, 3, 3, device="cuda") * 0.1
    reference = conv_norm2d(x, w, None, 2, 1)
    with torch.autocast("cuda", dtype=torch.float16):
        mixed = conv_norm2d(x, w, None, 2, 1)
    assert mixed.dtype == torch.float16
    assert_close_scaled(mixed.float(), reference, tol=tolerance(torch.float16))


@given(geometry=conv_geometries(max_channels=2), seed=seeds)
def test_device_matches_cpu_float64(geometry, seed, device, dtype):
    """The same pipeline on every device and dtype agrees with CPU float64."""
    x, w, b = geometry.tensors(seed)
    reference = _call(geometry, x, w, b)
    xs, ws, bs = geometry.tensors(seed, dtype=dtype, device=device)
    if dtype == torch.float64:
        tol = tolerance(torch.float64)
    else:
        # Round-off is amplified by the preconditioner's gain, 1/sqrt of the spectrum's floor.
        ratio = _spectrum_floor_ratio(geometry, w)
        assume(ratio > 1e-6)
        tol = min(1e-2, max(1e-4, 1e-5 / ratio**0.5))
    assert_close_scaled(_call(geometry, xs, ws, bs).cpu(), reference, tol=tol)


def test_input_errors_are_clear():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="4-D input"):
        conv_norm2d(torch.randn(3, 8, 8), w)
    with pytest.raises(ValueError, match="channels"):
        conv_norm2d(torch.randn(1, 5, 8, 8), w)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv_norm2d(torch.randn(1, 3, 2, 8), w)
    with pytest.raises(ValueError, match="padding_mode"):
        conv_norm2d(torch.randn(1, 3, 8, 8), w, padding_mode="mirror")
    with pytest.raises(ValueError, match="'same' is not supported for strided"):
        conv_norm2d(torch.randn(1, 3, 8, 8), w, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding"):
        conv_norm2d(torch.randn(1, 3, 8, 8), w, padding="full")
    with pytest.raises(ValueError, match="stride"):
        conv_norm2d(torch.randn(1, 3, 8, 8), w, stride=0)
    with pytest.raises(ValueError, match="groups"):
        conv_norm2d(torch.randn(1, 3, 8, 8), w, groups=3)
    with pytest.raises(ValueError, match="eps"):
        conv_norm2d(torch.randn(1, 3, 8, 8), w, eps=-1.0)


def test_output_has_conv_shape_for_odd_geometries():
    """Padding larger than the full padding, 'valid', anisotropic everything."""
    x = torch.randn(1, 2, 7, 10)
    w = torch.randn(3, 2, 2, 3)
    for padding, stride, dilation in [((4, 0), (2, 3), (2, 1)), ("valid", 1, (1, 3)), (0, (3, 1), 1)]:
        expected = F.conv2d(x, w, None, stride, padding, dilation)
        assert conv_norm2d(x, w, None, stride, padding, dilation).shape == expected.shape
    assert np.isfinite(conv_norm2d(x, w, None, 1, 5).numpy()).all()
