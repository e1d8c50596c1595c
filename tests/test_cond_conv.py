"""ConvNorm on timm's CondConv2d: per-sample mixed kernels, each normalized on its own.

The references are independent of :class:`convnorm_fx.ConvNormCondConv2d`'s grouped
formulation: timm's ``CondConv2d`` itself (bypass), one :func:`convnorm_fx.ops.conv_norm2d`
call per sample on that sample's mixed kernel, and the dense-matrix operator of
``tests/oracles.py`` (``Q = P A``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import timm
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from timm.layers import CondConv2d
from timm.layers.padding import pad_same
from torch import nn

import convnorm_fx
from convnorm_fx import ConvNormCondConv2d, bypass, ops, rewrite_report
from helpers import assert_close_scaled
from tolerances import tolerance
from oracles import conv_norm2d_dense
from strategies import ConvGeometry, conv_geometries, seeds

EXPERTS = 3


@dataclass(frozen=True)
class CondGeometry:
    """A conv geometry plus CondConv's own choices: TF 'same' padding and the expert count."""

    conv: ConvGeometry
    tf_same: bool  # timm padding='same': dynamic (computed from the input) for strided or even kernels
    batch: int

    def build(self, seed: int) -> CondConv2d:
        torch.manual_seed(seed % 10_000)
        g = self.conv
        padding = "same" if self.tf_same else g.padding
        cc = CondConv2d(
            g.in_channels, g.out_channels, g.kernel, g.stride, padding, g.dilation, g.groups, g.bias, EXPERTS
        )
        return cc.double()

    def inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        g = self.conv
        x = torch.randn(self.batch, g.in_channels, g.height, g.width, generator=gen, dtype=torch.float64)
        routing = torch.rand(self.batch, EXPERTS, generator=gen, dtype=torch.float64)
        return x, routing


def _cond_geometries(base: st.SearchStrategy[ConvGeometry]) -> st.SearchStrategy[CondGeometry]:
    return st.builds(CondGeometry, base, st.booleans(), st.integers(1, 3))


# CondConv pads with zeros only; 'same'/'valid'/int/tuple/beyond-full paddings all occur.
cond_geometries = _cond_geometries(conv_geometries(max_kernel=5, max_channels=2, padding_modes=("zeros",)))
tiny_cond_geometries = _cond_geometries(
    conv_geometries(max_kernel=3, max_stride=2, max_dilation=2, max_channels=2, max_groups=2, max_extra_size=3,
                    padding_modes=("zeros",))
)


