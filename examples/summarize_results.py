"""Turn the JSON outputs of the example scripts into the Markdown tables of ``examples/RESULTS.md``.

Two modes.

**Committed results** (the default, ``--results examples/results``): every experiment is a
folder of small JSON files under ``--results``, and each becomes one block of
``--output`` (default ``examples/RESULTS.md``), written between
``<!-- results:NAME:begin -->`` and ``<!-- results:NAME:end -->``:

* ``sizing`` - ``sizing/*.json`` from ``measure_speed.py``: images per second and the
  projected cost of the Table 6 plan;
* ``table6`` - ``table6/*/metrics.json`` from ``reproduce_table6.py``: the paper's row, ours,
  a Welch t-test and a bootstrap interval for ConvNorm+BN - BN, the verdict by the rule
  stated in the block, every run, and the validation curves (``table6/val_curves.png``);
* ``diagnose`` - ``diagnose/*.json`` from ``diagnose_convnorm.py``, and the training runs
  under ``diagnose/*/metrics.json``: ConvNorm without BatchNorm early in training;
* ``small`` - ``small/``: the reduced-scale runs of ``reproduce_small.py`` (training,
  SimBA and spectra), in the tables of the second mode.

A block whose folder is missing is left as it is.

**Run folders** (``--runs DIR``): every folder under ``DIR`` holding a ``metrics.json`` is one
training run. Runs are grouped by their setting (everything in the command line except
``--variant``, ``--seed``, ``--subset-seed`` and the output/system options); each group becomes
one row with the mean ± sample standard deviation over seeds of the test accuracy at the
best-validation epoch, per variant, and a second table gives the maximum test accuracy over
epochs (App. C.3 reports it for label noise) where it was measured. ``simba.json`` and
``spectra_summary.json`` files give the attack and the spectra tables, and ``jobs.json`` the
wall time of each job. The tables replace what lies between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in ``--output`` (appended when the markers are missing; printed
without ``--output``).

Example::

    python examples/summarize_results.py                      # examples/results -> examples/RESULTS.md
    python examples/summarize_results.py --runs runs/gpu_quick --output runs/gpu_quick/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

EXAMPLES = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
VARIANT_ORDER = ("vanilla", "bn", "convnorm", "convnorm_bn", "sn")
# Arguments that do not change what is measured (seeds are averaged over).
_NOT_SETTING = {
    "variant", "seed", "subset_seed", "out", "plot", "quiet", "threads", "device", "data", "torchvision_root",
    "download", "eval_batch_size", "compile", "channels_last",
}  # fmt: skip

#: Table 6 of the paper, 10 % column: mean and standard deviation over three seeds.
PAPER_TABLE6_10PCT = {"vanilla": (67.56, 0.50), "bn": (67.10, 2.59), "convnorm": (69.23, 0.94),
                      "convnorm_bn": (77.96, 0.11)}  # fmt: skip


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _fmt(value: Any, digits: int = 2) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.{digits}f}"


def _order(variant: str) -> int:
    return VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)


def mean_std(values: Iterable[float | None]) -> str:
    """``'mean ± std (n)'`` of the finite values, sample standard deviation; ``'-'`` if none."""
    finite = [v for v in values if v is not None]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.2f} (1)"
    return f"{statistics.mean(finite):.2f} ± {statistics.stdev(finite):.2f} ({len(finite)})"


# --------------------------------------------------------------------------------------
# Statistics (no SciPy here: the Student t distribution by numerical integration)
# --------------------------------------------------------------------------------------


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` (real, > 0) degrees of freedom.

    Integrates the density from 0 to ``|t|`` with Simpson's rule on 4,000 intervals (after
    the substitution ``x = tan(u)`` for large ``|t|``, so the tail is covered evenly); accurate
    to about 1e-8 for the ``df`` of a few seeds.
    """
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density_of_angle(u: float) -> float:  # the density at x = tan(u), times dx/du
        x = math.tan(u)
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df)) * (1 + x * x)

    upper = math.atan(abs(t))
    n = 4000
    h = upper / n
    total = density_of_angle(0.0) + density_of_angle(upper)
    total += sum((4 if i % 2 else 2) * density_of_angle(i * h) for i in range(1, n))
    half = total * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`student_t_cdf`)."""
    low, high = -1e3, 1e3
    for _ in range(100):
        middle = (low + high) / 2
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's two-sample t-test of ``mean(a) - mean(b)``, with its 95 % confidence interval.

    Returns:
        ``diff``, ``t``, ``df`` (Welch-Satterthwaite), ``p`` (two-sided), ``ci_low``, ``ci_high``.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least two values per group")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    p = 2 * (1 - student_t_cdf(abs(t), df))
    half = student_t_quantile(0.975, df) * se
    return {"diff": diff, "t": t, "df": df, "p": p, "ci_low": diff - half, "ci_high": diff + half}


def bootstrap_interval(a: Sequence[float], b: Sequence[float], *, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of ``mean(a) - mean(b)``, resampling each group with replacement."""
    rng = random.Random(seed)
    diffs = sorted(
        statistics.mean(rng.choices(a, k=len(a))) - statistics.mean(rng.choices(b, k=len(b))) for _ in range(draws)
    )
    return diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]


