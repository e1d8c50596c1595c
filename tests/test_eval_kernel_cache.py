"""``eval_kernel_cache``: eval passes reuse each spectral site's per-frequency operator.

The cached operator must give what the site computes without it (every geometry, both memory
formats, float32 and float64), never be stale (weights, affine kernels, input sizes and
dtypes change), never be used where a gradient is needed, and be freed by training mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convnorm_fx
from convnorm_fx import ConvNormConfig, ConvNormConv2d, modules, spectral
from convnorm_fx.models import cifar_resnet18
from helpers import assert_close_scaled
from strategies import conv_geometries, seeds
from tolerances import tolerance

geometries = conv_geometries(max_kernel=4, max_stride=3, max_dilation=2, max_channels=3, max_groups=2, max_extra_size=5)


def _pair(geometry, seed: int, dtype: torch.dtype, device: str = "cpu", algorithm: str = "spectral"):
    """The same site without and with the cache, in eval mode, with a non-trivial affine kernel."""
    torch.manual_seed(seed % 1000)
    conv = geometry.conv(dtype, device)
    plain = ConvNormConv2d.from_conv(conv, affine_init="default", algorithm=algorithm).eval()
    cached = copy.deepcopy(plain)
    cached.norm.eval_kernel_cache = True
    return plain, cached


def _operators(site: ConvNormConv2d) -> dict:
    cache = site.norm._preconditioner_cache
    return {} if cache is None else cache.operators


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@given(geometry=geometries, seed=seeds)
def test_cached_operator_gives_the_uncached_site(geometry, seed, dtype, device, channels_last):
    plain, cached = _pair(geometry, seed, dtype, device)
    x = geometry.tensors(seed, dtype, device)[0]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain(x)
        first, second = cached(x), cached(x)
    assert_close_scaled(first, expected, tol=4 * tolerance(dtype))  # the gain is folded in before the products
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert second.dtype == expected.dtype and second.shape == expected.shape
    assert second.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
        memory_format=torch.channels_last
    )


def test_operator_is_kept_and_reused_only_where_the_spectral_algorithm_runs(monkeypatch):
    site = ConvNormConv2d(4, 6, 3, padding=1, algorithm="spectral", eval_kernel_cache=True).eval()
    built = []
    monkeypatch.setattr(modules, "eval_operator", lambda *a: built.append(1) or spectral.eval_operator(*a))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        site(x)
        site(x)
    assert len(built) == 1 and len(_operators(site)) == 1
    site.norm.algorithm = "direct"  # the direct algorithm has no operator to keep
    with torch.no_grad():
        site(x)
    assert len(built) == 1


def test_never_stale_when_weights_affine_kernel_size_or_dtype_change():
    torch.manual_seed(0)
    site = ConvNormConv2d(3, 5, 3, padding=1, algorithm="spectral", affine_init="default", eval_kernel_cache=True)
    site.eval()
    x = torch.randn(2, 3, 10, 10)

    def fresh(inputs: torch.Tensor) -> torch.Tensor:
        reference = copy.deepcopy(site)
        reference.norm.eval_kernel_cache = False
        return reference(inputs)

    with torch.no_grad():
        site(x)
        site.weight.mul_(1.5).add_(0.1)  # in place: same tensor, new values
        assert_close_scaled(site(x), fresh(x))
        site.weight.data[0, 0, 0, 0] += 1.0  # through .data: no version bump
        assert_close_scaled(site(x), fresh(x))
        site.norm.affine_weight.data[:, 0, 1, 1] *= -2.0  # the affine kernel alone
        assert_close_scaled(site(x), fresh(x))
        site.load_state_dict(ConvNormConv2d(3, 5, 3, padding=1, affine_init="default").state_dict())
        assert_close_scaled(site(x), fresh(x))
        for size in (7, 12, 10):
            other = torch.randn(2, 3, size, size)
            assert_close_scaled(site(other), fresh(other))
        assert len(_operators(site)) == 1  # the last size's, as for the cached spectrum
        site.double()
        assert_close_scaled(site(x.double()), fresh(x.double()))


def test_inputs_needing_a_gradient_take_the_autograd_path():
    """Eval mode with autograd on an input (an attack, a saliency map): exact gradients, no operator."""
    torch.manual_seed(1)
    site = ConvNormConv2d(3, 4, 3, stride=2, padding=1, algorithm="spectral", eval_kernel_cache=True).double().eval()
    plain = copy.deepcopy(site)
    plain.norm.eval_kernel_cache = False
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(site(x).square().sum(), x)
    (expected,) = torch.autograd.grad(plain(x).square().sum(), x)
    assert_close_scaled(grad, expected)
    assert not _operators(site)
    assert torch.autograd.gradcheck(lambda t: site(t), (x[:1],))


def test_training_mode_frees_the_operators_and_ignores_them():
    site = ConvNormConv2d(4, 4, 3, padding=1, algorithm="spectral", eval_kernel_cache=True).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        site(x)
    held = site.norm.eval_cache_nbytes()
    assert _operators(site) and held > site.weight.numel() * 4
    model = torch.nn.Sequential(site)
    model.train()
    assert not _operators(site) and site.norm.eval_cache_nbytes() < held
    with torch.no_grad():
        site(x)  # training mode, no grad: recomputed, not kept
    assert not _operators(site)


@given(eval_kernel_cache=st.sampled_from([1, "yes", None, 1.0]))
def test_option_must_be_a_bool(eval_kernel_cache):
    with pytest.raises(TypeError, match="eval_kernel_cache"):
        ConvNormConfig(eval_kernel_cache=eval_kernel_cache)


def test_apply_sets_the_option_on_every_stage_and_copies_drop_the_cache():
    model = convnorm_fx.apply(cifar_resnet18(10, width=0.25), eval_kernel_cache=True).eval()
    stages = [m for m in model.modules() if isinstance(m, convnorm_fx.ConvNorm2d)]
    assert stages and all(s.eval_kernel_cache and s.config.eval_kernel_cache for s in stages)
    assert "eval_kernel_cache=True" in repr(stages[0])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    assert any(_operators_of(s) for s in stages)
    clone = copy.deepcopy(model)
    assert all(s.eval_cache_nbytes() == 0 for s in clone.modules() if isinstance(s, convnorm_fx.ConvNorm2d))
    with torch.no_grad():
        torch.testing.assert_close(clone(x), out)
    assert set(model.state_dict()) == set(convnorm_fx.apply(cifar_resnet18(10, width=0.25)).state_dict())


def _operators_of(stage) -> dict:
    cache = stage._preconditioner_cache
    return {} if cache is None else cache.operators


def test_cost_model_counts_a_kept_kernel_spectrum_as_free_in_eval_only():
    """With the operator kept, the kernel spectrum costs nothing in eval: the spectral algorithm
    becomes cheaper there, and never dearer; training is unaffected (it rebuilds the spectrum)."""
    from convnorm_fx import cost

    layer4 = ((32, 512, 4, 4), (512, 512, 3, 3))
    assert cost.select_algorithm(*layer4, training=False) == "direct"
    assert cost.select_algorithm(*layer4, training=False, kernel_cached=True) == "spectral"
    for shapes in (layer4, ((32, 64, 32, 32), (64, 64, 3, 3)), ((8, 72, 28, 28), (72, 1, 5, 5))):
        groups = shapes[0][1] // shapes[1][1]
        _, plain = cost.site_costs(*shapes, groups=groups, training=False)
        _, kept = cost.site_costs(*shapes, groups=groups, training=False, kernel_cached=True)
        assert kept < plain
        trained = cost.site_costs(*shapes, groups=groups, training=True, kernel_cached=True)
        assert trained == cost.site_costs(*shapes, groups=groups, training=True)


def test_operators_kept_under_inference_mode_serve_later_passes_with_autograd():
    """An operator first built under ``torch.inference_mode`` is an ordinary tensor: a later
    ``no_grad`` pass reuses it, and a pass with autograd on the input still differentiates."""
    torch.manual_seed(2)
    site = ConvNormConv2d(3, 4, 3, padding=1, algorithm="spectral", eval_kernel_cache=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        first = site(x)
    (operator,) = [entry[1] for entry in _operators(site).values()]
    assert not operator.is_inference()
    with torch.no_grad():
        torch.testing.assert_close(site(x), first)
    (reused,) = [entry[1] for entry in _operators(site).values()]
    assert reused is operator
    x.requires_grad_(True)
    site(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
