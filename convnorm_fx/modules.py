"""Thin ``nn.Module`` wrappers over :mod:`convnorm_fx.ops`.

* :class:`ConvNorm2d` is the normalization stage of one conv site (preconditioner, affine
  transform, crop, stride, conv bias, optional BatchNorm). It owns no conv weight: the
  weight it normalizes is passed to ``forward``, so a graph rewrite can feed it the
  original Parameter or a weight computed from one (weight standardization).
* :class:`ConvNormConv2d` is a drop-in ``nn.Conv2d`` with ConvNorm built in.
* :func:`bypass` turns the normalization off on a whole model, for ablations and for
  checking that a rewrite is faithful.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, NamedTuple, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .geometry import IntOrPair, PaddingArg, pair
from .precision import autocast_disabled, compute_dtype, spectral_dtypes, spectrum_dtype
from .spectral import SpectralPlan, eval_operator
from .config import ConvNormConfig, stage_config

__all__ = [
    "ConvNorm2d",
    "ConvNormConv2d",
    "FeedingConv",
    "bypass",
    "check_stage_arguments",
    "finish_stage_call",
    "refuse_torchscript",
    "stage_forward",
]



def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward hooks (its own or global ones)."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(hooks, "_global_forward_hooks", None)
        or getattr(hooks, "_global_forward_pre_hooks", None)
    )


def check_stage_arguments(stage: nn.Module, weight: Tensor, y: Tensor | None = None) -> None:
    """Raise ``ValueError`` if ``weight`` (or the conv output ``y``) does not fit ``stage``."""
    if weight.shape[0] != stage.num_channels or tuple(weight.shape[2:]) != stage.kernel_size:
        raise ValueError(
            f"{type(stage).__name__} was built for {stage.num_channels} channels and kernel {stage.kernel_size}, "
            f"got a weight of shape {tuple(weight.shape)}"
        )
    if y is not None and (y.dim() != 4 or y.shape[1] != stage.num_channels):
        raise ValueError(f"expected a conv output (N, {stage.num_channels}, H, W), got shape {tuple(y.shape)}")


class _PreconditionerCache(NamedTuple):
    """The eval-mode spectrum and what it was computed from."""

    key: tuple[Any, ...]  # grid, weight shape, dtype and device, eps, dilation
    weight: Tensor  # a copy of the weight's values
    inv_sqrt: Tensor
    # Per-frequency operators of the spectral algorithm for this weight (``eval_kernel_cache``).
    operators: dict[tuple[Any, ...], tuple[Tensor | None, Tensor]]


def refuse_torchscript(module: nn.Module) -> NoReturn:
    """Raise the error ``torch.jit.script`` meets on a ConvNorm module (it calls each module's
    ``__prepare_scriptable__`` before compiling anything, so nothing is left half-compiled)."""
    raise NotImplementedError(
        f"TorchScript is not supported: {type(module).__name__} (convnorm_fx) cannot be compiled by "
        "torch.jit.script, which is deprecated in PyTorch 2.14. Use torch.compile(model) for speed, "
        "torch.export.export(model, (example_input,)) for a graph, or "
        "convnorm_fx.deploy.freeze(model, input_size) followed by torch.onnx.export for ONNX."
    )


def _cacheable(weight: Tensor) -> bool:
    """Whether the values of ``weight`` can be compared: a plain tensor with storage (not a
    fake, functional or meta tensor seen while tracing or exporting)."""
    return type(weight) in (Tensor, nn.Parameter) and weight.device.type != "meta"


def adopt_conv_parameters(new: nn.Module, conv: nn.Module) -> Any:
    """Give ``new`` (built on the meta device) the very Parameters ``weight`` and ``bias`` of
    ``conv``, materialize its ConvNorm stage ``new.norm`` next to them, and copy the mode.

    Sharing the Parameters keeps their names and identity: checkpoints and optimizers that
    hold them still work after a module swap.
    """
    new.weight = conv.weight
    new.bias = conv.bias
    new.norm.to_empty(device=conv.weight.device)
    new.norm.reset_parameters()
    new.train(conv.training)
    return new


class FeedingConv:
    """The conv that feeds a stage, from the stage's ``kernel_size``, ``stride``, ``padding``
    and ``dilation`` (shared by :class:`ConvNorm2d` and the frozen stage of
    :mod:`convnorm_fx.deploy`)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]

    @property
    def feeding_stride(self) -> tuple[int, int]:
        """Stride of the conv whose output this stage takes."""
        return ops.feeding_conv_args(self.kernel_size, self.stride, self.padding, self.dilation)[0]

    @property
    def feeding_padding(self) -> tuple[int, int]:
        """Padding of the conv whose output this stage takes."""
        return ops.feeding_conv_args(self.kernel_size, self.stride, self.padding, self.dilation)[1]


