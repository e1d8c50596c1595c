"""Train-step and eval-forward cost of whole models, original vs rewritten with ConvNorm.

For each model, variants share the original's initial weights:

* ``original``: the model as built (BatchNorm where it has it);
* ``convnorm``: ``convnorm_fx.apply(model)`` (defaults: affine on, BN only where no
  normalization follows, each site's algorithm picked by the cost model);
* ``cn-direct``: the same with every site forced to the direct algorithm (full conv, then
  the frequency-domain stage);
* ``cn-nocache`` (``--cache-ablation``): the rewritten model with the eval-mode spectrum cache
  off (every call recomputes the preconditioner spectrum from the weight);
* ``cn-kcache`` (``--eval-kernel-cache``): rewritten with ``eval_kernel_cache=True`` (eval mode
  keeps each spectral site's per-frequency operator; the memory it holds is reported);
* ``naive`` (``--naive``, default for the CIFAR ResNet-18): the rewritten model with every
  ConvNorm layer computed by the paper's Algorithm 1 as written (``naive_convnorm.py``).

``--layouts contiguous channels_last`` times every variant in both memory formats (model
and input converted with ``.to(memory_format=torch.channels_last)``), interleaved in the same
process; the channels_last variants are named ``"<variant> (cl)"`` and get a table of their own.

Times are medians of interleaved repeats in one process: a train step is forward,
cross-entropy, backward and an SGD step (momentum 0.9); eval is a ``torch.no_grad`` forward
in eval mode. Memory: ``saved MB`` is what autograd keeps for backward in one training
forward (activations only, parameters excluded); on CPU ``peak MB`` is how far the resident
set peaks above its level before the first of three train steps (gradients and optimizer
state included), in a fresh subprocess per variant (the peak is reset then, so imports and
set-up do not count); on CUDA it is ``torch.cuda.max_memory_allocated`` over one train
step minus the memory held before it.

Usage::

    python benchmarks/bench_models.py --quick --threads 2
    python benchmarks/bench_models.py --models cifar_resnet18 --batch 32 --threads 2
    python benchmarks/bench_models.py --models cifar_resnet18 --layouts contiguous channels_last --threads 2
    python benchmarks/bench_models.py --device cuda --amp --channels-last --compile
"""

from __future__ import annotations

import os

# See bench_layer.py: passive OpenMP waiting on a shared machine; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convnorm_fx  # noqa: E402
from benchmarks import _common as common  # noqa: E402
from convnorm_fx.models import cifar_resnet18  # noqa: E402
from benchmarks.naive_convnorm import use_naive  # noqa: E402
from convnorm_fx.modules import ConvNorm2d  # noqa: E402

#: name -> (builder, default input size, number of classes)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {}


def _register_models() -> None:
    import timm
    import torchvision

    MODELS["cifar_resnet18"] = (lambda: cifar_resnet18(10), 32, 10)
    MODELS["resnet18"] = (lambda: torchvision.models.resnet18(weights=None, num_classes=100), 64, 100)
    MODELS["resnet50"] = (lambda: torchvision.models.resnet50(weights=None, num_classes=100), 64, 100)
    MODELS["efficientnet_b0"] = (lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=100), 64, 100)
    MODELS["vgg16_bn"] = (lambda: torchvision.models.vgg16_bn(weights=None, num_classes=100), 64, 100)
    for name in ("mobilenetv3_large_100", "convnext_tiny", "regnetx_016"):
        MODELS[name] = (lambda name=name: timm.create_model(name, pretrained=False, num_classes=100), 64, 100)


QUICK_MODELS = ["cifar_resnet18", "resnet18", "mobilenetv3_large_100"]
ALL_MODELS = [
    "cifar_resnet18",
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "convnext_tiny",
    "regnetx_016",
    "vgg16_bn",
]


def _set_algorithm(model: nn.Module, algorithm: str) -> None:
    for module in model.modules():
        if isinstance(module, ConvNorm2d):
            module.algorithm = algorithm


def _disable_eval_cache(model: nn.Module) -> None:
    """Recompute every stage's spectrum on every call, in eval mode too (cache ablation)."""
    for module in model.modules():
        if isinstance(module, ConvNorm2d):
            module.preconditioner = lambda weight, grid, stage=module: stage.compute_preconditioner(weight, grid)


