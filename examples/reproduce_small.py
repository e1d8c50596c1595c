"""Reduced-scale reproduction of the paper's CIFAR-10 experiments on a few CPU cores.

The full experiments (ResNet-18 for 120 epochs on 45,000 images, five seeds, 1,000 SimBA
images) need a GPU; see ``examples/RESULTS.md`` for their commands. This script runs a
small version of the same protocol on the real CIFAR-10 in about an hour on 2 CPU cores:

* **Table 1** - ResNet-18 at 1/8 width, the four variants (vanilla, bn, convnorm,
  convnorm_bn) over 3 seeds, on a class-stratified 5 % of the training split for 6 epochs
  (learning rate 0.1 divided by 10 after epochs 2 and 4, the paper's 1/3 and 2/3 points);
* **Table 5** - one label-noise point (40 % symmetric noise), bn vs convnorm_bn, one seed;
* **Table 6** - one data-scarcity point (a quarter of that subset), bn vs convnorm_bn, one
  seed, 12 epochs;
* **Table 4** - SimBA (eps 0.4 in the [0, 1] pixel scale, up to 3072 iterations) on 100
  correctly classified test images for bn and convnorm_bn, then for the paper's no-BN pair
  vanilla and convnorm;
* **Figure 2** - ``spectra.py`` on each seed-0 model;
* **Figure 3** - the four variants once more with ``--plain-training`` (one seed);
* SimBA once more with the step on the normalized input (``--space normalized``, the default
  of ``simba.py``);
* ``convnorm`` once more over 3 seeds with ``--affine-init default`` (the paper's code
  initializes the affine kernel like a conv; the library's default is the identity).

Jobs run ``--jobs`` at a time (one thread each), in the order of the plan; finished jobs are skipped
when the script is run again, so an interrupted run resumes. Each job logs to
``RUNS/logs/NAME.log``, the schedule with wall times goes to ``RUNS/jobs.json``, and at the
end ``summarize_results.py`` writes the tables into ``examples/RESULTS.md``.

Example::

    nice -n 5 python examples/reproduce_small.py --runs runs/small > runs/small.log 2>&1 &
    python examples/reproduce_small.py --dry-run      # print the commands only
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from jobs import Job, run_jobs

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent

# The reduced scale, sized from one-epoch timings on the 2-core machine (see RESULTS.md).
WIDTH = 0.125  # ResNet-18 with 8, 16, 32, 64 channels
SUBSET = 0.05  # of the 49,000-image training split: 2,450 images, class-stratified
VAL_FRACTION = 0.02  # 1,000 validation images (the paper: 10 %); the test set is the full 10,000
EPOCHS, MILESTONES = 6, (2, 4)
BATCH_SIZE = 64
SEEDS = (0, 1, 2)
NOISE = 0.4
SCARCE, SCARCE_EPOCHS, SCARCE_MILESTONES = 0.25, 12, (4, 8)  # a quarter of SUBSET: 610 images
SIMBA_IMAGES = 100
VARIANTS_ORDER = ("vanilla", "bn", "convnorm", "convnorm_bn")


def plan(runs: Path, data: Path | None, threads: int) -> list[Job]:
    """The reduced-scale experiments as a list of jobs."""
    python = sys.executable
    data_args = ["--data", str(data)] if data is not None else []
    common = [
        "--arch", "resnet18", "--width", str(WIDTH), "--val-fraction", str(VAL_FRACTION),
        "--batch-size", str(BATCH_SIZE), "--eval-test", "best", "--threads", str(threads), *data_args,
    ]  # fmt: skip
    train = [python, str(EXAMPLES / "train_cifar.py")]
    jobs: list[Job] = []

    def training(name: str, variant: str, seed: int, extra: list[str]) -> None:
        out = runs / name
        argv = [*train, "--variant", variant, "--seed", str(seed), *common, *extra, "--out", str(out)]
        jobs.append(Job(name, argv, out / "metrics.json"))

    schedule = ["--epochs", str(EPOCHS), "--milestones", *map(str, MILESTONES)]
    main_args = ["--subset", str(SUBSET), *schedule]
    noise_args = ["--subset", str(SUBSET), "--label-noise", str(NOISE), *schedule]
    scarce_args = ["--subset", str(SUBSET * SCARCE), "--epochs", str(SCARCE_EPOCHS), "--milestones",
                   *map(str, SCARCE_MILESTONES)]  # fmt: skip

    def attack(variant: str, space: str) -> None:
        name = f"simba_{space}_{variant}"
        source, out = runs / f"main_{variant}_s0", runs / name
        argv = [python, str(EXAMPLES / "simba.py"), str(source / "best.pt"), *data_args, "--num-images",
                str(SIMBA_IMAGES), "--eps", "0.4", "--space", space, "--threads", str(threads),
                "--out", str(out)]  # fmt: skip
        jobs.append(Job(name, argv, out / "simba.json", [f"main_{variant}_s0"]))

    def spectrum(variant: str) -> None:
        source, out = runs / f"main_{variant}_s0", runs / f"spectra_{variant}"
        argv = [python, str(EXAMPLES / "spectra.py"), str(source / "best.pt"), "--quiet", "--out", str(out)]
        jobs.append(Job(f"spectra_{variant}", argv, out / "spectra_summary.json", [f"main_{variant}_s0"]))

    # In order of priority, so that an interrupted run still holds complete comparisons:
    # seed 0 of Table 1, the label-noise and data-scarcity pairs and the SimBA pair first.
    for variant in ("convnorm_bn", "convnorm", "bn", "vanilla"):
        training(f"main_{variant}_s0", variant, 0, main_args)
    for variant in ("convnorm_bn", "bn"):
        training(f"noise{int(NOISE * 100)}_{variant}_s0", variant, 0, noise_args)
    for variant in ("convnorm_bn", "bn"):
        training(f"scarce{int(SCARCE * 100)}_{variant}_s0", variant, 0, scarce_args)
    for variant in ("bn", "convnorm_bn"):
        attack(variant, "pixel")
    for seed in SEEDS[1:]:
        for variant in ("convnorm_bn", "convnorm", "bn", "vanilla"):
            training(f"main_{variant}_s{seed}", variant, seed, main_args)
    for variant in VARIANTS_ORDER:
        spectrum(variant)
    for variant in ("vanilla", "convnorm"):  # the paper's Table 4 pair (no BatchNorm)
        attack(variant, "pixel")
    # Figure 3: no augmentation, no weight decay, no learning-rate decay (one seed).
    for variant in ("convnorm_bn", "convnorm", "bn", "vanilla"):
        training(f"plain_{variant}_s0", variant, 0, ["--subset", str(SUBSET), "--plain-training", "--epochs",
                                                     str(EPOCHS)])  # fmt: skip
    # The other reading of SimBA's eps (simba.py's default): 0.4 on the normalized input, about 0.1 in pixels.
    for variant in VARIANTS_ORDER:
        attack(variant, "normalized")
    # ConvNorm alone with the affine kernel initialized as the paper's code does (PyTorch's conv init).
    for seed in SEEDS:
        training(f"main_convnorm_affdefault_s{seed}", "convnorm", seed, [*main_args, "--affine-init", "default"])
    return jobs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "small", help="output directory of all runs")
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 .npz (default: the shared archive)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--results", type=Path, default=EXAMPLES / "RESULTS.md", help="file the summary goes into")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the plan; returns the process exit status."""
    args = parse_args(argv)
    jobs = plan(args.runs, args.data, args.threads)
    if args.dry_run:
        for job in jobs:
            print(shlex.join(job.argv))
        return 0
    failed = run_jobs(jobs, args.runs, parallel=args.jobs, threads=args.threads, cwd=REPO)
    summarize = [sys.executable, str(EXAMPLES / "summarize_results.py"), "--runs", str(args.runs), "--output",
                 str(args.results)]  # fmt: skip
    subprocess.run(summarize, cwd=REPO, check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
