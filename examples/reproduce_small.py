"""Reduced-scale runs of the paper's CIFAR-10 experiments on a few CPU cores.

The full experiments (ResNet-18 for 120 epochs on 45,000 images, five seeds, 1,000 SimBA
images) need a GPU; see ``examples/RESULTS.md`` for their commands. This script runs a
small version of parts of the protocol on the real CIFAR-10 on 2 CPU cores (Table 6 has its
own plan at a larger scale, ``reproduce_table6.py``):

* **Table 1** - ResNet-18 at 1/8 width, the four variants (vanilla, bn, convnorm,
  convnorm_bn) and the SN baseline (``sn``) over 3 seeds, on a class-stratified 5 % of the
  training split for 6 epochs (learning rate 0.1 divided by 10 after epochs 2 and 4, the
  paper's 1/3 and 2/3 points);
* **ConvNorm without BatchNorm** - ``convnorm`` over the same 3 seeds with a linear lr
  warm-up over the first 2 epochs (76 steps), with lr 0.01, and with the gradient taken
  through the preconditioner (``--no-stop-gradient``);
* **Table 4** - SimBA (eps 0.4 in the [0, 1] pixel scale, clamped, up to 3072 iterations) on
  100 correctly classified test images of the seed-0 models: the paper's no-BN models
  (vanilla, convnorm, sn; convnorm also with the warm-up) and bn, convnorm_bn; then the no-BN
  models once more with the step on the normalized input (``--space normalized``);
* **Table 5** - one label-noise point (40 % symmetric noise), bn vs convnorm_bn, 3 seeds, the
  test set evaluated after every epoch so that the maximum test accuracy (App. C.3) is known;
* **Figure 2** - ``spectra.py`` on each seed-0 model;
* **Figure 3** - bn and convnorm_bn with ``--plain-training``, 3 seeds.

Jobs run ``--jobs`` at a time (one thread each), in the order of the plan; finished jobs are
skipped when the script is run again, so an interrupted run resumes. Each job logs to
``RUNS/logs/NAME.log``, the schedule with wall times goes to ``RUNS/jobs.json``, and each
finished job's small JSON output (``metrics.json``, ``simba.json``, ``spectra_summary.json``)
is copied to ``--results`` (``examples/results/small/NAME/``), from which
``summarize_results.py`` writes the tables of ``examples/RESULTS.md``.

Example::

    nohup nice -n 10 env OMP_WAIT_POLICY=PASSIVE python examples/reproduce_small.py > runs/small.log 2>&1 &
    python examples/reproduce_small.py --dry-run      # print the commands only
    python examples/summarize_results.py              # the tables of examples/RESULTS.md"""

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

# The reduced scale, sized from one-epoch timings on the 2-core machine (see RESULTS.md).
WIDTH = 0.125  # ResNet-18 with 8, 16, 32, 64 channels
SUBSET = 0.05  # of the 49,000-image training split: 2,450 images, class-stratified
VAL_FRACTION = 0.02  # 1,000 validation images (the paper: 10 %); the test set is the full 10,000
EPOCHS, MILESTONES = 6, (2, 4)
BATCH_SIZE = 64
SEEDS = (0, 1, 2)
NOISE = 0.4
WARMUP_STEPS = 76  # two epochs of 38 steps
SIMBA_IMAGES = 100
VARIANTS_ORDER = ("vanilla", "bn", "convnorm", "convnorm_bn", "sn")


def plan(runs: Path, data: Path | None, threads: int, results: Path) -> list[Job]:
    """The reduced-scale experiments as a list of jobs."""
    python = sys.executable
    data_args = ["--data", str(data)] if data is not None else []
    common = [
        "--arch", "resnet18", "--width", str(WIDTH), "--val-fraction", str(VAL_FRACTION),
        "--batch-size", str(BATCH_SIZE), "--threads", str(threads), *data_args,
    ]  # fmt: skip
    train = [python, str(EXAMPLES / "train_cifar.py")]
    jobs: list[Job] = []

    def job(name: str, argv: list[str], output: str, after: list[str] | None = None) -> None:
        out = runs / name
        keep = [(out / output, results / name / output)]
        jobs.append(Job(name, [*argv, "--out", str(out)], out / output, after or [], keep))

    def training(name: str, variant: str, seed: int, extra: list[str], eval_test: str = "best") -> None:
        argv = [*train, "--variant", variant, "--seed", str(seed), *common, "--eval-test", eval_test, *extra]
        job(name, argv, "metrics.json")

    schedule = ["--epochs", str(EPOCHS), "--milestones", *map(str, MILESTONES)]
    main_args = ["--subset", str(SUBSET), *schedule]

    def attack(model: str, space: str) -> None:
        argv = [python, str(EXAMPLES / "simba.py"), str(runs / model / "best.pt"), *data_args, "--num-images",
                str(SIMBA_IMAGES), "--eps", "0.4", "--space", space, "--threads", str(threads)]  # fmt: skip
        job(f"simba_{space}_{model.removeprefix('main_').removesuffix('_s0')}", argv, "simba.json", [model])

    def spectrum(variant: str) -> None:
        model = f"main_{variant}_s0"
        argv = [python, str(EXAMPLES / "spectra.py"), str(runs / model / "best.pt"), "--quiet"]
        job(f"spectra_{variant}", argv, "spectra_summary.json", [model])

    # In order of priority, so that an interrupted run still holds complete comparisons.
    for seed in SEEDS:
        for variant in ("convnorm_bn", "convnorm", "bn", "vanilla", "sn"):
            training(f"main_{variant}_s{seed}", variant, seed, main_args)
    for seed in SEEDS:
        training(f"main_convnorm_warmup_s{seed}", "convnorm", seed, [*main_args, "--warmup-steps", str(WARMUP_STEPS)])
    for seed in SEEDS:
        training(f"main_convnorm_lr0.01_s{seed}", "convnorm", seed, [*main_args, "--lr", "0.01"])
    for model in ("main_vanilla_s0", "main_convnorm_s0", "main_sn_s0", "main_convnorm_warmup_s0", "main_bn_s0",
                  "main_convnorm_bn_s0"):  # fmt: skip
        attack(model, "pixel")
    for variant in ("vanilla", "bn", "convnorm", "convnorm_bn"):
        spectrum(variant)
    for seed in SEEDS:
        for variant in ("convnorm_bn", "bn"):
            training(f"noise{int(NOISE * 100)}_{variant}_s{seed}", variant, seed,
                     ["--subset", str(SUBSET), "--label-noise", str(NOISE), *schedule], eval_test="every")  # fmt: skip
    for seed in SEEDS:
        training(f"main_convnorm_nosg_s{seed}", "convnorm", seed, [*main_args, "--no-stop-gradient"])
    for model in ("main_vanilla_s0", "main_convnorm_s0", "main_sn_s0"):
        attack(model, "normalized")
    # Figure 3: no augmentation, no weight decay, no learning-rate decay.
    for seed in SEEDS:
        for variant in ("convnorm_bn", "bn"):
            training(f"plain_{variant}_s{seed}", variant, seed, ["--subset", str(SUBSET), "--plain-training",
                                                                 "--epochs", str(EPOCHS)])  # fmt: skip
    return jobs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "small", help="output directory of all runs")
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 .npz (default: the shared archive)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--results", type=Path, default=EXAMPLES / "results" / "small",
                        help="where the JSON output of each finished job is copied")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the plan; returns the process exit status."""
    args = parse_args(argv)
    jobs = plan(args.runs, args.data, args.threads, args.results)
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
