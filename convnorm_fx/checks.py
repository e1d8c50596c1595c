"""Per-site checks of a rewritten model: bypass equivalence and the tight-frame identity."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .modules import ConvNorm2d, bypass
from .recording import record_stage_calls
from .report import rewrite_report

__all__ = ["SiteCheck", "check_sites"]

#: A site passes when its bypassed output matches the original within this relative error...
BYPASS_TOLERANCE = 1e-4
#: ...and its preconditioner reproduces S / (S + eps) within this absolute error.
TIGHT_FRAME_TOLERANCE = 1e-4


@dataclass
class SiteCheck:
    """Result of :func:`check_sites` for one rewritten site.

    Attributes:
        name: the site's name in the rewrite report.
        bypass_error: with ConvNorm bypassed, ``max |rewritten - original| / max |original|``
            of the site's output (``nan`` if the site did not run).
        tight_frame_error: ``max_{k,w} |v_k(w)^2 S_k(w) - S_k(w) / (S_k(w) + eps)|`` where
            ``v_k`` is the preconditioner the stage actually used and ``S_k`` the kernel power
            spectrum from zero-padded FFTs: with ``eps = 0`` this is
            ``max |sum_j |DFT(v_k * a_kj)|^2 - 1|``, the tight-frame identity.
        passed: both errors within tolerance.
    """

    name: str
    bypass_error: float
    tight_frame_error: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _site_module_name(site: Any) -> str:
    return site.name.split("#", 1)[0]


def _capture_outputs(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, Tensor]:
    outputs: dict[str, Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name) if name else model

        def hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
            outputs[name] = out.detach().clone() if isinstance(out, Tensor) else out

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def check_sites(original: nn.Module, rewritten: nn.Module, input_size: Sequence[int], batch_size: int = 2) -> list[SiteCheck]:
    """Check every rewritten site of ``rewritten`` against ``original`` (eval mode, one batch).

    Args:
        original: the model before :func:`convnorm_fx.apply` (same weights).
        rewritten: the model :func:`convnorm_fx.apply` returned.
        input_size: input shape without the batch, e.g. ``(3, 32, 32)``.
        batch_size: size of the random probe batch.

    Returns:
        One :class:`SiteCheck` per rewritten site, in report order.
    """
    report = rewrite_report(rewritten)
    sites = [s for s in report.sites if s.rewritten]
    names = sorted({_site_module_name(s) for s in sites})
    parameter = next(iter(original.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    modes = [(m, m.training) for m in list(original.modules()) + list(rewritten.modules())]
    original.eval()
    rewritten.eval()
    try:
        expected = _capture_outputs(original, names, x)
        with bypass(rewritten):
            actual = _capture_outputs(rewritten, names, x)
    finally:
        for module, mode in modes:
            module.training = mode
    # What each stage normalizes with (a CondConv's stage: every sample's kernel).
    stage_inputs = {call.name: (call.stage, call.weight, call.grid) for call in record_stage_calls(rewritten, x)}

    stage_of_site = {}
    for stage_name in stage_inputs:
        owner = stage_name.rsplit(".", 1)[0] if "." in stage_name else ""
        stage_of_site.setdefault(owner, []).append(stage_name)

    results = []
    for site in sites:
        module_name = _site_module_name(site)
        ref, out = expected.get(module_name), actual.get(module_name)
        if isinstance(ref, Tensor) and isinstance(out, Tensor) and ref.shape == out.shape:
            scale = float(ref.abs().max()) or 1.0
            bypass_error = float((out - ref).abs().max()) / scale
        else:
            bypass_error = float("nan")
        tight = float("nan")
        for stage_name in stage_of_site.get(module_name, []):
            stage, weight, grid = stage_inputs[stage_name]
            tight = max(_tight_frame_error(stage, weight, grid), 0.0 if tight != tight else tight)
        passed = bypass_error <= BYPASS_TOLERANCE and tight <= TIGHT_FRAME_TOLERANCE
        results.append(SiteCheck(site.name, bypass_error, tight, passed))
    return results


def _power_by_dft(weight: Tensor, grid: tuple[int, int], dilation: tuple[int, int], chunk: int = 64) -> Tensor:
    """``sum_j |DFT_M(a_kj)|^2`` by explicit DFT matrices: independent of the library's path
    (autocorrelation) and, unlike many tiny FFTs, fast for large layers."""
    w = weight.to(torch.float64)
    kh, kw = w.shape[-2:]
    mh, mw = grid

    def dft(size: int, n_freq: int, taps: int, step: int) -> Tensor:
        phase = torch.outer(torch.arange(n_freq, dtype=torch.float64), torch.arange(taps, dtype=torch.float64) * step)
        return torch.polar(torch.ones_like(phase), -2 * torch.pi * torch.remainder(phase, size) / size).to(w.device)

    e_h = dft(mh, mh, kh, dilation[0])  # (M_h, k_h)
    e_w = dft(mw, mw // 2 + 1, kw, dilation[1])  # (M_w//2+1, k_w)
    parts = []
    for block in w.split(chunk):
        spectrum = e_h @ block.to(torch.complex128) @ e_w.T  # (chunk, C_in, M_h, M_w//2+1)
        parts.append(spectrum.abs().square().sum(1))
    return torch.cat(parts)


@torch.no_grad()
def _tight_frame_error(stage: ConvNorm2d, weight: Tensor, grid: tuple[int, int]) -> float:
    v = stage.preconditioner(weight, grid).to(torch.float64)
    power = _power_by_dft(weight, grid, stage.dilation)
    if v.shape != power.shape:  # a 1x1 stage keeps one value per channel
        v = v.reshape(power.shape[0], 1, 1).expand_as(power)
    expected = power / (power + stage.eps) if stage.eps > 0 else (power > 0).to(power.dtype)
    return float((v.square() * power - expected).abs().max())
