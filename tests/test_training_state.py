"""A rewritten model inside real training and evaluation code.

``apply`` promises the same model with ConvNorm at every conv and nothing else changed. These
tests hold it to that in the workflows users run: eval after fused optimizer steps and weight
edits (never a stale spectrum), ``inference_mode``, shared convs, hooks, parametrizations,
failures part-way (all or nothing), wrappers, lazy modules, and modules that call
``F.conv2d`` themselves (identity, buffers, state-dict hooks). Every eval output is compared
with :func:`convnorm_fx.conv_norm2d` computed afresh from the current weights.
"""

from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import convnorm_fx
from convnorm_fx import ConvNorm2d, ConvNormConv2d, apply, bypass, conv_norm2d, rewrite_report
from tolerances import tolerance
from convnorm_fx import planner as planner_module
from convnorm_fx import rewrite as rewrite_module
from convnorm_fx import sites as sites_module

TOL = tolerance(torch.float64)  # float64 throughout


# --------------------------------------------------------------------------------------
# Models and the reference
# --------------------------------------------------------------------------------------


def standardize(w: torch.Tensor) -> torch.Tensor:
    return (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()


class WSConv(nn.Conv2d):
    """A weight-standardized conv (as timm's StdConv2d): its forward calls F.conv2d itself.

    It also carries what a user's module may carry: a buffer its forward does not use, a
    method, and a ``_load_from_state_dict`` that renames an old checkpoint key.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # not used by forward
        self.loaded_from_old_key = False

    def standardized_weight(self) -> torch.Tensor:
        return standardize(self.weight)

    def forward(self, x):
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "kernel"
        if old in state_dict:  # checkpoints of an older version named the weight "kernel"
            state_dict[prefix + "weight"] = state_dict.pop(old)
            self.loaded_from_old_key = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Net(nn.Module):
    """A plain conv, a strided conv followed by nothing (BN added), a weight-standardized conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.ws = WSConv(6, 5, 3, padding=1)

    def forward(self, x):
        return self.ws(F.relu(self.conv2(F.relu(self.conv1(x)))))


def _site(conv: nn.Module, stage: ConvNorm2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One rewritten site from scratch: conv_norm2d with a fresh spectrum, then eval BN."""
    out = conv_norm2d(
        x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
        eps=stage.eps, affine_weight=stage.affine_weight, affine_bias=stage.affine_bias, algorithm="direct",
    )  # fmt: skip
    if stage.bn is not None:
        bn = stage.bn
        out = F.batch_norm(out, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return out


def reference(model: Net, x: torch.Tensor) -> torch.Tensor:
    """What the rewritten ``Net`` must compute in eval mode, from its current weights."""
    h = F.relu(_site(model.conv1, model.conv1.norm, x, model.conv1.weight))
    h = F.relu(_site(model.conv2, model.conv2.norm, h, model.conv2.weight))
    return _site(model.ws, model.ws.convnorm, h, standardize(model.ws.weight))


def rewritten_net(**options) -> Net:
    torch.manual_seed(0)
    model = apply(Net().double(), affine_init="default", **options)
    # Non-trivial BN statistics and affine parameters.
    with torch.no_grad():
        for stage in model.modules():
            if isinstance(stage, ConvNorm2d) and stage.bn is not None:
                stage.bn.running_mean.uniform_(-0.5, 0.5)
                stage.bn.running_var.uniform_(0.5, 2.0)
    return model


def _input(size: int = 8, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 2) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    model(_input(seed=seed)).square().mean().backward()
    optimizer.step()
    model.eval()


def assert_matches_reference(model: Net, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model, x), rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------------------
# 1. The eval spectrum is never stale
# --------------------------------------------------------------------------------------


def _fused(cls, **kwargs):
    return lambda params: cls(params, lr=0.05, fused=True, **kwargs)


WEIGHT_CHANGES = {
    "sgd-fused": _fused(torch.optim.SGD, momentum=0.9),
    "adamw-fused": _fused(torch.optim.AdamW),
    "adam-fused": _fused(torch.optim.Adam),
    "adagrad-fused": _fused(torch.optim.Adagrad),
}


@pytest.mark.parametrize("optimizer", WEIGHT_CHANGES, ids=list(WEIGHT_CHANGES))
def test_eval_after_a_fused_optimizer_step_uses_the_new_weights(optimizer):
    """validate -> train (fused: no version bump) -> validate evaluates the new weights."""
    model = rewritten_net().eval()
    x = _input()
    assert_matches_reference(model, x)  # fills the caches
    _train_step(model, WEIGHT_CHANGES[optimizer](model.parameters()))
    assert_matches_reference(model, x)


def _edit_data_in_place(model):
    model.conv1.weight.data.mul_(1.7)
    model.ws.weight.data[0].neg_()


def _assign_data(model):
    model.conv1.weight.data = torch.randn_like(model.conv1.weight)
    model.conv2.weight.data = model.conv2.weight.data.flip(-1).clone()


def _vector_to_parameters(model):
    vector = nn.utils.parameters_to_vector(model.parameters())
    nn.utils.vector_to_parameters(vector * 1.3 + 0.01, model.parameters())


def _load_state_dict(model):
    other = rewritten_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    model.load_state_dict(other.state_dict())


def _to_float32_and_back(model):
    model.float()
    model(_input().float())
    model.double()
    with torch.no_grad():
        model.conv1.weight.mul_(0.5)


EDITS = {
    "data-in-place": _edit_data_in_place,
    "data-assignment": _assign_data,
    "vector_to_parameters": _vector_to_parameters,
    "load_state_dict": _load_state_dict,
    "dtype-round-trip": _to_float32_and_back,
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_eval_after_weight_edits_uses_the_new_weights(edit):
    model = rewritten_net().eval()
    x = _input()
    assert_matches_reference(model, x)
    with torch.no_grad():
        EDITS[edit](model)
    assert_matches_reference(model, x)


def test_an_ema_copy_evaluates_its_current_average():
    model = rewritten_net()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
    ema.eval()
    x = _input()
    assert_matches_reference(ema.module, x)
    _train_step(model, torch.optim.AdamW(model.parameters(), lr=0.05, fused=True))
    ema.update_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(ema(x), reference(ema.module, x), rtol=TOL, atol=TOL)


def test_eval_cache_is_reused_while_values_are_unchanged(monkeypatch):
    """The cache still saves the spectrum, for Parameters and computed (standardized) weights."""
    model = rewritten_net().eval()
    x = _input()
    calls = []
    original = ConvNorm2d.compute_preconditioner
    monkeypatch.setattr(ConvNorm2d, "compute_preconditioner", lambda self, *a: calls.append(self.site_name) or original(self, *a))
    with torch.no_grad():
        model(x)
        assert sorted(calls) == ["conv1", "conv2", "ws#conv2d"]
        model(x)
        model(x * 2)
        assert len(calls) == 3  # same weights, same grid: no recomputation
        model(_input(size=10))
        assert len(calls) == 6  # another grid
        model.ws.weight.data[1, 0, 0, 0] += 1e-9  # the smallest change is seen
        model(_input(size=10))
        assert calls[6:] == ["ws#conv2d"]


# --------------------------------------------------------------------------------------
# 2. inference_mode never leaks into autograd
# --------------------------------------------------------------------------------------


def test_inference_mode_eval_then_an_input_gradient_in_eval():
    """An eval pass under inference_mode, then a saliency map / attack step in eval mode."""
    model = rewritten_net().eval()
    x = _input()
    with torch.inference_mode():
        model(x)
    x_grad = x.clone().requires_grad_(True)
    model(x_grad).sum().backward()
    x_ref = x.clone().requires_grad_(True)
    reference(model, x_ref).sum().backward()
    torch.testing.assert_close(x_grad.grad, x_ref.grad, rtol=TOL, atol=TOL)
    with torch.inference_mode():  # and back again
        torch.testing.assert_close(model(x), reference(model, x), rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------------------
# 3. One module, one rewrite
# --------------------------------------------------------------------------------------


class Siamese(nn.Module):
    """A stem shared by two heads, and a weight-standardized conv used twice."""

    def __init__(self):
        super().__init__()
        stem = nn.Conv2d(3, 3, 3, padding=1)
        self.left, self.right = stem, stem
        self.ws = WSConv(3, 3, 3, padding=1)
        self.head = nn.Sequential(self.ws, nn.ReLU(), self.ws)

    def forward(self, x):
        return self.head(self.left(x)) + self.right(x.flip(-1))


def test_a_conv_registered_under_several_names_is_one_rewritten_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    model.append(model[0])
    rewritten = apply(model, bn=False)
    assert isinstance(rewritten[0], ConvNormConv2d) and rewritten[0] is rewritten[2]
    (site,) = rewrite_report(rewritten).sites
    assert site.name == "0" and site.aliases == ("2",)
    x = torch.randn(2, 3, 8, 8)
    conv = rewritten[0]
    expected = conv(F.relu(conv(x)))
    torch.testing.assert_close(rewritten(x), expected)
    with bypass(rewritten):
        torch.testing.assert_close(rewritten(x), model(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_sharing_survives_apply_deepcopy_and_save_load(inplace):
    torch.manual_seed(0)
    original = Siamese()
    model = apply(original, inplace=inplace)
    assert (model is original) == inplace
    assert model.left is model.right and isinstance(model.left, ConvNormConv2d)
    assert model.head[0] is model.head[2] is model.ws and isinstance(model.ws, WSConv)
    sites = rewrite_report(model).sites
    assert [(s.name, s.aliases) for s in sites] == [("left", ("right",)), ("ws#conv2d", ("head.0#conv2d", "head.2#conv2d"))]
    assert sum(isinstance(m, ConvNorm2d) for m in model.modules()) == 2
    x = torch.randn(2, 3, 8, 8)
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert other.left is other.right and other.head[0] is other.head[2] is other.ws
        torch.testing.assert_close(other(x), model(x))


# --------------------------------------------------------------------------------------
# 4. Hooks move with the module
# --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("site", ["conv1", "ws"], ids=["module", "functional-owner"])
def test_hooks_on_a_conv_fire_once_per_call_and_see_the_site_output(site, inplace):
    torch.manual_seed(0)
    net = Net().double()
    conv = getattr(net, site)
    seen = {"pre": 0, "forward": [], "backward": 0, "kwargs": 0, "state": 0}
    handles = [
        conv.register_forward_pre_hook(lambda m, args: seen.__setitem__("pre", seen["pre"] + 1)),
        conv.register_forward_hook(lambda m, args, out: seen["forward"].append(out.detach().clone())),
        conv.register_forward_hook(lambda m, a, k, out: seen.__setitem__("kwargs", seen["kwargs"] + 1), with_kwargs=True),
        conv.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("backward", seen["backward"] + 1)),
        conv.register_state_dict_post_hook(lambda m, sd, prefix, local: seen.__setitem__("state", seen["state"] + 1)),
    ]
    model = apply(net, bn=False, inplace=inplace)
    rewritten = getattr(model, site)
    captured = {}
    rewritten.register_forward_hook(lambda m, args, out: captured.update(out=out.detach().clone()))
    x = _input()
    model(x).sum().backward()
    assert seen["pre"] == 1 and len(seen["forward"]) == 1 and seen["kwargs"] == 1 and seen["backward"] == 1
    torch.testing.assert_close(seen["forward"][0], captured["out"])  # the normalized output
    model.state_dict()
    assert seen["state"] == 1
    if inplace:  # the user's handles still remove the hooks
        for handle in handles:
            handle.remove()
        model(x)
        assert seen["pre"] == 1 and len(seen["forward"]) == 1


def test_forward_hook_output_is_the_normalized_site_output():
    torch.manual_seed(0)
    net = Net().double()
    outputs = []
    net.conv2.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    model = apply(net, affine_init="default").eval()
    x = _input()
    with torch.no_grad():
        model(x)
        h = F.relu(_site(model.conv1, model.conv1.norm, x, model.conv1.weight))
        torch.testing.assert_close(outputs[-1], _site(model.conv2, model.conv2.norm, h, model.conv2.weight))


# --------------------------------------------------------------------------------------
# 5. Parametrizations are honoured
# --------------------------------------------------------------------------------------


def _orthogonal(conv):
    return parametrizations.orthogonal(conv)


PARAMETRIZATIONS = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "orthogonal": _orthogonal,
    "legacy-weight_norm": nn.utils.weight_norm,
    "legacy-spectral_norm": nn.utils.spectral_norm,
}


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", PARAMETRIZATIONS, ids=list(PARAMETRIZATIONS))
def test_parametrized_convs_normalize_the_convolved_weight_and_keep_training(kind, inplace):
    torch.manual_seed(0)
    net = Net().double()
    PARAMETRIZATIONS[kind](net.conv2)  # after conv1: a half-done rewrite would show
    original_state = copy.deepcopy(net.state_dict())
    x = _input()
    net.eval()
    with torch.no_grad():
        expected_plain = net(x)
    model = apply(net, affine_init="default", inplace=inplace)
    report = {s.name.partition("#")[0]: s for s in rewrite_report(model).sites}
    assert report["conv2"].rewritten, report["conv2"].reason
    legacy = kind.startswith("legacy")
    assert legacy or parametrize.is_parametrized(model.conv2, "weight")
    model.eval()
    with torch.no_grad():
        with bypass(model):
            torch.testing.assert_close(model(x), expected_plain, rtol=TOL, atol=TOL)
        stage = model.conv2.norm if legacy else model.conv2.convnorm
        h = F.relu(_site(model.conv1, model.conv1.norm, x, model.conv1.weight))
        expected = _site(model.conv2, stage, h, model.conv2.weight)  # the parametrized weight
        with parametrize.cached():
            got = F.relu(model.conv1(x))
            got = model.conv2(got)
        torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    # The parametrization trains: its own parameters get gradients and move.
    learned = dict(model.conv2.named_parameters())
    sources = {n: p.detach().clone() for n, p in learned.items() if "original" in n or n in ("weight_g", "weight_v", "weight_orig")}
    assert sources
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, optimizer)
    assert all(not torch.equal(learned[n], v) for n, v in sources.items())
    # Original checkpoints load: only the new stage keys are missing.
    fresh = apply(_parametrized_net(kind))
    result = fresh.load_state_dict(original_state, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == _new_stage_keys(fresh, original_state)
    assert all(".norm." in k or ".convnorm." in k for k in result.missing_keys)


def _new_stage_keys(model: nn.Module, original_state: dict) -> set[str]:
    """Keys a rewrite adds, less BatchNorm's counter (its loader fills it in when missing)."""
    return {k for k in set(model.state_dict()) - set(original_state) if not k.endswith("num_batches_tracked")}


def _parametrized_net(kind):
    torch.manual_seed(0)
    net = Net().double()
    PARAMETRIZATIONS[kind](net.conv2)
    return net


# --------------------------------------------------------------------------------------
# 6. All or nothing
# --------------------------------------------------------------------------------------


class Everything(nn.Module):
    """Plain convs, a shared conv, a functional owner, a parametrized conv, a hook."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.shared = self.b
        self.ws = WSConv(4, 4, 3, padding=1)
        self.p = parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1))
        self.a.register_forward_hook(lambda m, args, out: None)

    def forward(self, x):
        return self.p(self.ws(self.shared(self.b(self.a(x)))))


def _snapshot(model: nn.Module):
    """Everything about a model's structure that apply could change."""
    modules = [(name, type(m), id(m), sorted(vars(m)), sorted(m._modules)) for name, m in model.named_modules(remove_duplicate=False)]
    tensors = {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    hooks = [(name, dict(m._forward_hooks)) for name, m in model.named_modules()]
    return modules, tensors, hooks


def _assert_unchanged(model, before):
    modules, tensors, hooks = _snapshot(model)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys()
    for key, (ident, value) in tensors.items():
        assert ident == before[1][key][0] and torch.equal(value, before[1][key][1]), key
    assert hooks == before[2]


class _Injected(RuntimeError):
    pass


def _fail_on_call(monkeypatch, owner, name, n):
    original = getattr(owner, name)
    count = {"calls": 0}

    def failing(*args, **kwargs):
        count["calls"] += 1
        if count["calls"] == n:
            raise _Injected(f"{name} call {n}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return count


# Each stage of apply, and where to inject a failure in it.
FAILURE_POINTS = {
    "planning: tracing": (planner_module, "trace"),
    "selection: filter_fn": None,
    "preparing: building a stage": (ConvNorm2d, "reset_parameters"),
    "preparing: a rewritten forward": (sites_module, "rewritten_forward_class"),
    "committing: installing a stage": (ConvNormConv2d, "install_stage"),
    "committing: the report": (rewrite_module, "setattr"),
}


@settings(max_examples=20, deadline=None)
@given(point=st.sampled_from(sorted(FAILURE_POINTS)), n=st.integers(1, 3))
def test_a_failing_inplace_apply_leaves_the_model_exactly_as_it_was(point, n):
    torch.manual_seed(0)
    model = Everything()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    before = _snapshot(model)
    with pytest.MonkeyPatch.context() as monkeypatch:
        filter_fn = None
        if FAILURE_POINTS[point] is None:
            calls = {"n": 0}

            def filter_fn(module, name):
                calls["n"] += 1
                if calls["n"] == n:
                    raise _Injected("filter_fn")
                return True

        elif point == "committing: the report":
            import builtins

            real_setattr = builtins.setattr

            def failing_setattr(obj, name, value):
                if name == convnorm_fx.report.REPORT_ATTRIBUTE:
                    raise _Injected("report")
                return real_setattr(obj, name, value)

            monkeypatch.setattr(rewrite_module, "setattr", failing_setattr, raising=False)
        else:
            _fail_on_call(monkeypatch, *FAILURE_POINTS[point], n)
        try:
            apply(model, inplace=True, filter_fn=filter_fn)
        except _Injected:
            pass
        else:  # fewer calls than n at this point: apply succeeded, nothing to check here
            return
    _assert_unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    rewritten = apply(model, inplace=True)  # and it still rewrites cleanly afterwards
    assert all(s.rewritten for s in rewrite_report(rewritten).sites)


def test_strict_failure_changes_nothing():
    class Untraceable(nn.Conv2d):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: cannot be traced, so cannot be rewritten
                x = x * 2
            return super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 3, 3), Untraceable(3, 3, 3))
    before = _snapshot(model)
    with pytest.raises(convnorm_fx.RewriteError, match="strict=True"):
        apply(model, inplace=True, strict=True)
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------------------
# 7. Wrappers
# --------------------------------------------------------------------------------------


@pytest.fixture
def process_group():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'store'}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _ddp(model):
    return nn.parallel.DistributedDataParallel(model)


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("wrap", [_ddp, _fsdp1, _fsdp2], ids=["DDP", "FSDP", "fully_shard"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
def test_distributed_wrappers_are_refused_before_anything_changes(process_group, wrap, nested):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model = nn.Sequential(wrap(inner), nn.Conv2d(4, 4, 1)) if nested else wrap(inner)
    # (FSDP changes its own attributes lazily, so compare the structure, not every attribute.)
    structure = lambda: ([(n, type(m), id(m)) for n, m in model.named_modules()], [id(p) for p in model.parameters()])  # noqa: E731
    before = structure()
    with pytest.raises(TypeError, match=r"Rewrite first, then (wrap|shard).*convnorm_fx.apply\(model\)"):
        apply(model, inplace=True)
    assert structure() == before
    assert not any(isinstance(m, ConvNorm2d) for m in model.modules())


def test_compiled_models_are_refused():
    compiled = torch.compile(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(TypeError, match=r"torch.compile\(convnorm_fx.apply\(model\)\)"):
        apply(compiled)


@pytest.mark.parametrize("inplace", [False, True])
def test_data_parallel_is_rewritten_through_its_module(inplace):
    torch.manual_seed(0)
    net = Net()
    reference_net = copy.deepcopy(net)
    wrapper = nn.DataParallel(net)
    rewritten = apply(wrapper, inplace=inplace)
    assert isinstance(rewritten, nn.DataParallel) and (rewritten is wrapper) == inplace
    assert isinstance(rewritten.module.conv1, ConvNormConv2d)
    assert rewrite_report(rewritten).summary() == rewrite_report(rewritten.module).summary()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rewritten(x), apply(reference_net)(x))
    # The wrapper replicates the module it holds at every call: the new parameters train.
    rewritten(x).sum().backward()
    assert rewritten.module.conv1.norm.affine_weight.grad is not None


# --------------------------------------------------------------------------------------
# 8. Lazy modules
# --------------------------------------------------------------------------------------


def test_uninitialized_lazy_conv_is_a_clear_error_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.LazyConv2d(6, 3))
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"LazyConv2d '2' has no weight yet: run one forward pass"):
        apply(model, inplace=True)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    model(torch.randn(1, 3, 8, 8))  # materialized: now it works
    rewritten = apply(model)
    assert all(s.rewritten for s in rewrite_report(rewritten).sites)


# --------------------------------------------------------------------------------------
# 9. Modules that call F.conv2d keep their identity
# --------------------------------------------------------------------------------------


def test_functional_owner_keeps_class_methods_buffers_and_state_dict_behaviour():
    torch.manual_seed(0)
    net = Net()
    net.ws.state_dict_prefixes = []
    net.ws.register_state_dict_pre_hook(_record_state_dict_prefix)
    original_keys = set(net.state_dict())
    model = apply(net)
    ws = model.ws
    assert isinstance(ws, WSConv) and isinstance(ws, nn.Conv2d) and type(ws).__name__ == "WSConv"
    assert callable(ws.standardized_weight) and "calls" in dict(ws.named_buffers())
    model.ws.state_dict_prefixes.clear()
    keys = set(model.state_dict())
    assert model.ws.state_dict_prefixes == ["ws."]  # the state-dict hook ran
    assert original_keys <= keys and all("norm" in k or "convnorm" in k for k in keys - original_keys)
    # An original checkpoint loads: only the new stage keys missing, nothing unexpected.
    result = model.load_state_dict(net.state_dict(), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == _new_stage_keys(model, net.state_dict())
    # The custom _load_from_state_dict still runs (an old key name is renamed).
    old = {("ws.kernel" if k == "ws.weight" else k): v for k, v in net.state_dict().items()}
    model.load_state_dict(old, strict=False)
    assert model.ws.loaded_from_old_key
    # Copies and pickles keep the class and the rewritten forward.
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    for other in (copy.deepcopy(model), _save_load(model)):
        assert type(other.ws).__name__ == "WSConv" and isinstance(other.ws, WSConv)
        torch.testing.assert_close(other(x), model(x))


def _record_state_dict_prefix(module, prefix, keep_vars):
    module.state_dict_prefixes.append(prefix)


def _save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# --------------------------------------------------------------------------------------
# A state machine: training, edits and evaluation interleaved
# --------------------------------------------------------------------------------------


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.02, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.02, foreach=True),
}


