"""DistributedDataParallel: two CPU processes (gloo) train a rewritten model.

Each rank runs ``ddp_train.py`` in its own process on half of every global batch. With no
BatchNorm (``bn=False``) nothing depends on per-rank batch statistics, so after a few SGD
steps the parameters must be identical across ranks and equal to one process training on
the whole batch. Both ``stop_gradient`` settings are trained: with ``stop_gradient=False``
each conv weight is used twice in the graph (conv and spectrum), which DDP's gradient
hooks must also handle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import tolerance
import torch.distributed as dist

import ddp_train

WORLD_SIZE = 2
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _launch(tmp_path: Path) -> list[dict]:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    store = tmp_path / "store"  # a FileStore: no port to pick, nothing left listening
    script = Path(ddp_train.__file__).resolve()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(WORLD_SIZE), str(store), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{output[-4000:]}"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_ddp_training_matches_single_process(tmp_path):
    ranks = _launch(tmp_path)
    for stop_gradient in (True, False):
        reference = ddp_train.build_model(stop_gradient)
        start = {k: v.clone() for k, v in reference.state_dict().items()}
        ddp_train.train(reference)  # one process, whole batches
        expected = reference.state_dict()
        for rank, results in enumerate(ranks):
            state = results[stop_gradient]
            assert state.keys() == expected.keys()
            for key, value in state.items():
                # Identical across ranks: DDP broadcasts at start and all-reduces every step.
                torch.testing.assert_close(value, ranks[0][stop_gradient][key], rtol=0, atol=0)
                torch.testing.assert_close(value, expected[key], rtol=100 * tolerance(torch.float64), atol=100 * tolerance(torch.float64), msg=f"rank {rank} {key}")
        assert any(not torch.equal(expected[k], start[k]) for k in expected)  # training did move the weights
