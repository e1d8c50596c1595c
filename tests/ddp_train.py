"""One rank of the DistributedDataParallel test (``test_ddp.py``), and the shared setup.

Run as ``python ddp_train.py RANK WORLD_SIZE STORE_FILE OUT_DIR``: trains the rewritten model
on this rank's share of every global batch under DDP (gloo, CPU), then saves the final
``state_dict`` to ``OUT_DIR/rank{RANK}.pt``. The test imports :func:`build_model`,
:func:`global_batches` and :func:`train` to compute the single-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import convnorm_fx

STEPS = 3
GLOBAL_BATCH = 8
LR = 0.1


class Net(nn.Module):
    """3x3 stem, strided 3x3, strided 1x1, linear head; no BatchNorm (per-rank statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(16, 16, 1, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.down(x))
        return self.head(self.proj(x).mean((2, 3)))


def build_model(stop_gradient: bool) -> nn.Module:
    torch.manual_seed(0)
    model = convnorm_fx.apply(Net(), bn=False, affine_init="default", stop_gradient=stop_gradient)
    return model.double()


def global_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, 12, 12, generator=g, dtype=torch.float64)
        yield x, torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def train(model: nn.Module, rank: int = 0, world_size: int = 1) -> None:
    """SGD with momentum on equal shares of each global batch (the whole batch when alone)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for x, t in global_batches():
        x, t = x.chunk(world_size)[rank], t.chunk(world_size)[rank]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), t).backward()  # DDP averages the gradients over ranks
        optimizer.step()


def main(argv: list[str]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world_size, store, out_dir = int(argv[0]), int(argv[1]), argv[2], Path(argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = {}
        for stop_gradient in (True, False):
            model = build_model(stop_gradient)
            train(DistributedDataParallel(model), rank, world_size)
            results[stop_gradient] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
