"""Why ConvNorm without BatchNorm stalls at learning rate 0.1: norms at initialization and early on.

Trains one network of ``train_cifar.py`` for ``--steps`` SGD steps on the same data, in the same
order and with the same optimizer as ``train_cifar.py`` would (every training option of
``train_cifar.py`` is accepted and passed through: ``--variant``, ``--seed``, ``--width``,
``--subset``, ``--lr``, ``--warmup-steps``, ``--affine-init``, ``--no-stop-gradient`` ...),
and records at steps 0 (the initialization), 1, 2, 5, 10, 20, 50 and the last one:

* per conv site (the conv with its ConvNorm stage, affine kernel, bias and BatchNorm): the RMS
  of the site's output and of the loss gradient with respect to it, the norm of the conv
  weight, of its gradient, and the cosine between the two (``radial_cos``). For a ConvNorm
  site the output does not change when a channel's weight is scaled (the preconditioner
  divides the scale out), so the exact gradient has no component along the weight; the
  component there comes from the stop-gradient on the preconditioner, which differentiates as
  if the output scaled with the weight. With a BatchNorm after the site it is zero again,
  since BatchNorm removes the scale;
* the gradient norms of the conv bias and of the affine kernel and its bias;
* per residual block: the RMS of the sum ``branch + shortcut`` before the last ReLU and of the
  block output, and the fraction of block outputs that are zero;
* the RMS of the logits;
* per conv site, the largest and the median over output channels of the channel condition
  number of the conv weight, ``sqrt((max S_k + eps) / (min S_k + eps))`` with ``S_k`` the
  kernel's power spectrum summed over input channels on the site's FFT grid: the spread of
  the gains ConvNorm applies across frequencies (a 3x3 kernel with few input channels, like
  the stem's, can have near-zeros in ``S_k``, which ConvNorm amplifies up to ``eps ** -0.5``);
* how far one SGD step moves each site: the relative change of the weight,
  ``|w' - w| / |w|``, and of the site's output on the same batch, ``rms(y' - y) / rms(y)``
  (the output is recomputed after the step, in training mode, without gradients). A site
  whose output moves much more than its weight is sensitive to the step;

and at every step the loss, the batch accuracy, the learning rate and the global gradient
norm. The output is one JSON file (``--out``).

Example::

    python examples/diagnose_convnorm.py --variant convnorm --seed 1 --width 0.125 --subset 0.05 \\
        --val-fraction 0.02 --batch-size 64 --steps 100 --out runs/diagnose/convnorm_s1.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

import common
import convnorm_fx
import models
import train_cifar

RECORD_AT = (0, 1, 2, 5, 10, 20, 50)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """``(own options, train_cifar options)``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    parser.add_argument("--steps", type=int, default=100, help="SGD steps to take")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the measurements")
    own, rest = parser.parse_known_args(argv)
    if own.steps < 1:
        parser.error("--steps must be >= 1")
    train_args = train_cifar.parse_args(rest)
    return own, train_args