class TrainingLoop(RuleBasedStateMachine):
    """Train steps (plain and fused optimizers), weight edits, checkpoint loads and eval
    passes under every grad mode and at two resolutions, in any order: every eval output
    equals a fresh ``conv_norm2d`` of the current weights."""

    def __init__(self):
        super().__init__()
        self.model = rewritten_net()
        self.optimizers = {name: make(self.model.parameters()) for name, make in OPTIMIZERS.items()}
        self.saved = copy.deepcopy(self.model.state_dict())
        self.step = 0

    @rule(optimizer=st.sampled_from(sorted(OPTIMIZERS)))
    def train_step(self, optimizer):
        self.step += 1
        _train_step(self.model, self.optimizers[optimizer], seed=self.step)

    @rule(edit=st.sampled_from(["data-in-place", "data-assignment", "vector_to_parameters"]))
    def edit_weights(self, edit):
        with torch.no_grad():
            EDITS[edit](self.model)

    @rule()
    def save_checkpoint(self):
        self.saved = copy.deepcopy(self.model.state_dict())

    @rule()
    def load_checkpoint(self):
        self.model.load_state_dict(self.saved)

    @rule(mode=st.sampled_from(["no_grad", "inference_mode", "grad"]), size=st.sampled_from([8, 11]))
    def evaluate(self, mode, size):
        self.model.eval()
        x = _input(size=size, seed=size)
        if mode == "grad":
            x.requires_grad_(True)
            out = self.model(x)
            out.sum().backward()  # an input gradient in eval mode, as an attack would take
        else:
            with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
                out = self.model(x)
        with torch.no_grad():
            torch.testing.assert_close(out.detach(), reference(self.model, x.detach()), rtol=TOL, atol=TOL)

    @rule()
    def evaluate_bypassed(self):
        self.model.eval()
        x = _input(size=9)
        with torch.no_grad(), bypass(self.model):
            out = self.model(x)
            h = F.relu(F.conv2d(x, self.model.conv1.weight, self.model.conv1.bias, padding=1))
            h = F.relu(F.conv2d(h, self.model.conv2.weight, None, stride=2, padding=1))
            ws = self.model.ws
            expected = F.conv2d(h, standardize(ws.weight), ws.bias, padding=1)
        torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)

    @invariant()
    def parameters_are_finite(self):
        assert all(bool(torch.isfinite(p).all()) for p in self.model.parameters())


TrainingLoop.TestCase.settings = settings(max_examples=12, stateful_step_count=12, deadline=None)
test_training_loop_state_machine = TrainingLoop.TestCase


class TaggedConv(nn.Conv2d):
    """A user's conv subclass that keeps nn.Conv2d's forward and adds a method."""

    def describe(self) -> str:
        return f"tagged {self.out_channels}"


def test_a_conv_subclass_becomes_a_subclass_of_both_and_pickles():
    torch.manual_seed(0)
    model = apply(nn.Sequential(TaggedConv(3, 4, 3, padding=1), nn.ReLU()))
    conv = model[0]
    assert isinstance(conv, TaggedConv) and isinstance(conv, ConvNormConv2d) and conv.describe() == "tagged 4"
    x = torch.randn(2, 3, 8, 8)
    for other in (copy.deepcopy(model), _save_load(model)):
        assert isinstance(other[0], TaggedConv) and isinstance(other[0], ConvNormConv2d)
        assert type(other[0]) is type(conv)  # the same generated class, rebuilt from its recipe
        torch.testing.assert_close(other(x), model(x))
