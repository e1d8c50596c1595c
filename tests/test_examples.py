"""The scripts in examples/ run end to end on a tiny synthetic dataset (never real data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TINY = ["--width", "0.0625", "--batch-size", "32", "--eval-batch-size", "200", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _examples_on_path() -> None:
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def synthetic_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 training and 100 test images whose class is visible in the mean colour."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "synthetic.npz"

    def images(labels: np.ndarray) -> np.ndarray:
        base = rng.integers(0, 128, (len(labels), 32, 32, 3))
        tint = np.stack([labels * 12, (9 - labels) * 12, (labels % 3) * 40], axis=1)[:, None, None, :]
        return np.clip(base + tint, 0, 255).astype(np.uint8)

    y_train = np.tile(np.arange(10), 30).astype(np.uint8)
    y_test = np.tile(np.arange(10), 10).astype(np.uint8)
    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


@pytest.fixture(scope="module")
def trained(synthetic_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A convnorm_bn run in-process (so that the training code is covered): 3 epochs of 3 steps."""
    import train_cifar

    out = tmp_path_factory.mktemp("run")
    argv = ["--data", str(synthetic_npz), "--variant", "convnorm_bn", "--epochs", "3", "--subset", "0.3334",
            "--label-noise", "0.2", "--plot", "--out", str(out), *TINY]  # fmt: skip
    assert train_cifar.main(argv) == 0
    return out


def test_train_outputs(trained: Path) -> None:
    record = json.loads((trained / "metrics.json").read_text())
    assert record["steps"] == 9 and len(record["epochs"]) == 3
    assert record["sizes"] == {"train": 90, "val": 30, "test": 100}
    assert 0.0 < record["noisy_label_fraction"] < 0.4  # r=0.2 changes about 18 % of the labels
    assert record["best"]["epoch"] in (1, 2, 3) and record["best"]["test_acc"] is not None
    assert record["max_test_acc"] >= record["best"]["test_acc"]
    assert (trained / "metrics.csv").read_text().count("\n") == 4
    for name in ("best.pt", "final.pt", "curves.png"):
        assert (trained / name).stat().st_size > 0


def test_checkpoint_round_trip(trained: Path) -> None:
    import common

    model, meta = common.load_checkpoint(trained / "final.pt")
    assert (meta["arch"], meta["variant"], meta["epoch"]) == ("resnet18", "convnorm_bn", 3)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    state = torch.load(trained / "final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "extra",
    [
        ["--arch", "vgg16", "--variant", "vanilla", "--plain-training"],
        ["--variant", "bn", "--subset", "0.5", "--eval-test", "best", "--amp", "--channels-last"],
        ["--variant", "convnorm", "--no-affine", "--milestones", "1"],
    ],
    ids=["vgg16-vanilla-plain", "bn-subset-amp", "convnorm-no-affine"],
)
def test_train_variants(synthetic_npz: Path, tmp_path: Path, extra: list[str]) -> None:
    import train_cifar

    argv = ["--data", str(synthetic_npz), "--epochs", "2", "--max-steps", "3", "--out", str(tmp_path), *TINY, *extra]
    assert train_cifar.main(argv) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["steps"] == 3
    if "--plain-training" in extra:
        assert record["args"]["weight_decay"] == 0.0 and record["args"]["milestones"] == []
    if "--eval-test" in extra:
        assert record["max_test_acc"] is None and record["best"]["test_acc"] is not None
    if "--milestones" in extra:
        assert record["epochs"][-1]["lr"] == pytest.approx(0.01)


