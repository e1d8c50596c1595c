"""Timing, memory and reporting helpers shared by the benchmark scripts.

Timings are interleaved: every repeat runs each variant once, in a fixed order, so that
drifts of a shared machine (other jobs, clock changes) hit all variants alike; results are
medians over repeats. CUDA work is synchronized before and after each timed call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "RESULTS_DIR",
    "add_common_arguments",
    "autocast_context",
    "describe_environment",
    "markdown_table",
    "median_ms",
    "parameter_pointers",
    "result_stem",
    "saved_activation_bytes",
    "setup_from_arguments",
    "time_interleaved",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes."""
    parser.add_argument("--quick", action="store_true", help="a small, fast subset")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    dtypes = ["float32", "float64", "bfloat16"]
    parser.add_argument("--dtype", default="float32", choices=dtypes, help="parameter and input dtype")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (float32 parameters)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs and modules")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON results here as well")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="default: benchmarks/results")
    parser.add_argument("--tag", default="", help="suffix of the result file names")


def setup_from_arguments(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply ``--threads`` and validate device and dtype."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    if args.amp and args.dtype != "float32":
        raise SystemExit("--amp runs bfloat16 autocast over float32 parameters; leave --dtype at float32")
    return device, getattr(torch, args.dtype)


def autocast_context(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on ``device`` (a no-op context when not ``enabled``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved over ``repeats`` rounds.

    Args:
        variants: name -> zero-argument callable.
        repeats: timed rounds; each round calls every variant once, in order.
        warmup: untimed calls per variant before the first round.
        device: synchronized around each call when it is a CUDA device.

    Returns:
        name -> list of ``repeats`` durations in seconds.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: Iterable[float]) -> float:
    return 1e3 * statistics.median(samples)


def parameter_pointers(*modules: nn.Module) -> set[int]:
    """Storage addresses of every parameter and buffer: saved tensors that are weights, not activations."""
    return {t.untyped_storage().data_ptr() for m in modules for t in list(m.parameters()) + list(m.buffers())}


def saved_activation_bytes(fn: Callable[[], Any], exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Storages in ``exclude`` (parameters, see :func:`parameter_pointers`) are not counted;
    a storage saved by several ops counts once, as it is held once.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude and tensor.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def describe_environment(device: torch.device, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Versions, machine and settings, stored with every result file."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if args is not None:
        info["arguments"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return info


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str, payload: dict[str, Any], markdown: str, args: argparse.Namespace) -> list[Path]:
    """Write ``<out-dir>/<stem>.json`` and ``.md`` (and ``--json`` if given); return the paths."""
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem + (f"_{args.tag}" if args.tag else "")
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    text = json.dumps(payload, indent=2, default=str)
    paths[0].write_text(text + "\n")
    paths[1].write_text(markdown + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        paths.append(args.json)
    return paths


def write_experiment(
    result: Path, script: str, title: str, env: dict[str, Any], header: list[str], table: list[list[Any]],
    records: list[dict[str, Any]],
) -> None:
    """Print and write one experiment's table (``result`` as JSON, and ``.md`` beside it), with
    the command that ran it (``script`` and this process's arguments)."""
    command = " ".join([f"python {script}", *sys.argv[1:]])
    markdown = f"# {title}\n\nCommand: `{command}`  \n"
    markdown += f"Load average at start: {env.get('load_average_at_start')}. Medians of interleaved repeats.\n\n"
    markdown += markdown_table(header, table)
    print(markdown)
    result.write_text(json.dumps({"environment": env, "command": command, "results": records}, indent=2) + "\n")
    result.with_suffix(".md").write_text(markdown + "\n")
    print(f"\nwrote {result} and .md")


def publish(
    prefix: str, key: str, records: list[dict[str, Any]], markdown: str, env: dict[str, Any], command: str,
    device: torch.device, args: argparse.Namespace,
) -> None:
    """Print the markdown tables and write them with the JSON records (see :func:`write_results`)."""
    print()
    print(markdown)
    payload = {"environment": env, "command": command, key: records}
    paths = write_results(result_stem(prefix, device, args), payload, markdown, args)
    print("\nwrote " + ", ".join(str(p) for p in paths))


def result_stem(prefix: str, device: torch.device, args: argparse.Namespace) -> str:
    """File stem that names the settings, e.g. ``layer_cpu_float32_quick``."""
    parts = [prefix, device.type, "amp-bf16" if args.amp else args.dtype]
    if args.channels_last:
        parts.append("cl")
    if getattr(args, "compile", False):
        parts.append("compile")
    parts.append("quick" if args.quick else "full")
    return "_".join(parts)
