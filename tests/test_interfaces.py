"""The interfaces users meet: other tools' tracers on rewritten models, TorchScript's refusal,
option validation, ``overrides`` precedence, and the command line's answers to bad input."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import convnorm_fx
from convnorm_fx import ConvNormConfig, ConvNormConv2d, apply, rewrite_report
from convnorm_fx.cli import main

REL_TOL = 1e-5  # a traced graph runs each site directly; eager may run it in the frequency domain


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max()) / max(float(expected.abs().max()), 1e-12)


def _rewritten(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply(model).eval()


# --------------------------------------------------------------------------------------
# 1. Other tracers
# --------------------------------------------------------------------------------------

TRACER_MODELS = {
    "tv-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv-mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "timm-test_nfnet": lambda: timm.create_model("test_nfnet", num_classes=10),  # ScaledStdConv2d: functional sites
    "timm-test_efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=10),
}


@pytest.mark.parametrize("name", TRACER_MODELS, ids=list(TRACER_MODELS))
def test_torchvision_feature_extraction_of_rewritten_models(name):
    torch.manual_seed(0)
    model = _rewritten(TRACER_MODELS[name]())
    train_nodes, eval_nodes = get_graph_node_names(model)
    names = [s.name.partition("#")[0] for s in rewrite_report(model).rewritten]
    # A module's name returns its output (torchvision keeps some conv blocks as leaves: those
    # convs have no node of their own, rewritten or not).
    visible = [n for n in names if any(node == n or node.startswith(n + ".") for node in eval_nodes)]
    assert visible or name == "tv-mobilenet_v3_small"  # (all its convs sit in torchvision's leaf blocks)
    site = visible[len(visible) // 2] if visible else eval_nodes[len(eval_nodes) // 2]
    extractor = create_feature_extractor(model, return_nodes={site: "site", eval_nodes[-1]: "out"})
    captured = {}
    if visible:
        model.get_submodule(site).register_forward_hook(lambda module, args, out: captured.update(site=out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(x)
        assert _relative_error(features["out"], model(x)) <= REL_TOL
    if visible:
        assert _relative_error(features["site"], captured["site"]) <= REL_TOL


@pytest.mark.parametrize("name", TRACER_MODELS, ids=list(TRACER_MODELS))
def test_timm_feature_extraction_of_rewritten_models(name):
    """timm's FX path keeps the library's modules as leaves: the graph equals eager exactly."""
    torch.manual_seed(0)
    model = _rewritten(TRACER_MODELS[name]())
    _, eval_nodes = timm.layers.get_graph_node_names(model)
    extractor = timm.layers.create_feature_extractor(model, {eval_nodes[-1]: "out"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["out"], model(x), rtol=1e-6, atol=1e-6)


def test_timm_feature_graph_net_and_features_only_models():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = _rewritten(timm.create_model("test_resnet", num_classes=10))
    graph_net = timm.models.FeatureGraphNet(model, out_indices=(1, 2))
    features_only = _rewritten(timm.create_model("test_efficientnet", features_only=True, feature_cls="fx"))
    with torch.no_grad():
        assert [f.shape[1] for f in graph_net(x)] == [info["num_chs"] for info in graph_net.feature_info.get_dicts()]
        assert all(torch.isfinite(f).all() for f in features_only(x))
    assert any(isinstance(m, ConvNormConv2d) for m in features_only.modules())


def test_symbolic_trace_of_rewritten_models_with_every_site_kind():
    """Module sites, a weight-standardized (functional) site and a CondConv, traced by torch.fx."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.std = timm.layers.StdConv2d(8, 8, 3, padding=1)
            self.cond = timm.layers.CondConv2d(8, 8, 3, padding=1, num_experts=2)
            self.route = nn.Linear(8, 2)

        def forward(self, x):
            x = self.std(F.relu(self.stem(x)))
            return self.cond(x, torch.sigmoid(self.route(x.mean((2, 3)))))

    model = _rewritten(Net())
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _relative_error(traced(x), model(x)) <= REL_TOL


