"""Collect the outputs of train_cifar.py, simba.py and spectra.py into Markdown tables.

Every folder under ``--runs`` holding a ``metrics.json`` is one training run. Runs are
grouped by their setting (everything in the command line except ``--variant``, ``--seed``
and the output/system options); each group becomes one row with the mean ± sample standard
deviation over seeds of the test accuracy at the best-validation epoch, per variant.
``simba.json`` and ``spectra_summary.json`` files give the attack and the spectra tables,
and ``jobs.json`` (written by ``reproduce_small.py``) the wall time of each job.

The tables replace what lies between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in ``--output``; the rest of the file is kept. Without those
markers the tables are appended (a new file is created if needed).

Example::

    python examples/summarize_results.py --runs runs/small --output examples/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
VARIANT_ORDER = ("vanilla", "bn", "convnorm", "convnorm_bn")
# Arguments that do not change what is measured (seeds are averaged over).
_NOT_SETTING = {
    "variant", "seed", "out", "plot", "quiet", "threads", "device", "data", "torchvision_root", "download",
    "eval_batch_size", "compile", "channels_last",
}  # fmt: skip


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def mean_std(values: Iterable[float | None]) -> str:
    """``'mean ± std (n)'`` of the finite values, sample standard deviation; ``'-'`` if none."""
    finite = [v for v in values if v is not None]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.2f} (1)"
    return f"{statistics.mean(finite):.2f} ± {statistics.stdev(finite):.2f} ({len(finite)})"


def describe_setting(args: dict[str, Any], sizes: dict[str, int]) -> str:
    """A short human-readable description of a training setting."""
    parts = [f"{args['arch']} x{args['width']:g}", f"{args['dataset']}", f"{sizes['train']} train imgs",
             f"{args['epochs']} ep"]  # fmt: skip
    if args.get("milestones"):
        parts.append("lr/10 at " + ",".join(map(str, args["milestones"])))
    if args.get("label_noise"):
        parts.append(f"label noise {args['label_noise']:g}")
    if args.get("plain_training"):
        parts.append("plain training")
    if args.get("affine") is False:
        parts.append("no affine")
    elif args.get("affine_init", "identity") != "identity":
        parts.append(f"affine init {args['affine_init']}")
    if args.get("max_steps"):
        parts.append(f"max {args['max_steps']} steps")
    return ", ".join(parts)


def training_tables(runs: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Table of mean ± std per setting and variant, then one line per run."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    descriptions: dict[str, str] = {}
    for _, record in runs:
        args = record["args"]
        key = json.dumps({k: v for k, v in sorted(args.items()) if k not in _NOT_SETTING})
        descriptions[key] = describe_setting(args, record["sizes"])
        groups.setdefault(key, {}).setdefault(args["variant"], []).append(record)
    variants = [v for v in VARIANT_ORDER if any(v in g for g in groups.values())]
    lines = [
        "### Test accuracy (%) at the best-validation epoch: mean ± std (number of seeds)",
        "",
        "| setting | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for key in sorted(groups, key=lambda k: descriptions[k]):
        cells = []
        for variant in variants:
            records = groups[key].get(variant, [])
            text = mean_std(_number(r["best"].get("test_acc")) for r in records)
            if any(r.get("diverged") for r in records):
                text += " (diverged)"
            cells.append(text)
        lines.append(f"| {descriptions[key]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Every run",
        "",
        "| run | variant | seed | best epoch | val acc | test acc @ best val | max test acc | val acc per epoch "
        "| train s/epoch | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, record in sorted(runs, key=lambda item: item[0].name):
        best, args = record["best"], record["args"]

        def fmt(value: Any) -> str:
            number = _number(value)
            return "-" if number is None else f"{number:.2f}"

        curve = " ".join(f"{row['val_acc']:.1f}" for row in record.get("epochs", []) if _number(row.get("val_acc")))
        lines.append(
            f"| {path.name} | {args['variant']} | {args['seed']} | {best.get('epoch')} | {fmt(best.get('val_acc'))} "
            f"| {fmt(best.get('test_acc'))} | {fmt(record.get('max_test_acc'))} | {curve} "
            f"| {fmt(record.get('mean_train_time_s'))} | {fmt(record.get('wall_time_s'))} |"
        )
    return lines


def simba_table(results: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """One row per SimBA run."""
    lines = [
        "### SimBA pixel attack",
        "",
        "| run | variant | clean test acc | images | eps (space) | success rate % | avg queries (all) "
        "| avg queries (successes) | avg iterations | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, r in sorted(results, key=lambda item: (item[1]["space"], VARIANT_ORDER.index(item[1]["variant"]))):

        def fmt(value: Any, digits: int = 1) -> str:
            number = _number(value)
            return "-" if number is None else f"{number:.{digits}f}"

        lines.append(
            f"| {path.name} | {r['variant']} | {fmt(r['clean_test_acc'], 2)} | {r['num_images']} | {r['eps']:g} "
            f"({r['space']}) | {fmt(r['success_rate'])} | {fmt(r['avg_queries'])} | {fmt(r['avg_queries_success'])} "
            f"| {fmt(r['avg_iterations'])} | {fmt(r['wall_time_s'], 0)} |"
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
    for path, r in sorted(results, key=lambda item: VARIANT_ORDER.index(item[1]["variant"])):
        lines.append(
            f"| {path.name} | {r['variant']} | {r['layers']} | {r['mean_cond_mean_before']:.3g} "
            f"| {r['mean_cond_mean_after']:.3g} | {r['mean_spectral_norm_before']:.3g} "
            f"| {r['mean_spectral_norm_after']:.3g} |"
        )
    return lines


def jobs_table(jobs: dict[str, Any]) -> list[str]:
    """Wall time of each job of reproduce_small.py."""
    total = sum(j["wall_time_s"] for j in jobs.values())
    lines = ["### Job wall times", "", "| job | wall s | exit |", "|---|---|---|"]
    lines += [f"| {name} | {j['wall_time_s']:.0f} | {j['returncode']} |" for name, j in sorted(jobs.items())]
    lines.append(f"| (sum over jobs) | {total:.0f} | |")
    return lines


def summarize(runs_dir: Path) -> str:
    """All tables for the runs under ``runs_dir``, as Markdown."""
    training = [(p.parent, r) for p in sorted(runs_dir.rglob("metrics.json")) if (r := _load(p))]
    simba = [(p.parent, r) for p in sorted(runs_dir.rglob("simba.json")) if (r := _load(p))]
    spectra = [(p.parent, r) for p in sorted(runs_dir.rglob("spectra_summary.json")) if (r := _load(p))]
    sections = [f"_Generated by `examples/summarize_results.py --runs {runs_dir}`._"]
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


def write_between_markers(path: Path, body: str) -> None:
    """Replace the text between the result markers of ``path`` (append them if missing)."""
    block = f"{BEGIN}\n{body}\n{END}"
    text = path.read_text() if path.is_file() else "# Results\n\n"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the summary; returns the process exit status."""
    parser = argparse.ArgumentParser(description="Summarize example runs into Markdown tables.")
    parser.add_argument("--runs", type=Path, required=True, help="directory holding the run folders")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file to update (default: print)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a directory")
    body = summarize(args.runs)
    if args.output is None:
        print(body)
    else:
        write_between_markers(args.output, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
