"""Time one conv site with and without ConvNorm, over geometries typical of ResNets and MobileNets.

Variants of each site (same weights):

* ``conv``: ``nn.Conv2d``; ``conv+bn``: followed by ``BatchNorm2d``;
* ``convnorm``: :class:`convnorm_fx.ConvNormConv2d` (affine transform on, the algorithm the
  cost model picks); ``cn-direct`` / ``cn-spectral``: the same with the algorithm forced;
* ``naive``: the straightforward Algorithm 1 of the paper (``naive_convnorm.py``).

Each is timed forward (eval mode, ``torch.no_grad``; ConvNorm's eval spectrum cache on)
and forward+backward (train mode), interleaved, medians over repeats. A breakdown times
the pieces of ConvNorm's forward separately through :mod:`convnorm_fx.ops`: kernel
spectrum, full conv, FFT normalization, crop/stride, affine (direct algorithm) and kernel
DFT, input transform, per-frequency products, inverse at the kept samples (spectral).
``saved MB`` is what autograd keeps for backward (activations only, weights excluded).

Usage::

    python benchmarks/bench_layer.py --quick --threads 2
    python benchmarks/bench_layer.py --device cuda --amp --channels-last
"""

from __future__ import annotations

import os

# libgomp's default spin-then-yield wait makes each multi-threaded op wait for a time slice
# when the cores are shared with other jobs; passive waiting measures the work instead.
# Must be set before torch loads libgomp; an explicit OMP_WAIT_POLICY is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as common  # noqa: E402
from benchmarks.naive_convnorm import use_naive  # noqa: E402
from convnorm_fx import ConvNormConv2d, cost, dft, ops, pipeline, spectral  # noqa: E402


@dataclass(frozen=True)
class Site:
    """One conv site: batch, channels, square input size, kernel, stride, groups."""

    name: str
    batch: int
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int = 1
    groups: int = 1

    @property
    def padding(self) -> int:
        return self.kernel // 2


#: CIFAR ResNet-18 at batch 32, and ImageNet-style sites at small batch.
QUICK_SITES = [
    Site("r18-cifar stem", 32, 3, 64, 32, 3),
    Site("r18-cifar layer1", 32, 64, 64, 32, 3),
    Site("r18-cifar layer2 down", 32, 64, 128, 32, 3, 2),
    Site("r18-cifar layer2", 32, 128, 128, 16, 3),
    Site("r18-cifar layer3", 32, 256, 256, 8, 3),
    Site("r18-cifar layer4", 32, 512, 512, 4, 3),
    Site("r18-cifar shortcut 1x1", 32, 64, 128, 32, 1, 2),
    Site("mbv3 dw 5x5", 8, 72, 72, 28, 5, 1, 72),
]

FULL_SITES = QUICK_SITES + [
    Site("r18-cifar layer3 down", 32, 128, 256, 16, 3, 2),
    Site("r18-cifar layer4 down", 32, 256, 512, 8, 3, 2),
    Site("imagenet stem 7x7", 8, 3, 64, 112, 7, 2),
    Site("resnet 3x3 C64 56", 8, 64, 64, 56, 3),
    Site("resnet 3x3 C128 28", 8, 128, 128, 28, 3),
    Site("resnet 3x3 C256 14", 8, 256, 256, 14, 3),
    Site("resnet 3x3 C512 7", 8, 512, 512, 7, 3),
    Site("resnet 1x1 256-64 56", 8, 256, 64, 56, 1),
    Site("resnet 3x3 C16 112", 8, 16, 16, 112, 3),
    Site("mbv2 dw 3x3 C32 112", 8, 32, 32, 112, 3, 1, 32),
    Site("mbv2 dw 3x3 s2 C96 56", 8, 96, 96, 56, 3, 2, 96),
    Site("effnet dw 5x5 C240 14", 8, 240, 240, 14, 5, 1, 240),
    Site("convnext dw 7x7 C96 16", 8, 96, 96, 16, 7, 1, 96),
    Site("regnet group 3x3 C96 g4 28", 8, 96, 96, 28, 3, 1, 4),
    Site("5x5 C64 16", 8, 64, 64, 16, 5),
]

VARIANTS = ("conv", "conv+bn", "convnorm", "cn-direct", "cn-spectral", "naive")


