"""Time training steps and evaluation passes of the CIFAR variants, to size a CPU plan.

For every ``--widths`` x ``--variants`` pair this builds the ResNet-18 of ``train_cifar.py``,
runs ``--warmup`` and then ``--steps`` SGD steps on real CIFAR-10 batches (crop + flip +
normalization, as in training) and one evaluation pass over ``--eval-images`` images, and
records images per second. With ``--processes 2`` the same measurement runs in two processes
at once (use ``--threads 1``), which is how two one-thread jobs share the cores; the JSON then
holds one entry per process.

From the measured speeds it projects the wall time of one Table 6 run (``--train-images``
per epoch, ``--val-images`` evaluated every epoch, the 10,000 test images once) for a few
epoch counts, so that the plan can be sized from numbers on this machine.

Example::

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python examples/measure_speed.py --widths 0.125 0.25 \\
        --variants bn convnorm_bn --threads 2 --out runs/sizing/speed_t2.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import common
import models


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 .npz (default: the shared archive)")
    parser.add_argument("--widths", type=float, nargs="+", default=[0.125, 0.25])
    parser.add_argument("--variants", nargs="+", choices=models.VARIANTS, default=["bn", "convnorm_bn"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--eval-images", type=int, default=1000, help="images in the timed evaluation pass")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--processes", type=int, default=1, help="identical measurements run at once")
    parser.add_argument("--train-images", type=int, default=4500, help="projection: training images per epoch")
    parser.add_argument("--val-images", type=int, nargs="+", default=[1000, 5000],
                        help="projection: validation images per epoch")  # fmt: skip
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 40], help="projection: epochs per run")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the measurements")
    args = parser.parse_args(argv)
    if min(args.steps, args.eval_images, args.threads, args.processes, args.batch_size) < 1:
        parser.error("--steps, --eval-images, --threads, --processes and --batch-size must be >= 1")
    return args


def measure(args: argparse.Namespace, rank: int = 0) -> list[dict[str, Any]]:
    """Images per second of training and evaluation for every (width, variant)."""
    torch.set_num_threads(args.threads)
    arrays = common.load_arrays("cifar10", data=args.data)
    mean, std = common.channel_stats("cifar10", torch.device("cpu"))
    rng = np.random.default_rng(rank)
    x_train = torch.from_numpy(arrays.x_train[rng.permutation(len(arrays.x_train))[:4096]].copy())
    y_train = torch.from_numpy(arrays.y_train[:4096])
    x_eval = common.normalize(torch.from_numpy(arrays.x_test[: args.eval_images].copy()), mean, std)
    generator = torch.Generator().manual_seed(rank)
    rows = []
    for width in args.widths:
        for variant in args.variants:
            torch.manual_seed(0)
            model = models.build_model("resnet18", variant, 10, width)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            times = []
            for step in range(args.warmup + args.steps):
                idx = torch.randint(0, len(x_train), (args.batch_size,), generator=generator)
                start = time.perf_counter()
                images = common.random_crop_flip(x_train[idx], 4, generator)
                loss = F.cross_entropy(model(common.normalize(images, mean, std)), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
            model.eval()
            with torch.no_grad():
                model(x_eval[: args.eval_batch_size])  # fills the eval-mode spectrum cache
                start = time.perf_counter()
                for first in range(0, len(x_eval), args.eval_batch_size):
                    model(x_eval[first : first + args.eval_batch_size])
                eval_time = time.perf_counter() - start
            row = {
                "rank": rank,
                "width": width,
                "variant": variant,
                "params": sum(p.numel() for p in model.parameters()),
                "train_step_s_median": float(np.median(times)),
                "train_img_per_s": args.batch_size / float(np.median(times)),
                "eval_img_per_s": len(x_eval) / eval_time,
                "load_average": os.getloadavg(),
            }
            rows.append(row)
            print(
                f"[{rank}] width {width:g} {variant}: train {row['train_img_per_s']:.1f} img/s, "
                f"eval {row['eval_img_per_s']:.1f} img/s (load {row['load_average'][0]:.1f})",
                flush=True,
            )
    return rows


def _worker(payload: tuple[argparse.Namespace, int]) -> list[dict[str, Any]]:
    args, rank = payload
    return measure(args, rank)


def project(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Projected wall time of one run per (width, variant, epochs, validation size)."""
    projections = []
    keys = sorted({(r["width"], r["variant"]) for r in rows})
    for width, variant in keys:
        mine = [r for r in rows if (r["width"], r["variant"]) == (width, variant)]
        # Throughput of the whole machine: each process runs its own job.
        train = float(np.mean([r["train_img_per_s"] for r in mine]))
        evaluation = float(np.mean([r["eval_img_per_s"] for r in mine]))
        for epochs in args.epochs:
            for val in args.val_images:
                seconds = epochs * (args.train_images / train + val / evaluation) + 10_000 / evaluation
                projections.append({
                    "width": width, "variant": variant, "epochs": epochs, "val_images": val,
                    "run_s": seconds, "runs_in_parallel": args.processes,
                })  # fmt: skip
    return projections


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print and write; returns the process exit status."""
    args = parse_args(argv)
    started = time.perf_counter()
    if args.processes == 1:
        rows = measure(args)
    else:
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            rows = [row for part in pool.map(_worker, [(args, rank) for rank in range(args.processes)]) for row in part]
    projections = project(rows, args)
    for p in projections:
        print(f"width {p['width']:g} {p['variant']}: {p['epochs']} epochs, {p['val_images']} val images per epoch: "
              f"{p['run_s'] / 60:.1f} min per run ({p['runs_in_parallel']} at a time)")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": common.describe_machine(torch.device("cpu")),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "wall_time_s": time.perf_counter() - started,
            "measurements": rows,
            "projections": projections,
        }
        common.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
