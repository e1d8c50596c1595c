"""Train a CIFAR ResNet-18 or VGG-16 with or without ConvNorm (Liu et al. 2021, §4, App. C).

The paper's default setting is what the flags default to: SGD with learning rate 0.1,
momentum 0.9 and weight decay 1e-4; CIFAR-10 for 120 epochs with the learning rate divided
by 10 at epochs 40 and 80, CIFAR-100 for 150 epochs with drops at 60 and 120; random crop
(4 pixels of zero padding) and horizontal flip; 10 % of the training set held out for
validation and model selection. The reported test accuracy is that of the epoch with the
best validation accuracy (``best.test_acc`` in ``metrics.json``); the maximum test accuracy
over epochs, which the paper reports for label noise (App. C.3), is ``max_test_acc`` (with
``--eval-test every``), and the test accuracy of the last epoch's weights ``final_test_acc``.

Variants (``--variant``, see ``examples/models.py``): ``vanilla`` (no normalization), ``bn``
(conv -> BatchNorm), ``convnorm`` (``convnorm_fx.apply(vanilla, bn=False)``) and
``convnorm_bn`` (``convnorm_fx.apply(vanilla, bn=True)``), and ``sn`` (torch's spectral
normalization on every conv, no BatchNorm: the SN baseline of Table 4).

Examples::

    # Table 1, one seed (CIFAR-10, ResNet-18, ConvNorm + BN)
    python examples/train_cifar.py --variant convnorm_bn --out runs/c10_r18_cnbn_s0 --seed 0

    # Figure 3: no augmentation, no weight decay, no learning-rate decay
    python examples/train_cifar.py --variant convnorm --plain-training --epochs 30 --out runs/fig3

    # Table 5 / Figure 4: 80 % symmetric label noise
    python examples/train_cifar.py --variant convnorm_bn --label-noise 0.8 --out runs/noise80

    # Table 6: 10 % of the training split, the subset drawn with the run's seed
    python examples/train_cifar.py --variant bn --subset 0.1 --seed 1 --subset-seed 1 --out runs/t6_bn_s1

    # two processes (CPU: gloo; GPU: nccl, one process per GPU)
    torchrun --nproc_per_node 2 examples/train_cifar.py --variant bn --out runs/ddp

Outputs in ``--out``: ``metrics.json`` (arguments, per-epoch metrics, best epoch, wall
times, machine), ``metrics.csv`` (one row per epoch), ``best.pt`` (the best-validation
weights, what ``simba.py`` and ``spectra.py`` load), ``final.pt`` (the last weights) and,
with ``--plot``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import common
import models

#: Paper defaults per dataset: (epochs, learning-rate milestones).
SCHEDULES = {"cifar10": (120, (40, 80)), "cifar100": (150, (60, 120))}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        description="Train CIFAR ResNet-18 / VGG-16 with vanilla, BN, ConvNorm or ConvNorm+BN (Liu et al. 2021).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=tuple(common.DATASETS), default="cifar10")
    data.add_argument("--data", type=Path, default=None,
                      help="a .npz with x_train, y_train, x_test, y_test (uint8 HWC images); default: "
                           "../shared/data/cifar10/cifar10.npz next to the repository, for cifar10")  # fmt: skip
    data.add_argument("--torchvision-root", type=Path, default=None, help="use torchvision.datasets in this directory")
    data.add_argument("--download", action="store_true", help="with --torchvision-root: download the dataset")
    data.add_argument("--val-fraction", type=float, default=0.1, help="training images held out for validation")
    data.add_argument("--split-seed", type=int, default=0,
                      help="seed of the validation split, the label noise and (unless --subset-seed is given) "
                           "the --subset draw; the same for every run, so runs differ only by --seed")  # fmt: skip
    data.add_argument("--label-noise", type=float, default=0.0, metavar="R",
                      help="symmetric label noise on the training and validation labels (App. C.3): with "
                           "probability R a label is replaced by a class drawn uniformly from all classes, "
                           "the true one included")  # fmt: skip
    data.add_argument("--subset", type=float, default=1.0, metavar="F",
                      help="train on a class-stratified fraction F of the training split (validation unchanged)")
    data.add_argument("--subset-seed", type=int, default=None,
                      help="seed of the --subset draw (default: --split-seed); pass the run's --seed so that "
                           "seeds vary the subset as well as the initialization (Table 6)")  # fmt: skip
    data.add_argument("--val-size", type=int, default=None, metavar="N",
                      help="evaluate every epoch on a fixed class-stratified N-image sample of the validation "
                           "split (model selection on it; the split itself is unchanged). Default: all of it")  # fmt: skip

    model = parser.add_argument_group("model")
    model.add_argument("--arch", choices=models.ARCHS, default="resnet18")
    model.add_argument("--variant", choices=models.VARIANTS, default="convnorm_bn",
                       help="sn: spectral normalization on every conv, no BatchNorm (the SN baseline of Table 4)")
    model.add_argument("--width", type=float, default=1.0, help="channel multiplier (reduced-scale runs)")
    model.add_argument("--no-affine", dest="affine", action="store_false",
                       help="ConvNorm without the learnable affine kernel (Table 2)")  # fmt: skip
    model.add_argument("--affine-init", choices=("identity", "default"), default="identity",
                       help="initial affine kernel: identity, or PyTorch's default conv initialization")  # fmt: skip
    model.add_argument("--no-stop-gradient", dest="stop_gradient", action="store_false",
                       help="ConvNorm: differentiate through the preconditioner (the paper and the library "
                            "treat it as a constant in backward)")  # fmt: skip

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, default=None, help="default: 120 (cifar10) / 150 (cifar100)")
    optim.add_argument("--milestones", type=int, nargs="*", default=None,
                       help="epochs where the learning rate is divided by 10; default: 40 80 / 60 120")
    optim.add_argument("--batch-size", type=int, default=128, help="global batch size (split over processes)")
    optim.add_argument("--lr", type=float, default=0.1)
    optim.add_argument("--warmup-steps", type=int, default=0,
                       help="raise the learning rate linearly from lr/N to lr over the first N steps (not in the "
                            "paper; see RESULTS.md on ConvNorm without BatchNorm)")  # fmt: skip
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument("--plain-training", action="store_true",
                       help="Figure 3: no augmentation, no weight decay and no learning-rate decay")
    optim.add_argument("--seed", type=int, default=0, help="initialization, batch order and augmentation")
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (tests)")

    system = parser.add_argument_group("system")
    system.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    system.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    system.add_argument("--amp", action="store_true", help="bf16 autocast on CPU; fp16 autocast + GradScaler on CUDA")
    system.add_argument("--channels-last", action="store_true")
    system.add_argument("--compile", action="store_true", help="torch.compile the model")
    system.add_argument("--sync-bn", action="store_true", help="distributed: synchronize BatchNorm statistics")
    system.add_argument("--eval-batch-size", type=int, default=500)
    system.add_argument("--eval-test", choices=("every", "best"), default="every",
                        help="evaluate the test set after every epoch, or only for the best-validation weights "
                             "at the end (cheaper; then max_test_acc is not available)")  # fmt: skip

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None, help="directory for metrics, checkpoints and plots")
    output.add_argument("--plot", action="store_true", help="write curves.png (needs matplotlib)")
    output.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")

    args = parser.parse_args(argv)
    default_epochs, default_milestones = SCHEDULES[args.dataset]
    if args.epochs is None:
        args.epochs = default_epochs
    if args.milestones is None:
        args.milestones = list(default_milestones)
    if args.plain_training:
        args.milestones, args.weight_decay = [], 0.0
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.batch_size < 1 or args.eval_batch_size < 1:
        parser.error("batch sizes must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if args.val_size is not None and args.val_size < 1:
        parser.error("--val-size must be >= 1")
    if args.download and args.torchvision_root is None:
        parser.error("--download needs --torchvision-root")
    if not (args.affine and args.stop_gradient) and args.variant not in ("convnorm", "convnorm_bn"):
        parser.error("--no-affine and --no-stop-gradient apply to the convnorm variants only")
    return args


# --------------------------------------------------------------------------------------
# Distributed helpers (all no-ops in a single process)
# --------------------------------------------------------------------------------------


def _init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; starts the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    return rank, world, device


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all ranks hold one model."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def _replica_divergence(module: nn.Module, device: torch.device) -> dict[str, float]:
    """Largest difference between this rank's parameters/buffers and rank 0's."""
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    result = {}
    for kind, tensors in (("parameters", list(module.parameters())), ("buffers", list(module.buffers()))):
        floats = [t.detach().reshape(-1).to(torch.float64) for t in tensors if t.is_floating_point()]
        flat = torch.cat(floats) if floats else torch.zeros(0, dtype=torch.float64, device=device)
        reference = flat.clone()
        dist.broadcast(reference, 0)
        diff = (flat - reference).abs().max() if flat.numel() else torch.zeros((), dtype=torch.float64, device=device)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        result[f"max_abs_diff_{kind}"] = float(diff)
    return result


# --------------------------------------------------------------------------------------
# Data on the device
# --------------------------------------------------------------------------------------


class DeviceData:
    """The splits of one run as tensors on the device (uint8 images, int64 labels).

    Args:
        arrays: the loaded dataset.
        args: parsed command line (split, subset and noise options).
        device: where the tensors live.
    """

    def __init__(self, arrays: common.CifarArrays, args: argparse.Namespace, device: torch.device) -> None:
        num_classes = common.DATASETS[args.dataset]["classes"]
        train_idx, val_idx = common.split_indices(arrays.y_train, args.val_fraction, args.split_seed)
        subset_seed = args.split_seed if args.subset_seed is None else args.subset_seed
        train_idx = common.stratified_subset(train_idx, arrays.y_train, args.subset, subset_seed)
        if args.val_size is not None and args.val_size < len(val_idx):
            val_idx = common.stratified_sample(val_idx, arrays.y_train, args.val_size, args.split_seed)
        labels = arrays.y_train
        if args.label_noise > 0:
            # App. C.3 puts the noise on the training and the validation split; the test set stays clean.
            labels = common.symmetric_label_noise(labels, args.label_noise, num_classes, args.split_seed)
        self.noisy_fraction = float((labels[train_idx] != arrays.y_train[train_idx]).mean()) if len(train_idx) else 0.0
        if len(train_idx) == 0:
            raise ValueError("the training split is empty; raise --subset or lower --val-fraction")

        def put(x: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(device)

        self.x_train, self.y_train = put(arrays.x_train[train_idx]), put(labels[train_idx])
        self.x_val, self.y_val = put(arrays.x_train[val_idx]), put(labels[val_idx])
        self.x_test, self.y_test = put(arrays.x_test), put(arrays.y_test)
        self.num_classes = num_classes


def learning_rate(args: argparse.Namespace, epoch: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), taken in epoch ``epoch`` (0-based).

    ``--lr`` divided by 10 at each of ``--milestones`` (epochs), times a linear warm-up factor
    ``(step + 1) / N`` during the first ``N = --warmup-steps`` steps.
    """
    lr = args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.milestones)
    if step < args.warmup_steps:
        lr *= (step + 1) / args.warmup_steps
    return lr


