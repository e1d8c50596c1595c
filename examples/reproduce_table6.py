"""Table 6 of Liu et al. 2021 (data scarcity) at its 10 % point, sized for 2 CPU cores.

The paper trains ResNet-18 on a random 10 % of the 45,000-image training split of CIFAR-10
(4,500 images; the 5,000 validation and 10,000 test images unchanged) with its default
protocol, and reports the test accuracy of the best-validation model over three seeds:
ConvNorm + BN 77.96 ± 0.11, ConvNorm 69.23 ± 0.94, BN 67.10 ± 2.59, vanilla 67.56 ± 0.50.

This plan keeps the paper's protocol except for the network width and the number of epochs:

* the real CIFAR-10, 10 % of the training split held out for validation (``--split-seed 0``,
  the same for every run), a class-stratified 10 % of the remaining 45,000 images for
  training (450 per class) drawn with the run's seed (``--subset-seed S``), so that the seeds
  vary the subset as well as the initialization and the batch order;
* SGD with learning rate 0.1, momentum 0.9, weight decay 1e-4, batch 128, random crop
  (4 pixels of zero padding) and horizontal flip, the learning rate divided by 10 at 1/3 and
  2/3 of the epochs;
* ResNet-18 at ``--width`` (default 0.25: 16, 32, 64, 128 channels) for ``--epochs``
  (default 30), the largest that fit about 100 minutes on this machine by the measurements of
  ``measure_speed.py`` (``examples/results/sizing/``);
* the model is selected on a fixed class-stratified 1,000-image sample of the validation split
  evaluated after every epoch (``--val-size``; every ConvNorm evaluation pass is slow on a
  CPU), and the test set (10,000) is evaluated for the selected weights and the last ones.

Jobs run in the order of priority: seed by seed the pair (convnorm_bn, bn), then vanilla and
convnorm. Two one-thread jobs at a time gave more images per second on 2 cores than one
two-thread job. Finished jobs are skipped when the script runs again, so the plan can be split
across sittings. Each run writes ``RUNS/NAME/metrics.json``, which is copied into ``--results``
(``examples/results/table6/NAME/metrics.json``) as soon as the run finishes, together with the
plan's ``jobs.json``.

Example::

    nohup nice -n 10 env OMP_WAIT_POLICY=PASSIVE python examples/reproduce_table6.py > runs/table6.log 2>&1 &
    python examples/reproduce_table6.py --dry-run        # print the commands only
    python examples/summarize_results.py                 # tables and plot into examples/RESULTS.md
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Sequence

from jobs import Job, run_jobs

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent

#: Order of the jobs: the comparison the issue asks for first, seed by seed.
VARIANTS = ("convnorm_bn", "bn", "vanilla", "convnorm")


def plan(args: argparse.Namespace) -> list[Job]:
    """The Table 6 runs as a list of jobs."""
    third = args.epochs / 3
    milestones = [str(round(third)), str(round(2 * third))]
    data_args = ["--data", str(args.data)] if args.data is not None else []
    fixed = [
        "--arch", "resnet18", "--width", str(args.width), "--val-fraction", "0.1", "--subset", "0.1",
        "--val-size", str(args.val_size), "--epochs", str(args.epochs), "--milestones", *milestones,
        "--batch-size", "128", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4",
        "--eval-test", "best", "--threads", str(args.threads), *data_args,
    ]  # fmt: skip
    order = [(v, s) for v in VARIANTS[:2] for s in args.seeds]
    order.sort(key=lambda item: (args.seeds.index(item[1]), VARIANTS.index(item[0])))  # pairs, seed by seed
    order += [(v, s) for v in VARIANTS[2:] for s in args.seeds]
    jobs = []
    for variant, seed in order:
        if variant not in args.variants:
            continue
        name = f"t6_{variant}_s{seed}"
        out = args.runs / name
        argv = [sys.executable, str(EXAMPLES / "train_cifar.py"), "--variant", variant, "--seed", str(seed),
                "--subset-seed", str(seed), *fixed, "--out", str(out)]  # fmt: skip
        keep = [(out / "metrics.json", args.results / name / "metrics.json")]
        jobs.append(Job(name, argv, out / "metrics.json", keep=keep))
    return jobs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "table6", help="output directory of the runs")
    parser.add_argument("--results", type=Path, default=EXAMPLES / "results" / "table6",
                        help="where each run's metrics.json is copied")  # fmt: skip
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 .npz (default: the shared archive)")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--val-size", type=int, default=1000, help="validation images evaluated every epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.epochs < 3:
        parser.error("--jobs and --threads must be >= 1, --epochs >= 3")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the plan; returns the process exit status."""
    args = parse_args(argv)
    jobs = plan(args)
    if args.dry_run:
        for job in jobs:
            print(shlex.join(job.argv))
        return 0
    failed = run_jobs(jobs, args.runs, parallel=args.jobs, threads=args.threads, cwd=REPO)
    if (args.runs / "jobs.json").is_file():
        args.results.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.runs / "jobs.json", args.results / "jobs.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