def test_simba_and_spectra_scripts(trained: Path, synthetic_npz: Path, tmp_path: Path) -> None:
    import simba
    import spectra

    argv = [str(trained / "best.pt"), "--data", str(synthetic_npz), "--num-images", "4", "--max-iters", "40",
            "--threads", "1", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    assert simba.main(argv) == 0
    summary = json.loads((tmp_path / "simba.json").read_text())
    assert summary["num_images"] <= 4 and summary["max_iters"] == 40 and summary["space"] == "normalized"
    per_image = summary["per_image"]
    assert all(i <= q <= 2 * i for i, q in zip(per_image["iterations"], per_image["queries"]))
    assert all(s or i == 40 for s, i in zip(per_image["success"], per_image["iterations"]))
    assert simba.main([*argv, "--space", "pixel", "--num-images", "2"]) == 0
    assert json.loads((tmp_path / "simba.json").read_text())["space"] == "pixel"

    assert spectra.main([str(trained / "best.pt"), "--quiet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "spectra.json").read_text())
    assert len(report["rows"]) == 20  # 17 3x3 convs + 3 shortcuts of ResNet-18
    assert all(abs(row["cond_mean_after"] - 1.0) < 1e-3 for row in report["rows"])  # 1 up to eps
    assert json.loads((tmp_path / "spectra_summary.json").read_text())["layers"] == 17
    assert (tmp_path / "spectra.png").stat().st_size > 0


def test_spectra_of_a_model_without_convnorm(synthetic_npz: Path, tmp_path: Path) -> None:
    import spectra
    import train_cifar

    argv = ["--data", str(synthetic_npz), "--variant", "bn", "--epochs", "1", "--max-steps", "1",
            "--out", str(tmp_path), *TINY]  # fmt: skip
    assert train_cifar.main(argv) == 0
    assert spectra.main([str(tmp_path / "final.pt"), "--quiet", "--no-plot", "--out", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "spectra.json").read_text())["rows"]) == 20


def test_simba_matches_a_one_image_reference() -> None:
    """The batched attack takes the same steps as a plain per-image SimBA loop."""
    from simba import simba_pixel

    torch.manual_seed(0)
    weight = torch.randn(3, 12, dtype=torch.float64)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.reshape(len(x), -1) @ weight.T * 3.0, dim=1)

    images = torch.rand(6, 3, 2, 2, dtype=torch.float64)
    labels = probabilities(images).argmax(1)
    result = simba_pixel(probabilities, images, labels, eps=0.3, generator=torch.Generator().manual_seed(1))
    order = torch.rand(6, 12, generator=torch.Generator().manual_seed(1)).argsort(dim=1)
    for i in range(6):
        x, y = images[i].reshape(-1), int(labels[i])
        prob, queries, iterations, success = float(probabilities(x[None])[0, y]), 0, 0, False
        for coordinate in order[i].tolist():
            iterations += 1
            for sign in (-1.0, 1.0):
                trial = x.clone()
                trial[coordinate] += sign * 0.3
                trial = trial.clamp(0, 1)
                probs = probabilities(trial[None])[0]
                queries += 1
                if float(probs[y]) < prob:
                    x, prob = trial, float(probs[y])
                    success = int(probs.argmax()) != y
                    break
            if success:
                break
        assert (bool(result["success"][i]), int(result["queries"][i]), int(result["iterations"][i])) == (
            success, queries, iterations,
        )  # fmt: skip


def test_reproduce_plan_and_summary(tmp_path: Path, synthetic_npz: Path, capsys: pytest.CaptureFixture) -> None:
    """The reduced-scale plan lists its commands, and the summarizer turns run folders into tables."""
    import reproduce_small
    import summarize_results
    import train_cifar

    assert reproduce_small.main(["--dry-run", "--runs", str(tmp_path / "runs")]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert sum("train_cifar.py" in c for c in commands) == 23 and sum("simba.py" in c for c in commands) == 8
    for variant, seed in (("bn", 0), ("bn", 1), ("vanilla", 0)):
        out = tmp_path / "runs" / f"main_{variant}_s{seed}"
        argv = ["--data", str(synthetic_npz), "--variant", variant, "--seed", str(seed), "--epochs", "1",
                "--max-steps", "2", "--out", str(out), *TINY]  # fmt: skip
        assert train_cifar.main(argv) == 0
    results = tmp_path / "RESULTS.md"
    results.write_text("# notes kept\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n\ntail kept\n")
    assert summarize_results.main(["--runs", str(tmp_path / "runs"), "--output", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# notes kept") and text.rstrip().endswith("tail kept") and "\nold\n" not in text
    assert "| setting | vanilla | bn |" in text and " ± " in text and "| main_bn_s1 | bn | 1 |" in text


def test_torchrun_two_processes_stay_in_sync(synthetic_npz: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` on CPU (gloo): both ranks end with identical weights."""
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            "examples/train_cifar.py", "--data", str(synthetic_npz), "--variant", "convnorm_bn", "--epochs", "2",
            "--max-steps", "4", "--out", str(tmp_path), *TINY]  # fmt: skip
    _run(args, timeout=180)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 4
    assert record["replicas"]["max_abs_diff_parameters"] == 0.0
    assert record["replicas"]["max_abs_diff_buffers"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "final.pt", "metrics.csv", "metrics.json"]


@pytest.mark.slow
def test_gpu_quick_script_on_cpu(synthetic_npz: Path, tmp_path: Path) -> None:
    """``gpu_quick.sh`` end to end at a tiny CPU setting (10 Python processes; ``-m slow``)."""
    env = {**_env(), "PYTHON": sys.executable, "DATA": str(synthetic_npz), "RUNS": str(tmp_path), "EPOCHS": "2",
           "WIDTH": "0.0625", "SIMBA_IMAGES": "2", "SIMBA_ITERS": "5", "AMP": ""}  # fmt: skip
    result = subprocess.run(
        ["bash", str(EXAMPLES / "gpu_quick.sh"), "--threads", "1", "--max-steps", "2", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| setting | vanilla | bn | convnorm | convnorm_bn |" in text and "### SimBA pixel attack" in text
