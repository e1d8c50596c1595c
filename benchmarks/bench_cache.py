"""What the eval-mode spectrum cache costs and saves, per eval forward.

In eval mode each :class:`~convnorm_fx.modules.ConvNorm2d` reuses the spectrum of its weight
while the weight's *values* are unchanged, checked with ``torch.equal`` against a copy taken
when the spectrum was computed (fused optimizers and ``.data`` edits do not bump version
counters, so nothing cheaper is safe). This script measures, for whole models in eval mode:

* ``check ms``: all stages' cache hits of one forward (the value check), timed alone;
* ``spectrum ms``: all stages' spectrum computations of one forward, timed alone (what a
  cache hit saves);
* ``eval ms cached`` / ``eval ms uncached``: the eval forward with the cache, and with every
  stage recomputing its spectrum (interleaved repeats, medians);
* ``copy MB``: the weight copies the caches hold, next to the model's parameter size.

Usage::

    python benchmarks/bench_cache.py --threads 2
"""

from __future__ import annotations

import os

# See bench_layer.py: passive OpenMP waiting on a shared machine; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convnorm_fx  # noqa: E402
from benchmarks import _common as common  # noqa: E402
from convnorm_fx.models import cifar_resnet18  # noqa: E402
from convnorm_fx.modules import ConvNorm2d  # noqa: E402


def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    import timm
    import torchvision

    return {
        "cifar_resnet18": (lambda: cifar_resnet18(10), (32, 3, 32, 32)),
        "resnet50": (lambda: torchvision.models.resnet50(weights=None, num_classes=100), (8, 3, 64, 64)),
        "convnext_tiny": (lambda: timm.create_model("convnext_tiny", pretrained=False, num_classes=100), (8, 3, 64, 64)),
    }


def _recorded_spectrum_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[ConvNorm2d, torch.Tensor, tuple[int, int]]]:
    """Each stage with the weight and grid its spectrum is computed for in one forward."""
    calls = []
    stages = [m for m in model.modules() if isinstance(m, ConvNorm2d)]
    for stage in stages:
        original = stage.preconditioner

        def record(weight, grid, stage=stage, original=original):
            calls.append((stage, weight.detach(), grid))
            return original(weight, grid)

        stage.preconditioner = record  # an instance attribute, removed below
    try:
        with torch.no_grad():
            model(x)
    finally:
        for stage in stages:
            del stage.preconditioner
    return calls


def measure(name: str, builder: Callable[[], nn.Module], shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convnorm_fx.apply(builder()).eval()
    x = torch.randn(*shape)
    calls = _recorded_spectrum_calls(model, x)
    uncached = convnorm_fx.apply(builder()).eval()
    for stage in uncached.modules():
        if isinstance(stage, ConvNorm2d):
            stage.preconditioner = lambda weight, grid, stage=stage: stage.compute_preconditioner(weight, grid)
    uncached.load_state_dict(model.state_dict())

    def checks() -> None:  # every stage's cache hit: the value check, and nothing else
        for stage, weight, grid in calls:
            stage.preconditioner(weight, grid)

    def spectra() -> None:
        for stage, weight, grid in calls:
            stage.compute_preconditioner(weight, grid)

    def eval_cached() -> None:
        with torch.no_grad():
            model(x)

    def eval_uncached() -> None:
        with torch.no_grad():
            uncached(x)

    variants = {"check": checks, "spectrum": spectra, "eval cached": eval_cached, "eval uncached": eval_uncached}
    times = common.time_interleaved(variants, args.repeats, args.warmup, torch.device("cpu"))
    ms = {k: common.median_ms(v) for k, v in times.items()}
    copy_bytes = sum(weight.nbytes for _, weight, _ in calls)  # each cache keeps a copy of its weight
    parameter_bytes = sum(p.nbytes for p in model.parameters())
    return {
        "model": name,
        "input": "x".join(map(str, shape)),
        "stages": len(calls),
        "check_ms": ms["check"],
        "spectrum_ms": ms["spectrum"],
        "spectrum_over_check": ms["spectrum"] / ms["check"],
        "eval_ms_cached": ms["eval cached"],
        "eval_ms_uncached": ms["eval uncached"],
        "check_share_of_eval": ms["check"] / ms["eval cached"],
        "copy_mb": copy_bytes / 2**20,
        "parameter_mb": parameter_bytes / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--models", default=None, help="comma-separated subset of: cifar_resnet18, resnet50, convnext_tiny")
    args = parser.parse_args(argv)
    if args.dtype != "float32" or args.device != "cpu" or args.amp or args.channels_last:
        raise SystemExit("bench_cache.py measures float32 on the CPU only")
    device, _ = common.setup_from_arguments(args)
    args.repeats = args.repeats or (3 if args.quick else 9)
    models = _models()
    names = args.models.split(",") if args.models else (["cifar_resnet18"] if args.quick else list(models))
    unknown = sorted(set(names) - set(models))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(models)}")
    records = []
    for name in names:
        builder, shape = models[name]
        records.append(measure(name, builder, shape, args))
        print(f"{name}: {records[-1]}", flush=True)
    header = [
        "model", "input", "stages", "check ms", "spectrum ms", "spectrum / check", "eval ms cached",
        "eval ms uncached", "check / eval", "copy MB", "parameter MB",
    ]  # fmt: skip
    rows = [[r[k] for k in (
        "model", "input", "stages", "check_ms", "spectrum_ms", "spectrum_over_check", "eval_ms_cached",
        "eval_ms_uncached", "check_share_of_eval", "copy_mb", "parameter_mb",
    )] for r in records]  # fmt: skip
    env = common.describe_environment(device, args)
    command = "python benchmarks/bench_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown = "\n".join(
        [
            f"# Eval spectrum cache (cpu, {env['threads']} threads, torch {env['torch']})",
            "",
            f"Command: `{command}`  ",
            f"OMP_WAIT_POLICY={env['omp_wait_policy']}, load average at start {env.get('load_average_at_start')}. "
            "Medians of interleaved repeats, per eval forward.",
            "",
            common.markdown_table(header, rows),
        ]
    )
    common.publish("cache", "models", records, markdown, env, command, device, args)


if __name__ == "__main__":
    main()
