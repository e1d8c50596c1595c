"""Deployment: freeze the ConvNorm stages of a model for one input size.

:func:`freeze` returns a copy of a rewritten model in which every
:class:`~convnorm_fx.modules.ConvNorm2d` stage is replaced by a :class:`FrozenConvNorm2d`:
the preconditioner spectrum is computed once, for the weights and the input size of the
moment, and the circular filtering ``irfft2(rfft2(y) * v)`` (Appendix B.2) is computed
with precomputed real DFT matrices, i.e. plain matrix products. The frozen model has no
FFT and no float64 arithmetic left, so any exporter and runtime that knows ``MatMul``
can run it.

ONNX status (torch 2.14, onnx 1.23, onnxscript 0.7, onnxruntime 1.32):

* ``torch.onnx.export(model, ..., dynamo=True)`` (the default exporter since torch 2.9)
  exports a rewritten model in eval mode as it is: ``rfft2``/``irfft2`` become ONNX
  ``DFT`` nodes (opset 20), the eval spectrum is folded into a constant, and onnxruntime
  (CPU) reproduces the eager output. Spatial sizes are fixed at export time (the spectrum
  depends on them); the batch size may be dynamic. Use :func:`freeze` first for runtimes
  or execution providers without ``DFT``.
* The legacy TorchScript exporter (``dynamo=False``) fails on the unfrozen model with
  ``UnsupportedOperatorError: Exporting the operator 'aten::fft_rfft2' to ONNX``; a frozen
  model exports with it and onnxruntime reproduces the eager output.

Cost: the DFT matrices make the filtering of one channel ``O(M_h M_w (M_h + M_w))``
multiply-adds instead of the FFT's ``O(M_h M_w log(M_h M_w))``, for an ``M_h x M_w``
full-conv output: cheap for CIFAR-sized feature maps, costly for stems at 224 x 224.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from .dft import hermitian_weights, phase
from .modules import ConvNorm2d, FeedingConv, check_stage_arguments, finish_stage_call
from .pipeline import finish_stage
from .precision import complex_dtype, compute_dtype
from .recording import record_stage_calls

__all__ = ["FrozenConvNorm2d", "freeze"]


def _dft_matrices(size: int, count: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``2 pi u t / size`` for ``count`` frequencies ``u`` and all ``t``: ``(count, size)``."""
    table = phase(count, size, tuple(range(size)), complex_dtype(dtype), device)
    return table.real.to(dtype), table.imag.to(dtype)