def _mixed(cc: nn.Module, routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's kernel ``(B, C_out, C_in/g, k_h, k_w)`` and bias ``(B, C_out)``, as CondConv mixes them."""
    weight = (routing @ cc.weight).view(routing.shape[0], *cc.weight_shape)
    bias = None if cc.bias is None else routing @ cc.bias
    return weight, bias


def _per_sample_oracle(module: ConvNormCondConv2d, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """ConvNorm of every sample alone, with its own mixed kernel: one conv_norm2d call per sample."""
    weights, biases = _mixed(module, routing)
    stage = module.norm
    outs = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        padding = module.padding
        if module.dynamic_padding:
            xb, padding = pad_same(xb, module.kernel_size, module.stride, module.dilation), 0
        outs.append(
            ops.conv_norm2d(
                xb, weights[b], None if biases is None else biases[b], module.stride, padding, module.dilation,
                module.groups, eps=stage.eps, stop_gradient=stage.stop_gradient,
                affine_weight=stage.affine_weight, affine_bias=stage.affine_bias,
            )
        )
    out = torch.cat(outs)
    return out if stage.bn is None else stage.bn(out)


# --------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------


@given(geometry=cond_geometries, seed=seeds)
def test_bypass_reproduces_cond_conv(geometry, seed):
    """Inside ``bypass`` (affine and BN present) the module is timm's CondConv2d, in both modes."""
    cc = geometry.build(seed)
    module = ConvNormCondConv2d.from_cond_conv(cc, bn=True, affine_init="default")
    x, routing = geometry.inputs(seed)
    for train in (True, False):
        cc.train(train)
        module.train(train)
        with bypass(module):
            assert_close_scaled(module(x, routing), cc(x, routing))
    assert not module.norm.bypassed


@given(geometry=cond_geometries, seed=seeds, stop_gradient=st.booleans())
def test_each_sample_is_conv_norm_of_its_own_mixed_kernel(geometry, seed, stop_gradient):
    """Sample b's output is ConvNorm of sample b's conv alone (shared affine and BN), in
    train and eval mode, and in eval mode nothing is cached across calls."""
    cc = geometry.build(seed)
    bn = geometry.batch > 1  # train-mode BatchNorm needs more than one value per channel
    module = ConvNormCondConv2d.from_cond_conv(cc, bn=bn, affine_init="default", stop_gradient=stop_gradient)
    x, routing = geometry.inputs(seed)
    module.train()
    assert_close_scaled(module(x, routing), _per_sample_oracle(module, x, routing))
    module.eval()
    assert_close_scaled(module(x, routing), _per_sample_oracle(module, x, routing))
    other = routing.flip(-1) + 0.5  # new kernels for the same input: a cached spectrum would be stale
    assert_close_scaled(module(x, other), _per_sample_oracle(module, x, other))


@settings(max_examples=25)
@given(geometry=tiny_cond_geometries, seed=seeds)
def test_each_sample_matches_the_dense_operator(geometry, seed):
    """Exact ConvNorm (eps = 0) per sample, against ``Q_b = P_b A_b`` built from dense matrices."""
    cc = geometry.build(seed)
    module = ConvNormCondConv2d.from_cond_conv(cc, affine=False, eps=0.0)
    x, routing = geometry.inputs(seed)
    weights, biases = _mixed(cc, routing)
    out = module(x, routing)
    for b in range(geometry.batch):
        xb = x[b : b + 1]
        padding = cc.padding
        if cc.dynamic_padding:
            xb, padding = pad_same(xb, cc.kernel_size, cc.stride, cc.dilation), (0, 0)
        grid = ops.grid_size(xb.shape[-2:], cc.kernel_size, cc.dilation)
        power = ops.kernel_power_spectrum(weights[b].detach(), grid, cc.dilation)
        assume(float(power.min()) > 1e-6 * float(power.max()))  # away from spectral nulls
        sample = dataclasses.replace(
            geometry.conv, batch=1, padding=tuple(padding), height=xb.shape[-2], width=xb.shape[-1]
        )
        bias = None if biases is None else biases[b].detach().numpy()
        expected = conv_norm2d_dense(sample, xb.numpy(), weights[b].detach().numpy(), bias)
        # Q is a tight frame (|Q x| <= |x| per channel): the input bounds the output's round-off,
        # also where the expected values cancel to almost nothing.
        scale = max(float(abs(expected).max()), float(xb.abs().max()))
        assert_close_scaled(out[b : b + 1], torch.from_numpy(expected), tol=10 * tolerance(torch.float64), scale=scale)


@given(geometry=conv_geometries(max_kernel=4, max_stride=1, max_channels=2, padding_modes=("zeros",)), seed=seeds)
def test_each_sample_is_a_tight_frame(geometry, seed):
    """sum_j |DFT(q_kj)|^2 = 1 for every sample's normalized operator (eq. 7), read off the module.

    With padding ``d (k - 1)`` and stride 1 the output is the whole circular domain, so the
    response to a delta in input channel j is the first column of the circulant block
    ``Q_kj`` of that sample; its DFT holds the block's eigenvalues.
    """
    g = geometry
    full = ops.full_padding(g.kernel, g.dilation)
    cc = CondConv2d(g.in_channels, g.out_channels, g.kernel, 1, full, g.dilation, g.groups, False, EXPERTS).double()
    module = ConvNormCondConv2d.from_cond_conv(cc, affine=False, eps=0.0)
    gen = torch.Generator().manual_seed(seed)
    samples = 2
    routing = torch.rand(samples, EXPERTS, generator=gen, dtype=torch.float64)
    weights, _ = _mixed(cc, routing)
    grid = ops.grid_size((g.height, g.width), g.kernel, g.dilation)
    for b in range(samples):
        power = ops.kernel_power_spectrum(weights[b].detach(), grid, g.dilation)
        assume(float(power.min()) > 1e-6 * float(power.max()))
    deltas = torch.zeros(g.in_channels, g.in_channels, g.height, g.width, dtype=torch.float64)
    deltas[torch.arange(g.in_channels), torch.arange(g.in_channels), 0, 0] = 1.0
    for b in range(samples):
        response = module(deltas, routing[b].expand(g.in_channels, -1))  # (C_in: j, C_out: k, M_h, M_w)
        assert tuple(response.shape[-2:]) == grid
        energy = torch.fft.fft2(response).abs().square().sum(0)  # (C_out, M_h, M_w)
        torch.testing.assert_close(energy, torch.ones_like(energy), rtol=0, atol=10 * tolerance(torch.float64))
    # Different samples really have different preconditioners.
    spectra = [ops.preconditioner_spectrum(weights[b], grid, g.dilation, 0.0) for b in range(samples)]
    assert not torch.allclose(spectra[0], spectra[1])


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_gradients_reach_routing_and_experts(stop_gradient):
    """Gradients of routing weights, expert kernels, expert biases and the shared affine
    transform equal those of the per-sample oracle (and are non-zero)."""
    torch.manual_seed(0)
    cc = CondConv2d(4, 6, 3, 2, "same", groups=2, bias=True, num_experts=EXPERTS).double()
    assert cc.dynamic_padding
    module = ConvNormCondConv2d.from_cond_conv(cc, affine_init="default", stop_gradient=stop_gradient)
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    routing = torch.rand(3, EXPERTS, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    params = [routing, module.weight, module.bias, module.norm.affine_weight, module.norm.affine_bias]

    grads = torch.autograd.grad((module(x, routing) * probe).sum(), params)
    expected = torch.autograd.grad((_per_sample_oracle(module, x, routing) * probe).sum(), params)
    for got, want in zip(grads, expected):
        assert float(got.abs().max()) > 0
        assert_close_scaled(got, want)


def test_gradcheck_without_stop_gradient():
    """The full derivative (through the per-sample spectra) is right, float64 gradcheck."""
    torch.manual_seed(0)
    cc = CondConv2d(2, 2, 3, 1, "", bias=True, num_experts=2).double()
    module = ConvNormCondConv2d.from_cond_conv(cc, affine_init="default", stop_gradient=False, eps=1e-3)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    routing = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, r, w: _with_weight(module, w)(xx, r), (x, routing, module.weight))


def _with_weight(module: ConvNormCondConv2d, weight: torch.Tensor):
    def run(x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, {"weight": weight}, (x, routing))

    return run


def test_shares_parameters_and_loads_the_original_checkpoint():
    cc = CondConv2d(4, 8, 3, 1, "", bias=True, num_experts=EXPERTS)
    module = ConvNormCondConv2d.from_cond_conv(cc, bn=True)
    assert module.weight is cc.weight and module.bias is cc.bias
    assert {"weight", "bias"} <= set(module.state_dict())
    fresh = ConvNormCondConv2d(4, 8, 3, padding=1, bias=True, num_experts=EXPERTS, bn=True)
    missing, unexpected = fresh.load_state_dict(cc.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {
        "norm.affine_weight", "norm.affine_bias", "norm.bn.weight", "norm.bn.bias",
        "norm.bn.running_mean", "norm.bn.running_var",
    }  # fmt: skip (BatchNorm fills in a missing num_batches_tracked itself)
    torch.testing.assert_close(fresh.weight, cc.weight, rtol=0, atol=0)
    x, routing = torch.randn(2, 4, 7, 7), torch.rand(2, EXPERTS)
    with bypass(fresh):
        torch.testing.assert_close(fresh(x, routing), cc(x, routing))


def test_rejects_bad_arguments():
    cc = CondConv2d(4, 8, 3, num_experts=EXPERTS)
    module = ConvNormCondConv2d.from_cond_conv(cc)
    with pytest.raises(ValueError, match="routing_weights"):
        module(torch.randn(2, 4, 8, 8), torch.rand(3, EXPERTS))
    with pytest.raises(ValueError, match="expected an input"):
        module(torch.randn(2, 5, 8, 8), torch.rand(2, EXPERTS))
    with pytest.raises(TypeError, match="CondConv2d"):
        ConvNormCondConv2d.from_cond_conv(nn.Conv2d(4, 8, 3))
    with pytest.raises(TypeError, match="apply it once"):
        ConvNormCondConv2d.from_cond_conv(module)
    with pytest.raises(ValueError, match="eval_spectrum"):
        ConvNormCondConv2d(4, 8, eval_spectrum="never")
    with pytest.raises(ValueError, match="groups"):
        ConvNormCondConv2d(4, 6, groups=4)


# --------------------------------------------------------------------------------------
# apply()
# --------------------------------------------------------------------------------------


class _TinyCondNet(nn.Module):
    """Routing from pooled features; one CondConv into a BatchNorm, one (TF 'same', strided) into ReLU."""

    def __init__(self, data_dependent: bool = False) -> None:
        super().__init__()
        self.data_dependent = data_dependent
        self.route = nn.Linear(3, 2)
        self.cc1 = CondConv2d(3, 4, 3, padding="", bias=True, num_experts=2)
        self.bn = nn.BatchNorm2d(4)
        self.cc2 = CondConv2d(4, 4, 3, stride=2, padding="same", groups=2, num_experts=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = torch.sigmoid(self.route(x.mean((2, 3))))
        y = self.bn(self.cc1(x, routing))
        if self.data_dependent and bool(y.sum() > 1e9):  # untraceable: planned by walking modules
            y = y * 0
        return torch.relu(self.cc2(y, routing))


@pytest.mark.parametrize("data_dependent", [False, True], ids=["traced", "walked"])
def test_apply_rewrites_cond_convs_with_bn_auto(data_dependent):
    torch.manual_seed(0)
    model = _TinyCondNet(data_dependent).eval()
    rewritten = convnorm_fx.apply(model, strict=True)
    sites = {s.name: s for s in rewrite_report(rewritten).sites}
    assert set(sites) == {"cc1", "cc2"}
    action = "module swap" if data_dependent else "graph rewrite"
    for name, site in sites.items():
        assert site.action == action and site.kind == "module" and site.conv_class == "CondConv2d"
        assert "per-sample CondConv" in site.reason
        assert isinstance(rewritten.get_submodule(name), ConvNormCondConv2d)
    assert not sites["cc1"].bn and "flows into BatchNorm2d" in sites["cc1"].reason
    assert sites["cc2"].bn and "BN added" in sites["cc2"].reason
    assert sites["cc2"].geometry() == "k3x3 s2x2 psame g2"
    assert rewritten.cc2.norm.bn is not None and rewritten.cc1.norm.bn is None
    x = torch.randn(2, 3, 11, 11)
    for train in (False, True):
        model.train(train)
        rewritten.train(train)
        with bypass(rewritten):
            torch.testing.assert_close(rewritten(x), model(x))
    again = rewrite_report(convnorm_fx.apply(rewritten))
    assert [s.action for s in again.sites] == ["already rewritten"] * 2


def test_report_says_running_spectrum_does_not_apply():
    model = convnorm_fx.apply(_TinyCondNet().eval(), eval_spectrum="running")
    for site in rewrite_report(model).sites:
        assert site.rewritten and "eval_spectrum='running' does not apply" in site.reason


def test_apply_graph_module_keeps_cond_convs_as_leaves():
    torch.manual_seed(0)
    model = _TinyCondNet().eval()
    gm = convnorm_fx.apply(model, graph_module=True)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "cc1" in calls and "cc2" in calls
    x = torch.randn(2, 3, 10, 10)
    with bypass(gm):
        torch.testing.assert_close(gm(x), model(x))


def test_apply_on_a_lone_cond_conv_and_check_finite():
    """A model that is one CondConv2d is swapped as a whole; check_finite names the site."""
    torch.manual_seed(0)
    cc = CondConv2d(3, 4, 3, stride=2, padding="same", num_experts=2)
    rewritten = convnorm_fx.apply(cc, check_finite=True)
    assert isinstance(rewritten, ConvNormCondConv2d) and rewritten.weight is not cc.weight  # a copy
    (site,) = rewrite_report(rewritten).sites
    assert site.action == "module swap" and site.rewritten
    assert [s.action for s in rewrite_report(convnorm_fx.apply(rewritten)).sites] == ["already rewritten"]
    model = convnorm_fx.apply(_TinyCondNet().eval(), check_finite=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.cc1.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weight of conv site 'cc1'"):
        model(x)


def test_check_sites_measures_every_sample():
    """``check_sites`` (the CLI's ``check``) reads each sample's mixed kernels: bypass exact, tight frames."""
    from convnorm_fx.checks import check_sites

    torch.manual_seed(0)
    model = _TinyCondNet().eval()
    results = check_sites(model, convnorm_fx.apply(model), (3, 12, 12))
    assert [r.name for r in results] == ["cc1", "cc2"]
    assert all(r.passed and r.bypass_error <= 1e-6 and r.tight_frame_error <= 1e-5 for r in results), results


def test_apply_on_efficientnet_cc():
    """timm's CondConv EfficientNet: every conv rewritten, bypass exact, normalized model finite."""
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_cc_b0_4e", pretrained=False).eval()
    rewritten = convnorm_fx.apply(model, strict=True)
    report = rewrite_report(rewritten)
    assert not report.skipped
    cond = [s for s in report.sites if s.conv_class == "CondConv2d"]
    assert len(cond) == 24
    assert all(s.rewritten and "per-sample CondConv" in s.reason for s in cond)
    assert all(not s.bn for s in cond)  # each flows into a BatchNormAct2d
    assert {s.geometry() for s in cond} == {
        "k1x1 p0x0", "k3x3 p1x1 g1152", "k5x5 p2x2 g1152", "k5x5 p2x2 g480", "k5x5 p2x2 g672", "k5x5 s2x2 p2x2 g672",
    }  # fmt: skip (pointwise and depthwise, one strided)
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        model.train(train)
        rewritten.train(train)
        with torch.no_grad():
            want = model(x)
            with bypass(rewritten):
                got = rewritten(x)
        assert_close_scaled(got, want, tol=tolerance(torch.float32))
    rewritten.train()
    out = rewritten(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    block = rewritten.blocks[5][0]
    assert isinstance(block.conv_dw, ConvNormCondConv2d)
    for p in (block.conv_dw.weight, block.conv_pw.weight, block.routing_fn.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().max()) > 0
    missing, unexpected = rewritten.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".norm." in k for k in missing)