def _rms(x: Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def _norm(x: Tensor | None) -> float | None:
    return None if x is None else float(x.detach().norm())


def channel_condition(weight: Tensor, size: tuple[int, int], eps: float = convnorm_fx.DEFAULT_EPS) -> tuple[float, float]:
    """Largest and median channel condition number of a conv weight on the ConvNorm grid of an input size.

    Args:
        weight: ``(C_out, C_in, k_h, k_w)``.
        size: the conv's input ``(H, W)``; the grid is ``(H + k_h - 1, W + k_w - 1)`` (stride 1, dilation 1).
        eps: added to the power spectrum, as ConvNorm does.

    Returns:
        ``(max, median)`` over output channels of ``sqrt((max S_k + eps) / (min S_k + eps))``.
    """
    k_h, k_w = weight.shape[-2:]
    if (k_h, k_w) == (1, 1):
        return 1.0, 1.0
    grid = (size[0] + k_h - 1, size[1] + k_w - 1)
    power = torch.fft.rfft2(weight.detach().double(), s=grid).abs().pow(2).sum(1).flatten(1)  # (C_out, bins)
    cond = ((power.max(1).values + eps) / (power.min(1).values + eps)).sqrt()
    return float(cond.max()), float(cond.median())


class Probe:
    """Forward hooks that keep what one step needs (the model's ReLUs must not be in place)."""

    def __init__(self, model: nn.Module) -> None:
        self.sites = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, models.ConvBN))}
        # A conv inside ConvBN is measured through its ConvBN (the site is conv + BN).
        self.sites = {n: m for n, m in self.sites.items() if not n.endswith(".conv") or n[:-5] not in self.sites}
        self.blocks = {name: m for name, m in model.named_modules() if isinstance(m, models.BasicBlock)}
        self.outputs: dict[str, Tensor] = {}
        self.input_sizes: dict[str, tuple[int, int]] = {}
        self.sums: dict[str, Tensor] = {}
        self.block_out: dict[str, Tensor] = {}
        self.active = False
        for name, module in self.sites.items():
            module.register_forward_hook(self._keep(self.outputs, name, retain=True))
            module.register_forward_pre_hook(self._size(name))
        for name, block in self.blocks.items():
            block.relu2.register_forward_pre_hook(self._keep_input(self.sums, name))
            block.register_forward_hook(self._keep(self.block_out, name, retain=False))

    def _keep(self, store: dict[str, Tensor], name: str, retain: bool):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self.active:
                if retain and output.requires_grad:
                    output.retain_grad()
                store[name] = output

        return hook

    def _size(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            self.input_sizes[name] = tuple(inputs[0].shape[-2:])

        return hook

    def _keep_input(self, store: dict[str, Tensor], name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if self.active:
                store[name] = inputs[0].detach()

        return hook

    def weights(self) -> dict[str, Tensor]:
        """A copy of every site's conv weight (the parametrized one for ``sn``)."""
        copies = {}
        for name, module in self.sites.items():
            conv = module.conv if isinstance(module, models.ConvBN) else module
            copies[name] = conv.weight.detach().clone()
        return copies

    def step_sizes(self, weights: dict[str, Tensor], outputs: dict[str, Tensor], layers: list[dict[str, Any]]) -> None:
        """Add the relative change of each site's weight and output since ``weights`` / ``outputs``."""
        now = self.weights()
        for layer in layers:
            name = layer["name"]
            layer["weight_step"] = float((now[name] - weights[name]).norm() / weights[name].norm())
            before, after = outputs[name].detach(), self.outputs[name].detach()
            layer["output_step"] = _rms(after - before) / max(_rms(before), 1e-12)

    def report(self, logits: Tensor) -> dict[str, Any]:
        """Measurements of the last forward/backward pass."""
        layers = []
        for name, module in self.sites.items():
            conv = module.conv if isinstance(module, models.ConvBN) else module
            weight = getattr(conv, "parametrizations", None)
            weight = conv.parametrizations.weight.original if weight is not None else conv.weight
            weight, grad = weight.detach(), weight.grad
            cos = None
            if grad is not None and float(grad.norm()) > 0 and float(weight.norm()) > 0:
                cos = float((grad * weight).sum() / (grad.norm() * weight.norm()))
            stage = getattr(conv, "norm", None)
            output = self.outputs.get(name)
            cond_max, cond_median = channel_condition(conv.weight, self.input_sizes[name])
            layers.append({
                "name": name,
                "act_rms": None if output is None else _rms(output),
                "act_grad_rms": None if output is None or output.grad is None else _rms(output.grad),
                "weight_norm": _norm(weight),
                "weight_grad_norm": _norm(grad),
                "radial_cos": cos,
                "cond_max": cond_max,
                "cond_median": cond_median,
                "bias_grad_norm": _norm(None if conv.bias is None else conv.bias.grad),
                "affine_weight_grad_norm": _norm(getattr(getattr(stage, "affine_weight", None), "grad", None)),
                "affine_bias_grad_norm": _norm(getattr(getattr(stage, "affine_bias", None), "grad", None)),
            })  # fmt: skip
        blocks = [
            {
                "name": name,
                "sum_rms": _rms(self.sums[name]),
                "out_rms": _rms(self.block_out[name]),
                "dead_fraction": float((self.block_out[name] <= 0).float().mean()),
            }
            for name in self.blocks
            if name in self.sums
        ]
        return {"logits_rms": _rms(logits), "layers": layers, "blocks": blocks}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe; returns the process exit status."""
    own, args = parse_args(argv)
    common.library_state()  # the library as imported, before anyone edits it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    arrays = common.load_arrays(args.dataset, data=args.data)
    data = train_cifar.DeviceData(arrays, args, device)
    mean, std = common.channel_stats(args.dataset, device)
    torch.manual_seed(args.seed)  # the same initialization as train_cifar.py
    net = models.build_model(
        args.arch,
        args.variant,
        data.num_classes,
        args.width,
        affine=args.affine,
        affine_init=args.affine_init,
        stop_gradient=args.stop_gradient,
    )
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # the hooks read tensors that an in-place ReLU would overwrite
    probe = Probe(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sampler = DistributedSampler(range(len(data.y_train)), num_replicas=1, rank=0, shuffle=True, seed=args.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed * 1000)
    record_at = {s for s in RECORD_AT if s < own.steps} | {own.steps - 1}
    steps: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    step, epoch = 0, 0
    while step < own.steps:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for first in range(0, len(order), args.batch_size):
            idx = torch.tensor(order[first : first + args.batch_size])
            images = data.x_train[idx]
            if not args.plain_training:
                images = common.random_crop_flip(images, 4, generator)
            inputs = common.normalize(images, mean, std)
            target = data.y_train[idx]
            lr = train_cifar.learning_rate(args, epoch, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            probe.active = step in record_at
            logits = net(inputs)
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters() if p.grad is not None))
            steps.append({
                "step": step, "lr": lr, "loss": float(loss.detach()), "acc": 100.0 * float((logits.argmax(1) == target).float().mean()),
                "grad_norm": grad_norm,
            })  # fmt: skip
            recorded = probe.active
            if recorded:
                records.append({"step": step, **probe.report(logits)})
                weights_before, outputs_before = probe.weights(), dict(probe.outputs)
            optimizer.step()
            if recorded:
                with torch.no_grad():
                    net(inputs)  # the same batch after the step
                probe.step_sizes(weights_before, outputs_before, records[-1]["layers"])
                probe.active = False
                probe.outputs.clear()
            step += 1
            if step >= own.steps:
                break
        epoch += 1
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps_taken": own.steps,
        "train_images": len(data.y_train),
        "wall_time_s": time.perf_counter() - started,
        "machine": common.describe_machine(device),
        "per_step": steps,
        "records": records,
    }
    last = steps[-1]
    print(
        f"{args.variant} seed {args.seed} width {args.width:g} lr {args.lr:g} warmup {args.warmup_steps}: "
        f"loss {steps[0]['loss']:.3f} -> {last['loss']:.3f}, logits rms {records[0]['logits_rms']:.3g} -> "
        f"{records[-1]['logits_rms']:.3g} ({result['wall_time_s']:.0f}s)",
        flush=True,
    )
    if own.out is not None:
        own.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_json(own.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