class FrozenConvNorm2d(FeedingConv, nn.Module):
    """A :class:`~convnorm_fx.modules.ConvNorm2d` stage frozen for fixed weights and input size.

    Same forward signature and result as the stage in eval mode, for the one input size it
    was frozen for. The preconditioner ``P_k`` with DFT ``v_k = (S_k + eps)^{-1/2}`` (eq. 6)
    is applied as ``conj(F_h) ((F_h y F_w) * v_k) conj(F_w) / (M_h M_w)``, with ``F`` the
    (symmetric) DFT matrices written as real cosine and sine matrices and only the rFFT half
    plane along ``w`` kept; the affine transform, crop, stride, conv bias and BatchNorm are
    those of the original stage (its Parameters and BatchNorm are shared).

    Args:
        stage: the stage to freeze; its eval-mode spectrum is used (cache of ``weight`` or
            the running autocorrelation, as the stage would choose).
        weight: the conv weight the stage receives (for a weight-standardized conv, the
            standardized weight).
        grid: ``(M_h, M_w)``, the spatial size of the conv output the stage receives.

    Shape:
        - y: ``(N, C, M_h, M_w)``, the frozen size (1x1 kernels: any size)
        - weight: ``(C, C_in / g, k_h, k_w)``; only its shape is checked
        - output: as :class:`~convnorm_fx.modules.ConvNorm2d`

    Example:
        >>> stage = ConvNorm2d(8, 3, padding=1).eval()
        >>> w = torch.randn(8, 3, 3, 3)
        >>> frozen = FrozenConvNorm2d(stage, w, (18, 18))
        >>> frozen(F.conv2d(torch.randn(2, 3, 16, 16), w, padding=2), w).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(self, stage: ConvNorm2d, weight: Tensor, grid: Sequence[int]) -> None:
        super().__init__()
        if not isinstance(stage, ConvNorm2d):
            raise TypeError(f"FrozenConvNorm2d freezes a ConvNorm2d, got {type(stage).__name__}")
        for name in ("num_channels", "kernel_size", "stride", "padding", "dilation", "groups", "eps"):
            setattr(self, name, getattr(stage, name))
        self.normalize = not stage.bypassed
        self.affine_weight = stage.affine_weight
        self.affine_bias = stage.affine_bias
        self.bn = stage.bn
        self.grid = (1, 1) if self.kernel_size == (1, 1) else (int(grid[0]), int(grid[1]))
        was_training = stage.training
        stage.eval()
        with torch.no_grad():
            inv_sqrt = stage.preconditioner(weight.detach(), self.grid)  # (C, M_h, M_w // 2 + 1)
        stage.train(was_training)
        compute = compute_dtype(weight.dtype)
        self.register_buffer("preconditioner", inv_sqrt.detach().to(compute).clone())
        if self.kernel_size != (1, 1):
            mh, mw = self.grid
            half = mw // 2 + 1
            cos_h, sin_h = _dft_matrices(mh, mh, compute, weight.device)  # (M_h, M_h), symmetric
            cos_w, sin_w = _dft_matrices(mw, half, compute, weight.device)  # (M_w//2+1, M_w)
            # The inverse rFFT along w counts every frequency but DC and Nyquist twice, and
            # both inverse transforms divide by their size: fold both into the matrices.
            scale = (hermitian_weights(mw, weight.device)[:, None] / (mh * mw)).to(compute)  # (M_w//2+1, 1)
            self.register_buffer("cos_h", cos_h, persistent=False)
            self.register_buffer("sin_h", sin_h, persistent=False)
            self.register_buffer("cos_w", cos_w, persistent=False)
            self.register_buffer("sin_w", sin_w, persistent=False)
            self.register_buffer("inverse_cos_w", cos_w * scale, persistent=False)
            self.register_buffer("inverse_sin_w", sin_w * scale, persistent=False)
        self.train(was_training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Frozen models saved by 0.1 named the preconditioner's DFT "spectrum".
        old_key = prefix + "spectrum"
        if old_key in state_dict and prefix + "preconditioner" not in state_dict:
            state_dict[prefix + "preconditioner"] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, grid={self.grid}, normalize={self.normalize}"
        )

    def _filter(self, y: Tensor) -> Tensor:
        """``irfft2(rfft2(y) * preconditioner)`` as real matrix products."""
        compute = self.preconditioner.dtype
        z = y.to(compute)
        # Forward DFT, w on the half plane then h: Y = (C_h - i S_h) z (C_w - i S_w)^T.
        a = z @ self.cos_w.T  # (N, C, M_h, K)
        b = z @ self.sin_w.T  # (N, C, M_h, K)
        real = (self.cos_h @ a - self.sin_h @ b) * self.preconditioner
        imag = (self.cos_h @ b + self.sin_h @ a) * -self.preconditioner
        # Inverse along h: (C_h + i S_h) (real + i imag); then the real inverse along w.
        a = self.cos_h @ real - self.sin_h @ imag
        b = self.cos_h @ imag + self.sin_h @ real
        out = a @ self.inverse_cos_w - b @ self.inverse_sin_w  # (N, C, M_h, M_w)
        return out.to(y.dtype)

    def forward(self, y: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        check_stage_arguments(self, weight, y)
        if self.kernel_size == (1, 1):
            return finish_stage_call(self, y, weight, bias, self.preconditioner if self.normalize else None)
        if tuple(y.shape[-2:]) != self.grid:
            raise ValueError(
                f"this stage was frozen for a conv output of spatial size {self.grid}, got {tuple(y.shape[-2:])}; "
                "freeze the model again for this input size"
            )
        affine = (self.affine_weight, self.affine_bias) if self.normalize else (None, None)
        z = self._filter(y) if self.normalize else y
        out = finish_stage(z, self.kernel_size, self.stride, self.padding, self.dilation, bias, *affine)
        return self.bn(out) if self.bn is not None and self.normalize else out


def freeze(model: nn.Module, input_size: Sequence[int] | Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode whose ConvNorm stages are frozen for one input size.

    Runs ``model`` once (in eval mode, without gradients) on an input of ``input_size`` to
    see the size and weight each stage receives, then replaces every stage that ran by a
    :class:`FrozenConvNorm2d`. Stages that did not run are left as they are. The result
    matches the eval-mode model at that input size (within float32 round-off) and contains
    no FFT; it is meant for inference and export (see the module docstring for ONNX). The
    original model is not changed.

    Args:
        model: a model rewritten by :func:`convnorm_fx.apply` (or containing
            :class:`~convnorm_fx.modules.ConvNormConv2d` modules).
        input_size: the input shape ``(N, C, H, W)`` or ``(C, H, W)``, or an example input
            tensor (for models whose path depends on the data). The frozen model accepts
            any batch size at this spatial size.

    Returns:
        The frozen model, in eval mode.

    Raises:
        ValueError: if the model has no ConvNorm stage, or a stage runs at two sizes.

    Example:
        >>> model = convnorm_fx.apply(torchvision.models.resnet18(num_classes=10))
        >>> frozen = freeze(model, (1, 3, 32, 32))
        >>> torch.onnx.export(frozen, (torch.randn(1, 3, 32, 32),), "model.onnx", dynamo=False)
    """
    frozen = copy.deepcopy(model).eval()
    stages = {name: m for name, m in frozen.named_modules() if isinstance(m, ConvNorm2d)}
    if not stages:
        raise ValueError(f"{type(model).__name__} has no ConvNorm2d stage; rewrite it with convnorm_fx.apply first")
    reference = next(frozen.parameters(), None)
    if isinstance(input_size, Tensor):
        example = input_size
    else:
        shape = tuple(int(s) for s in input_size)
        if len(shape) == 3:
            shape = (1,) + shape
        if len(shape) != 4:
            raise ValueError(f"input_size must be (N, C, H, W) or (C, H, W), got {tuple(input_size)}")
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        example = torch.zeros(shape, **factory)

    seen: dict[str, tuple[tuple[int, int], Tensor]] = {}
    for call in record_stage_calls(frozen, example, cond_convs=False):
        if call.name in seen and call.stage.kernel_size != (1, 1) and seen[call.name][0] != call.grid:
            raise ValueError(
                f"stage '{call.name}' runs at two sizes {seen[call.name][0]} and {call.grid}; it cannot be frozen for one"
            )
        seen[call.name] = (call.grid, call.weight)
    for name, (grid, weight) in seen.items():
        frozen.set_submodule(name, FrozenConvNorm2d(stages[name], weight, grid))
    return frozen