class ConvNorm2d(FeedingConv, nn.Module):
    """ConvNorm stage of one conv site (Liu et al. 2021, §3.2-3.3, Appendix B).

    ``forward(y, weight, bias)`` takes the output of the conv that feeds it (see
    :func:`convnorm_fx.ops.feeding_conv_args`: the unstrided "full" conv, or the conv itself
    for 1x1 kernels) and the conv's weight, and returns what the original conv would
    return, normalized: preconditioner ``P_k`` -> affine ``r_k`` -> crop -> stride -> conv
    bias -> BatchNorm (if ``bn``).

    Args:
        num_channels: ``C_out`` of the conv.
        kernel_size, stride, padding, dilation, groups: the original conv's geometry
            (``groups`` only describes the layer; the math needs just the weight). ``padding``
            is its zero padding (int, pair, ``'same'``, ``'valid'``, or an explicit
            ``(top, bottom, left, right)``); for other padding modes, pad the input first
            and pass ``padding=0``.
        config: the stage's options (:class:`~convnorm_fx.config.ConvNormConfig`; default
            :data:`~convnorm_fx.config.STAGE_DEFAULTS`, which has no BatchNorm). ``bn`` must be
            ``True`` or ``False`` here (``'auto'`` is for :func:`convnorm_fx.apply`).
        **options: options that replace those of ``config`` (``eps=1e-3``, ...), as fields of
            :class:`~convnorm_fx.config.ConvNormConfig`:

            * ``affine``: learn the per-channel depthwise affine transform ``r_k`` (§3.3), a
              ``k_h x k_w`` kernel with bias and "same" output size;
            * ``affine_init``: ``'identity'`` (default: a centred delta and zero bias, so the
              stage starts as pure ConvNorm) or ``'default'`` (PyTorch's conv init, as the
              paper's code does);
            * ``bn``: append a ``BatchNorm2d`` after the stage;
            * ``eps``: added to the kernel power spectrum; bounds the gain by ``eps ** -0.5``;
            * ``stop_gradient``: treat the preconditioner as a constant in backward (§3.3);
            * ``eval_spectrum``: ``'cache'`` (default) computes the spectrum of the current
              weight and reuses it in eval mode while the weight's *values* and the input size
              are unchanged (see :meth:`preconditioner`; never saved in ``state_dict``).
              ``'running'`` keeps an exponential running average of the kernel
              autocorrelation (a buffer of ``(2 k_h - 1) x (2 k_w - 1)`` lags per channel)
              during training and uses it in eval mode; it is valid at any input size;
            * ``momentum``: running-average momentum for ``eval_spectrum='running'``;
            * ``check_finite``: check the weight, the input and the output of every call and
              raise ``FloatingPointError`` naming the site (:attr:`site_name`) at the first
              NaN or Inf. Costs one reduction per tensor (and a device sync on GPU); skipped
              while ``torch.compile`` or ``torch.export`` traces the model. Off by default;
              it can be toggled later (``stage.check_finite = True``);
            * ``algorithm``: how :meth:`forward_from_input` computes the site: ``'auto'``
              (default, the cheaper by :func:`convnorm_fx.cost.select_algorithm`), ``'direct'``
              or ``'spectral'`` (see :func:`convnorm_fx.ops.conv_norm2d`). ``forward`` itself
              always receives the full conv output and runs directly;
            * ``eval_kernel_cache``: in eval mode, keep the per-frequency operator
              ``v_k R_k conj(A_kj)`` that :meth:`forward_from_input` uses when it computes the
              site by the spectral algorithm, next to the cached spectrum
              (``eval_spectrum='cache'``, for the same input size), and reuse it while the
              weight and the affine kernel keep their values (see :meth:`operator_keeper`).
              It saves rebuilding the kernel spectrum on every call, and the cost model then
              picks the spectral algorithm more often, at ``F C_out C_in / g`` complex values
              per site (``F = M_h (M_w // 2 + 1)``): 13x the weights of a CIFAR ResNet-18 at
              32x32. Calls that need a gradient do not use it, and it is bypassed with the
              spectrum cache while compiling or exporting. Off by default; entering
              training mode frees it (:meth:`eval_cache_nbytes` says what is held).

    Shape:
        - y: ``(N, C, M_h, M_w)`` with ``M = H + d (k - 1)`` (1x1 kernels: ``(N, C, H_out, W_out)``)
        - weight: ``(C, C_in / g, k_h, k_w)``
        - output: ``(N, C, H_out, W_out)``, ``H_out = (H + p_t + p_b - d_h (k_h - 1) - 1) // s_h + 1``

    Example:
        >>> stage = ConvNorm2d(8, 3, stride=2, padding=1)
        >>> w = torch.randn(8, 3, 3, 3)
        >>> x = torch.randn(2, 3, 16, 16)
        >>> stage(F.conv2d(x, w, padding=2), w).shape
        torch.Size([2, 8, 8, 8])
    """

    _version = 1

    def __prepare_scriptable__(self) -> "ConvNorm2d":
        refuse_torchscript(self)

    def __init__(
        self,
        num_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: PaddingArg | tuple[int, int, int, int] = 0,
        dilation: IntOrPair = 1,
        *,
        groups: int = 1,
        config: ConvNormConfig | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        config = stage_config(config, **options)
        factory = {"device": device, "dtype": dtype}
        self.num_channels = int(num_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        if groups < 1 or num_channels % groups != 0:
            raise ValueError(f"groups={groups} must be >= 1 and divide num_channels={num_channels}")
        self.groups = int(groups)
        if isinstance(padding, (tuple, list)) and len(padding) == 4:
            self.padding = tuple(int(p) for p in padding)
        else:
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions; pass explicit padding")
            self.padding = ops.explicit_padding(padding, self.kernel_size, self.dilation)
        ops.feeding_conv_args(self.kernel_size, self.stride, self.padding, self.dilation)  # validates 1x1 padding
        self.affine_init = config.affine_init
        self.eps = config.eps
        self.stop_gradient = config.stop_gradient
        self.eval_spectrum = config.eval_spectrum
        self.momentum = config.momentum
        self.algorithm = config.algorithm
        self.check_finite = config.check_finite
        self.eval_kernel_cache = config.eval_kernel_cache
        #: Name of the conv site this stage normalizes, used in error messages (set by
        #: :func:`convnorm_fx.apply`).
        self.site_name = ""
        #: When True the stage is the identity preconditioner: no P_k, no affine, no BN.
        self.bypassed = False
        if config.affine:
            self.affine_weight = nn.Parameter(torch.empty(num_channels, 1, *self.kernel_size, **factory))
            self.affine_bias = nn.Parameter(torch.empty(num_channels, **factory))
        else:
            self.register_parameter("affine_weight", None)
            self.register_parameter("affine_bias", None)
        if config.eval_spectrum == "running":
            lags = (2 * self.kernel_size[0] - 1, 2 * self.kernel_size[1] - 1)
            self.register_buffer("running_autocorrelation", torch.empty(num_channels, *lags, **factory))
        else:
            self.register_buffer("running_autocorrelation", None)
        self.bn = nn.BatchNorm2d(num_channels, **factory) if config.bn else None
        self._preconditioner_cache: _PreconditionerCache | None = None
        self.reset_parameters()

    @property
    def config(self) -> ConvNormConfig:
        """The stage's options as they are now (validated)."""
        return ConvNormConfig(
            bn=self.bn is not None,
            affine=self.affine_weight is not None,
            affine_init=self.affine_init,
            eps=self.eps,
            stop_gradient=self.stop_gradient,
            eval_spectrum=self.eval_spectrum,
            momentum=self.momentum,
            check_finite=self.check_finite,
            algorithm=self.algorithm,
            eval_kernel_cache=self.eval_kernel_cache,
        )

    # -- parameters and state --------------------------------------------------------

    def reset_parameters(self) -> None:
        """Identity (or PyTorch-default) affine transform; a flat running spectrum."""
        if self.affine_weight is not None:
            if self.affine_init == "identity":
                with torch.no_grad():
                    self.affine_weight.zero_()
                    centre_h, centre_w = (self.kernel_size[0] - 1) // 2, (self.kernel_size[1] - 1) // 2
                    self.affine_weight[:, :, centre_h, centre_w] = 1.0
                    self.affine_bias.zero_()
            else:
                nn.init.kaiming_uniform_(self.affine_weight, a=math.sqrt(5))
                bound = 1.0 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
                nn.init.uniform_(self.affine_bias, -bound, bound)
        if self.running_autocorrelation is not None:
            with torch.no_grad():
                # A unit delta: a flat spectrum, i.e. P_k = I until statistics arrive.
                self.running_autocorrelation.zero_()
                self.running_autocorrelation[:, self.kernel_size[0] - 1, self.kernel_size[1] - 1] = 1.0
        if self.bn is not None:
            self.bn.reset_parameters()
        self._preconditioner_cache = None

    def extra_repr(self) -> str:
        parts = [
            f"{self.num_channels}",
            f"kernel_size={self.kernel_size}",
            f"stride={self.stride}",
            f"padding={self.padding}",
        ]
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        parts.append(f"affine={self.affine_weight is not None}")
        parts.append(f"eps={self.eps:g}")
        if not self.stop_gradient:
            parts.append("stop_gradient=False")
        if self.eval_spectrum != "cache":
            parts.append(f"eval_spectrum={self.eval_spectrum!r}")
        if self.algorithm != "auto":
            parts.append(f"algorithm={self.algorithm!r}")
        if self.check_finite:
            parts.append("check_finite=True")
        if self.eval_kernel_cache:
            parts.append("eval_kernel_cache=True")
        return ", ".join(parts)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__().copy()
        state["_preconditioner_cache"] = None  # derived data: copies and checkpoints stay small
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> "ConvNorm2d":
        self._preconditioner_cache = None  # device or dtype may change
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "ConvNorm2d":
        if mode and self._preconditioner_cache is not None:
            self._preconditioner_cache.operators.clear()  # large, and of no use while training
        return super().train(mode)

    # -- spectrum --------------------------------------------------------------------

    def _spectrum_grid(self, y: Tensor) -> tuple[int, int]:
        if self.kernel_size == (1, 1):
            return 1, 1  # flat spectrum: one frequency is enough
        return int(y.shape[-2]), int(y.shape[-1])

    def compute_preconditioner(self, weight: Tensor, grid: tuple[int, int]) -> Tensor:
        """``(S_k + eps)^{-1/2}`` of ``weight`` on ``grid``, computed afresh (no cache, no running average)."""
        return ops.preconditioner_spectrum(weight, grid, self.dilation, self.eps, self.stop_gradient)

    def _running_preconditioner(self, grid: tuple[int, int]) -> Tensor:
        lags = self.running_autocorrelation
        with autocast_disabled(lags.device):
            power = ops.power_spectrum_from_autocorrelation(lags.to(spectrum_dtype(lags.device)), grid, self.dilation)
            return ops.inverse_sqrt_spectrum(power, self.eps).to(compute_dtype(lags.dtype))

    @torch.no_grad()
    def _update_running(self, weight: Tensor) -> None:
        current = ops.kernel_autocorrelation(weight.detach().to(spectrum_dtype(weight.device)))
        self.running_autocorrelation.lerp_(current.to(self.running_autocorrelation.dtype), self.momentum)

    def preconditioner(self, weight: Tensor, grid: tuple[int, int]) -> Tensor:
        """The preconditioner's DFT ``(S_k + eps)^{-1/2}`` for ``weight`` on ``grid``.

        In training mode it is computed from ``weight`` (and the running average is updated
        when ``eval_spectrum='running'``). In eval mode it comes from the running average
        (``eval_spectrum='running'``) or from a cache (``'cache'``).

        The cache is reused exactly when ``weight`` has the same values (``torch.equal``
        with a copy taken when the spectrum was computed), shape, dtype and device as then,
        on the same grid, with the same ``eps`` and dilation. Comparing values, not the
        tensor's identity or version counter, covers every way a weight can change: fused
        optimizer steps (which do not bump the version counter), ``.data`` edits and
        assignments, ``load_state_dict``, EMA copies, ``vector_to_parameters``, and computed
        weights (weight standardization, parametrizations) alike. The cost is one copy of the
        weight per stage while in eval mode and one comparison per forward. It is bypassed
        (the spectrum computed afresh) while a graph through the spectrum is needed
        (``stop_gradient=False`` with autograd on), while compiling or exporting, and for
        tensors whose values cannot be read (fake or meta tensors). The cached tensors are
        created outside ``torch.inference_mode``, so an eval pass under ``inference_mode``
        never hands an inference tensor to a later pass with autograd on.
        """
        if self.training:
            if self.running_autocorrelation is not None:
                self._update_running(weight)
            return self.compute_preconditioner(weight, grid)
        if self.running_autocorrelation is not None:
            return self._running_preconditioner(grid)
        needs_graph = not self.stop_gradient and torch.is_grad_enabled() and weight.requires_grad
        if needs_graph or torch.compiler.is_compiling() or not _cacheable(weight):
            return self.compute_preconditioner(weight, grid)
        key = (grid, tuple(weight.shape), weight.dtype, weight.device, self.eps, self.dilation)
        cache = self._preconditioner_cache
        if cache is not None and cache.key == key and torch.equal(cache.weight, weight):
            return cache.inv_sqrt
        with torch.inference_mode(False), torch.no_grad():
            snapshot = weight.detach().clone()
            inv_sqrt = self.compute_preconditioner(snapshot, grid)
        self._preconditioner_cache = _PreconditionerCache(key, snapshot, inv_sqrt, {})
        return inv_sqrt

    def eval_cache_nbytes(self) -> int:
        """Bytes held by the eval-mode caches: the weight's copy, its spectrum and the
        operators kept by ``eval_kernel_cache`` (0 when nothing is cached)."""
        cache = self._preconditioner_cache
        if cache is None:
            return 0
        tensors = [cache.weight, cache.inv_sqrt]
        for affine_copy, operator in cache.operators.values():
            tensors += [operator] if affine_copy is None else [operator, affine_copy]
        return sum(t.numel() * t.element_size() for t in tensors)

    def operator_keeper(self, inv_sqrt: Tensor) -> Callable[[Tensor, SpectralPlan], Tensor] | None:
        """For ``eval_kernel_cache``: a function ``(x, plan) -> operator`` that returns the
        spectral algorithm's per-frequency operator for this call, kept between calls, or
        ``None`` where nothing may be kept.

        Operators are kept only in eval mode and only when ``inv_sqrt`` is the cached
        spectrum (:meth:`preconditioner` has just checked it against the weight's values),
        next to it: a new weight gets a new spectrum and no operators. Each is kept per
        geometry and complex dtype, with a copy of the affine kernel it folds in, and is
        rebuilt when the affine kernel's values change."""
        cache = self._preconditioner_cache
        if not self.eval_kernel_cache or self.training or cache is None or cache.inv_sqrt is not inv_sqrt:
            return None

        def kept_operator(x: Tensor, plan: SpectralPlan) -> Tensor:
            _, cplx = spectral_dtypes(x, cache.weight)
            key = (plan.rows, plan.cols, plan.groups, cplx)
            affine_weight = self.affine_weight
            entry = cache.operators.get(key)
            if entry is not None and (affine_weight is None or torch.equal(entry[0], affine_weight)):
                return entry[1]
            with torch.inference_mode(False), torch.no_grad():
                affine_copy = None if affine_weight is None else affine_weight.detach().clone()
                operator = eval_operator(cache.weight, affine_copy, cache.inv_sqrt, plan, cplx)
            cache.operators[key] = (affine_copy, operator)
            return operator

        return kept_operator

    # -- finiteness checks ------------------------------------------------------------

    def checking_finite(self) -> bool:
        """Whether this call checks for NaN/Inf: ``check_finite`` is on and nothing is compiling."""
        return self.check_finite and not torch.compiler.is_compiling()

    def require_finite(self, role: str, tensor: Tensor | None) -> None:
        """Raise ``FloatingPointError`` naming this site if ``tensor`` (the site's ``role``) has NaN/Inf."""
        if tensor is None or not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return
        if bool(torch.isfinite(tensor).all()):
            return
        name = getattr(self, "site_name", "")
        where = f"conv site '{name}'" if name else "a ConvNorm2d stage"
        hints = {
            "weight": "the weights diverged: lower the learning rate, clip gradients, or check the checkpoint",
            "input": "it comes from an earlier layer or from the data, not from this site",
            "conv output": "the weight is finite, so the input had NaN/Inf or the conv overflowed: check earlier layers",
            "output": (
                f"the input and weight are finite, so the normalization overflowed: raise eps (now {self.eps:g}) "
                "or run this site in float32"
            ),
        }
        raise FloatingPointError(f"NaN or Inf in the {role} of {where} ({tensor.dtype}): {hints[role]}")

    # -- forward ---------------------------------------------------------------------

    def forward(self, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return stage_forward(self, y, weight, bias)

    def _forward_unwrapped(self, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        check_stage_arguments(self, weight, y)
        checking = self.checking_finite()
        if checking:
            self.require_finite("weight", weight)
            self.require_finite("conv output", y)
        normalize = not self.bypassed
        inv_sqrt = self.preconditioner(weight, self._spectrum_grid(y)) if normalize else None
        out = finish_stage_call(self, y, weight, bias, inv_sqrt)
        if checking:
            self.require_finite("output", out)
        return out

    def forward_from_input(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The whole site from the conv's input: feeding conv and stage in one call.

        Returns what ``self(F.conv2d(x, weight, None, self.feeding_stride,
        self.feeding_padding, self.dilation, self.groups), weight, bias)`` returns, computed
        by the algorithm :attr:`algorithm` selects: the spectral one never forms the full
        conv output, and keeps only ``x`` for backward. Forward hooks of this stage do not
        run (the stage is not called); :class:`ConvNormConv2d` calls the stage instead when
        it has hooks.

        Args:
            x: the conv's input ``(N, C_in, H, W)``, already padded if the conv's padding
                mode is not ``'zeros'`` (the stage's ``padding`` is its zero padding).
            weight: ``(C, C_in / g, k_h, k_w)``.
            bias: optional ``(C,)``.
        """
        if self.bypassed:
            y = F.conv2d(x, weight, None, self.feeding_stride, self.feeding_padding, self.dilation, self.groups)
            return self(y, weight, bias)
        check_stage_arguments(self, weight)
        checking = self.checking_finite()
        if checking:
            self.require_finite("weight", weight)
            self.require_finite("input", x)
        if self.kernel_size == (1, 1):
            grid = (1, 1)
        else:
            grid = ops.grid_size(x.shape[-2:], self.kernel_size, self.dilation)
        inv_sqrt = self.preconditioner(weight, grid)
        out = ops.conv_norm_from_input(
            x,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.eps,
            self.stop_gradient,
            self.affine_weight,
            self.affine_bias,
            inv_sqrt,
            self.algorithm,
            kept_operator=self.operator_keeper(inv_sqrt),
        )
        if self.bn is not None:
            out = self.bn(out)
        if checking:
            self.require_finite("output", out)
        return out


def finish_stage_call(
    stage: nn.Module, y: Tensor, weight: Tensor, bias: Tensor | None, inv_sqrt: Tensor | None
) -> Tensor:
    """What a stage does once its preconditioner's DFT ``inv_sqrt`` is known (``None``: bypass):
    :func:`convnorm_fx.ops.conv_norm_stage` with the stage's geometry and affine transform,
    then its BatchNorm. Shared by :class:`ConvNorm2d` and the frozen stage of
    :mod:`convnorm_fx.deploy`, which has the same attributes."""
    normalize = inv_sqrt is not None
    out = ops.conv_norm_stage(
        y, weight, bias, stage.stride, stage.padding, stage.dilation, stage.eps,
        affine_weight=stage.affine_weight, affine_bias=stage.affine_bias, inv_sqrt=inv_sqrt, normalize=normalize,
    )  # fmt: skip
    return stage.bn(out) if stage.bn is not None and normalize else out


@torch.fx.wrap
def stage_forward(stage: ConvNorm2d, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``stage(y, weight, bias)``, which every ``torch.fx`` tracer records as one call.

    The stage checks shapes and computes spectra whose sizes depend on the input, which
    symbolic tracing cannot follow; as one call, a rewritten model traces with any tracer
    (torchvision's and timm's feature extractors, ``torch.fx.symbolic_trace``), and the
    traced model runs the stage exactly as the eager one.
    """
    return stage._forward_unwrapped(y, weight, bias)


class ConvNormConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ConvNorm built in: a drop-in replacement.

    The constructor takes ``nn.Conv2d``'s arguments plus the ConvNorm options of
    :class:`ConvNorm2d` (``config=``, or options such as ``eps=1e-3``); ``weight`` and ``bias``
    keep their names, so ``nn.Conv2d``
    checkpoints load (the stage's affine and BN parameters are then reported missing).
    The forward pass is: pad (non-zero padding modes) -> conv feeding the stage (the full
    conv, or the strided conv for 1x1) -> :class:`ConvNorm2d` (``self.norm``), run as one
    site by :meth:`ConvNorm2d.forward_from_input` (which may compute it in the frequency
    domain, see ``algorithm``).

    Shape:
        - input: ``(N, C_in, H, W)``
        - output: ``(N, C_out, H_out, W_out)``, as ``nn.Conv2d``

    Example:
        >>> conv = ConvNormConv2d(3, 16, 3, stride=2, padding=1)
        >>> conv(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16, 16, 16])
    """

    def __prepare_scriptable__(self) -> "ConvNormConv2d":
        refuse_torchscript(self)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: PaddingArg = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        config: ConvNormConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.install_stage(self.stage_for(self, config, **options))

    @staticmethod
    def stage_for(conv: nn.Conv2d, config: ConvNormConfig | None = None, **options: Any) -> ConvNorm2d:
        """The :class:`ConvNorm2d` stage for ``conv``'s geometry, next to its weight.

        Args:
            conv: an ``nn.Conv2d`` (its weight may be a Parameter or a tensor that a
                reparametrization hook computes, such as ``torch.nn.utils.weight_norm``'s).
            config, **options: the stage's options, as for :class:`ConvNorm2d`.
        """
        mode_padding = ops.explicit_padding(conv.padding, conv.kernel_size, conv.dilation)
        zero_padding = mode_padding if conv.padding_mode == "zeros" else (0, 0, 0, 0)
        weight = conv.weight
        return ConvNorm2d(
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            zero_padding,
            conv.dilation,
            groups=conv.groups,
            config=config,
            device=weight.device,
            dtype=weight.dtype,
            **options,
        )

    def install_stage(self, stage: ConvNorm2d) -> None:
        """Make ``stage`` this conv's ConvNorm stage (``self.norm``).

        :func:`convnorm_fx.apply` turns an ``nn.Conv2d`` into a ``ConvNormConv2d`` in place:
        it changes the object's class and installs the stage, so the object keeps its
        identity, Parameters, hooks, parametrization hooks and every attribute.
        """
        self._mode_padding = ops.explicit_padding(self.padding, self.kernel_size, self.dilation)
        self.norm = stage

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: ConvNormConfig | None = None, **options: Any) -> "ConvNormConv2d":
        """A new ``ConvNormConv2d`` that shares ``conv``'s ``weight`` and ``bias`` Parameters.

        Args:
            conv: a plain ``nn.Conv2d`` (subclasses that change the forward pass, such as
                weight-standardized or dynamically padded convs, and parametrized convs are
                rejected: rewrite them with :func:`convnorm_fx.apply`, which keeps their
                semantics).
            config, **options: the stage's options, as for :class:`ConvNorm2d`.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if isinstance(conv, ConvNormConv2d):
            raise TypeError("this conv already has ConvNorm; apply it once")
        if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
            raise TypeError(
                f"{type(conv).__name__} overrides nn.Conv2d's forward, so a module swap would change what it "
                "computes; use convnorm_fx.apply(model), which rewrites it in the graph"
            )
        if not isinstance(conv.weight, nn.Parameter):
            raise TypeError(
                f"the weight of this {type(conv).__name__} is computed (a parametrization or a reparametrization "
                "hook), so a new module cannot share it; use convnorm_fx.apply(model), which normalizes the "
                "computed weight and keeps the parametrization"
            )
        weight = conv.weight
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=weight.dtype, config=config,
            **options,
        )
        return adopt_conv_parameters(new, conv)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Conv2d's argument name
        if isinstance(input, Tensor) and input.dim() != 4:  # fx proxies are not Tensors
            raise ValueError(f"ConvNormConv2d expects a 4-D input (N, C, H, W), got shape {tuple(input.shape)}")
        x = input
        if self.padding_mode != "zeros":
            x = ops.pad_for_mode(x, self._mode_padding, self.padding_mode)
        stage = self.norm
        # The stage's own call is kept where something observes it (hooks, fx tracing) or
        # where it was replaced (e.g. by a frozen stage); otherwise the site runs as one.
        if isinstance(x, Tensor) and type(stage).forward is ConvNorm2d.forward and not _has_hooks(stage):
            return stage.forward_from_input(x, self.weight, self.bias)
        y = F.conv2d(x, self.weight, None, self.norm.feeding_stride, self.norm.feeding_padding, self.dilation, self.groups)
        return self.norm(y, self.weight, self.bias)


@contextlib.contextmanager
def bypass(model: nn.Module) -> Iterator[nn.Module]:
    """Bypass ConvNorm on every stage of ``model`` inside the ``with`` block.

    Each :class:`ConvNorm2d` then uses the identity preconditioner and skips its affine
    transform and BatchNorm, so the pipeline (full conv, crop, stride, bias) reproduces the
    original convolutions. The previous state is restored on exit, also after an error.

    Example:
        >>> conv = ConvNormConv2d(3, 4, 3, padding=1)
        >>> with bypass(conv):
        ...     out = conv(torch.randn(1, 3, 8, 8))
    """
    stages = [m for m in model.modules() if isinstance(m, ConvNorm2d)]
    previous = [m.bypassed for m in stages]
    try:
        for stage in stages:
            stage.bypassed = True
        yield model
    finally:
        for stage, state in zip(stages, previous):
            stage.bypassed = state