def _build(site: Site, device: torch.device, dtype: torch.dtype, channels_last: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Conv2d(site.c_in, site.c_out, site.kernel, site.stride, site.padding, groups=site.groups, bias=False)
    modules: dict[str, nn.Module] = {
        "conv": conv,
        "conv+bn": nn.Sequential(conv, nn.BatchNorm2d(site.c_out)),
        "convnorm": ConvNormConv2d.from_conv(conv, affine_init="default"),
        "cn-direct": ConvNormConv2d.from_conv(conv, affine_init="default", algorithm="direct"),
        "cn-spectral": ConvNormConv2d.from_conv(conv, affine_init="default", algorithm="spectral"),
        "naive": ConvNormConv2d.from_conv(conv, affine_init="default"),
    }
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return {name: m.to(device=device, dtype=dtype, memory_format=memory_format) for name, m in modules.items()}


def _input(site: Site, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = torch.randn(site.batch, site.c_in, site.size, site.size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _call(name: str, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "naive":

        def run(x: torch.Tensor) -> torch.Tensor:
            with use_naive(module):
                return module(x)

        return run
    return module


def _breakdown(
    site: Site, x: torch.Tensor, module: ConvNormConv2d, amp: bool, repeats: int, warmup: int
) -> dict[str, float]:
    """Forward pieces of ConvNorm, timed separately through the ops functions (no grad)."""
    device = x.device
    stage = module.norm
    weight, k, s, d, pads = module.weight, stage.kernel_size, stage.stride, stage.dilation, stage.padding
    grid = (1, 1) if k == (1, 1) else ops.grid_size(x.shape[-2:], k, d)
    feed_stride, feed_padding = stage.feeding_stride, stage.feeding_padding
    with torch.no_grad(), common.autocast_context(device, amp):
        inv = ops.preconditioner_spectrum(weight, grid, d)
        y = F.conv2d(x, weight, None, feed_stride, feed_padding, d, site.groups)
        pieces: dict[str, Callable[[], Any]] = {
            "spectrum": lambda: ops.preconditioner_spectrum(weight, grid, d),
            "full conv": lambda: F.conv2d(x, weight, None, feed_stride, feed_padding, d, site.groups),
        }
        if k != (1, 1):
            z = ops.normalize_circular(y, inv)
            pieces["fft normalize"] = lambda: ops.normalize_circular(y, inv)
            pieces["crop/stride"] = lambda: ops.crop_and_downsample(z, k, s, pads, d)
            affine_w, affine_b = stage.affine_weight, stage.affine_bias
            pieces["affine"] = lambda: pipeline.affine_crop_downsample(z, k, s, pads, d, affine_w, affine_b)
            plan = spectral.spectral_plan(x, x.shape[-2:], k, s, pads, d, site.groups, stage.affine_weight, x.dtype)
            if plan is not None:
                cplx = torch.complex128 if x.dtype == torch.float64 else torch.complex64
                compute = torch.float64 if x.dtype == torch.float64 else torch.float32
                rows_in, cols_in = spectral.input_samples(plan.rows), spectral.input_samples(plan.cols)
                rows_out, cols_out = spectral.kept_samples(plan.rows), spectral.kept_samples(plan.cols)
                kernel = spectral.kernel_dft(weight, plan, cplx)
                kernel4 = kernel.view(plan.frequencies, site.groups, site.c_out // site.groups, -1)
                spectrum = dft.to_spectrum(x.to(compute), plan.grid, rows_in, cols_in, -1)
                u = spectral.grouped_matmul(spectrum, kernel4, site.groups)
                pieces["sp: kernel dft"] = lambda: spectral.kernel_dft(weight, plan, cplx)
                pieces["sp: input dft"] = lambda: dft.to_spectrum(x.to(compute), plan.grid, rows_in, cols_in, -1)
                pieces["sp: products"] = lambda: spectral.grouped_matmul(spectrum, kernel4, site.groups)
                pieces["sp: inverse"] = lambda: dft.from_spectrum(u, plan.grid, rows_out, cols_out, 1)
        else:
            affine_w, affine_b = stage.affine_weight, stage.affine_bias
            pieces["scale"] = lambda: pipeline.scale_1x1(y, weight, stage.eps, True, affine_w, affine_b, inv)
        times = common.time_interleaved(pieces, repeats, warmup, device)
    return {name: common.median_ms(t) for name, t in times.items()}


def run_site(site: Site, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    modules = _build(site, device, dtype, args.channels_last)
    x = _input(site, device, dtype, args.channels_last)
    calls = {name: _call(name, m) for name, m in modules.items()}
    probe = modules["convnorm"]
    picked = ops.select_algorithm(x.shape, probe.weight.shape, probe.stride, probe.dilation, site.groups)
    record: dict[str, Any] = {"site": asdict(site), "auto": picked, "forward_ms": {}, "train_ms": {}, "saved_mb": {}}

    for m in modules.values():
        m.eval()

    def forward(call: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), common.autocast_context(device, args.amp):
                return call(x)

        return run

    times = common.time_interleaved({n: forward(c) for n, c in calls.items()}, args.repeats, args.warmup, device)
    record["forward_ms"] = {n: common.median_ms(t) for n, t in times.items()}

    for m in modules.values():
        m.train()
    x_train = x.detach().clone().requires_grad_(True)

    def train(call: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with common.autocast_context(device, args.amp):
                out = call(x_train)
            out.float().square().mean().backward()
            return out

        return run

    train_calls = {n: train(c) for n, c in calls.items()}
    times = common.time_interleaved(train_calls, args.repeats, args.warmup, device)
    record["train_ms"] = {n: common.median_ms(t) for n, t in times.items()}
    exclude = common.parameter_pointers(*modules.values())
    for name, call in calls.items():

        def forward_only(call: Callable[[torch.Tensor], torch.Tensor] = call) -> None:
            with common.autocast_context(device, args.amp):
                call(x_train)

        record["saved_mb"][name] = common.saved_activation_bytes(forward_only, exclude) / 2**20
    for m in modules.values():
        m.zero_grad(set_to_none=True)
    if not args.no_breakdown:
        record["breakdown_ms"] = _breakdown(site, x, probe, args.amp, args.repeats, args.warmup)
        record["roofline"] = _roofline(site, x, record)
    return record


#: Breakdown pieces and the operation counts (``cost.site_operations``) they perform.
_PIECE_OPERATIONS = {
    "full conv": ("full conv",),
    "fft normalize": ("stage transform", "stage gain", "stage inverse"),
    "spectrum": ("spectrum",),
    "sp: kernel dft": ("sp: kernel dft",),
    "sp: input dft": ("sp: input transform",),
    "sp: products": ("sp: products",),
    "sp: inverse": ("sp: inverse",),
}
_SPECTRAL_PIECES = ("sp: input transform", "sp: kernel dft", "sp: products", "sp: inverse")
_DIRECT_PIECES = ("full conv", "stage transform", "stage gain", "stage inverse")


def _roofline(site: Site, x: torch.Tensor, record: dict[str, Any]) -> dict[str, Any]:
    """Multiply-adds, bytes, time and achieved rate of each piece next to the plain conv's, and
    the site's lower bound: its operation count at the rate the plain conv achieves."""
    weight_shape = (site.c_out, site.c_in // site.groups, site.kernel, site.kernel)
    counts = cost.site_operations(x.shape, weight_shape, site.stride, site.padding, 1, site.groups, x.element_size())
    conv_seconds = record["forward_ms"]["conv"] / 1e3
    conv_rate = counts["conv"].macs / conv_seconds  # multiply-adds per second
    pieces = {}
    for piece, names in _PIECE_OPERATIONS.items():
        ms = record["breakdown_ms"].get(piece)
        if ms is None:
            continue
        macs = sum(counts[n].macs for n in names)
        pieces[piece] = {
            "gmac": macs / 1e9,
            "mb": sum(counts[n].bytes for n in names) / 2**20,
            "ms": ms,
            "gflops": 2 * macs / (ms / 1e3) / 1e9,
        }
    spectral_macs = sum(counts[n].macs for n in _SPECTRAL_PIECES)
    direct_macs = sum(counts[n].macs for n in _DIRECT_PIECES)
    bound_ms = min(spectral_macs, direct_macs) / conv_rate * 1e3 if site.kernel > 1 else record["forward_ms"]["conv"]
    return {
        "conv_gflops": 2 * conv_rate / 1e9,
        "conv_gmac": counts["conv"].macs / 1e9,
        "spectral_gmac": spectral_macs / 1e9,
        "direct_gmac": direct_macs / 1e9,
        "lower_bound_ms": bound_ms,
        "convnorm_over_bound": record["forward_ms"]["convnorm"] / bound_ms,
        "pieces": pieces,
    }


def _markdown(records: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    lines = [f"# Layer benchmark ({env['device']}, {env['threads']} threads, torch {env['torch']})", ""]
    lines.append(f"Command: `{command}`  ")
    lines.append(f"Load average at start: {env.get('load_average_at_start')}. Medians of interleaved repeats.")
    for key, title in (("forward_ms", "Forward, eval, no grad (ms)"), ("train_ms", "Forward + backward, train (ms)")):
        header = ["site", "N", "auto"] + list(VARIANTS) + ["convnorm / conv", "naive / convnorm"]
        rows = []
        for r in records:
            t = r[key]
            rows.append(
                [r["site"]["name"], r["site"]["batch"], r["auto"]]
                + [t[v] for v in VARIANTS]
                + [t["convnorm"] / t["conv"], t["naive"] / t["convnorm"]]
            )
        lines += ["", f"## {title}", "", common.markdown_table(header, rows)]
    header = ["site"] + list(VARIANTS)
    rows = [[r["site"]["name"]] + [r["saved_mb"][v] for v in VARIANTS] for r in records]
    lines += ["", "## Saved for backward (MB, activations only)", "", common.markdown_table(header, rows)]
    if records and "breakdown_ms" in records[0]:
        pieces: list[str] = []
        for r in records:
            pieces += [p for p in r["breakdown_ms"] if p not in pieces]
        rows = [[r["site"]["name"]] + [r["breakdown_ms"].get(p, "") for p in pieces] for r in records]
        lines += ["", "## ConvNorm forward pieces (ms, no grad)", "", common.markdown_table(["site"] + pieces, rows)]
        header = [
            "site", "conv GMAC", "conv GFLOP/s", "spectral GMAC", "direct GMAC", "lower bound ms", "convnorm ms",
            "convnorm / bound",
        ]  # fmt: skip
        rows = []
        for r in records:
            roof = r["roofline"]
            rows.append([
                r["site"]["name"], roof["conv_gmac"], roof["conv_gflops"], roof["spectral_gmac"], roof["direct_gmac"],
                roof["lower_bound_ms"], r["forward_ms"]["convnorm"], roof["convnorm_over_bound"],
            ])  # fmt: skip
        lines += [
            "",
            "## Roofline (eval forward)",
            "",
            "Lower bound: the cheaper algorithm's multiply-adds at the rate the plain conv achieves.",
            "",
            common.markdown_table(header, rows),
        ]
        header = ["site", "piece", "GMAC", "MB moved", "ms", "GFLOP/s", "conv GFLOP/s"]
        rows = [
            [r["site"]["name"], piece, p["gmac"], p["mb"], p["ms"], p["gflops"], r["roofline"]["conv_gflops"]]
            for r in records
            for piece, p in r["roofline"]["pieces"].items()
        ]
        lines += ["", "## Pieces against the conv's rate", "", common.markdown_table(header, rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--sites", default=None, help="only sites whose name contains this text")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-piece timing")
    args = parser.parse_args(argv)
    device, dtype = common.setup_from_arguments(args)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 9
    sites = QUICK_SITES if args.quick else FULL_SITES
    if args.sites:
        sites = [s for s in sites if args.sites in s.name]
    env = common.describe_environment(device, args)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    records = []
    for site in sites:
        record = run_site(site, args, device, dtype)
        records.append(record)
        f, t = record["forward_ms"], record["train_ms"]
        print(
            f"{site.name:28s} auto={record['auto']:8s} fwd conv {f['conv']:8.2f} cn {f['convnorm']:8.2f} "
            f"naive {f['naive']:8.2f} | train conv {t['conv']:8.2f} cn {t['convnorm']:8.2f} naive {t['naive']:8.2f} ms",
            flush=True,
        )
    common.publish("layer", "sites", records, _markdown(records, env, command), env, command, device, args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
