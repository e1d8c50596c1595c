"""The ``convnorm-fx`` command line (also ``python -m convnorm_fx``).

* ``convnorm-fx inspect [MODEL]``: build a model with random weights, rewrite it, check every
  site (bypass equivalence, tight frame), print the spectral table before/after and the
  training-step time ratio. With no model: a CIFAR ResNet-18 at 32x32.
* ``convnorm-fx zoo``: rewrite many timm/torchvision models and tabulate coverage.

Exit status 0 when every check passes; 2 with a one-line reason on stderr for a bad input or
a failed check (``--traceback`` shows where an unexpected error came from), 130 when
interrupted.

The command is often run on a shared or busy machine. OpenMP's default spin-waiting makes a
2-thread op wait for a time slice of every other CPU-bound process there, so unless the user
chose an ``OMP_WAIT_POLICY``, the command sets it to ``PASSIVE`` for its own process, before
PyTorch loads OpenMP (``import convnorm_fx`` does not load PyTorch). ``--threads N`` sets
PyTorch's thread count.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import difflib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, NoReturn, Sequence  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["main", "build_model"]

_DEFAULT_MODEL = "cifar_resnet18"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _unknown(name: str, candidates: Sequence[str], source: str) -> CliError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return CliError(f"unknown {source} model {name!r}{hint}")


def build_model(name: str, source: str | None = None, num_classes: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """Build ``name`` with random weights; return it with a sensible small input size.

    ``source`` is ``'timm'``, ``'torchvision'``, ``'module:callable'`` (any importable
    factory), or None to search the built-in CIFAR models, then torchvision, then timm.
    """
    from . import models

    if source and ":" in source:
        return _model_from_factory(source), (3, 32, 32)
    if source in (None, "builtin") and name in ("cifar_resnet18", "cifar_vgg16"):
        return getattr(models, name)(), (3, 32, 32)
    if source in (None, "torchvision"):
        import torchvision

        if name in _torchvision_names():
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            return torchvision.models.get_model(name, weights=None, **kwargs), (3, 64, 64)
        if source == "torchvision":
            raise _unknown(name, _torchvision_names(), "torchvision")
    if source in (None, "timm"):
        import timm

        if name in _timm_names():
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            model = timm.create_model(name, pretrained=False, **kwargs)
            size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
            return model, (size[0], 64, 64) if size[1] > 64 else size
        raise _unknown(name, _timm_names() + _torchvision_names() + ["cifar_resnet18", "cifar_vgg16"], "timm/torchvision")
    raise CliError(f"--source must be timm, torchvision or module:callable, got {source!r}")


def _model_from_factory(source: str) -> nn.Module:
    """Call ``module:callable`` and check that it gives a model."""
    module_name, _, attr = source.partition(":")
    if not module_name or not attr:
        raise CliError(f"--source {source!r}: expected module:callable, e.g. mypackage.models:build")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise CliError(f"--source {source!r}: cannot import {module_name!r}: {type(e).__name__}: {_first_line(e)}") from e
    factory: Callable[..., Any] | None = getattr(module, attr, None)
    if not callable(factory):
        what = "has no attribute" if factory is None else "has a non-callable"
        raise CliError(f"--source {source!r}: module {module_name!r} {what} {attr!r}")
    try:
        model = factory()
    except Exception as e:  # the user's factory
        raise CliError(f"--source {source!r}: {attr}() raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise CliError(f"--source {source!r}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _check_input_size(model: nn.Module, input_size: Sequence[int]) -> None:
    """A one-sample forward, so that a wrong ``--input-size`` fails now, in one line."""
    if any(v < 1 for v in input_size):
        raise CliError(f"--input-size must be three positive integers C H W, got {' '.join(map(str, input_size))}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    except Exception as e:  # a shape mismatch raises RuntimeError, ValueError, ...
        raise CliError(
            f"{type(model).__name__} does not take inputs of size {tuple(input_size)} (--input-size C H W): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    finally:
        model.train(was_training)


def _check_output_path(option: str, path: str | None) -> None:
    """Fail before any work if ``path`` cannot be written."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CliError(f"{option} {path!r} is a directory; give a file name")
    if not folder.is_dir():
        raise CliError(f"{option} {path!r}: the directory {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{option} {path!r}: the directory {str(folder)!r} is not writable")


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------