def build_variant(name: str, variant: str, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """The model ``name`` in one variant (seeded, so every variant starts from the same weights)."""
    builder = MODELS[name][0]
    torch.manual_seed(0)
    model = builder()
    if variant != "original":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = {"eval_kernel_cache": True} if variant == "cn-kcache" else {}
            model = convnorm_fx.apply(model, **options)
        if variant == "cn-direct":
            _set_algorithm(model, "direct")
        if variant == "cn-nocache":
            _disable_eval_cache(model)
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def _variant_context(variant: str, model: nn.Module) -> Iterator[None]:
    if variant == "naive":
        with use_naive(model):
            yield
    else:
        yield


class Runner:
    """A model variant with its optimizer and fixed batch; ``train_step`` and ``eval_forward``."""

    def __init__(self, model: nn.Module, variant: str, x: torch.Tensor, target: torch.Tensor, amp: bool) -> None:
        self.model, self.variant, self.x, self.target, self.amp = model, variant, x, target, amp
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.device = x.device

    def forward_loss(self) -> torch.Tensor:
        with _variant_context(self.variant, self.model), common.autocast_context(self.device, self.amp):
            logits = self.model(self.x)
        return F.cross_entropy(logits.float(), self.target)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_loss().backward()
        self.optimizer.step()

    def eval_forward(self) -> None:
        self.model.eval()
        with torch.no_grad(), _variant_context(self.variant, self.model):
            with common.autocast_context(self.device, self.amp):
                self.model(self.x)


#: Suffix of the variants timed in the channels_last memory format next to contiguous ones.
CHANNELS_LAST_SUFFIX = " (cl)"


def _layouts(args: argparse.Namespace) -> list[str]:
    """The memory formats to time: ``--layouts``, else the one ``--channels-last`` chooses."""
    if args.layouts:
        return list(dict.fromkeys(args.layouts))
    return ["channels_last" if args.channels_last else "contiguous"]


def _key(variant: str, layout: str, layouts: list[str]) -> str:
    """A variant's name in the results: suffixed when it is the channels_last half of a pair."""
    return variant + CHANNELS_LAST_SUFFIX if layout == "channels_last" and len(layouts) > 1 else variant


def _inputs(
    name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, channels_last: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _, default_size, classes = MODELS[name]
    size = default_size if name.startswith("cifar") else args.size
    batch = args.cifar_batch if name.startswith("cifar") else args.batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    if args.channels_last if channels_last is None else channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return x, target


def _variants(name: str, args: argparse.Namespace) -> list[str]:
    variants = ["original", "convnorm"]
    if args.direct:
        variants.append("cn-direct")
    if args.cache_ablation:
        variants.append("cn-nocache")
    if args.eval_kernel_cache:
        variants.append("cn-kcache")
    if args.naive or (args.naive is None and name == "cifar_resnet18"):
        variants.append("naive")
    return variants


def _peak_memory_cuda(runner: Runner) -> float:
    torch.cuda.synchronize(runner.device)
    before = torch.cuda.memory_allocated(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    runner.train_step()
    torch.cuda.synchronize(runner.device)
    return (torch.cuda.max_memory_allocated(runner.device) - before) / 2**20


def _peak_memory_cpu(name: str, variant: str, args: argparse.Namespace) -> float | None:
    """Peak RSS growth over train steps of one variant, in a fresh interpreter."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name, variant, "--size", str(args.size)]
    command += ["--batch", str(args.batch), "--cifar-batch", str(args.cifar_batch), "--dtype", args.dtype]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.amp:
        command.append("--amp")
    if args.channels_last:
        command.append("--channels-last")
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(f"  memory subprocess failed for {name}/{variant}: {result.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"])


def _child_memory(args: argparse.Namespace) -> None:
    name, variant = args.child_memory
    device, dtype = common.setup_from_arguments(args)
    _register_models()
    model = build_variant(name, variant, device, dtype, args.channels_last)
    x, target = _inputs(name, args, device, dtype)
    runner = Runner(model, variant, x, target, args.amp)

    before = _resident_mb("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(3):
        runner.train_step()
    peak = _resident_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak - before, "before_mb": before, "peak_reset": reset}))


def _resident_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the peak resident set size (Linux >= 4.0), so imports and set-up do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    variants, layouts = _variants(name, args), _layouts(args)
    runners: dict[str, Runner] = {}
    sites = None
    for layout in layouts:
        x, target = _inputs(name, args, device, dtype, channels_last=layout == "channels_last")
        for variant in variants:
            model = build_variant(name, variant, device, dtype, layout == "channels_last")
            if args.compile:
                model = torch.compile(model)
            runners[_key(variant, layout, layouts)] = Runner(model, variant, x, target, args.amp)
            if variant == "convnorm":
                report = convnorm_fx.rewrite_report(model)
                sites = sum(1 for s in report.sites if s.rewritten)
    record: dict[str, Any] = {
        "model": name,
        "input": list(x.shape),
        "layouts": layouts,
        "rewritten_sites": sites,
        "parameters_m": sum(p.numel() for p in runners["original"].model.parameters()) / 1e6,
    }
    times = common.time_interleaved({v: r.train_step for v, r in runners.items()}, args.repeats, args.warmup, device)
    record["train_ms"] = {v: common.median_ms(t) for v, t in times.items()}
    times = common.time_interleaved({v: r.eval_forward for v, r in runners.items()}, args.repeats, args.warmup, device)
    record["eval_ms"] = {v: common.median_ms(t) for v, t in times.items()}
    record["eval_cache_mb"] = {v: _eval_cache_mb(r.model) for v, r in runners.items()}
    record["saved_mb"] = {}
    for variant, runner in runners.items():
        runner.model.train()
        exclude = common.parameter_pointers(runner.model)
        record["saved_mb"][variant] = common.saved_activation_bytes(runner.forward_loss, exclude) / 2**20
    if not args.no_memory:
        if device.type == "cuda":
            record["peak_mb"] = {v: _peak_memory_cuda(r) for v, r in runners.items()}
        elif not args.compile and len(layouts) == 1:  # (the subprocess takes the one layout)
            record["peak_mb"] = {v: _peak_memory_cpu(name, v, args) for v in variants}
    for runner in runners.values():
        runner.optimizer.zero_grad(set_to_none=True)
    return record


def _eval_cache_mb(model: nn.Module) -> float:
    """Memory the stages' eval caches hold after the eval repeats (spectra, weight copies,
    the operators of ``eval_kernel_cache``)."""
    return sum(m.eval_cache_nbytes() for m in model.modules() if isinstance(m, ConvNorm2d)) / 2**20


def _ratio(values: dict[str, Any], key: str, base: str = "original") -> float | str:
    if values.get(key) is None or not values.get(base):
        return ""
    return values[key] / values[base]


def _markdown(records: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    lines = [f"# Model benchmark ({env['device']}, {env['threads']} threads, torch {env['torch']})", ""]
    lines.append(f"Command: `{command}`  ")
    lines.append(
        f"OMP_WAIT_POLICY={env.get('omp_wait_policy')}, load average at start {env.get('load_average_at_start')}. "
        "Medians of interleaved repeats; ratios are variant / original."
    )
    header = [
        "model",
        "input",
        "sites",
        "train ms orig",
        "train ms CN",
        "train CN/orig",
        "eval ms orig",
        "eval ms CN",
        "eval CN/orig",
        "saved MB orig",
        "saved MB CN",
        "saved CN/orig",
        "peak MB orig",
        "peak MB CN",
        "peak CN/orig",
    ]
    rows = []
    for r in records:
        peak = r.get("peak_mb", {})
        rows.append(
            [
                r["model"],
                "x".join(str(v) for v in r["input"]),
                r["rewritten_sites"],
                r["train_ms"]["original"],
                r["train_ms"]["convnorm"],
                _ratio(r["train_ms"], "convnorm"),
                r["eval_ms"]["original"],
                r["eval_ms"]["convnorm"],
                _ratio(r["eval_ms"], "convnorm"),
                r["saved_mb"]["original"],
                r["saved_mb"]["convnorm"],
                _ratio(r["saved_mb"], "convnorm"),
                peak.get("original", ""),
                peak.get("convnorm", ""),
                _ratio(peak, "convnorm") if peak else "",
            ]
        )
    lines += ["", "## Original vs rewritten", "", common.markdown_table(header, rows)]
    lines += _layout_table(records)
    paired = ("original", "convnorm", "original" + CHANNELS_LAST_SUFFIX, "convnorm" + CHANNELS_LAST_SUFFIX)
    others = [(r, v) for r in records for v in r["train_ms"] if v not in paired]
    if others:
        header = ["model", "variant", "train ms", "variant / convnorm (train)"]
        header += ["eval ms", "variant / convnorm (eval)", "variant / original (eval)", "saved MB", "eval cache MB"]
        rows = [
            [
                r["model"],
                v,
                r["train_ms"][v],
                r["train_ms"][v] / r["train_ms"][_same_layout("convnorm", v)],
                r["eval_ms"][v],
                r["eval_ms"][v] / r["eval_ms"][_same_layout("convnorm", v)],
                r["eval_ms"][v] / r["eval_ms"][_same_layout("original", v)],
                r["saved_mb"][v],
                r.get("eval_cache_mb", {}).get(v, ""),
            ]
            for r, v in others
        ]
        title = "## Other ConvNorm implementations (same rewritten model)"
        lines += ["", title, "", common.markdown_table(header, rows)]
    return "\n".join(lines)


def _same_layout(variant: str, like: str) -> str:
    """``variant`` in the memory format of the variant named ``like``."""
    return variant + CHANNELS_LAST_SUFFIX if like.endswith(CHANNELS_LAST_SUFFIX) else variant


def _layout_table(records: list[dict[str, Any]]) -> list[str]:
    """Contiguous vs channels_last, for the records that timed both: each format's ratio, and
    the rewritten model in its faster format over the original in its faster one."""
    cl = CHANNELS_LAST_SUFFIX
    both = [r for r in records if "convnorm" + cl in r["train_ms"]]
    if not both:
        return []
    header = ["model", "mode", "orig ms", "orig ms (cl)", "CN ms", "CN ms (cl)", "CN/orig", "CN/orig (cl)"]
    header += ["faster CN / faster orig"]
    rows = []
    for r in both:
        for mode in ("train_ms", "eval_ms"):
            t = r[mode]
            best = min(t["convnorm"], t["convnorm" + cl]) / min(t["original"], t["original" + cl])
            rows.append([r["model"], mode.split("_")[0], t["original"], t["original" + cl], t["convnorm"],
                         t["convnorm" + cl], t["convnorm"] / t["original"], t["convnorm" + cl] / t["original" + cl],
                         best])  # fmt: skip
    return ["", "## Memory formats: contiguous vs channels_last", "", common.markdown_table(header, rows)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--models", default=None, help=f"comma-separated, from: {', '.join(ALL_MODELS)}")
    parser.add_argument("--batch", type=int, default=8, help="batch of the ImageNet-style models (default 8)")
    parser.add_argument("--size", type=int, default=64, help="input size of the ImageNet-style models (default 64)")
    parser.add_argument("--cifar-batch", type=int, default=32, help="batch of the CIFAR ResNet-18 (default 32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--direct", action="store_true", help="also time every site forced to the direct algorithm")
    parser.add_argument(
        "--cache-ablation", action="store_true", help="also time the rewritten model without the eval spectrum cache"
    )
    parser.add_argument(
        "--naive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time Algorithm 1 as written (default: CIFAR ResNet-18 only)",
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=("contiguous", "channels_last"),
        default=None,
        help="memory formats to time, interleaved (default: the one --channels-last chooses)",
    )
    parser.add_argument(
        "--eval-kernel-cache", action="store_true", help="also time the rewritten model with eval_kernel_cache=True"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--child-memory", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layouts and len(set(args.layouts)) == 1:
        args.channels_last = args.layouts[0] == "channels_last"
    if args.child_memory:
        _child_memory(args)
        return
    device, dtype = common.setup_from_arguments(args)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 9
    _register_models()
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else ALL_MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {ALL_MODELS}")
    env = common.describe_environment(device, args)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    records = []
    for name in names:
        record = run_model(name, args, device, dtype)
        records.append(record)
        t, e = record["train_ms"], record["eval_ms"]
        extra = " ".join(f"{v} {t[v]:.0f}" for v in t if v not in ("original", "convnorm"))
        print(
            f"{name:24s} train orig {t['original']:8.1f} CN {t['convnorm']:8.1f} "
            f"({t['convnorm'] / t['original']:.2f}x) "
            f"eval orig {e['original']:7.1f} CN {e['convnorm']:7.1f} ({e['convnorm'] / e['original']:.2f}x) {extra}",
            flush=True,
        )
    common.publish("models", "models", records, _markdown(records, env, command), env, command, device, args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
