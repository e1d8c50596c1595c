"""Fit the cost model's constants (``convnorm_fx.cost``) to a ``bench_layer.py`` run.

For every site with a kernel larger than 1x1 and both modes (eval forward, train step), the
run measured the direct and the spectral algorithm (``cn-direct``, ``cn-spectral``). A set of
constants picks one of them per (site, mode) point; it costs the time lost against the faster
one. This script scores the constants in ``convnorm_fx.cost`` and every point of a grid, and
prints the best few: the loss summed over points (ms and % of the best total) and how many
points pick the faster algorithm.

Usage::

    python benchmarks/bench_layer.py --threads 2 --repeats 5 --warmup 1 --no-breakdown --tag calibration
    python benchmarks/fit_cost_model.py benchmarks/results/layer_cpu_float32_full_calibration.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convnorm_fx import cost  # noqa: E402

#: The constants fitted, and the values tried for each.
GRID = {
    "BYTE_COST": (1.0, 2.0, 3.0, 4.0, 6.0, 8.0),
    "COMPLEX_MATMUL_COST": (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0),
    "FFT_COST": (1.5, 2.5, 4.0),
    "DEPTHWISE_COST": (3.0, 6.0, 10.0),
}

MODES = (("eval", "forward_ms", False), ("train", "train_ms", True))


def points(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The (site, mode) points of a bench_layer run where the two algorithms compete."""
    found = []
    for record in run["sites"]:
        site = record["site"]
        if site["kernel"] == 1:
            continue
        for mode, key, training in MODES:
            times = record[key]
            found.append(
                {
                    "name": f"{site['name']} ({mode})",
                    "input": (site["batch"], site["c_in"], site["size"], site["size"]),
                    "weight": (site["c_out"], site["c_in"] // site["groups"], site["kernel"], site["kernel"]),
                    "stride": site["stride"],
                    "groups": site["groups"],
                    "training": training,
                    "direct": times["cn-direct"],
                    "spectral": times["cn-spectral"],
                }
            )
    return found


def score(found: list[dict[str, Any]], constants: dict[str, float]) -> tuple[float, int, list[str]]:
    """Time lost (ms), points right, and the names of the points picked wrongly, for ``constants``."""
    saved = {name: getattr(cost, name) for name in constants}
    try:
        for name, value in constants.items():
            setattr(cost, name, value)
        lost, right, wrong = 0.0, 0, []
        for p in found:
            pick = cost.select_algorithm(p["input"], p["weight"], p["stride"], 1, p["groups"], p["training"])
            best = min(p["direct"], p["spectral"])
            lost += p[pick] - best
            if p[pick] == best:
                right += 1
            else:
                wrong.append(f"{p['name']}: {pick} {p[pick]:.1f} ms vs {best:.1f}")
        return lost, right, wrong
    finally:
        for name, value in saved.items():
            setattr(cost, name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="JSON written by bench_layer.py (without --quick: all sites)")
    parser.add_argument("--top", type=int, default=5, help="how many of the best grid points to print")
    args = parser.parse_args(argv)
    found = points(json.loads(args.run.read_text()))
    if not found:
        raise SystemExit(f"{args.run}: no site with both algorithms measured")
    best_total = sum(min(p["direct"], p["spectral"]) for p in found)
    current = {name: getattr(cost, name) for name in GRID}
    lost, right, wrong = score(found, current)
    print(f"{len(found)} points; the faster algorithm everywhere takes {best_total:.1f} ms in all")
    print(f"current {current}: lost {lost:.1f} ms ({100 * lost / best_total:.1f} %), right {right}/{len(found)}")
    for line in wrong:
        print(f"    {line}")
    results = []
    for values in itertools.product(*GRID.values()):
        constants = dict(zip(GRID, values))
        lost, right, wrong = score(found, constants)
        results.append((lost, -right, constants, wrong))
    results.sort(key=lambda r: (r[0], r[1]))
    for lost, minus_right, constants, wrong in results[: args.top]:
        print(f"{constants}: lost {lost:.1f} ms ({100 * lost / best_total:.1f} %), right {-minus_right}/{len(found)}")
        for line in wrong:
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