# --------------------------------------------------------------------------------------
# Run folders: training, SimBA, spectra, jobs
# --------------------------------------------------------------------------------------


def describe_setting(args: dict[str, Any], sizes: dict[str, int]) -> str:
    """A short human-readable description of a training setting."""
    parts = [f"{args['arch']} x{args['width']:g}", f"{args['dataset']}", f"{sizes['train']} train imgs",
             f"{args['epochs']} ep"]  # fmt: skip
    if args.get("milestones"):
        parts.append("lr/10 at " + ",".join(map(str, args["milestones"])))
    if args.get("lr", 0.1) != 0.1:
        parts.append(f"lr {args['lr']:g}")
    if args.get("warmup_steps"):
        parts.append(f"warm-up {args['warmup_steps']} steps")
    if args.get("label_noise"):
        parts.append(f"label noise {args['label_noise']:g}")
    if args.get("plain_training"):
        parts.append("plain training")
    if args.get("affine") is False:
        parts.append("no affine")
    elif args.get("affine_init", "identity") != "identity":
        parts.append(f"affine init {args['affine_init']}")
    if args.get("stop_gradient") is False:
        parts.append("no stop-gradient")
    if args.get("val_size"):
        parts.append(f"{sizes['val']} val imgs")
    if args.get("max_steps"):
        parts.append(f"max {args['max_steps']} steps")
    return ", ".join(parts)


def _group(runs: list[tuple[Path, dict[str, Any]]]) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], dict[str, str]]:
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    descriptions: dict[str, str] = {}
    for _, record in runs:
        args = record["args"]
        key = json.dumps({k: v for k, v in sorted(args.items()) if k not in _NOT_SETTING})
        descriptions[key] = describe_setting(args, record["sizes"])
        groups.setdefault(key, {}).setdefault(args["variant"], []).append(record)
    return groups, descriptions