# --------------------------------------------------------------------------------------
# 2. TorchScript: a clear refusal, every time
# --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_torchscript_is_refused_clearly_and_again():
    model = _rewritten(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    for _ in range(2):  # a second attempt gives the same message, nothing half-registered
        with pytest.raises(NotImplementedError, match=r"TorchScript is not supported.*torch\.compile.*torch\.export.*freeze"):
            torch.jit.script(model)
    for module in (model[0], model[0].norm, convnorm_fx.ConvNormCondConv2d(3, 4, 3)):
        with pytest.raises(NotImplementedError, match="TorchScript is not supported"):
            torch.jit.script(module)


# --------------------------------------------------------------------------------------
# 3. overrides: exact names first, then regexes in order; unmatched keys are errors
# --------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
        self.layer2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))

    def forward(self, x):
        return self.layer2(self.layer1(self.conv1(x)))


SITE_NAMES = ["conv1", "layer1.0", "layer1.1", "layer2.0"]


def _eps_by_site(model: nn.Module) -> dict[str, float | None]:
    return {name: (model.get_submodule(name).norm.eps if isinstance(model.get_submodule(name), ConvNormConv2d) else None) for name in SITE_NAMES}


def test_exact_names_win_over_earlier_regexes():
    model = apply(Net(), overrides={".*": {"eps": 1e-3}, "conv1": None})
    assert _eps_by_site(model) == {"conv1": None, "layer1.0": 1e-3, "layer1.1": 1e-3, "layer2.0": 1e-3}
    assert rewrite_report(model).sites[0].reason == "excluded by overrides['conv1']"


def test_regexes_apply_in_order_and_configs_replace_options():
    config = ConvNormConfig(eps=0.5, bn=False)
    model = apply(Net(), eps=1e-4, overrides={r"layer.*": {"eps": 1e-2}, r"layer1\..*": config, r"conv\d": config})
    assert _eps_by_site(model) == {"conv1": 0.5, "layer1.0": 1e-2, "layer1.1": 1e-2, "layer2.0": 1e-2}


def test_an_override_key_that_matches_nothing_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"overrides key 'conv_1' matches no conv site; closest site names: conv1"):
        apply(Net(), overrides={"conv_1": None})
    before = apply(Net(), overrides={"conv_1": None}, unmatched_overrides="ignore")
    assert all(s.rewritten for s in rewrite_report(before).sites)
    with pytest.warns(UserWarning, match="matches no conv site"):
        apply(Net(), overrides={"layer3.*": None}, unmatched_overrides="warn")


OVERRIDE_KEYS = st.sampled_from(SITE_NAMES + [r".*", r"layer1\..*", r"layer\d\.0", r"conv.", r"layer2.*", "layer1"])


@settings(max_examples=40, deadline=None)
@given(entries=st.lists(st.tuples(OVERRIDE_KEYS, st.sampled_from([None, 1e-3, 1e-2, 1e-1])), max_size=5, unique_by=lambda e: e[0]))
def test_override_precedence_is_the_documented_rule(entries):
    """For any overrides, each site gets: the entry whose key is its name, else the first
    entry (in order) whose regex matches its whole name, else the defaults."""
    overrides = {key: None if eps is None else {"eps": eps} for key, eps in entries}

    def documented(name):
        for key, eps in entries:
            if key == name:
                return eps, True
        for key, eps in entries:
            if re.fullmatch(key, name):
                return eps, True
        return convnorm_fx.DEFAULT_EPS, False

    matched_keys = {k for k, _ in entries if any(k == n or re.fullmatch(k, n) for n in SITE_NAMES)}
    if matched_keys != {k for k, _ in entries}:
        with pytest.raises(ValueError, match="matches no conv site"):
            apply(Net(), overrides=overrides)
        return
    got = _eps_by_site(apply(Net(), overrides=overrides))
    assert got == {name: documented(name)[0] for name in SITE_NAMES}