def _train_step_times(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().square().mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def _step_ratio(original: nn.Module, rewritten: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median forward+backward+SGD time of each, interleaved in this process."""
    original, rewritten = _clone_for_timing(original), _clone_for_timing(rewritten)
    _train_step_times(original, x, 1)  # warm-up
    _train_step_times(rewritten, x, 1)
    a, b = [], []
    for _ in range(repeats):
        a += _train_step_times(original, x, 1)
        b += _train_step_times(rewritten, x, 1)
    return statistics.median(a), statistics.median(b)


def _clone_for_timing(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _plot_figure2(report: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    index = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.semilogy(index, [r.cond_mean_before for r in rows], "o-", label="conv (A_k)")
    left.semilogy(index, [r.cond_mean_after for r in rows], "s-", label="ConvNorm (Q_k)")
    left.set_xlabel("layer")
    left.set_ylabel("mean channel condition number")
    left.legend()
    right.plot(index, [r.spectral_norm_before for r in rows], "o-", label="conv ||A||")
    right.plot(index, [r.spectral_norm_after for r in rows], "s-", label="ConvNorm ||Q||")
    right.set_xlabel("layer")
    right.set_ylabel("layer spectral norm")
    right.legend()
    fig.suptitle("Per-channel conditioning and layer spectral norm (circular operator, random init)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import convnorm_fx
    from .checks import check_sites

    _check_output_path("--json", args.json)
    _check_output_path("--plot", args.plot)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise CliError("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from e
    torch.manual_seed(args.seed)
    model, input_size = build_model(args.model, args.source)
    if args.input_size:
        input_size = tuple(args.input_size)
    _check_input_size(model, input_size)
    bn = {"auto": "auto", "on": True, "off": False}[args.bn]
    model.eval()
    start = time.perf_counter()
    rewritten = convnorm_fx.apply(model, bn=bn)
    rewrite_seconds = time.perf_counter() - start
    report = convnorm_fx.rewrite_report(rewritten)
    print(f"model: {args.model} ({type(model).__name__}), input {tuple(input_size)}, rewritten in {rewrite_seconds:.2f} s")
    print(report.summary())
    if args.verbose:
        print(report.format_table())

    checks = check_sites(model, rewritten, input_size)
    failed = [c for c in checks if not c.passed]
    worst_bypass = max((c.bypass_error for c in checks), default=0.0)
    worst_frame = max((c.tight_frame_error for c in checks), default=0.0)
    status = "PASS" if not failed else f"FAIL ({len(failed)} sites)"
    print(f"site checks: {len(checks)} sites, bypass max rel. error {worst_bypass:.2e}, tight-frame max error {worst_frame:.2e}: {status}")
    for check in failed[:10]:
        print(f"  failed: {check.name}: bypass {check.bypass_error:.2e}, tight frame {check.tight_frame_error:.2e}")

    spectral = convnorm_fx.spectral_report(rewritten, input_size)
    print()
    print(spectral.format_table())
    ratio = None
    if args.repeats > 0:
        x = torch.randn(args.batch_size, *input_size)
        base, new = _step_ratio(model, rewritten, x, args.repeats)
        ratio = new / base
        print(
            f"\ntrain step (forward+backward+SGD, batch {args.batch_size}, median of {args.repeats}): "
            f"original {base * 1e3:.1f} ms, rewritten {new * 1e3:.1f} ms, ratio {ratio:.2f}x"
        )
    if args.plot:
        _plot_figure2(spectral, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        payload = {
            "model": args.model,
            "input_size": list(input_size),
            "rewrite": report.to_dict(),
            "checks": [c.to_dict() for c in checks],
            "spectral": spectral.to_dict(),
            "train_step_ratio": ratio,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    skipped_learned = [s for s in report.skipped if s.learned and not s.reason.startswith("excluded")]
    if failed:
        raise CliError(f"{len(failed)} of {len(checks)} sites failed their checks (first: {failed[0].name})")
    if skipped_learned:
        raise CliError(f"{len(skipped_learned)} learned conv(s) were not rewritten (first: {skipped_learned[0].name}: {skipped_learned[0].reason})")
    return 0


# --------------------------------------------------------------------------------------
# zoo
# --------------------------------------------------------------------------------------


def _zoo_row(name: str, source: str, input_size: tuple[int, ...] | None) -> dict[str, Any]:
    import convnorm_fx
    from .report import SKIPPED

    start = time.perf_counter()
    model, size = build_model(name, source)
    size = input_size or size
    model.eval()
    rewritten = convnorm_fx.apply(model)
    report = convnorm_fx.rewrite_report(rewritten)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        with convnorm_fx.bypass(rewritten):
            actual = rewritten(x)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    actual = actual if isinstance(actual, torch.Tensor) else actual[0]
    error = float((actual - expected).abs().max()) / (float(expected.abs().max()) or 1.0)
    skipped: dict[str, int] = {}
    for site in report.sites:
        if site.action == SKIPPED:
            skipped[site.reason] = skipped.get(site.reason, 0) + 1
    swaps = sum(1 for s in report.sites if s.action == "module swap")
    tracing = "whole" if "" in report.traced else ("in parts" if report.traced else "module swap")
    return {
        "model": name,
        "tracing": tracing,
        "sites": len(report.sites),
        "rewritten": len(report.rewritten),
        "module_swaps": swaps,
        "skipped": skipped,
        "bypass_error": error,
        "seconds": time.perf_counter() - start,
        "ok": error <= 1e-4 and not any(s.learned for s in report.skipped),
    }


def _cmd_zoo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    _check_output_path("--json", args.json)
    pattern = None
    if args.filter:
        try:
            pattern = re.compile(args.filter)
        except re.error as e:
            raise CliError(f"--filter {args.filter!r} is not a valid regular expression: {e}") from e
    if args.input_size and any(v < 1 for v in args.input_size):
        raise CliError(f"--input-size must be three positive integers C H W, got {' '.join(map(str, args.input_size))}")
    names = _torchvision_names() if args.source == "torchvision" else _timm_names()
    if pattern is not None:
        names = [n for n in names if pattern.search(n)]
    if args.limit:
        names = names[: args.limit]
    if not names:
        raise CliError(f"no {args.source} model matches {args.filter!r}")
    rows = []
    for name in tqdm(names, desc="zoo", disable=args.quiet or not sys.stderr.isatty()):
        try:
            rows.append(_zoo_row(name, args.source, tuple(args.input_size) if args.input_size else None))
        except Exception as e:  # one model's failure must not end the sweep
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}", "ok": False})
    header = f"{'model':32} {'tracing':11} {'sites':>5} {'rewritten':>9} {'swaps':>5} {'bypass err':>10} {'time s':>7}  skipped"
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:32} ERROR {r['error'][:100]}")
            continue
        skipped = "; ".join(f"{n}x {reason}" for reason, n in r["skipped"].items())
        print(
            f"{r['model']:32} {r['tracing']:11} {r['sites']:>5} {r['rewritten']:>9} {r['module_swaps']:>5} "
            f"{r['bypass_error']:>10.1e} {r['seconds']:>7.1f}  {skipped}"
        )
    ok = [r for r in rows if r.get("ok")]
    totals = {
        "models": len(rows),
        "ok": len(ok),
        "sites": sum(r.get("sites", 0) for r in rows),
        "rewritten": sum(r.get("rewritten", 0) for r in rows),
        "seconds": sum(r.get("seconds", 0.0) for r in rows),
    }
    print(
        f"total: {totals['models']} models, {totals['ok']} ok, {totals['sites']} sites, "
        f"{totals['rewritten']} rewritten, {totals['seconds']:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": totals, "rows": rows}, indent=2))
    if len(ok) != len(rows):
        bad = next(r for r in rows if not r.get("ok"))
        raise CliError(f"{len(rows) - len(ok)} model(s) failed (first: {bad['model']}: {bad.get('error', 'checks failed')})")
    return 0


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convnorm-fx", description="Convolutional Normalization for any PyTorch ConvNet.")
    parser.add_argument("--traceback", action="store_true", help="on an error, show the Python traceback too")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    inspect = sub.add_parser("inspect", help="rewrite one model, check every site, show its spectra")
    inspect.add_argument("model", nargs="?", default=_DEFAULT_MODEL, help="model name (default: cifar_resnet18)")
    inspect.add_argument("--source", help="timm, torchvision or module:callable (default: search all)")
    inspect.add_argument("--input-size", nargs=3, type=_integer, metavar=("C", "H", "W"))
    inspect.add_argument("--bn", choices=("auto", "on", "off"), default="auto")
    inspect.add_argument("--batch-size", type=_positive, default=8, help="batch of the timing step (default 8)")
    inspect.add_argument("--repeats", type=_non_negative, default=5, help="timed train steps per model; 0 skips timing")
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--json", metavar="PATH", help="write everything as JSON")
    inspect.add_argument("--plot", metavar="PATH", help="write a Figure-2-style PNG")
    inspect.add_argument("--verbose", "-v", action="store_true", help="print the per-site rewrite table")
    zoo = sub.add_parser("zoo", help="coverage sweep over a model zoo")
    zoo.add_argument("--source", choices=("timm", "torchvision"), default="torchvision")
    zoo.add_argument("--filter", help="regex on model names")
    zoo.add_argument("--limit", type=_non_negative, default=0)
    zoo.add_argument("--input-size", nargs=3, type=_integer, metavar=("C", "H", "W"))
    zoo.add_argument("--json", metavar="PATH")
    zoo.add_argument("--quiet", action="store_true")
    for command in (inspect, zoo):
        command.add_argument("--threads", type=_non_negative, default=0, help="torch threads (default: torch's choice)")
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help="on an error, show the traceback too")
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser()
    first = next((a for a in argv if not a.startswith("-")), None)
    if first not in ("inspect", "zoo") and not any(a in ("-h", "--help") for a in argv):
        argv = ["inspect", *argv]  # the default command
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    try:
        args = _parse(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.command == "inspect":
            return _cmd_inspect(args)
        return _cmd_zoo(args)
    except CliError as e:
        if show_traceback:
            traceback.print_exc()
        print(f"convnorm-fx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convnorm-fx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else: still one line, unless asked for the traceback
        if show_traceback:
            traceback.print_exc()
        hint = "" if show_traceback else " (rerun with --traceback to see where)"
        print(f"convnorm-fx: error: {type(e).__name__}: {_first_line(e)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
