"""Run a model once and record what each ConvNorm stage saw: its weight and its grid.

One pass serves the tools that measure or freeze stages: :func:`convnorm_fx.deploy.freeze`
(the size each stage runs at), :func:`convnorm_fx.spectral_report` (the spectra of the
weights the stages normalize) and :func:`convnorm_fx.checks.check_sites` (the tight frame of
each stage's preconditioner). A weight-standardized site records the standardized weight,
exactly what the stage receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .cond_conv import ConvNormCondConv2d
from .geometry import grid_size
from .modules import ConvNorm2d

__all__ = ["StageCall", "record_stage_calls"]


@dataclass
class StageCall:
    """One call of a ConvNorm stage.

    Attributes:
        name: the stage's qualified name in the model.
        stage: the stage.
        weight: the conv weight it normalized, detached; for a CondConv, every sample's mixed
            kernel, ``(B * C_out, C_in / g, k_h, k_w)``.
        grid: the circular domain ``(M_h, M_w)`` it normalized on (``(1, 1)`` for 1x1 kernels).
        index: how many calls of the same stage came before this one.
    """

    name: str
    stage: ConvNorm2d
    weight: Tensor
    grid: tuple[int, int]
    index: int = 0


def _stage_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> list[Any]:
    """The first ``len(names)`` arguments of a call, given positionally or by keyword."""
    values = list(args[: len(names)]) + [kwargs[n] for n in names[len(args[: len(names)]) :] if n in kwargs]
    if len(values) < len(names):
        raise ValueError(f"a ConvNorm module was called without ({', '.join(names)}); cannot record it")
    return values


def record_stage_calls(model: nn.Module, *inputs: Any, cond_convs: bool = True, **kwargs: Any) -> list[StageCall]:
    """Run ``model(*inputs, **kwargs)`` once in eval mode without gradients and record every
    stage call in order. Modes are restored afterwards, also after an error.

    Args:
        model: a rewritten model.
        *inputs, **kwargs: the call's arguments.
        cond_convs: also record :class:`~convnorm_fx.cond_conv.ConvNormCondConv2d` sites,
            whose stage is not called (their kernel is mixed per sample).
    """
    names = {id(m): name for name, m in model.named_modules()}
    calls: list[StageCall] = []
    counts: dict[int, int] = {}

    def add(name: str, stage: ConvNorm2d, weight: Tensor, grid: tuple[int, int]) -> None:
        index = counts.get(id(stage), 0)
        counts[id(stage)] = index + 1
        calls.append(StageCall(name, stage, weight.detach(), grid, index))

    def record_stage(stage: nn.Module, args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> None:
        y, weight = _stage_arguments(args, call_kwargs, ("y", "weight"))
        grid = (1, 1) if tuple(stage.kernel_size) == (1, 1) else (int(y.shape[-2]), int(y.shape[-1]))
        add(names[id(stage)], stage, weight, grid)

    def record_cond_conv(conv: nn.Module, args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> None:
        x, routing = _stage_arguments(args, call_kwargs, ("x", "routing_weights"))
        weight, _ = conv.mixed_kernels(routing)
        size = conv.grouped_signal(x).shape[-2:]
        grid = (1, 1) if conv.kernel_size == (1, 1) else grid_size(size, conv.kernel_size, conv.dilation)
        add(names[id(conv.norm)], conv.norm, weight, grid)

    handles = []
    for module in model.modules():
        if isinstance(module, ConvNorm2d):
            handles.append(module.register_forward_pre_hook(record_stage, with_kwargs=True))
        elif cond_convs and isinstance(module, ConvNormCondConv2d):
            handles.append(module.register_forward_pre_hook(record_cond_conv, with_kwargs=True))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    return calls
