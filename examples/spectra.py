"""Figure 2 of Liu et al. 2021 for a trained checkpoint: conditioning and Lipschitzness per layer.

For every conv of the network, :func:`convnorm_fx.spectral_report` measures, on the layer's
circular operator, the mean over output channels of the channel condition number
``cond(A_k)`` and the layer spectral norm ``||A||`` of the conv weight as it is ("before"),
and the same for the ConvNorm operator ``Q`` of that weight ("after": ``cond(Q_k) = 1``
and ``||Q|| <= sqrt(sum_k ||Q_k||^2)``, Proposition 3.1). The affine kernel and BatchNorm
are not part of these numbers.

Checkpoints without ConvNorm (``vanilla``, ``bn``) are measured through
``convnorm_fx.apply(model, bn=False)``, which shares the conv weights, so "after" shows what
ConvNorm would make of the trained weights. As in Figure 2, the 1x1 shortcut convs of
ResNet-18 are left out of the plot (``--include-shortcuts`` keeps them); the table lists
every layer.

Example::

    python examples/spectra.py runs/c10_r18_convnorm_bn_s0/best.pt --out runs/spectra_convnorm_bn
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import common
import convnorm_fx
from convnorm_fx import ConvNorm2d


def is_shortcut(name: str) -> bool:
    """Whether a stage belongs to a skip connection (``...shortcut...``) of ResNet-18."""
    return "shortcut" in name.split(".")


def plot_report(report: convnorm_fx.SpectralReport, path: Path, title: str, include_shortcuts: bool = False) -> None:
    """Two panels: mean channel condition number and layer spectral norm, before vs after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report.rows if include_shortcuts or not is_shortcut(row.name)]
    layers = list(range(1, len(rows) + 1))
    fig, (cond_ax, norm_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for attr, label, marker in (
        ("cond_mean_before", "before (A)", "o"),
        ("cond_mean_after", "after ConvNorm (Q)", "s"),
    ):
        values = [getattr(row, attr) for row in rows]
        cond_ax.plot(layers, [v if math.isfinite(v) else math.nan for v in values], marker=marker, label=label)
    cond_ax.set(xlabel="layer", ylabel="mean channel condition number", yscale="log", title="channel conditioning")
    for attr, label, marker in (
        ("spectral_norm_before", "before (A)", "o"),
        ("spectral_norm_after", "after ConvNorm (Q)", "s"),
    ):
        norm_ax.plot(layers, [getattr(row, attr) for row in rows], marker=marker, label=label)
    norm_ax.set(xlabel="layer", ylabel="layer spectral norm", yscale="log", title="layer Lipschitz constant")
    for ax in (cond_ax, norm_ax):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Per-layer condition numbers and spectral norms before/after ConvNorm (Figure 2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="best.pt or final.pt from train_cifar.py")
    parser.add_argument("--input-size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    parser.add_argument("--include-shortcuts", action="store_true", help="plot the 1x1 shortcut convs too")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for spectra.json, spectra_summary.json, spectra.txt, spectra.png")  # fmt: skip
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure a checkpoint; returns the process exit status."""
    args = parse_args(argv)
    model, meta = common.load_checkpoint(args.checkpoint, "cpu")
    model = model.double()  # the measures are computed in the model's dtype
    if not any(isinstance(m, ConvNorm2d) for m in model.modules()):
        model = convnorm_fx.apply(model, bn=False, affine=False, inplace=True, strict=True).eval()
    report = convnorm_fx.spectral_report(model, (3, *args.input_size))
    table = report.format_table()
    plotted = [row for row in report.rows if args.include_shortcuts or not is_shortcut(row.name)]

    def mean(attr: str) -> float:
        values = [getattr(row, attr) for row in plotted]
        return sum(values) / len(values) if values else math.nan

    summary = (
        f"{meta['arch']} x{meta['width']:g} {meta['variant']} ({len(plotted)} layers"
        f"{'' if args.include_shortcuts else ', shortcuts excluded'}): mean channel condition number "
        f"{mean('cond_mean_before'):.3g} -> {mean('cond_mean_after'):.3g}, mean layer spectral norm "
        f"{mean('spectral_norm_before'):.3g} -> {mean('spectral_norm_after'):.3g}"
    )
    if not args.quiet:
        print(table)
        print(summary, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "spectra.json").write_text(report.to_json(indent=2) + "\n")
        record = {
            "checkpoint": str(args.checkpoint),
            **{key: meta[key] for key in ("arch", "variant", "width")},
            "layers": len(plotted),
            "shortcuts_included": args.include_shortcuts,
            **{f"mean_{attr}": mean(attr) for attr in
               ("cond_mean_before", "cond_mean_after", "spectral_norm_before", "spectral_norm_after")},
        }  # fmt: skip
        common.write_json(args.out / "spectra_summary.json", record)
        (args.out / "spectra.txt").write_text(table + "\n" + summary + "\n")
        if args.plot:
            title = f"{meta['arch']} x{meta['width']:g} {meta['variant']}: before vs after ConvNorm"
            plot_report(report, args.out / "spectra.png", title, args.include_shortcuts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
