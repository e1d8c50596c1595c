"""Facts about a traced graph that the rewrite needs: what a conv's output flows into, what
its input and its weight are made of, and which module's code made a node.

They decide where ``bn="auto"`` adds a BatchNorm (not where the conv output already flows
into a normalization, nor on globally pooled maps), which weights are learned, and which
module owns a functional conv.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

__all__ = [
    "conv_args",
    "flows_into_norm",
    "is_norm_module",
    "is_parametrization",
    "join",
    "next_sibling_norm",
    "reads_pooled_map",
    "stack_owner",
    "weight_sources",
]


_NORM_CLASSES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, timm BatchNormAct2d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
_NORM_NAME = re.compile(r"(Batch|Group|Layer|Instance|RMS|Frozen\w*)Norm")
_NORM_FUNCTIONS = {
    F.batch_norm,
    F.layer_norm,
    F.group_norm,
    F.instance_norm,
    torch.batch_norm,
    torch.layer_norm,
    torch.group_norm,
    torch.instance_norm,
}
if hasattr(F, "rms_norm"):
    _NORM_FUNCTIONS.add(F.rms_norm)
# Nodes a conv output may pass through and still "flow into" a normalization.
_TRANSPARENT_METHODS = {
    "permute", "reshape", "view", "contiguous", "flatten", "transpose", "to", "float", "clone", "type_as", "add", "add_",
    "relu", "relu_",
}  # fmt: skip
_TRANSPARENT_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.flatten, torch.permute, torch.reshape, F.relu}
_TRANSPARENT_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.Flatten,
)
_MAX_HOPS = 4
_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_ARG_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def is_norm_module(module: nn.Module) -> bool:
    if isinstance(module, _NORM_CLASSES):
        return True
    return bool(_NORM_NAME.search(type(module).__name__)) and not any(isinstance(m, nn.Conv2d) for m in module.modules())


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def conv_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a conv2d call node by name, defaults filled in."""
    args = dict(_ARG_DEFAULTS)
    args.update(zip(_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return args


def flows_into_norm(node: fx.Node, root: nn.Module) -> str | None:
    """Name of a normalization the value of ``node`` reaches through transparent ops, if any."""
    frontier, seen = [(node, 0)], set()
    while frontier:
        current, hops = frontier.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                module = root.get_submodule(user.target)
                if is_norm_module(module):
                    return f"{type(module).__name__} '{user.target}'"
                transparent = isinstance(module, _TRANSPARENT_MODULES) or "DropPath" in type(module).__name__
            elif user.op == "call_function":
                if user.target in _NORM_FUNCTIONS:
                    return f"{getattr(user.target, '__name__', user.target)}()"
                transparent = user.target in _TRANSPARENT_FUNCTIONS
            elif user.op == "call_method":
                if user.target in ("batch_norm", "layer_norm", "group_norm"):
                    return f".{user.target}()"
                transparent = user.target in _TRANSPARENT_METHODS
            else:
                transparent = False
            if transparent and hops + 1 < _MAX_HOPS:
                frontier.append((user, hops + 1))
    return None


_GLOBAL_POOL_MODULES: tuple[type, ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def reads_pooled_map(node: fx.Node, root: nn.Module) -> str | None:
    """Whether the conv's input is a global pooling (squeeze-excite, gating branches)."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    for _ in range(2 * _MAX_HOPS):
        if not isinstance(source, fx.Node):
            return None
        if source.op == "call_module":
            module = root.get_submodule(source.target)
            size = getattr(module, "output_size", None)
            if isinstance(module, _GLOBAL_POOL_MODULES) and size in (1, (1, 1)):
                return f"{type(module).__name__} '{source.target}'"
            if "Pool" in type(module).__name__ and "Select" in type(module).__name__:
                return f"{type(module).__name__} '{source.target}'"  # timm SelectAdaptivePool2d
            keeps_size = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            if not (isinstance(module, _TRANSPARENT_MODULES) or keeps_size or "Act" in type(module).__name__):
                return None
        elif source.op == "call_method" and source.target in ("mean", "amax", "sum"):
            dims = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim")
            dims = {dims} if isinstance(dims, int) else set(dims or ())
            if {2, 3} <= dims or {-2, -1} <= dims:
                return f".{source.target}() over the spatial axes"
            return None
        elif source.op == "call_function" and source.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean):
            return f"{getattr(source.target, '__name__', source.target)}()"
        elif not (source.op == "call_function" and source.target in _TRANSPARENT_FUNCTIONS):
            if not (source.op == "call_method" and source.target in _TRANSPARENT_METHODS):
                return None
        source = source.args[0] if source.args else None
    return None


def next_sibling_norm(parent: nn.Module, name: str) -> str | None:
    """For convs found by walking modules: is the next registered sibling a normalization?"""
    names = list(parent._modules)
    index = names.index(name)
    if index + 1 < len(names):
        sibling = parent._modules[names[index + 1]]
        if sibling is not None and is_norm_module(sibling):
            return f"{type(sibling).__name__} '{names[index + 1]}' (next module)"
    return None


def weight_sources(weight: fx.Node | Any, root: nn.Module) -> tuple[list[tuple[str, Any]], bool]:
    """What a conv's weight node is computed from: ``get_attr`` ancestors and the parameters
    of modules called on the way (a parametrization), by qualified name; and whether it
    depends on a forward input (a kernel made per sample)."""
    if not isinstance(weight, fx.Node):
        return [], False
    found, stack, seen, from_input = [], [weight], set(), False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            found.append((node.target, _attribute(root, node.target)))
        elif node.op == "call_module":
            module = root.get_submodule(node.target)
            found.extend((join(node.target, name), p) for name, p in module.named_parameters())
        elif node.op == "placeholder":
            from_input = True
        stack.extend(node.all_input_nodes)
    return found, from_input


def _attribute(root: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def is_parametrization(module: nn.Module) -> bool:
    return isinstance(module, parametrize.ParametrizationList)


def stack_owner(node: fx.Node) -> tuple[str, bool]:
    """The qualified name of the module whose own code made ``node`` (from the tracer's
    module stack), and whether this is that module's first call."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", True
    key = next(reversed(stack))
    path = stack[key][0] if isinstance(stack[key], tuple) else key
    return path, re.search(r"@\d+$", key) is None
