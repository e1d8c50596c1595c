"""Experiment: do the DFT-matrix transforms gain from working on a few images at a time?

The channels_last transforms of :mod:`convnorm_fx.dft` pass whole-batch intermediates (about
10 MB each for 32 images of 64 channels at 32x32) from one GEMM to the next, so each pass
reads and writes main memory. Splitting the batch into chunks keeps each chunk's
intermediates in the last-level cache. This script compares the library's transforms with
chunked variants written here (same tables, same GEMMs per chunk, results written into the
whole-batch tensor), exact against the library's, timed interleaved with a 64 MB buffer
touched before every call so that no variant starts from a warm cache.

Usage::

    python benchmarks/experiments/chunked_transforms.py --threads 2
"""

from __future__ import annotations

import os

# See bench_layer.py: passive OpenMP waiting on a shared machine; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import _common as common  # noqa: E402
from convnorm_fx import dft  # noqa: E402
from convnorm_fx.precision import complex_dtype  # noqa: E402
from convnorm_fx.dft import Samples  # noqa: E402

RESULT = Path(__file__).resolve().parents[1] / "results" / "experiment_chunked_transforms.json"
CHUNKS = (4, 8, 16)


def to_spectrum_chunked(signal: torch.Tensor, grid: tuple[int, int], samples: Samples, chunk: int) -> torch.Tensor:
    """``dft.to_spectrum(signal, grid, samples, samples, -1)`` for a channels_last signal, ``chunk`` images at a time."""
    n, c, p, q = signal.shape
    mh, mw = grid
    wf = mw // 2 + 1
    table = dft.half_forward_table(mw, samples, -1, signal.dtype, signal.device).view(q, wf, 2).transpose(0, 2)
    table = table.reshape(2 * wf, q)
    block = dft._block_forward_table(mh, samples, -1, signal.dtype, signal.device)
    out = torch.empty(mh * wf, n, c, dtype=complex_dtype(signal.dtype))
    for start in range(0, n, chunk):
        part = signal[start : start + chunk]
        m = part.shape[0]
        along_w = torch.matmul(table, part.permute(2, 3, 0, 1).reshape(p, q, m * c))
        parts = torch.matmul(block, along_w.view(2 * p, wf * m * c)).view(2, mh * wf, m, c)
        torch.complex(parts[0], parts[1], out=out[:, start : start + m])
    return out


def from_spectrum_chunked(spectrum: torch.Tensor, grid: tuple[int, int], samples: Samples, chunk: int) -> torch.Tensor:
    """``dft.from_spectrum(spectrum, grid, samples, samples, 1, channels_last=True)``, ``chunk`` images at a time."""
    _, n, c = spectrum.shape
    mh, mw = grid
    wf = mw // 2 + 1
    p = q = samples[1]
    inverse_h = dft.dft_table(mh, samples, 1, spectrum.dtype, spectrum.device).T / mh
    table = dft.half_inverse_table(mw, samples, 1, spectrum.real.dtype, spectrum.device)
    table = table.view(wf, 2, q).transpose(0, 1).reshape(2 * wf, q).T.contiguous()
    out = torch.empty(n, c, p, q, memory_format=torch.channels_last)
    rows = out.permute(0, 2, 3, 1)  # (N, P, Q, C), contiguous
    for start in range(0, n, chunk):
        part = spectrum[:, start : start + chunk]
        m = part.shape[1]
        along_h = torch.matmul(inverse_h, part.reshape(mh, wf * m * c))
        split = torch.view_as_real(along_h).view(p, wf, m * c, 2).permute(0, 3, 1, 2).reshape(p, 2 * wf, m * c)
        rows[start : start + m].copy_(torch.matmul(table, split).view(p, q, m, c).permute(2, 0, 1, 3))
    return out


def median_ms(fn: Callable[[], object], flush: torch.Tensor, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        flush.add_(1.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(channels: int, size: int, repeats: int, flush: torch.Tensor) -> dict:
    x = torch.randn(32, channels, size, size).contiguous(memory_format=torch.channels_last)
    grid, inputs, kept = (size + 2, size + 2), (0, size, 1), (1, size, 1)
    spectrum = dft.to_spectrum(x, grid, inputs, inputs, -1)
    output = dft.from_spectrum(spectrum, grid, kept, kept, 1, True)
    forward = {"library": lambda: dft.to_spectrum(x, grid, inputs, inputs, -1)}
    inverse = {"library": lambda: dft.from_spectrum(spectrum, grid, kept, kept, 1, True)}
    for chunk in CHUNKS:
        torch.testing.assert_close(to_spectrum_chunked(x, grid, inputs, chunk), spectrum)
        torch.testing.assert_close(from_spectrum_chunked(spectrum, grid, kept, chunk), output)
        forward[f"chunks of {chunk}"] = lambda chunk=chunk: to_spectrum_chunked(x, grid, inputs, chunk)
        inverse[f"chunks of {chunk}"] = lambda chunk=chunk: from_spectrum_chunked(spectrum, grid, kept, chunk)
    times: dict[str, dict[str, list[float]]] = {"forward": {}, "inverse": {}}
    for _ in range(repeats):  # interleave the variants: every round times each once
        for kind, variants in (("forward", forward), ("inverse", inverse)):
            for name, fn in variants.items():
                times[kind].setdefault(name, []).append(median_ms(fn, flush, 3))
    medians = {kind: {name: statistics.median(t) for name, t in by.items()} for kind, by in times.items()}
    return {"channels": channels, "size": size, "batch": 32, "ms": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.describe_environment(torch.device("cpu"))
    flush = torch.empty(16 * 2**20)  # 64 MB, more than the last-level cache
    rows = [measure(c, s, args.repeats, flush) for c, s in ((64, 32), (128, 16), (256, 8))]
    names = ["library"] + [f"chunks of {c}" for c in CHUNKS]
    header = ["site", "transform"] + [f"{name} ms" for name in names]
    table = [
        [f"{row['channels']} ch, {row['size']}x{row['size']}", kind] + [row["ms"][kind][name] for name in names]
        for row in rows
        for kind in ("forward", "inverse")
    ]
    common.write_experiment(RESULT, "benchmarks/experiments/chunked_transforms.py", "Batch-chunked DFT-matrix transforms, channels_last, batch 32", env, header, table, rows)


if __name__ == "__main__":
    main()