def _batches(indices: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    mean: Tensor,
    std: Tensor,
    batch_size: int,
    amp: bool = False,
    channels_last: bool = False,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on a split (each process takes every ``world``-th image).

    Returns:
        ``{"loss": ..., "acc": ...}`` with accuracy in percent (``nan`` for an empty split).
    """
    was_training = model.training
    model.eval()
    device = images.device
    total_loss, correct, count = 0.0, 0.0, 0.0
    shard = torch.arange(rank, len(images), world, device=device)
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        inputs = common.normalize(images[idx], mean, std, channels_last=channels_last)
        with _autocast(device, amp):
            logits = model(inputs)
        target = labels[idx]
        total_loss += float(F.cross_entropy(logits.float(), target, reduction="sum"))
        correct += float((logits.argmax(1) == target).sum())
        count += len(idx)
    total_loss, correct, count = _all_sum([total_loss, correct, count], device)
    model.train(was_training)
    if count == 0:
        return {"loss": math.nan, "acc": math.nan}
    return {"loss": total_loss / count, "acc": 100.0 * correct / count}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    fields = list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train/validation/test accuracy and training loss per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test")):
        values = [row.get(key) for row in rows]
        if any(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in values):
            acc_ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend()
    loss_ax.plot(epochs, [row["train_loss"] for row in rows], marker="o", label="train")
    loss_ax.plot(epochs, [row["val_loss"] for row in rows], marker="o", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", yscale="log")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one training; returns the process exit status."""
    args = parse_args(argv)
    common.library_state()  # the library as imported, before anyone edits it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world, device = _init_distributed(args)
    is_main = rank == 0
    show_bars = is_main and not args.quiet and sys.stderr.isatty()

    def log(message: str) -> None:
        if is_main and not args.quiet:
            print(message, flush=True)

    try:
        arrays = common.load_arrays(
            args.dataset, data=args.data, torchvision_root=args.torchvision_root, download=args.download
        )
        data = DeviceData(arrays, args, device)
        mean, std = common.channel_stats(args.dataset, device)

        torch.manual_seed(args.seed)  # the same initialization on every rank
        net = models.build_model(
            args.arch,
            args.variant,
            data.num_classes,
            args.width,
            affine=args.affine,
            affine_init=args.affine_init,
            stop_gradient=args.stop_gradient,
        ).to(device)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if world > 1 and args.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        num_params = sum(p.numel() for p in net.parameters())
        model: nn.Module = net
        if world > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
        if args.compile:
            model = torch.compile(model)

        optimizer = torch.optim.SGD(
            net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
        sampler = DistributedSampler(
            range(len(data.y_train)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=False
        )
        augment = not args.plain_training
        generator = torch.Generator(device=device)
        generator.manual_seed(args.seed * 1000 + rank)
        local_batch = args.batch_size // world
        eval_options = {
            "mean": mean, "std": std, "batch_size": args.eval_batch_size, "amp": args.amp,
            "channels_last": args.channels_last, "rank": rank, "world": world,
        }  # fmt: skip

        log(
            f"{args.arch} x{args.width:g} {args.variant} on {args.dataset}: {len(data.y_train)} train / "
            f"{len(data.y_val)} val / {len(data.y_test)} test images, {num_params:,} parameters, {world} "
            f"process(es) on {device}"
        )
        rows: list[dict[str, Any]] = []
        best: dict[str, Any] = {"epoch": None, "val_acc": -math.inf, "test_acc": None}
        best_state: dict[str, Tensor] | None = None
        step, diverged, started = 0, False, time.perf_counter()
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            net.train()
            epoch_start = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0.0, 0.0
            order = list(sampler)
            bar = tqdm(
                list(_batches(order, local_batch)), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show_bars,
                leave=False, dynamic_ncols=True,
            )  # fmt: skip
            for batch in bar:
                idx = torch.tensor(batch, device=device)
                images = data.x_train[idx]  # (B, H, W, C) uint8
                if augment:
                    images = common.random_crop_flip(images, 4, generator)
                inputs = common.normalize(images, mean, std, channels_last=args.channels_last)
                target = data.y_train[idx]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(args, epoch, step)
                with _autocast(device, args.amp):
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                batch_loss = float(loss.detach())
                if not math.isfinite(batch_loss):
                    diverged = True
                loss_sum += batch_loss * len(batch)
                correct += float((logits.detach().argmax(1) == target).sum())
                seen += len(batch)
                bar.set_postfix(loss=f"{batch_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
                # Every rank takes the same number of steps; a local divergence is acted on at the
                # end of the epoch when several processes run, so that no rank waits on another.
                if (diverged and world == 1) or (args.max_steps is not None and step >= args.max_steps):
                    break
            bar.close()
            diverged = bool(_all_sum([float(diverged)], device)[0])
            loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], device)
            train_time = time.perf_counter() - epoch_start
            _sync_buffers(net)

            val = evaluate(net, data.x_val, data.y_val, **eval_options)
            test = evaluate(net, data.x_test, data.y_test, **eval_options) if args.eval_test == "every" else None
            row = {
                "epoch": epoch + 1,
                "step": step,
                "lr": optimizer.param_groups[0]["lr"],  # of the epoch's last step
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": 100.0 * correct / max(seen, 1),
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "test_loss": test["loss"] if test else None,
                "test_acc": test["acc"] if test else None,
                "train_time_s": train_time,
                "epoch_time_s": time.perf_counter() - epoch_start,
            }
            rows.append(row)
            improved = math.isfinite(val["acc"]) and val["acc"] > best["val_acc"]
            if improved:
                best = {"epoch": epoch + 1, "val_acc": val["acc"], "test_acc": row["test_acc"]}
                best_state = copy.deepcopy(net.state_dict())
            test_text = f" test {row['test_acc']:.2f}" if test else ""
            log(
                f"epoch {epoch + 1:3d}/{args.epochs} loss {row['train_loss']:.4f} train {row['train_acc']:.2f} "
                f"val {val['acc']:.2f}{test_text} ({row['epoch_time_s']:.1f}s){' *' if improved else ''}"
            )
            if diverged:
                log("training diverged (non-finite loss); stopping")
                break
            if args.max_steps is not None and step >= args.max_steps:
                break

        final_state = copy.deepcopy(net.state_dict())
        final_test_acc = rows[-1]["test_acc"] if rows else None
        if best_state is not None and args.eval_test == "best":
            if rows and best["epoch"] != rows[-1]["epoch"]:
                final_test_acc = evaluate(net, data.x_test, data.y_test, **eval_options)["acc"]
            net.load_state_dict(best_state)
            best["test_acc"] = evaluate(net, data.x_test, data.y_test, **eval_options)["acc"]
            if final_test_acc is None:  # the best epoch is the last one
                final_test_acc = best["test_acc"]
            net.load_state_dict(final_state)
        wall = time.perf_counter() - started
        replicas = _replica_divergence(net, device)
        tests = [row["test_acc"] for row in rows if row["test_acc"] is not None and math.isfinite(row["test_acc"])]

        if is_main and args.out is not None:
            out = args.out
            out.mkdir(parents=True, exist_ok=True)
            meta = {
                "arch": args.arch, "variant": args.variant, "num_classes": data.num_classes, "width": args.width,
                "affine": args.affine, "affine_init": args.affine_init, "stop_gradient": args.stop_gradient,
                "dataset": args.dataset,
                "mean": common.DATASETS[args.dataset]["mean"], "std": common.DATASETS[args.dataset]["std"],
            }  # fmt: skip
            common.save_checkpoint(out / "final.pt", net, {**meta, "epoch": rows[-1]["epoch"] if rows else 0})
            if best_state is not None:
                net.load_state_dict(best_state)
                common.save_checkpoint(out / "best.pt", net, {**meta, **best})
                net.load_state_dict(final_state)
            record = {
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "data_source": arrays.source,
                "sizes": {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test)},
                "noisy_label_fraction": data.noisy_fraction,
                "num_params": num_params,
                "world_size": world,
                "steps": step,
                "diverged": diverged,
                "best": best,
                "max_test_acc": max(tests) if tests else None,
                "final_test_acc": final_test_acc,
                "final": rows[-1] if rows else None,
                "wall_time_s": wall,
                "mean_epoch_time_s": float(np.mean([r["epoch_time_s"] for r in rows])) if rows else None,
                "mean_train_time_s": float(np.mean([r["train_time_s"] for r in rows])) if rows else None,
                "replicas": replicas,
                "machine": common.describe_machine(device),
                "epochs": rows,
            }
            common.write_json(out / "metrics.json", record)
            _write_csv(out / "metrics.csv", rows)
            if args.plot and rows:
                plot_curves(rows, out / "curves.png", f"{args.arch} x{args.width:g} {args.variant} ({args.dataset})")
        best_test = "n/a" if best["test_acc"] is None else f"{best['test_acc']:.2f}"
        log(
            f"done in {wall:.0f}s: best val {best['val_acc']:.2f} at epoch {best['epoch']}, test {best_test}"
            + (" (diverged)" if diverged else "")
        )
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
