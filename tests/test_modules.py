"""ConvNorm2d / ConvNormConv2d / bypass: drop-in behaviour, state, caches, options."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

from convnorm_fx import ConvNorm2d, ConvNormConv2d, bypass, conv_norm2d
from helpers import assert_close_scaled
from strategies import conv_geometries, seeds


@given(geometry=conv_geometries(), seed=seeds)
def test_bypass_reproduces_nn_conv2d(geometry, seed, device, dtype):
    """Inside ``bypass`` a ConvNormConv2d (with affine and BN) is exactly its nn.Conv2d."""
    torch.manual_seed(seed % 1000)
    conv = geometry.conv(dtype=dtype, device=device)
    wrapped = ConvNormConv2d.from_conv(conv, bn=True, affine_init="default")
    x = geometry.tensors(seed, dtype=dtype, device=device)[0]
    for mode in (True, False):
        wrapped.train(mode)
        conv.train(mode)
        with bypass(wrapped):
            assert_close_scaled(wrapped(x), conv(x))
    assert not wrapped.norm.bypassed  # restored


@given(geometry=conv_geometries(), seed=seeds)
def test_module_equals_functional(geometry, seed):
    conv = geometry.conv()
    x = geometry.tensors(seed)[0]
    module = ConvNormConv2d.from_conv(conv, affine=False, eps=1e-3)
    expected = conv_norm2d(
        x, conv.weight, conv.bias, conv.stride, geometry.padding, conv.dilation, conv.groups, conv.padding_mode, eps=1e-3
    )
    assert_close_scaled(module(x), expected)
    # The identity-initialized affine transform changes nothing.
    assert_close_scaled(ConvNormConv2d.from_conv(conv, eps=1e-3)(x), expected)


def test_from_conv_shares_parameters_and_keeps_names():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    wrapped = ConvNormConv2d.from_conv(conv)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias
    keys = set(wrapped.state_dict())
    assert {"weight", "bias"} <= keys
    missing, unexpected = wrapped.load_state_dict(conv.state_dict(), strict=False)
    assert set(missing) == {"norm.affine_weight", "norm.affine_bias"} and not unexpected
    assert wrapped.norm.affine_weight.device == conv.weight.device


def test_from_conv_rejects_semantics_changing_subclasses():
    class Standardized(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    with pytest.raises(TypeError, match="overrides"):
        ConvNormConv2d.from_conv(Standardized(3, 4, 3))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        ConvNormConv2d.from_conv(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="already"):
        ConvNormConv2d.from_conv(ConvNormConv2d(3, 4, 3))


def test_gradients_reach_every_parameter():
    conv = ConvNormConv2d(4, 6, 3, stride=2, padding=1, bn=True)
    conv(torch.randn(2, 4, 9, 9)).square().mean().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_affine_inits():
    stage = ConvNorm2d(4, (2, 3))
    centre = torch.zeros(2, 3)
    centre[0, 1] = 1.0  # 'same' puts the smaller half of the halo first
    torch.testing.assert_close(stage.affine_weight[:, 0], centre.expand(4, 2, 3))
    assert stage.affine_bias.abs().sum() == 0
    default = ConvNorm2d(4, 3, affine_init="default")
    assert default.affine_weight.std() > 0 and default.affine_bias.abs().sum() > 0
    assert ConvNorm2d(4, 3, affine=False).affine_weight is None


def test_eval_cache_is_reused_and_invalidated():
    conv = ConvNormConv2d(3, 4, 3, padding=1, eps=0.0).eval()
    x = torch.randn(1, 3, 8, 8)
    calls = []
    original = conv.norm.compute_preconditioner

    def counting(weight, grid):
        calls.append(grid)
        return original(weight, grid)

    conv.norm.compute_preconditioner = counting
    first = conv(x)
    conv(x)
    assert len(calls) == 1  # cached
    conv(torch.randn(1, 3, 10, 10))
    assert len(calls) == 2  # new input size, new grid
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in-place update bumps the version
    second = conv(x)
    assert len(calls) == 3
    # Exact ConvNorm is scale invariant: doubling the weight leaves the output unchanged,
    # which a stale cache (spectrum of the old weight) would not.
    assert_close_scaled(second, first, tol=1e-4)
    conv.train()
    conv(x)
    conv(x)
    assert len(calls) == 5  # training never caches
    assert not any("cache" in k for k in conv.state_dict())


def test_eval_cache_is_not_fooled_by_a_new_parameter():
    conv = ConvNormConv2d(3, 4, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 3, 8, 8)
    conv(x)
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))
    expected = conv_norm2d(x, conv.weight, padding=1)
    assert_close_scaled(conv(x), expected)


def test_running_spectrum_is_shape_safe_and_loads():
    torch.manual_seed(0)
    conv = ConvNormConv2d(3, 4, 3, padding=1, eval_spectrum="running", momentum=1.0, bias=False)
    conv.train()
    conv(torch.randn(2, 3, 16, 16))
    conv.eval()
    # momentum=1: the running statistics are the current weight's, so eval equals exact ConvNorm at any size.
    for size in (8, 16, 23):
        x = torch.randn(1, 3, size, size)
        assert_close_scaled(conv(x), conv_norm2d(x, conv.weight, padding=1), tol=1e-4)
    fresh = ConvNormConv2d(3, 4, 3, padding=1, eval_spectrum="running", bias=False).eval()
    fresh.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 11, 11)
    torch.testing.assert_close(fresh(x), conv(x))
    assert "norm.running_autocorrelation" in conv.state_dict()


def test_running_spectrum_before_training_is_identity_preconditioner():
    conv = ConvNormConv2d(3, 4, 3, padding=1, eval_spectrum="running", affine=False).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1) / (1 + 1e-5) ** 0.5)


def test_bypass_restores_after_error():
    conv = ConvNormConv2d(3, 4, 3)
    with pytest.raises(RuntimeError):
        with bypass(conv):
            raise RuntimeError("boom")
    assert conv.norm.bypassed is False


def test_copy_pickle_and_save_load_whole_module():
    conv = ConvNormConv2d(3, 4, 3, padding=1, bn=True).eval()
    x = torch.randn(1, 3, 8, 8)
    expected = conv(x)  # fills the eval cache, which holds a weak reference
    clone = copy.deepcopy(conv)
    torch.testing.assert_close(clone(x), expected)
    restored = pickle.loads(pickle.dumps(conv))
    torch.testing.assert_close(restored(x), expected)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), expected)


def test_float64_and_to_device_dtype():
    conv = ConvNormConv2d(3, 4, 3, padding=1).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert conv(x).dtype == torch.float64
    conv.float()
    assert conv(x.float()).dtype == torch.float32


def test_repr_and_options_validation():
    conv = ConvNormConv2d(3, 4, 3, stride=2, padding=1, dilation=2, groups=1, bn=True)
    text = repr(conv)
    assert "ConvNorm2d(" in text and "BatchNorm2d" in text and "dilation=(2, 2)" in text and "affine=True" in text
    with pytest.raises(ValueError, match="affine_init"):
        ConvNorm2d(4, 3, affine_init="zeros")
    with pytest.raises(ValueError, match="eval_spectrum"):
        ConvNorm2d(4, 3, eval_spectrum="ema")
    with pytest.raises(ValueError, match="eps"):
        ConvNorm2d(4, 3, eps=-1)
    with pytest.raises(ValueError, match="momentum"):
        ConvNorm2d(4, 3, momentum=2.0)
    with pytest.raises(ValueError, match="'same'"):
        ConvNorm2d(4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="4-D input"):
        ConvNormConv2d(3, 4, 3)(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ConvNormConv2d(3, 4, 5)(torch.randn(1, 3, 3, 3))
    stage = ConvNorm2d(4, 3)
    with pytest.raises(ValueError, match="built for 4 channels"):
        stage(torch.randn(1, 4, 8, 8), torch.randn(5, 3, 3, 3))


def test_1x1_module_matches_functional_under_bn_and_affine():
    conv = nn.Conv2d(6, 5, 1, stride=2, bias=True)
    wrapped = ConvNormConv2d.from_conv(conv, affine_init="default").eval()
    x = torch.randn(2, 6, 9, 9)
    expected = conv_norm2d(
        x, conv.weight, conv.bias, 2, 0, affine_weight=wrapped.norm.affine_weight, affine_bias=wrapped.norm.affine_bias
    )
    assert_close_scaled(wrapped(x), expected)


def test_stage_rejects_a_weight_or_conv_output_that_does_not_fit():
    stage = ConvNorm2d(8, 3, padding=1)
    w = torch.randn(8, 4, 3, 3)
    y = torch.randn(2, 8, 10, 10)
    for bad in (torch.randn(6, 4, 3, 3), torch.randn(8, 4, 5, 5)):
        with pytest.raises(ValueError, match=r"ConvNorm2d was built for 8 channels and kernel \(3, 3\)"):
            stage(y, bad)
        with pytest.raises(ValueError, match="built for 8 channels"):
            stage.forward_from_input(torch.randn(2, 4, 8, 8), bad)
    for bad_y in (torch.randn(2, 6, 10, 10), torch.randn(8, 10, 10)):
        with pytest.raises(ValueError, match=r"expected a conv output \(N, 8, H, W\)"):
            stage(bad_y, w)
    assert stage(y, w).shape == (2, 8, 8, 8)
