"""ConvNorm for conditionally parameterized convolutions (timm's ``CondConv2d``).

CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient
Inference", NeurIPS 2019) mixes ``E`` expert kernels per sample: ``W_b = sum_e r_be W_e``
with routing weights ``r`` computed from the input. timm runs all samples at once as one
grouped conv: the input is viewed as ``(1, B C_in, H, W)`` and convolved with the ``B C_out``
mixed kernels at ``groups = B g``.

ConvNorm is defined per output channel (Liu et al. 2021, eq. 6: ``P_k = (A_k A_k^T)^{-1/2}``),
and in that grouped conv every output channel of every sample is a channel of its own: the
same grouped conv through :func:`convnorm_fx.ops.conv_norm2d` gives each sample's mixed
kernel its own spectrum, which is exactly ConvNorm applied to each sample's conv alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .config import ConvNormConfig, stage_config
from .modules import ConvNorm2d, adopt_conv_parameters, refuse_torchscript
from .geometry import IntOrPair, pair

__all__ = ["ConvNormCondConv2d", "cond_conv_forward", "is_cond_conv2d"]



@functools.lru_cache(maxsize=1)
def _timm_cond_conv_class() -> type | None:
    try:
        from timm.layers.cond_conv2d import CondConv2d
    except ImportError:  # timm is a dependency, but keep the library importable without it
        return None
    return CondConv2d


def is_cond_conv2d(module: nn.Module) -> bool:
    """True for timm's ``CondConv2d`` and subclasses that keep its forward pass.

    Such a module can be swapped for :class:`ConvNormCondConv2d` without changing what it
    computes; a subclass with its own ``forward`` cannot.
    """
    cls = _timm_cond_conv_class()
    return cls is not None and isinstance(module, cls) and type(module).forward is cls.forward


def _pad_same(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """timm's dynamic TF "same" padding, the very function ``CondConv2d`` uses."""
    from timm.layers.padding import pad_same

    return pad_same(x, kernel_size, stride, dilation)


