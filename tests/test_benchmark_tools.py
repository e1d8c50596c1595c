"""The benchmarks' own logic on synthetic records: the cost-model fit and the layout table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_models, fit_cost_model  # noqa: E402
from convnorm_fx import cost  # noqa: E402


def _record(name, c, size, stride, direct, spectral, kernel=3, groups=1, batch=32):
    site = {"name": name, "batch": batch, "c_in": c, "c_out": c, "size": size, "kernel": kernel,
            "stride": stride, "groups": groups}  # fmt: skip
    times = {"cn-direct": direct, "cn-spectral": spectral}
    return {"site": site, "forward_ms": dict(times), "train_ms": {k: 3 * v for k, v in times.items()}}


def test_fit_scores_picks_against_the_faster_algorithm_and_restores_the_constants():
    run = {"sites": [_record("a", 64, 32, 1, 10.0, 20.0), _record("b", 512, 4, 1, 30.0, 15.0),
                     _record("shortcut", 64, 32, 2, 1.0, 1.0, kernel=1)]}  # fmt: skip
    found = fit_cost_model.points(run)
    assert [p["name"] for p in found] == ["a (eval)", "a (train)", "b (eval)", "b (train)"]  # 1x1 sites left out
    before = {name: getattr(cost, name) for name in fit_cost_model.GRID}
    picks = {p["name"]: cost.select_algorithm(p["input"], p["weight"], p["stride"], 1, 1, p["training"]) for p in found}
    expected_lost = sum(p[picks[p["name"]]] - min(p["direct"], p["spectral"]) for p in found)
    lost, right, wrong = fit_cost_model.score(found, before)
    assert lost == pytest.approx(expected_lost) and right + len(wrong) == 4
    # Constants that make the complex products ruinous send every point to the direct algorithm.
    lost, right, wrong = fit_cost_model.score(found, {"COMPLEX_MATMUL_COST": 1e9})
    assert lost == pytest.approx(15.0 + 45.0) and right == 2
    assert {name: getattr(cost, name) for name in fit_cost_model.GRID} == before


def test_layout_table_compares_each_format_and_the_faster_of_each():
    cl = bench_models.CHANNELS_LAST_SUFFIX
    times = {"original": 100.0, "convnorm": 200.0, "original" + cl: 80.0, "convnorm" + cl: 180.0}
    record = {"model": "m", "train_ms": times, "eval_ms": dict(times)}
    lines = bench_models._layout_table([record])
    assert lines and "contiguous vs channels_last" in lines[1]
    row = next(line for line in lines[-1].splitlines() if line.startswith("| m | train"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert [float(c) for c in cells[6:9]] == pytest.approx([2.0, 2.25, 180.0 / 80.0])
    assert bench_models._layout_table([{"model": "m", "train_ms": {"original": 1.0, "convnorm": 2.0}}]) == []
    assert bench_models._key("convnorm", "channels_last", ["contiguous", "channels_last"]) == "convnorm" + cl
    assert bench_models._key("convnorm", "channels_last", ["channels_last"]) == "convnorm"


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_transform_experiment_computes_the_library_transforms(chunk):
    from benchmarks.experiments import chunked_transforms as experiment

    torch = pytest.importorskip("torch")
    from convnorm_fx import dft

    x = torch.randn(5, 6, 7, 7).contiguous(memory_format=torch.channels_last)
    grid, inputs, kept = (9, 9), (0, 7, 1), (1, 7, 1)
    spectrum = dft.to_spectrum(x, grid, inputs, inputs, -1)
    torch.testing.assert_close(experiment.to_spectrum_chunked(x, grid, inputs, chunk), spectrum)
    out = experiment.from_spectrum_chunked(spectrum, grid, kept, chunk)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, dft.from_spectrum(spectrum, grid, kept, kept, 1, True))


def test_kernel_memo_experiment_reuses_a_spectrum_until_the_weight_changes():
    from benchmarks.experiments import eval_kernel_memo as experiment

    torch = pytest.importorskip("torch")
    from convnorm_fx import ConvNormConv2d, spectral

    torch.manual_seed(0)
    site = ConvNormConv2d(4, 5, 3, padding=1, algorithm="spectral").eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = site(x)
    memo: dict = {}
    plain = spectral.kernel_dft
    spectral.kernel_dft = experiment.memoized_kernel_dft(memo)
    try:
        with torch.no_grad():
            torch.testing.assert_close(site(x), expected)
            filled = len(memo)
            torch.testing.assert_close(site(x), expected)
            assert filled > 0 and len(memo) == filled  # the second call reads the memo
            site.weight.mul_(2.0)  # bumps the version: a new key, recomputed
            changed = site(x)
        assert len(memo) > filled
        spectral.kernel_dft = plain
        with torch.no_grad():
            torch.testing.assert_close(changed, site(x))
    finally:
        spectral.kernel_dft = plain
