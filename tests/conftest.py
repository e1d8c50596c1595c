"""Shared fixtures: devices, dtypes with their tolerances, hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# device/dtype fixtures are plain values, so reusing them across hypothesis examples is safe.
_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]

# "ci" is deterministic (derandomized, fixed example counts); "dev" explores new examples.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=50,
    suppress_health_check=_SUPPRESSED,
    print_blob=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=50,
    suppress_health_check=_SUPPRESSED,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])



@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)