# --------------------------------------------------------------------------------------
# 4. Options validated at the door
# --------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"affine": "no"}, TypeError, r"affine must be True or False, got 'no'"),
    ({"inplace": "no"}, TypeError, r"inplace must be True or False, got 'no'"),
    ({"strict": 1}, TypeError, r"strict must be True or False"),
    ({"stop_gradient": None}, TypeError, r"stop_gradient must be True or False"),
    ({"check_finite": "yes"}, TypeError, r"check_finite must be True or False"),
    ({"graph_module": 0}, TypeError, r"graph_module must be True or False"),
    ({"eps": True}, TypeError, r"eps must be a finite real number >= 0.*got True"),
    ({"eps": "x"}, TypeError, r"eps must be a finite real number"),
    ({"eps": None}, TypeError, r"eps must be a finite real number"),
    ({"eps": -1.0}, ValueError, r"eps must be a finite real number >= 0"),
    ({"eps": float("inf")}, ValueError, r"eps must be a finite real number"),
    ({"momentum": "x"}, TypeError, r"momentum must be a real number in \[0, 1\]"),
    ({"momentum": 1.5}, ValueError, r"momentum must be a real number in \[0, 1\]"),
    ({"bn": "yes"}, ValueError, r"bn must be one of 'auto', True, False"),
    ({"bn": 1}, TypeError, r"bn must be one of 'auto', True, False; got 1 \(int\)"),
    ({"eval_spectrum": "ema"}, ValueError, r"eval_spectrum must be one of 'cache', 'running'"),
    ({"affine_init": "random"}, ValueError, r"affine_init must be one of 'identity', 'default'"),
    ({"unmatched_overrides": "skip"}, ValueError, r"unmatched_overrides must be one of 'error', 'warn', 'ignore'"),
    ({"overrides": {"conv1": "skip"}}, TypeError, r"overrides\['conv1'\] must be None .*, a dict of options or a ConvNormConfig"),
    ({"overrides": {"conv1": {"epz": 1.0}}}, TypeError, r"overrides\['conv1'\]: unknown ConvNorm option 'epz' \(did you mean 'eps'\?\)"),
    ({"overrides": {"conv1": {"eps": -1.0}}}, ValueError, r"overrides\['conv1'\]: eps must be"),
    ({"overrides": {"[conv": None}}, ValueError, r"overrides key '\[conv' is not a valid regular expression"),
    ({"overrides": {1: None}}, TypeError, r"overrides keys must be site names or regexes"),
    ({"overrides": ["conv1"]}, TypeError, r"overrides must be a dict"),
    ({"tracer_options": {"leaf_modules": nn.ReLU}}, TypeError, r"leaf_modules must be a sequence of nn.Module classes, got the class ReLU itself: pass \[ReLU\]"),
    ({"tracer_options": {"leaf_modules": [nn.ReLU()]}}, TypeError, r"leaf_modules must hold nn.Module classes"),
    ({"tracer_options": {"autowrap_functions": F.relu}}, TypeError, r"autowrap_functions must be a sequence of functions"),
    ({"filter_fn": 3}, TypeError, r"filter_fn must be a callable"),
    ({"tracer_options": {"concrete_args": [1]}}, TypeError, r"concrete_args must be a dict"),
    ({"tracer_options": {"leaf_module": [nn.ReLU]}}, TypeError, r"tracer_options has unknown key 'leaf_module'"),
    ({"leaf_modules": [nn.ReLU]}, TypeError, r"leaf_modules is a tracer option: pass tracer_options=\{'leaf_modules': ...\}"),
    ({"epz": 1.0}, TypeError, r"unknown ConvNorm option 'epz' \(did you mean 'eps'\?\)"),
    ({"config": {"eps": 1.0}}, TypeError, r"config must be a ConvNormConfig or None"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=[repr(o) for o, _, _ in BAD_OPTIONS])
def test_bad_options_are_refused_with_the_option_value_and_what_is_allowed(options, error, message):
    model = Net()
    with pytest.raises(error, match=message):
        apply(model, inplace=True, **options) if "inplace" not in options else apply(model, **options)
    assert not any(isinstance(m, ConvNormConv2d) for m in model.modules())  # nothing changed


