"""convnorm_fx.apply on user-defined ConvNets: sites, bypass equivalence, options, report, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convnorm_fx import ConvNorm2d, ConvNormConv2d, RewriteError, apply, bypass, rewrite_report
from helpers import assert_close_scaled
from tolerances import tolerance


class FunctionalConv(nn.Module):
    """A user block that calls F.conv2d on its own Parameter, optionally standardized."""

    def __init__(self, c_in, c_out, k, stride, dilation, groups, standardize):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in // groups, k, k) * 0.3)
        self.stride, self.dilation, self.groups, self.standardize = stride, dilation, groups, standardize
        self.padding = dilation * (k - 1) // 2

    def forward(self, x):
        w = self.weight
        if self.standardize:
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.square().mean((1, 2, 3), keepdim=True) + 1e-5).sqrt()
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class Branches(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


@st.composite
def conv_nets(draw):
    """Random small ConvNets: module and functional convs, with or without norms, branches."""
    layers, sites, channels = [], 0, 3
    for _ in range(draw(st.integers(1, 4))):
        groups = draw(st.sampled_from([1, channels])) if channels > 1 else 1
        c_out = groups * draw(st.integers(1, 3))
        k = draw(st.sampled_from([1, 2, 3, 5]))
        stride = draw(st.sampled_from([1, 2]))
        dilation = draw(st.sampled_from([1, 2])) if k > 1 else 1
        kind = draw(st.sampled_from(["module", "function", "standardized", "branch"]))
        pad = dilation * (k - 1) // 2
        padding_mode = draw(st.sampled_from(["zeros", "zeros", "replicate"]))  # reflect needs pad < size
        if kind == "module":
            layer = nn.Conv2d(channels, c_out, k, stride, pad, dilation, groups, draw(st.booleans()), padding_mode)
            sites += 1
        elif kind == "branch":
            k = k | 1  # both branches must keep the same output size
            pad = dilation * (k - 1) // 2
            layer = Branches(nn.Conv2d(channels, c_out, k, stride, pad, dilation, groups), nn.Conv2d(channels, c_out, 1, stride))
            sites += 2
        else:
            layer = FunctionalConv(channels, c_out, k, stride, dilation, groups, kind == "standardized")
            sites += 1
        layers.append(layer)
        norm = draw(st.sampled_from(["none", "bn", "gn"]))
        if norm == "bn":
            layers.append(nn.BatchNorm2d(c_out))
        elif norm == "gn":
            layers.append(nn.GroupNorm(1, c_out))
        layers.append(nn.ReLU())
        channels = c_out
    return nn.Sequential(*layers), sites


def _independent_site_count(model: nn.Module) -> int:
    return sum(
        1
        for m in model.modules()
        if isinstance(m, nn.Conv2d) or isinstance(m, FunctionalConv)
    )


@settings(max_examples=25)
@given(net=conv_nets(), bn=st.sampled_from(["auto", True, False]))
def test_random_convnets_meet_the_invariants(net, bn):
    model, expected_sites = net
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    rewritten = apply(model, bn=bn)
    report = rewrite_report(rewritten)
    assert len(report.sites) == expected_sites == _independent_site_count(model)
    assert all(s.rewritten for s in report.sites), report.format_table()
    assert type(rewritten) is type(model)
    for mode in (True, False):
        model.train(mode)
        rewritten.train(mode)
        with bypass(rewritten):
            expected, actual = model(x), rewritten(x)
        assert_close_scaled(actual, expected, tol=tolerance(torch.float32))
    rewritten.train()
    out = rewritten(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 4:
            grad = rewritten.get_parameter(name).grad
            assert grad is not None and torch.isfinite(grad).all(), name


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1))
        self.head = nn.Linear(16, 10)
        self.tag = "custom attribute"

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        return self.head(self.body(x).mean((2, 3)))

    def features(self, x):
        return self.body(self.stem(x))


def test_report_lists_every_site_with_geometry_and_bn_decision():
    model = apply(Net(), bn="auto")
    report = rewrite_report(model)
    names = [s.name for s in report.sites]
    assert names == ["stem", "body.0", "body.2"]
    stem, down, point = report.sites
    assert not stem.bn and "BatchNorm2d 'bn1'" in stem.reason
    assert down.bn and point.bn
    assert down.stride == (2, 2) and down.kernel_size == (3, 3) and point.kernel_size == (1, 1)
    assert report.summary().startswith("3 conv sites: 3 rewritten")
    table = report.format_table()
    assert all(n in table for n in names)
    assert report.to_dict()["counts"] == {"graph rewrite": 3}


def test_model_keeps_class_methods_and_attributes():
    original = Net()
    model = apply(original)
    assert type(model) is Net and model.tag == "custom attribute"
    assert isinstance(model.stem, ConvNormConv2d) and isinstance(model.body[2], ConvNormConv2d)
    assert model.features(torch.randn(2, 3, 8, 8)).shape == (2, 16, 4, 4)
    assert model.stem.weight is not original.stem.weight  # a copy by default
    assert isinstance(original.stem, nn.Conv2d) and not isinstance(original.stem, ConvNormConv2d)
    same = apply(original, inplace=True)
    assert same is original and isinstance(original.stem, ConvNormConv2d)


@pytest.mark.parametrize("bn,expected", [(True, 3), (False, 0), ("auto", 2)])
def test_bn_policy(bn, expected):
    model = apply(Net(), bn=bn)
    assert sum(1 for m in model.modules() if isinstance(m, ConvNorm2d) and m.bn is not None) == expected


def test_filter_fn_and_overrides():
    model = apply(Net(), filter_fn=lambda module, name: name != "stem")
    report = rewrite_report(model)
    assert report.sites[0].action == "skipped" and report.sites[0].reason == "excluded by filter_fn"
    assert type(model.stem) is nn.Conv2d
    model = apply(Net(), overrides={"stem": None, r"body\.\d": {"bn": False, "eps": 1e-3}})
    report = rewrite_report(model)
    assert report.sites[0].reason == "excluded by overrides['stem']"
    assert model.body[0].norm.bn is None and model.body[0].norm.eps == 1e-3
    with pytest.raises(ValueError, match="bn must be"):
        apply(Net(), overrides={"stem": {"bn": "sometimes"}})
    with pytest.raises(TypeError):
        apply(Net(), overrides={"stem": {"colour": 1}})


def test_idempotent():
    once = apply(Net())
    keys = set(once.state_dict())
    twice = apply(once)
    assert set(twice.state_dict()) == keys
    assert {s.action for s in rewrite_report(twice).sites} == {"already rewritten"}
    x = torch.randn(2, 3, 8, 8)
    once.eval(), twice.eval()
    torch.testing.assert_close(twice(x), once(x))


def test_functional_sites_are_idempotent_too():
    model = nn.Sequential(FunctionalConv(3, 4, 3, 1, 1, 1, True), nn.ReLU())
    once = apply(model)
    twice = apply(once)
    assert set(twice.state_dict()) == set(once.state_dict())
    assert [s.action for s in rewrite_report(twice).sites] == ["already rewritten"]


def test_checkpoints_load_both_ways():
    original = Net()
    model = apply(Net())
    result = model.load_state_dict(original.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(".norm." in k for k in result.missing_keys) and result.missing_keys
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    fresh = apply(Net())
    fresh.load_state_dict(model.state_dict())  # strict round trip


def test_functional_conv_keeps_parameter_names_and_attributes():
    model = nn.Sequential(FunctionalConv(3, 4, 3, 2, 1, 1, True))
    rewritten = apply(model)
    assert set(model.state_dict()) <= set(rewritten.state_dict())
    assert rewritten[0].stride == 2 and rewritten[0].standardize is True
    site = rewrite_report(rewritten).sites[0]
    assert site.kind == "function" and site.name == "0#conv2d" and site.action == "graph rewrite"
    assert site.kernel_size == (3, 3) and site.stride == (2, 2)


def test_buffer_convs_are_skipped_with_reason():
    class Blur(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("filt", torch.ones(3, 1, 3, 3) / 9)

        def forward(self, x):
            return F.conv2d(x, self.filt, padding=1, groups=3)

    model = apply(nn.Sequential(Blur(), nn.Conv2d(3, 4, 3)))
    first, second = rewrite_report(model).sites
    assert first.action == "skipped" and "buffer" in first.reason
    assert second.action == "graph rewrite"
    apply(nn.Sequential(Blur(), nn.Conv2d(3, 4, 3)), strict=True)  # a buffer conv is not a learned conv


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = -x
        return self.other(self.bn(self.conv(x)))


def test_untraceable_model_falls_back_to_module_swap():
    model = Untraceable()
    rewritten = apply(model)
    report = rewrite_report(rewritten)
    assert [s.action for s in report.sites] == ["module swap", "module swap"]
    assert not report.sites[0].bn and report.sites[1].bn  # 'bn' is the next module after 'conv'
    assert "" in report.untraced
    x = torch.randn(2, 3, 8, 8)
    with bypass(rewritten):
        torch.testing.assert_close(rewritten(x), model(x))


def test_untraceable_block_inside_traceable_model():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), Untraceable(), nn.Conv2d(4, 2, 1))
    rewritten = apply(model)
    report = rewrite_report(rewritten)
    assert [s.action for s in report.sites].count("module swap") == 2
    assert [s.action for s in report.sites].count("graph rewrite") == 2
    x = torch.randn(2, 3, 8, 8)
    with bypass(rewritten):
        torch.testing.assert_close(rewritten(x), model(x))


def test_out_of_scope_convs_are_listed():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 3, 3)
            self.t2 = nn.ConvTranspose2d(3, 3, 3)
            self.c2 = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return self.c2(self.t2(x)), self.c1(x.flatten(2))

    report = rewrite_report(apply(Mixed()))
    actions = {s.name: s.action for s in report.sites}
    assert actions == {"t2": "not rewritten", "c2": "graph rewrite", "c1": "not rewritten"}


def test_no_conv_warns_and_returns_model_unchanged():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="no 2-D convolution"):
        rewritten = apply(model)
    assert rewrite_report(rewritten).sites == []
    assert type(rewritten[0]) is nn.Linear


def test_strict_raises_on_skipped_learned_conv():
    class Subclass(nn.Conv2d):
        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return super().forward(x)

    model = nn.Sequential(Subclass(3, 3, 3))
    report = rewrite_report(apply(model))
    assert report.sites[0].action == "skipped"
    with pytest.raises(RewriteError, match="strict=True"):
        apply(model, strict=True)


def test_bad_options_raise_value_errors():
    with pytest.raises(ValueError, match="bn must be"):
        apply(Net(), bn="yes")
    with pytest.raises(ValueError, match="eps"):
        apply(Net(), eps=-1.0)
    with pytest.raises(ValueError, match="affine_init"):
        apply(Net(), affine_init="random")
    with pytest.raises(TypeError, match="nn.Module"):
        apply("resnet18")
    with pytest.raises(TypeError, match="filter_fn"):
        apply(Net(), filter_fn=3)
    with pytest.raises(ValueError, match="carries no rewrite report"):
        rewrite_report(Net())


def test_graph_module_option_returns_flat_graph():
    gm = apply(Net(), graph_module=True)
    assert isinstance(gm, torch.fx.GraphModule)
    targets = [n.target for n in gm.graph.nodes]
    assert sum(1 for t in targets if t in (F.conv2d, torch.conv2d)) == 3
    stages = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ConvNorm2d)]
    assert len(stages) == 3
    model = apply(Net())
    model.load_state_dict(gm.state_dict())
    x = torch.randn(2, 3, 8, 8)
    model.eval(), gm.eval()
    torch.testing.assert_close(gm(x), model(x))
    assert rewrite_report(gm).summary() == rewrite_report(model).summary()


def test_float64_train_and_eval():
    model = apply(Net().double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for mode in (True, False):
        model.train(mode)
        assert model(x).dtype == torch.float64


def test_top_level_functional_conv_keeps_the_model_class():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=1)

        def describe(self):
            return "top"

    original = Top()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = apply(original)
    assert isinstance(model, Top) and type(model).__name__ == "Top" and model.describe() == "top"
    assert rewrite_report(model).sites[0].action == "graph rewrite"
    assert isinstance(model.convnorm, ConvNorm2d)
    x = torch.randn(1, 3, 8, 8)
    with bypass(model):
        torch.testing.assert_close(model(x), F.conv2d(x, model.weight, padding=1))
    assert not torch.allclose(model(x), F.conv2d(x, model.weight, padding=1))
    assert type(original) is Top and not hasattr(original, "convnorm")  # not inplace: the original is untouched


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 2, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(2, c, 1)

    def forward(self, x):
        x = self.conv(x)
        gate = self.fc2(self.act(self.fc1(self.pool(x))))
        mean_gate = self.fc1(x.mean((2, 3), keepdim=True))
        return x * torch.sigmoid(gate) + mean_gate


def test_auto_bn_skips_convs_on_globally_pooled_maps():
    """BN over a 1x1 map sees one value per sample: 'auto' adds none in squeeze-excite branches."""
    report = rewrite_report(apply(SqueezeExcite(4)))
    bn = {s.name: s.bn for s in report.sites}
    assert bn == {"conv": True, "fc1": False, "fc2": False}
    assert "globally pooled" in report.sites[1].reason and "globally pooled" in report.sites[2].reason
    assert all(rewrite_report(apply(SqueezeExcite(4), bn=True)).sites[i].bn for i in range(3))
