"""SimBA pixel attack on a trained CIFAR model (Guo et al. 2019; Liu et al. 2021, §4.2, Table 4).

SimBA is a black-box attack that only reads the model's output probabilities. For each
image it walks through the ``3 x 32 x 32 = 3072`` pixel coordinates in a random order; at
each coordinate it tries a step of ``-eps`` and, if that does not lower the probability of
the true class, ``+eps``; a step is kept when it lowers that probability. The attack on an
image stops when the model no longer predicts the true class (success) or when every
coordinate has been tried (failure). It is run on ``--num-images`` test images that the
model classifies correctly, drawn at random (App. C.3: 1000 images).

**Scale of eps.** By default (``--space pixel``) the step is taken in the ``[0, 1]`` pixel
scale, before the model's input normalization, and ``images + perturbation`` is clamped to
``[0, 1]``: this is what Guo et al.'s reference code does (it perturbs the ``[0, 1]`` image,
clamps it and normalizes it inside the model wrapper), and the paper calls its setting a
"pixel attack using a step size eps = 0.4". One step then moves a pixel by 0.4, about 102
grey levels. ``--space normalized`` takes the step on the normalized model input,
``(x - mean) / std``, instead (one step moves a pixel by ``0.4 * std_c``, about 0.1 or 26 grey
levels), clamped to the normalized image of ``[0, 1]``; it is kept as an option because the
paper does not state the scale. Every result records its ``space``.

**Counting.** A model query is one forward pass for one image; an iteration (one coordinate)
costs one or two queries. The report gives the success rate after at most 3072 iterations,
the average number of queries over all attacked images (failures count every query they
used, which is how Table 4's averages of 2519-2966 queries with 54-61 % success can arise)
and, for completeness, the average over successful attacks only and the average number of
iterations.

The attack is batched over images: every iteration runs one forward pass on the images
still being attacked, and a second one on those whose ``-eps`` step did not help.

Example::

    python examples/simba.py runs/c10_r18_convnorm_s0/best.pt --num-images 1000 --out runs/simba_convnorm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

import common

Classifier = Callable[[Tensor], Tensor]


def simba_pixel(
    probabilities: Classifier,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float = 0.4,
    max_iters: int | None = None,
    low: Tensor | float = 0.0,
    high: Tensor | float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Untargeted SimBA in the pixel basis, batched over images.

    Args:
        probabilities: maps a batch ``(B, C, H, W)`` in the attacked space to class
            probabilities ``(B, K)``.
        images: ``(N, C, H, W)`` images the model classifies correctly.
        labels: ``(N,)`` their true classes.
        eps: step size in the attacked space.
        max_iters: coordinates tried per image (default and maximum ``C * H * W``).
        low, high: bounds of valid inputs (scalars or tensors broadcastable to ``images``).
        generator: CPU generator for the per-image random coordinate orders.
        progress: show a tqdm bar over iterations.

    Returns:
        Per image: ``success`` (bool), ``queries`` and ``iterations`` (int64), ``l2`` and
        ``linf`` (norms of the final perturbation), ``final_prob`` (true-class probability).
    """
    n = images.shape[0]
    dims = images[0].numel()
    max_iters = dims if max_iters is None else min(int(max_iters), dims)
    device = images.device
    flat = images.reshape(n, dims)
    low_flat = torch.as_tensor(low, dtype=images.dtype, device=device).expand_as(images).reshape(n, dims)
    high_flat = torch.as_tensor(high, dtype=images.dtype, device=device).expand_as(images).reshape(n, dims)
    # A random order of coordinates per image: SimBA picks each coordinate once, at random.
    order = torch.rand(n, dims, generator=generator).argsort(dim=1).to(device)  # (N, dims)
    delta = torch.zeros_like(flat)
    queries = torch.zeros(n, dtype=torch.int64, device=device)
    iterations = torch.zeros(n, dtype=torch.int64, device=device)
    success = torch.zeros(n, dtype=torch.bool, device=device)

    def query(idx: Tensor, perturbation: Tensor) -> tuple[Tensor, Tensor]:
        candidate = torch.minimum(torch.maximum(flat[idx] + perturbation, low_flat[idx]), high_flat[idx])
        probs = probabilities(candidate.reshape(-1, *images.shape[1:]))
        queries[idx] += 1
        return probs.gather(1, labels[idx, None]).squeeze(1), probs.argmax(1)

    all_idx = torch.arange(n, device=device)
    prob, pred = query(all_idx, delta)
    queries.zero_()  # the clean prediction is known to the attacker; it is not counted
    success |= pred != labels
    for step in tqdm(range(max_iters), desc="SimBA", disable=not progress, leave=False, dynamic_ncols=True):
        active = all_idx[~success]
        if active.numel() == 0:
            break
        iterations[active] += 1
        coordinate = order[active, step]
        rows = torch.arange(active.numel(), device=device)
        for sign in (-1.0, 1.0):
            if active.numel() == 0:
                break
            trial = delta[active].clone()
            trial[rows, coordinate] += sign * eps
            new_prob, new_pred = query(active, trial)
            better = new_prob < prob[active]
            accepted = active[better]
            delta[accepted] = trial[better]
            prob[accepted] = new_prob[better]
            pred[accepted] = new_pred[better]
            success[accepted] = new_pred[better] != labels[accepted]
            # The +eps step is tried only where -eps did not lower the probability.
            keep = ~better
            active, coordinate = active[keep], coordinate[keep]
            rows = torch.arange(active.numel(), device=device)
    applied = torch.minimum(torch.maximum(flat + delta, low_flat), high_flat) - flat
    return {
        "success": success.cpu(),
        "queries": queries.cpu(),
        "iterations": iterations.cpu(),
        "l2": applied.norm(dim=1).cpu(),
        "linf": applied.abs().amax(dim=1).cpu(),
        "final_prob": prob.cpu(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="SimBA pixel attack (Table 4) on a checkpoint written by train_cifar.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="best.pt or final.pt from train_cifar.py")
    parser.add_argument("--data", type=Path, default=None,
                        help="the .npz the model was trained on (default: the shared CIFAR-10)")  # fmt: skip
    parser.add_argument("--torchvision-root", type=Path, default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--num-images", type=int, default=1000, help="correctly classified test images to attack")
    parser.add_argument("--eps", type=float, default=0.4, help="step size (see --space)")
    parser.add_argument("--space", choices=("pixel", "normalized"), default="pixel",
                        help="pixel: eps in the [0, 1] pixel scale, clamped to [0, 1], before the "
                             "normalization (Guo et al.'s reference code); normalized: eps on the "
                             "normalized model input")  # fmt: skip
    parser.add_argument("--max-iters", type=int, default=None, help="coordinates per image (default 3*32*32 = 3072)")
    parser.add_argument("--batch-size", type=int, default=1000, help="images attacked together")
    parser.add_argument("--seed", type=int, default=0, help="choice of images and coordinate orders")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="directory for simba.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be >= 1")
    if not args.eps > 0:
        parser.error("--eps must be > 0")
    return args


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> int:
    """Attack a checkpoint; returns the process exit status."""
    args = parse_args(argv)
    common.library_state()  # the library as imported, before anyone edits it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model, meta = common.load_checkpoint(args.checkpoint, device)
    arrays = common.load_arrays(
        meta["dataset"], data=args.data, torchvision_root=args.torchvision_root, download=args.download
    )
    mean = torch.tensor(meta["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def logits_of_pixels(x: Tensor) -> Tensor:  # x: (B, 3, H, W) in [0, 1]
        return model((x - mean) / std)

    x_test = torch.from_numpy(arrays.x_test).to(device).permute(0, 3, 1, 2).float() / 255.0  # (M, 3, H, W)
    y_test = torch.from_numpy(arrays.y_test).to(device)
    preds = torch.cat([logits_of_pixels(x_test[i : i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)])
    clean_acc = 100.0 * float((preds == y_test).float().mean())
    correct = torch.nonzero(preds == y_test).squeeze(1).cpu()
    generator = torch.Generator().manual_seed(args.seed)
    chosen = correct[torch.randperm(len(correct), generator=generator)[: args.num_images]]
    if len(chosen) < args.num_images and not args.quiet:
        print(f"only {len(chosen)} correctly classified test images; attacking all of them", flush=True)

    normalized = args.space == "normalized"

    def to_space(x: Tensor) -> Tensor:  # x: (B, 3, H, W) in [0, 1]
        return (x - mean) / std if normalized else x

    def probabilities(x: Tensor) -> Tensor:  # x: (B, 3, H, W) in the attacked space
        return torch.softmax((model(x) if normalized else logits_of_pixels(x)).float(), dim=1)

    # Valid inputs: the image of [0, 1] in the attacked space.
    low, high = (to_space(torch.zeros_like(mean)), to_space(torch.ones_like(mean))) if normalized else (0.0, 1.0)

    results: dict[str, list[Tensor]] = {}
    started = time.perf_counter()
    for start in range(0, len(chosen), args.batch_size):
        idx = chosen[start : start + args.batch_size].to(device)
        part = simba_pixel(
            probabilities, to_space(x_test[idx]), y_test[idx], eps=args.eps, max_iters=args.max_iters,
            low=low, high=high, generator=generator, progress=not args.quiet and sys.stderr.isatty(),
        )  # fmt: skip
        for key, value in part.items():
            results.setdefault(key, []).append(value)
    wall = time.perf_counter() - started
    merged = {key: torch.cat(values) for key, values in results.items()}
    success = merged["success"]
    queries = merged["queries"].double()
    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "arch": meta["arch"],
        "variant": meta["variant"],
        "width": meta["width"],
        "checkpoint_epoch": meta.get("epoch"),
        "clean_test_acc": clean_acc,
        "num_images": int(len(chosen)),
        "eps": args.eps,
        "space": args.space,
        "max_iters": int(args.max_iters or x_test[0].numel()),
        "success_rate": 100.0 * float(success.double().mean()) if len(chosen) else None,
        "avg_queries": float(queries.mean()) if len(chosen) else None,
        "avg_queries_success": float(queries[success].mean()) if bool(success.any()) else None,
        "avg_iterations": float(merged["iterations"].double().mean()) if len(chosen) else None,
        "median_l2_success": float(merged["l2"][success].median()) if bool(success.any()) else None,
        "wall_time_s": wall,
        "seed": args.seed,
        "machine": common.describe_machine(device),
        "per_image": {
            "test_index": chosen.tolist(),
            "success": success.tolist(),
            "queries": merged["queries"].tolist(),
            "iterations": merged["iterations"].tolist(),
        },
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        common.write_json(args.out / "simba.json", summary)
    if not args.quiet:
        print(
            f"{meta['arch']} x{meta['width']:g} {meta['variant']}: clean test acc {clean_acc:.2f}; "
            f"SimBA eps={args.eps} "
            f"({args.space}) on {len(chosen)} images: success {summary['success_rate']:.1f}%, "
            f"avg queries {summary['avg_queries']:.1f}, avg iterations {summary['avg_iterations']:.1f} ({wall:.0f}s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