def training_tables(runs: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Mean ± std per setting and variant (best-validation test accuracy, then max test accuracy), every run."""
    groups, descriptions = _group(runs)
    variants = sorted({v for g in groups.values() for v in g}, key=_order)
    keys = sorted(groups, key=lambda k: descriptions[k])

    def summary(title: str, value: str, only_measured: bool) -> list[str]:
        lines = [title, "", "| setting | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for key in keys:
            records = [r for v in groups[key].values() for r in v]
            if only_measured and not any(_number(r.get(value)) is not None for r in records):
                continue
            cells = []
            for variant in variants:
                mine = groups[key].get(variant, [])
                numbers = [_number(r["best"].get("test_acc")) if value == "best" else _number(r.get(value)) for r in mine]
                text = mean_std(numbers)
                if any(r.get("diverged") for r in mine):
                    text += " (diverged)"
                cells.append(text)
            lines.append(f"| {descriptions[key]} | " + " | ".join(cells) + " |")
        return lines

    lines = summary("### Test accuracy (%) at the best-validation epoch: mean ± std (number of seeds)", "best", False)
    maximum = summary(
        "### Maximum test accuracy (%) over epochs (App. C.3, as the paper reports for label noise): mean ± std (n)",
        "max_test_acc",
        True,
    )
    if len(maximum) > 4:
        lines += ["", *maximum]
    lines += [
        "",
        "### Every run",
        "",
        "| run | variant | seed | best epoch | val acc | test acc @ best val | max test acc | final test acc "
        "| val acc per epoch | train s/epoch | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, record in sorted(runs, key=lambda item: item[0].name):
        best, args = record["best"], record["args"]
        curve = " ".join(f"{row['val_acc']:.1f}" for row in record.get("epochs", []) if _number(row.get("val_acc")))
        lines.append(
            f"| {path.name} | {args['variant']} | {args['seed']} | {best.get('epoch')} | {_fmt(best.get('val_acc'))} "
            f"| {_fmt(best.get('test_acc'))} | {_fmt(record.get('max_test_acc'))} | {_fmt(record.get('final_test_acc'))} "
            f"| {curve} | {_fmt(record.get('mean_train_time_s'))} | {_fmt(record.get('wall_time_s'))} |"
        )
    return lines


def simba_table(results: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """One row per SimBA run; the space of eps is named in every row."""
    lines = [
        "### SimBA pixel attack (eps in the [0, 1] pixel scale unless the row says normalized)",
        "",
        "| run | variant | clean test acc | images | eps (space) | success rate % | avg queries (all) "
        "| avg queries (successes) | avg iterations | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, r in sorted(results, key=lambda item: (item[1]["space"] != "pixel", _order(item[1]["variant"]))):
        lines.append(
            f"| {path.name} | {r['variant']} | {_fmt(r['clean_test_acc'])} | {r['num_images']} | {r['eps']:g} "
            f"({r['space']}) | {_fmt(r['success_rate'], 1)} | {_fmt(r['avg_queries'], 1)} "
            f"| {_fmt(r['avg_queries_success'], 1)} | {_fmt(r['avg_iterations'], 1)} | {_fmt(r['wall_time_s'], 0)} |"
        )
    return lines


def spectra_table(results: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Layer averages of the spectral measures, before and after ConvNorm."""
    lines = [
        "### Spectra of the trained weights (Figure 2; averages over layers, shortcuts excluded)",
        "",
        "| run | variant | layers | mean channel cond. before | after | mean layer spectral norm before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, r in sorted(results, key=lambda item: _order(item[1]["variant"])):
        lines.append(
            f"| {path.name} | {r['variant']} | {r['layers']} | {r['mean_cond_mean_before']:.3g} "
            f"| {r['mean_cond_mean_after']:.3g} | {r['mean_spectral_norm_before']:.3g} "
            f"| {r['mean_spectral_norm_after']:.3g} |"
        )
    return lines


def jobs_table(jobs: dict[str, Any]) -> list[str]:
    """Wall time of each job of a plan."""
    total = sum(j["wall_time_s"] for j in jobs.values())
    lines = ["### Job wall times", "", "| job | wall s | exit |", "|---|---|---|"]
    lines += [f"| {name} | {j['wall_time_s']:.0f} | {j['returncode']} |" for name, j in sorted(jobs.items())]
    lines.append(f"| (sum over jobs) | {total:.0f} | |")
    return lines


def _collect(folder: Path, name: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p.parent, r) for p in sorted(folder.rglob(name)) if (r := _load(p))]


def summarize(runs_dir: Path, *, label: str | None = None) -> str:
    """All tables for the run folders under ``runs_dir``, as Markdown."""
    training = _collect(runs_dir, "metrics.json")
    simba = _collect(runs_dir, "simba.json")
    spectra = _collect(runs_dir, "spectra_summary.json")
    sections = [f"_Generated by `python examples/summarize_results.py --runs {label or runs_dir}`._"]
    if training:
        sections.append("\n".join(training_tables(training)))
    if simba:
        sections.append("\n".join(simba_table(simba)))
    if spectra:
        sections.append("\n".join(spectra_table(spectra)))
    jobs = _load(runs_dir / "jobs.json")
    if jobs:
        sections.append("\n".join(jobs_table(jobs)))
    if len(sections) == 1:
        sections.append("No finished runs yet.")
    return "\n\n".join(sections)


# --------------------------------------------------------------------------------------
# Committed results: sizing, Table 6, ConvNorm without BN
# --------------------------------------------------------------------------------------


def sizing_block(folder: Path) -> str:
    """Measured speeds and the projected cost of the Table 6 plan."""
    lines = [f"_Generated by `python examples/summarize_results.py` from `{_rel(folder)}/*.json`._", ""]
    for path in sorted(folder.glob("*.json")):
        record = _load(path)
        if not record:
            continue
        args = record["args"]
        processes, threads = args["processes"], args["threads"]
        lines += [
            f"**`{path.name}`**: `python examples/{record['command']}` ({processes} process(es) x {threads} "
            f"thread(s), batch {args['batch_size']}, {args['steps']} timed steps, {args['eval_images']} images "
            f"evaluated; `OMP_WAIT_POLICY={record.get('omp_wait_policy')}`)",
            "",
            "| width | variant | parameters | train img/s per process | eval img/s per process | load average |",
            "|---|---|---|---|---|---|",
        ]
        keys = sorted({(m["width"], m["variant"]) for m in record["measurements"]}, key=lambda k: (k[0], _order(k[1])))
        for width, variant in keys:
            mine = [m for m in record["measurements"] if (m["width"], m["variant"]) == (width, variant)]
            train = statistics.mean(m["train_img_per_s"] for m in mine)
            evaluation = statistics.mean(m["eval_img_per_s"] for m in mine)
            load = statistics.mean(m["load_average"][0] for m in mine)
            lines.append(f"| {width:g} | {variant} | {mine[0]['params']:,} | {train:.0f} | {evaluation:.0f} | {load:.1f} |")
        lines += ["", "Projected minutes per run (4,500 training images per epoch, validation every epoch, the "
                      "10,000 test images once), and for 3 seeds each of bn and convnorm_bn with "
                      f"{processes} job(s) at a time:", "",
                  "| width | epochs | val imgs | bn min/run | convnorm_bn min/run | 3 + 3 runs, min |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        projections: dict[tuple[float, int, int], dict[str, float]] = {}
        for p in record["projections"]:
            projections.setdefault((p["width"], p["epochs"], p["val_images"]), {})[p["variant"]] = p["run_s"] / 60
        for (width, epochs, val), minutes in sorted(projections.items()):
            if {"bn", "convnorm_bn"} <= set(minutes):
                total = 3 * (minutes["bn"] + minutes["convnorm_bn"]) / processes
                lines.append(
                    f"| {width:g} | {epochs} | {val} | {minutes['bn']:.1f} | {minutes['convnorm_bn']:.1f} | {total:.0f} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip()


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(EXAMPLES.parent))
    except ValueError:
        return str(path)


def verdict(diff: float, ci_low: float, paper_diff: float) -> str:
    """The rule stated in the Table 6 block, applied to the measured difference."""
    if ci_low > 0 and diff >= paper_diff / 2:
        return "reproduced"
    if diff > 0 and (ci_low > 0 or diff >= paper_diff / 2):
        return "partly reproduced"
    return "not reproduced"


def plot_curves(records: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Validation and training accuracy per epoch: the mean over seeds and the band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = (("val_acc", "validation", "validation sample, after each epoch"),
              ("train_acc", "training", "augmented training batches, during each epoch"))  # fmt: skip
    for ax, (key, name, caption) in zip(axes, panels):
        for variant in sorted(records, key=_order):
            curves = [[row[key] for row in r["epochs"]] for r in records[variant]]
            length = min(len(c) for c in curves)
            epochs = list(range(1, length + 1))
            columns = [[c[i] for c in curves] for i in range(length)]
            line = ax.plot(epochs, [statistics.mean(col) for col in columns], label=f"{variant} (n={len(curves)})")[0]
            ax.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], color=line.get_color(),
                            alpha=0.2)  # fmt: skip
        ax.set(xlabel="epoch", ylabel=f"{name} accuracy (%)", title=caption)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table6_block(folder: Path, plot: bool = True) -> str:
    """The Table 6 comparison: paper vs ours, the test of ConvNorm+BN - BN, the verdict, every run."""
    runs = _collect(folder, "metrics.json")
    lines = [f"_Generated by `python examples/summarize_results.py` from `{_rel(folder)}/*/metrics.json`._", ""]
    if not runs:
        return "\n".join([*lines, "No finished runs yet."])
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for _, record in runs:
        by_variant.setdefault(record["args"]["variant"], []).append(record)
    variants = sorted(set(by_variant) | set(PAPER_TABLE6_10PCT), key=_order)
    first = runs[0][1]
    args, sizes = first["args"], first["sizes"]
    settings = {json.dumps({k: v for k, v in sorted(r["args"].items()) if k not in _NOT_SETTING}) for _, r in runs}
    if len(settings) > 1:
        lines += ["**Warning: the runs in this folder do not share one setting.**", ""]

    def test_accs(variant: str, key: str = "best") -> list[float]:
        records = by_variant.get(variant, [])
        values = [_number(r["best"]["test_acc"]) if key == "best" else _number(r.get(key)) for r in records]
        return [v for v in values if v is not None]

    def cell(values: list[float]) -> str:
        return mean_std(values) if values else "not run"

    lines += [
        f"Setting: ResNet-18 x{args['width']:g}, {sizes['train']:,} training images (10 % of the 45,000-image split, "
        f"class-stratified, drawn per seed), {args['epochs']} epochs, batch {args['batch_size']}, SGD lr {args['lr']:g} "
        f"/10 at epochs {', '.join(map(str, args['milestones']))}, momentum {args['momentum']:g}, weight decay "
        f"{args['weight_decay']:g}, crop + flip; model selected on {sizes['val']:,} validation images; test on "
        f"{sizes['test']:,}.",
        "",
        "| | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
        "| paper (ResNet-18 x1, 120 epochs), test acc @ best val | "
        + " | ".join(f"{PAPER_TABLE6_10PCT[v][0]:.2f} ± {PAPER_TABLE6_10PCT[v][1]:.2f} (3)" if v in PAPER_TABLE6_10PCT
                     else "-" for v in variants) + " |",
        f"| ours (x{args['width']:g}, {args['epochs']} epochs), test acc @ best val | "
        + " | ".join(cell(test_accs(v)) for v in variants) + " |",
        "| ours, test acc of the last epoch | " + " | ".join(cell(test_accs(v, "final_test_acc")) for v in variants) + " |",
        "| ours, mean wall time per run (min) | "
        + " | ".join(_fmt(statistics.mean(r["wall_time_s"] for r in by_variant[v]) / 60, 1) if v in by_variant else "-"
                     for v in variants) + " |",
    ]  # fmt: skip
    total = sum(r["wall_time_s"] for _, r in runs)
    jobs = _load(folder / "jobs.json") or {}
    lines += ["", f"{len(runs)} runs, {total / 60:.0f} min of training summed over runs (two runs at a time, one "
                  "thread each)."]  # fmt: skip
    if jobs:
        span = _elapsed(jobs)
        if span is not None:
            lines[-1] += f" The plan's jobs ran over {span / 60:.0f} min of wall-clock time, in one or more sittings."

    hashes = {r.get("machine", {}).get("convnorm_fx_sha256") for _, r in runs} - {None}
    if len(hashes) > 1:
        lines[-1] += (f" The library was edited while the plan ran: the runs recorded {len(hashes)} different "
                      "`convnorm_fx` source hashes (`machine.convnorm_fx_sha256` in each metrics.json).")  # fmt: skip

    a, b = test_accs("convnorm_bn"), test_accs("bn")
    paper_diff = PAPER_TABLE6_10PCT["convnorm_bn"][0] - PAPER_TABLE6_10PCT["bn"][0]
    lines += ["", "#### ConvNorm+BN - BN (test accuracy at the best-validation epoch, percentage points)", ""]
    if len(a) >= 2 and len(b) >= 2:
        w = welch(a, b)
        low, high = bootstrap_interval(a, b)
        result = verdict(w["diff"], w["ci_low"], paper_diff)
        lines += [
            "| | difference | 95 % interval | test |",
            "|---|---|---|---|",
            f"| paper | {paper_diff:+.2f} | - | - |",
            f"| ours, Welch t-test (n = {len(a)} and {len(b)}) | {w['diff']:+.2f} | [{w['ci_low']:+.2f}, {w['ci_high']:+.2f}] "
            f"| t = {w['t']:.2f}, df = {w['df']:.1f}, two-sided p = {w['p']:.3g} |",
            f"| ours, bootstrap (10,000 resamples of the seeds) | {w['diff']:+.2f} | [{low:+.2f}, {high:+.2f}] | - |",
            "",
            f"Rule: **reproduced** if the Welch interval lies above 0 and the difference is at least half the paper's "
            f"({paper_diff / 2:.2f} points); **partly reproduced** if the difference is positive and only one of the "
            f"two holds; **not reproduced** otherwise. Verdict at this scale: **{result}**.",
        ]  # fmt: skip
        last_a, last_b = test_accs("convnorm_bn", "final_test_acc"), test_accs("bn", "final_test_acc")
        if len(last_a) >= 2 and len(last_b) >= 2:
            wl = welch(last_a, last_b)
            lines += [
                "",
                f"With the last epoch's weights instead of the best-validation ones: {wl['diff']:+.2f} points, "
                f"95 % interval [{wl['ci_low']:+.2f}, {wl['ci_high']:+.2f}], p = {wl['p']:.3g}.",
            ]
    else:
        lines.append("Fewer than two finished seeds of convnorm_bn or bn: no test yet.")

    if plot:
        curves = {v: by_variant[v] for v in by_variant}
        plot_curves(curves, folder / "val_curves.png",
                    f"Table 6, 10 %: ResNet-18 x{args['width']:g}, {sizes['train']} images; mean and min-max over seeds")  # fmt: skip
        lines += ["", f"![validation curves]({_rel(folder / 'val_curves.png').removeprefix('examples/')})"]
    lines += [
        "",
        "| run | variant | seed | best epoch | val acc @ best | test acc @ best val | final test acc | best train acc "
        "| train s/epoch | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, r in sorted(runs, key=lambda item: (_order(item[1]["args"]["variant"]), item[1]["args"]["seed"])):
        train_acc = max((row["train_acc"] for row in r["epochs"]), default=None)
        lines.append(
            f"| {path.name} | {r['args']['variant']} | {r['args']['seed']} | {r['best']['epoch']} "
            f"| {_fmt(r['best']['val_acc'])} | {_fmt(r['best']['test_acc'])} | {_fmt(r.get('final_test_acc'))} "
            f"| {_fmt(train_acc)} | {_fmt(r.get('mean_train_time_s'), 1)} | {_fmt(r['wall_time_s'] / 60, 1)} |"
        )
    return "\n".join(lines)


def _elapsed(jobs: dict[str, Any]) -> float | None:
    """Seconds during which at least one job of the plan ran (from the finish stamps and wall times)."""
    import datetime

    spans = []
    for job in jobs.values():
        try:
            end = datetime.datetime.strptime(job["finished"], "%Y-%m-%d %H:%M:%S").timestamp()
        except (KeyError, ValueError):
            return None
        spans.append((end - job["wall_time_s"], end))
    spans.sort()
    busy, current_start, current_end = 0.0, None, None
    for start, end in spans:
        if current_end is None or start > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return busy


def _diagnose_label(record: dict[str, Any]) -> str:
    args = record["args"]
    parts = [args["variant"]]
    if args.get("warmup_steps"):
        parts.append(f"warm-up {args['warmup_steps']}")
    if args.get("stop_gradient") is False:
        parts.append("no stop-gradient")
    if args.get("affine_init", "identity") != "identity":
        parts.append(f"affine init {args['affine_init']}")
    if args.get("lr", 0.1) != 0.1:
        parts.append(f"lr {args['lr']:g}")
    if not args.get("affine", True):
        parts.append("no affine")
    return ", ".join(parts)


def plot_diagnose(probes: list[tuple[Path, dict[str, Any]]], path: Path) -> None:
    """Training loss (moving average over 10 steps) and the RMS of the last block's output, per probe run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, rms_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = sorted({_diagnose_label(r) for _, r in probes}, key=lambda label: (_order(label.split(",")[0]), label))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    styles = ("-", "--", ":", "-.")
    for _, r in sorted(probes, key=lambda item: item[1]["args"]["seed"]):
        label, seed = _diagnose_label(r), r["args"]["seed"]
        losses = [s["loss"] for s in r["per_step"]]
        smooth = [statistics.mean(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        style = {"color": colors[label], "linestyle": styles[seed % len(styles)], "label": f"{label}, seed {seed}"}
        loss_ax.plot(range(len(smooth)), smooth, **style)
        rms_ax.plot([rec["step"] for rec in r["records"]], [rec["blocks"][-1]["out_rms"] for rec in r["records"]],
                    marker="o", markersize=3, **style)  # fmt: skip
    loss_ax.axhline(math.log(10), color="grey", linewidth=0.8)
    loss_ax.set(xlabel="step", ylabel="training loss (moving average of 10)", title="loss; grey: ln 10")
    rms_ax.set(xlabel="step", ylabel="RMS of the last block's output", yscale="log", title="last residual block")
    for ax in (loss_ax, rms_ax):
        ax.grid(alpha=0.3)
    rms_ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagnose_block(folder: Path, plot: bool = True) -> str:
    """Early-training measurements of ``diagnose_convnorm.py``, and the training runs next to them."""
    lines = [f"_Generated by `python examples/summarize_results.py` from `{_rel(folder)}/`._", ""]
    probes = [(p, r) for p in sorted(folder.glob("*.json")) if (r := _load(p)) and "records" in r]
    if probes:
        first = probes[0][1]["args"]
        lines += [
            f"ResNet-18 x{first['width']:g}, batch {first['batch_size']}, lr {first['lr']:g}, the first "
            f"{probes[0][1]['steps_taken']} SGD steps on the {probes[0][1]['train_images']:,} training images of the "
            "reduced runs. Loss and batch accuracy are averaged over the last 20 steps. The block and logit RMS are at "
            "step 0 (initialization) -> the last step; `radial cos` is the absolute cosine between a conv weight and "
            "its gradient, averaged over the 20 convs and over the recorded steps after step 0; `|w| growth` is the mean "
            "over convs of the weight norm at the last step over that at step 0; `first step` is the relative change "
            "of the weight and of the output of the stem conv (the first site, which has no site upstream) in step 0, "
            "the output recomputed on the same batch; `stem cond` is the largest channel condition number of the stem "
            "conv's weight at initialization (the spread of the gains ConvNorm applies across frequencies).",
            "",
            "| run | variant | seed | loss, step 0 -> last 20 | batch acc, last 20 | logits RMS | last block out RMS "
            "| last block zeros at end | radial cos | \\|w\\| growth | max grad norm | first step: stem weight, output "
            "| stem cond |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for path, r in sorted(probes, key=lambda item: (item[1]["args"]["seed"], item[0].name)):
            steps, records = r["per_step"], r["records"]
            tail = steps[-20:]
            start, end = records[0], records[-1]
            cosines = [abs(layer["radial_cos"]) for rec in records[1:] for layer in rec["layers"]
                       if layer["radial_cos"] is not None]  # fmt: skip
            growth = [e["weight_norm"] / s["weight_norm"] for s, e in zip(start["layers"], end["layers"]) if s["weight_norm"]]
            lines.append(
                f"| {path.stem} | {_diagnose_label(r)} | {r['args']['seed']} "
                f"| {steps[0]['loss']:.3f} -> {statistics.mean(s['loss'] for s in tail):.3f} "
                f"| {statistics.mean(s['acc'] for s in tail):.1f} "
                f"| {start['logits_rms']:.3g} -> {end['logits_rms']:.3g} "
                f"| {start['blocks'][-1]['out_rms']:.3g} -> {end['blocks'][-1]['out_rms']:.3g} "
                f"| {end['blocks'][-1]['dead_fraction']:.2f} "
                f"| {statistics.mean(cosines) if cosines else math.nan:.3f} "
                f"| {statistics.mean(growth):.2f} | {max(s['grad_norm'] for s in steps):.3g} "
                f"| {_step_text(start['layers'][0])} | {_fmt(start['layers'][0].get('cond_max'), 1)} |"
            )
        lines += ["", *_diagnose_layers(probes)]
        if plot:
            plot_diagnose(probes, folder / "early_training.png")
            lines += ["", f"![early training]({_rel(folder / 'early_training.png').removeprefix('examples/')})"]
    runs = _collect(folder, "metrics.json")
    if runs:
        lines += ["", "Training runs (`train_cifar.py`, the reduced setting):", "", *training_tables(runs)]
    return "\n".join(lines)


def _step_text(layer: dict[str, Any]) -> str:
    if layer.get("weight_step") is None:
        return "-"
    return f"{100 * layer['weight_step']:.2g} %, {100 * layer['output_step']:.2g} %"


def _diagnose_layers(probes: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Per residual block at initialization: RMS of branch + shortcut, for the first seed of each run kind."""
    seen: dict[str, dict[str, Any]] = {}
    for _, r in sorted(probes, key=lambda item: item[1]["args"]["seed"]):
        seen.setdefault(_diagnose_label(r), r)
    if not seen:
        return []
    labels = sorted(seen, key=lambda label: (_order(label.split(",")[0]), label))
    blocks = [b["name"] for b in seen[labels[0]]["records"][0]["blocks"]]
    lines = [
        "RMS of `branch + shortcut` (before the block's last ReLU) at initialization, and at the last recorded "
        f"step, per residual block (seed {seen[labels[0]]['args']['seed']}):",
        "",
        "| block | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for index, block in enumerate(blocks):
        cells = []
        for label in labels:
            records = seen[label]["records"]
            cells.append(f"{records[0]['blocks'][index]['sum_rms']:.3g} -> {records[-1]['blocks'][index]['sum_rms']:.3g}")
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_between_markers(path: Path, body: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` (append the block if they are missing)."""
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else "# Results\n\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of the block ``name``."""
    return f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"


def summarize_results(results: Path, output: Path, plot: bool = True) -> list[str]:
    """Write every block whose folder exists under ``results``; returns the names written."""
    written = []
    blocks = {
        "sizing": lambda folder: sizing_block(folder),
        "table6": lambda folder: table6_block(folder, plot),
        "diagnose": lambda folder: diagnose_block(folder, plot),
        "small": lambda folder: summarize(folder, label=_rel(folder)),
    }
    for name, make in blocks.items():
        folder = results / name
        if folder.is_dir():
            write_between_markers(output, make(folder), *markers(name))
            written.append(name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Write the summary; returns the process exit status."""
    parser = argparse.ArgumentParser(description="Summarize example runs into Markdown tables.")
    parser.add_argument("--runs", type=Path, default=None, help="a directory of run folders (second mode)")
    parser.add_argument("--results", type=Path, default=EXAMPLES / "results", help="committed results (first mode)")
    parser.add_argument("--output", type=Path, default=None,
                        help="Markdown file to update (default: examples/RESULTS.md; with --runs: print)")  # fmt: skip
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="do not redraw the PNG plots")
    args = parser.parse_args(argv)
    if args.runs is not None:
        if not args.runs.is_dir():
            parser.error(f"{args.runs} is not a directory")
        body = summarize(args.runs)
        if args.output is None:
            print(body)
        else:
            write_between_markers(args.output, body)
        return 0
    if not args.results.is_dir():
        parser.error(f"{args.results} is not a directory")
    written = summarize_results(args.results, args.output or EXAMPLES / "RESULTS.md", args.plot)
    print(f"wrote the blocks {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