class ConvNormCondConv2d(nn.Module):
    """timm's ``CondConv2d`` with ConvNorm on each sample's mixed kernel.

    ``forward(x, routing_weights)`` mixes the expert kernels per sample as ``CondConv2d``
    does, then runs the grouped conv (``groups = B g``) through
    :func:`convnorm_fx.ops.conv_norm2d`: unstrided full conv -> each sample's per-channel
    preconditioner ``P_k`` -> affine ``r_k`` -> crop -> stride -> the sample's mixed bias ->
    BatchNorm (if ``bn``). The affine transform and the BatchNorm belong to the output
    channel and are shared by all samples (the affine kernels are repeated over the sample
    blocks of the grouped conv, which is the same as applying them to the output viewed as
    ``(B, C_out, ...)``).

    ``weight`` ``(E, C_out * C_in / g * k_h * k_w)`` and ``bias`` ``(E, C_out)`` keep
    ``CondConv2d``'s names and layout, so its checkpoints load with ``strict=False`` (the
    stage's affine and BN parameters, under ``norm.``, are then reported missing).

    The kernel changes with every sample, so the spectrum is always computed from the
    current mixed kernels, in training and in eval mode: ``eval_spectrum``, ``momentum`` and
    ``eval_kernel_cache`` are accepted for a uniform interface and have no effect (no cache,
    no running average).
    ``self.norm`` holds the stage's options and parameters; its own ``forward`` is not
    called, so hooks on it do not run and :func:`convnorm_fx.spectral_report` lists it as
    not called. Inside :func:`convnorm_fx.bypass` the module reproduces ``CondConv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as ``CondConv2d``.
        padding: zero padding (int or pair), as ``CondConv2d.padding`` after timm resolved
            its padding argument.
        bias: learn a bias per expert.
        num_experts: number of expert kernels ``E``.
        dynamic_padding: pad each input with timm's TF "same" padding (``CondConv2d``'s
            ``dynamic_padding``); the padded input is then the signal.
        device, dtype: factory arguments.
        config, **options: the stage's options, as for :class:`~convnorm_fx.modules.ConvNorm2d`
            (``eval_spectrum``, ``momentum`` and ``eval_kernel_cache`` have no effect here).

    Shape:
        - x: ``(B, C_in, H, W)``
        - routing_weights: ``(B, E)``
        - output: ``(B, C_out, H_out, W_out)``, ``H_out = (H + 2 p_h - d_h (k_h - 1) - 1) // s_h + 1``
          (with ``dynamic_padding``, ``H_out = ceil(H / s_h)``)

    Example:
        >>> conv = ConvNormCondConv2d(8, 16, 3, stride=2, padding=1, num_experts=4)
        >>> routing = torch.sigmoid(torch.randn(2, 4))
        >>> conv(torch.randn(2, 8, 16, 16), routing).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair = 3, stride: IntOrPair = 1,
        padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = False, num_experts: int = 4,
        dynamic_padding: bool = False, device: Any = None, dtype: torch.dtype | None = None, *,
        config: ConvNormConfig | None = None, **options: Any,
    ) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must be >= 1 and divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups = int(groups)
        self.num_experts = int(num_experts)
        self.dynamic_padding = bool(dynamic_padding)
        self.weight_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(self.num_experts, math.prod(self.weight_shape), **factory))
        if bias:
            self.bias_shape = (self.out_channels,)
            self.bias = nn.Parameter(torch.empty(self.num_experts, self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.install_stage(self.stage_for(self, config, **options))
        self.reset_parameters()

    @staticmethod
    def stage_for(cond_conv: nn.Module, config: ConvNormConfig | None = None, **options: Any) -> ConvNorm2d:
        """The :class:`~convnorm_fx.modules.ConvNorm2d` stage (options and parameters) for
        a ``CondConv2d``'s geometry, next to its weight.

        ``eval_spectrum``, ``momentum`` and ``eval_kernel_cache`` are accepted and ignored: see
        the class docstring.
        """
        # No cache and no running average: every sample has its own kernel.
        config = dataclasses.replace(stage_config(config, **options), eval_spectrum="cache", eval_kernel_cache=False)
        # With dynamic padding the padded input is the signal: the stage sees no zero padding.
        zero_padding = (0, 0) if cond_conv.dynamic_padding else cond_conv.padding
        weight = cond_conv.weight
        return ConvNorm2d(
            cond_conv.out_channels,
            cond_conv.kernel_size,
            cond_conv.stride,
            zero_padding,
            cond_conv.dilation,
            groups=cond_conv.groups,
            device=weight.device,
            dtype=weight.dtype,
            config=config,
        )

    def install_stage(self, stage: ConvNorm2d) -> None:
        """Make ``stage`` this module's ConvNorm stage (``self.norm``); :func:`convnorm_fx.apply`
        turns a timm ``CondConv2d`` into a ``ConvNormCondConv2d`` in place with it."""
        self.norm = stage

    def __prepare_scriptable__(self) -> "ConvNormCondConv2d":
        refuse_torchscript(self)

    def reset_parameters(self) -> None:
        """``CondConv2d``'s initialization of every expert, and the stage's own reset."""
        with torch.no_grad():
            for expert in self.weight:
                nn.init.kaiming_uniform_(expert.view(self.weight_shape), a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(math.prod(self.weight_shape[1:]))
                nn.init.uniform_(self.bias, -bound, bound)
        self.norm.reset_parameters()

    @classmethod
    def from_cond_conv(
        cls, cond_conv: nn.Module, config: ConvNormConfig | None = None, **options: Any
    ) -> "ConvNormCondConv2d":
        """Wrap a timm ``CondConv2d``, reusing its ``weight`` and ``bias`` Parameters.

        Args:
            cond_conv: a ``timm.layers.CondConv2d`` (subclasses that change its forward are
                rejected).
            config, **options: the stage's options, as for the constructor.
        """
        if isinstance(cond_conv, ConvNormCondConv2d):
            raise TypeError("this CondConv already has ConvNorm; apply it once")
        if not is_cond_conv2d(cond_conv):
            raise TypeError(
                f"from_cond_conv expects a timm CondConv2d (forward not overridden), got {type(cond_conv).__name__}"
            )
        weight = cond_conv.weight
        new = cls(
            cond_conv.in_channels, cond_conv.out_channels, cond_conv.kernel_size, cond_conv.stride, cond_conv.padding,
            cond_conv.dilation, cond_conv.groups, cond_conv.bias is not None, cond_conv.num_experts,
            cond_conv.dynamic_padding, device="meta", dtype=weight.dtype, config=config, **options,
        )
        return adopt_conv_parameters(new, cond_conv)

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}",
            f"kernel_size={self.kernel_size}",
            f"stride={self.stride}",
            "padding='same' (dynamic)" if self.dynamic_padding else f"padding={self.padding}",
        ]
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        parts.append(f"num_experts={self.num_experts}")
        parts.append(f"bias={self.bias is not None}")
        return ", ".join(parts)

    def mixed_kernels(self, routing_weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """Every sample's kernel and bias, mixed from the experts as ``CondConv2d`` does.

        Sample-major: channel ``b * C_out + k`` is channel ``k`` of sample ``b``, as in the
        grouped conv (and what :func:`convnorm_fx.checks.check_sites` measures per sample).

        Shape:
            - routing_weights: ``(B, E)``
            - output: weight ``(B * C_out, C_in / g, k_h, k_w)``, bias ``(B * C_out,)`` or ``None``
        """
        b = routing_weights.shape[0]
        weight = torch.matmul(routing_weights, self.weight).view(b * self.out_channels, *self.weight_shape[1:])
        bias = None
        if self.bias is not None:
            bias = torch.matmul(routing_weights, self.bias).view(b * self.out_channels)
        return weight, bias

    def grouped_signal(self, x: Tensor) -> Tensor:
        """The input as the grouped conv sees it: samples stacked along channels, then
        padded with timm's dynamic "same" padding if ``dynamic_padding``.

        Shape:
            - x: ``(B, C_in, H, W)``
            - output: ``(1, B * C_in, H', W')`` (``H' = H`` without dynamic padding)
        """
        b, c, h, w = x.shape
        signal = x.reshape(1, b * c, h, w)  # reshape, not view: channels_last inputs
        if self.dynamic_padding:
            signal = _pad_same(signal, self.kernel_size, self.stride, self.dilation)
        return signal

    def forward(self, x: Tensor, routing_weights: Tensor) -> Tensor:
        return cond_conv_forward(self, x, routing_weights)

    def _forward_unwrapped(self, x: Tensor, routing_weights: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an input (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        if tuple(routing_weights.shape) != (b, self.num_experts):
            raise ValueError(
                f"routing_weights must have shape (B, num_experts) = ({b}, {self.num_experts}), "
                f"got {tuple(routing_weights.shape)}"
            )
        stage = self.norm
        normalize = not stage.bypassed
        weight, bias = self.mixed_kernels(routing_weights)  # (B C_out, C_in / g, k_h, k_w), (B C_out,)
        signal = self.grouped_signal(x)  # (1, B C_in, H', W')
        checking = stage.checking_finite()
        if checking:
            stage.require_finite("weight", weight)
            stage.require_finite("input", signal)
        affine_weight = affine_bias = None
        if normalize and stage.affine_weight is not None:
            # The same r_k for every sample: repeat it over the B sample blocks.
            affine_weight = stage.affine_weight.repeat(b, 1, 1, 1)  # (B C_out, 1, k_h, k_w)
            affine_bias = stage.affine_bias.repeat(b)  # (B C_out,)
        out = ops.conv_norm2d(
            signal,
            weight,
            bias,
            self.stride,
            (0, 0) if self.dynamic_padding else self.padding,
            self.dilation,
            self.groups * b,
            eps=stage.eps,
            stop_gradient=stage.stop_gradient,
            affine_weight=affine_weight,
            affine_bias=affine_bias,
            normalize=normalize,
            algorithm=stage.algorithm,
        )  # (1, B C_out, H_out, W_out)
        out = out.reshape(b, self.out_channels, out.shape[-2], out.shape[-1])
        if stage.bn is not None and normalize:
            out = stage.bn(out)
        if checking:
            stage.require_finite("output", out)
        return out


@torch.fx.wrap
def cond_conv_forward(module: ConvNormCondConv2d, x: Tensor, routing_weights: Tensor) -> Tensor:
    """``module(x, routing_weights)``, which every ``torch.fx`` tracer records as one call (the
    grouped conv's groups depend on the batch size, which symbolic tracing cannot follow)."""
    return module._forward_unwrapped(x, routing_weights)