@pytest.mark.parametrize(
    "options, error",
    [({"affine": 1}, TypeError), ({"eps": "1e-5"}, TypeError), ({"momentum": -0.1}, ValueError), ({"bn": None}, TypeError)],
)
def test_modules_validate_their_options_too(options, error):
    with pytest.raises(error):
        convnorm_fx.ConvNorm2d(4, 3, **options)


# --------------------------------------------------------------------------------------
# 5. The command line: one line, exit status 2, no traceback, paths checked first
# --------------------------------------------------------------------------------------

CLI_ARGS = ["--repeats", "0"]
BAD_CLI_INPUTS = {
    "missing module": (["inspect", "x", "--source", "no_such_module:build"], r"cannot import 'no_such_module'"),
    "missing callable": (["inspect", "x", "--source", "cli_models:nope"], r"module 'cli_models' has no attribute 'nope'"),
    "factory raises": (["inspect", "x", "--source", "cli_models:raising_factory"], r"raising_factory\(\) raised RuntimeError: broken"),
    "not a module": (["inspect", "x", "--source", "cli_models:not_a_model"], r"not_a_model\(\) returned a list, not an nn.Module"),
    "zero size": (["inspect", "x", "--source", "cli_models:tiny_net", "--input-size", "3", "0", "16"], r"--input-size must be three positive"),
    "negative size": (["inspect", "x", "--source", "cli_models:tiny_net", "--input-size", "3", "-4", "16"], r"--input-size must be three positive"),
    "wrong channels": (["inspect", "x", "--source", "cli_models:tiny_net", "--input-size", "4", "16", "16"], r"does not take inputs of size \(4, 16, 16\)"),
    "json in a missing directory": (["inspect", "--json", "/no/such/dir/out.json"], r"--json '/no/such/dir/out.json': the directory '/no/such/dir' does not exist"),
    "plot in a missing directory": (["inspect", "--plot", "/no/such/dir/f.png"], r"--plot .* does not exist"),
    "bad zoo filter": (["zoo", "--filter", "["], r"--filter '\[' is not a valid regular expression"),
    "zero batch size": (["inspect", "--batch-size", "0"], r"--batch-size: must be a positive integer, got 0"),
    "negative threads": (["inspect", "--threads", "-1"], r"--threads: must be 0 or a positive integer"),
    "unknown option": (["inspect", "--colour"], r"unrecognized arguments: --colour"),
    "non-integer size": (["inspect", "--input-size", "3", "a", "16"], r"--input-size: must be an integer, got 'a'"),
}


@pytest.mark.parametrize("case", BAD_CLI_INPUTS, ids=list(BAD_CLI_INPUTS))
def test_cli_answers_bad_input_with_one_line_and_status_2(case, capsys, monkeypatch):
    argv, message = BAD_CLI_INPUTS[case]
    if "directory" in case:  # checked before any work: building a model would fail the test
        monkeypatch.setattr(convnorm_fx.cli, "build_model", lambda *a, **k: pytest.fail("built a model before checking paths"))
    status = main([*argv, *(CLI_ARGS if argv[0] == "inspect" else [])])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("convnorm-fx: error:"), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_cli_process_prints_no_traceback_and_sets_a_passive_wait_policy():
    code = (
        "import os, sys; from convnorm_fx.cli import main; "
        "print(os.environ['OMP_WAIT_POLICY'], file=sys.stderr); sys.exit(main(['zoo', '--filter', '[']))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[0] == "PASSIVE" and "Traceback" not in result.stderr
    assert len(lines) == 2 and lines[1].startswith("convnorm-fx: error: --filter")
    assert "torch" not in __import__("subprocess").run(
        [sys.executable, "-c", "import sys, convnorm_fx; print(' '.join(m for m in sys.modules if m == 'torch'))"],
        capture_output=True, text=True,
    ).stdout  # importing the package does not load PyTorch (so the policy can still apply)


def test_cli_traceback_flag_shows_where(capsys):
    assert main(["inspect", "x", "--source", "cli_models:raising_factory", "--traceback", *CLI_ARGS]) == 2
    assert "Traceback" in capsys.readouterr().err
