"""Experiment: would an eval-mode cache of the kernel spectrum pay for its memory?

The spectral algorithm rebuilds each site's kernel spectrum ``(F, C_out, C_in)`` (complex) from
the weight on every call. In eval mode the weight does not change, so the spectrum could be
kept. This script measures what keeping it would buy, without changing the library: it times
the CIFAR ResNet-18 (BN model, rewritten model, rewritten model with every kernel spectrum
memoized by weight storage, version, block and geometry) interleaved in one process, eval
forward under ``torch.no_grad``, in both memory formats, and reports the memo's size.

Usage::

    python benchmarks/experiments/eval_kernel_memo.py --threads 2
"""

from __future__ import annotations

import os

# See bench_layer.py: passive OpenMP waiting on a shared machine; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import convnorm_fx  # noqa: E402
from benchmarks import _common as common  # noqa: E402
from convnorm_fx import spectral  # noqa: E402
from convnorm_fx.models import cifar_resnet18  # noqa: E402

RESULT = Path(__file__).resolve().parents[1] / "results" / "experiment_eval_kernel_memo.json"


def memoized_kernel_dft(memo: dict) -> Callable:
    """``spectral.kernel_dft`` that keeps every result, keyed by what it depends on."""
    compute = spectral.kernel_dft

    def kernel_dft(weight, plan, complex_dtype, affine=False, frequencies=None, taps=None):
        block = None if frequencies is None else (frequencies.start, frequencies.stop)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), plan.rows, plan.cols, complex_dtype, affine, block)
        if key not in memo:
            memo[key] = compute(weight, plan, complex_dtype, affine, frequencies, taps).clone()
        return memo[key]

    return kernel_dft


def measure(channels_last: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    original = cifar_resnet18(10).eval()
    rewritten = convnorm_fx.apply(copy.deepcopy(original)).eval()
    x = torch.randn(32, 3, 32, 32)
    if channels_last:
        original = original.to(memory_format=torch.channels_last)
        rewritten = rewritten.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    memo: dict = {}
    plain, memoized = spectral.kernel_dft, memoized_kernel_dft(memo)
    variants = {"original": (original, plain), "convnorm": (rewritten, plain), "convnorm + memo": (rewritten, memoized)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        with torch.no_grad():
            for step in range(repeats + 2):
                for name, (model, kernel_dft) in variants.items():
                    spectral.kernel_dft = kernel_dft
                    start = time.perf_counter()
                    model(x)
                    if step >= 2:  # the first two calls warm up (and fill the memo)
                        times[name].append(time.perf_counter() - start)
    finally:
        spectral.kernel_dft = plain
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    memo_mb = sum(v.numel() * v.element_size() for v in memo.values()) / 2**20
    return {"layout": "channels_last" if channels_last else "contiguous", "eval_ms": ms, "memo_mb": memo_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.describe_environment(torch.device("cpu"))
    rows = [measure(layout, args.repeats) for layout in (False, True)]
    header = ["layout", "original ms", "convnorm ms", "convnorm + memo ms", "ratio", "ratio with memo", "memo MB"]
    table = []
    for row in rows:
        ms = row["eval_ms"]
        table.append([
            row["layout"], ms["original"], ms["convnorm"], ms["convnorm + memo"],
            ms["convnorm"] / ms["original"], ms["convnorm + memo"] / ms["original"], row["memo_mb"],
        ])
    common.write_experiment(RESULT, "benchmarks/experiments/eval_kernel_memo.py", "Eval kernel-spectrum memo, CIFAR ResNet-18, batch 32", env, header, table, rows)


if __name__ == "__main__":
    main()
