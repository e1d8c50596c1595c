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
        ["--variant", "convnorm", "--no-affine", "--milestones", "1", "--warmup-steps", "4"],
        ["--variant", "sn", "--subset", "0.5", "--subset-seed", "3", "--val-size", "10"],
        ["--variant", "convnorm", "--no-stop-gradient"],
    ],
    ids=["vgg16-vanilla-plain", "bn-subset-amp", "convnorm-no-affine-warmup", "sn-subset-seed-val-size", "convnorm-no-sg"],
)
def test_train_variants(synthetic_npz: Path, tmp_path: Path, extra: list[str]) -> None:
    import common
    import train_cifar

    argv = ["--data", str(synthetic_npz), "--epochs", "2", "--max-steps", "3", "--out", str(tmp_path), *TINY, *extra]
    assert train_cifar.main(argv) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["steps"] == 3
    if "--plain-training" in extra:
        assert record["args"]["weight_decay"] == 0.0 and record["args"]["milestones"] == []
    if "--eval-test" in extra:
        assert record["max_test_acc"] is None and record["best"]["test_acc"] is not None
    assert record["final_test_acc"] is not None
    if "--warmup-steps" in extra:
        assert record["epochs"][-1]["lr"] == pytest.approx(0.1 * 3 / 4)  # the lr of step 3 of 4 warm-up steps
    if "--val-size" in extra:
        assert record["sizes"] == {"train": 140, "val": 10, "test": 100}  # 27 per class, halved, rounds to 14
    if "--variant" in extra and extra[extra.index("--variant") + 1] == "sn":
        model, _ = common.load_checkpoint(tmp_path / "final.pt")
        assert sum("parametrizations" in name for name, _ in model.named_parameters()) == 20  # every conv


def test_learning_rate_schedule() -> None:
    """Milestones divide the rate by 10; the warm-up ramps it linearly over the first steps."""
    import argparse

    import train_cifar

    args = argparse.Namespace(lr=0.1, milestones=[2, 4], warmup_steps=0)
    assert [train_cifar.learning_rate(args, e, 100) for e in range(6)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    args.warmup_steps = 4
    assert [train_cifar.learning_rate(args, 0, s) for s in range(6)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]
    )


def test_subset_seed_varies_the_subset_only() -> None:
    """--subset-seed draws another class-stratified subset; the validation split stays put."""
    import common

    labels = np.repeat(np.arange(10), 100)
    train, val = common.split_indices(labels, 0.1, 0)
    a, b = (common.stratified_subset(train, labels, 0.2, seed) for seed in (0, 1))
    assert len(a) == len(b) == 180 and not np.array_equal(a, b)
    assert (np.bincount(labels[a]) == 18).all() and not set(a) & set(val)
    sample = common.stratified_sample(val, labels, 50, 0)
    assert len(sample) == 50 and (np.bincount(labels[sample]) == 5).all() and set(sample) <= set(val)


def test_simba_and_spectra_scripts(trained: Path, synthetic_npz: Path, tmp_path: Path) -> None:
    import simba
    import spectra

    argv = [str(trained / "best.pt"), "--data", str(synthetic_npz), "--num-images", "4", "--max-iters", "40",
            "--threads", "1", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    assert simba.main(argv) == 0
    summary = json.loads((tmp_path / "simba.json").read_text())
    assert summary["num_images"] <= 4 and summary["max_iters"] == 40 and summary["space"] == "pixel"
    per_image = summary["per_image"]
    assert all(i <= q <= 2 * i for i, q in zip(per_image["iterations"], per_image["queries"]))
    assert all(s or i == 40 for s, i in zip(per_image["success"], per_image["iterations"]))
    assert simba.main([*argv, "--space", "normalized", "--num-images", "2"]) == 0
    assert json.loads((tmp_path / "simba.json").read_text())["space"] == "normalized"

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
    assert sum("train_cifar.py" in c for c in commands) == 36 and sum("simba.py" in c for c in commands) == 9
    assert all("--space pixel" in c for c in commands if "simba.py" in c and "simba_pixel" in c)
    assert sum("--eval-test every" in c for c in commands) == 6  # the label-noise runs: max test accuracy
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


def test_table6_plan(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """The Table 6 plan: pairs seed by seed first, the paper's schedule shape, the subset drawn per seed."""
    import reproduce_table6

    assert reproduce_table6.main(["--dry-run", "--runs", str(tmp_path), "--epochs", "30", "--width", "0.25"]) == 0
    commands = [c.split() for c in capsys.readouterr().out.splitlines()]
    assert len(commands) == 12
    names = [c[c.index("--out") + 1].rsplit("/", 1)[-1] for c in commands]
    assert names[:6] == ["t6_convnorm_bn_s0", "t6_bn_s0", "t6_convnorm_bn_s1", "t6_bn_s1", "t6_convnorm_bn_s2", "t6_bn_s2"]
    for command in commands:
        value = {flag: command[command.index(flag) + 1] for flag in ("--seed", "--subset-seed", "--subset", "--epochs")}
        assert value["--seed"] == value["--subset-seed"] and value["--subset"] == "0.1" and value["--epochs"] == "30"
        milestones = command.index("--milestones")
        assert command[milestones + 1 : milestones + 3] == ["10", "20"]
        assert {"--lr", "0.1"} <= set(command) and "--val-size" in command


def test_table6_summary_on_tiny_runs(synthetic_npz: Path, tmp_path: Path) -> None:
    """Committed-results mode: the Table 6 block (paper row, Welch test, verdict, plot) from metrics.json files."""
    import reproduce_table6
    import summarize_results

    results = tmp_path / "results"
    argv = ["--data", str(synthetic_npz), "--runs", str(tmp_path / "runs"), "--results", str(results / "table6"),
            "--width", "0.0625", "--epochs", "3", "--val-size", "20", "--seeds", "0", "1", "--variants", "bn",
            "convnorm_bn"]  # fmt: skip
    assert reproduce_table6.main(argv) == 0
    assert sorted(p.name for p in (results / "table6").iterdir()) == [
        "jobs.json", "t6_bn_s0", "t6_bn_s1", "t6_convnorm_bn_s0", "t6_convnorm_bn_s1",
    ]  # fmt: skip
    assert reproduce_table6.main(argv) == 0  # resumes: nothing left to run
    assert len(json.loads((results / "table6" / "jobs.json").read_text())) == 4
    output = tmp_path / "RESULTS.md"
    output.write_text("# head\n\n<!-- results:table6:begin -->\nold\n<!-- results:table6:end -->\n\ntail\n")
    assert summarize_results.main(["--results", str(results), "--output", str(output)]) == 0
    text = output.read_text()
    assert text.startswith("# head") and text.rstrip().endswith("tail") and "\nold\n" not in text
    assert "77.96 ± 0.11 (3)" in text and "Welch t-test (n = 2 and 2)" in text and "Verdict at this scale: **" in text
    assert (results / "table6" / "val_curves.png").stat().st_size > 0


def test_welch_and_student_t() -> None:
    """The t distribution without SciPy: known quantiles, and Welch's test on a textbook case."""
    from summarize_results import bootstrap_interval, student_t_cdf, student_t_quantile, welch

    assert student_t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert student_t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert student_t_cdf(-1.0, 1.0) == pytest.approx(0.25, abs=1e-9)  # Cauchy
    result = welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert result["diff"] == pytest.approx(-1.0) and result["df"] == pytest.approx(5.8824, abs=1e-3)
    assert result["t"] == pytest.approx(-1.0954, abs=1e-4) and result["p"] == pytest.approx(0.3161, abs=1e-4)
    low, high = bootstrap_interval([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert 2.0 <= low <= 4.0 <= high <= 6.0


@pytest.mark.parametrize(
    ("variant", "extra", "radial"),
    [("bn", [], "zero"), ("convnorm_bn", [], "zero"), ("convnorm", [], "nonzero"),
     ("convnorm", ["--no-stop-gradient"], "zero"), ("sn", [], "any")],
)  # fmt: skip
def test_diagnose_probe(synthetic_npz: Path, tmp_path: Path, variant: str, extra: list[str], radial: str) -> None:
    """The probe records every conv site and block; a weight's gradient has no radial part when the output
    ignores the weight's scale (BatchNorm after it, or ConvNorm differentiated through its preconditioner)."""
    import diagnose_convnorm

    out = tmp_path / "probe.json"
    argv = ["--data", str(synthetic_npz), "--variant", variant, "--width", "0.0625", "--batch-size", "32",
            "--threads", "1", "--steps", "3", "--weight-decay", "0", "--out", str(out), *extra]  # fmt: skip
    assert diagnose_convnorm.main(argv) == 0
    record = json.loads(out.read_text())
    assert [s["step"] for s in record["per_step"]] == [0, 1, 2] and [r["step"] for r in record["records"]] == [0, 1, 2]
    first = record["records"][0]
    assert len(first["layers"]) == 20 and len(first["blocks"]) == 8
    assert all(layer["act_grad_rms"] is not None for layer in first["layers"])
    cosines = [abs(layer["radial_cos"]) for layer in first["layers"]]
    if radial == "zero":
        assert max(cosines) < 1e-3
    elif radial == "nonzero":
        assert max(cosines) > 1e-2


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
    """``gpu_quick.sh`` end to end at a tiny CPU setting (13 Python processes; ``-m slow``)."""
    env = {**_env(), "PYTHON": sys.executable, "DATA": str(synthetic_npz), "RUNS": str(tmp_path), "EPOCHS": "2",
           "WIDTH": "0.0625", "SIMBA_IMAGES": "2", "SIMBA_ITERS": "5", "AMP": ""}  # fmt: skip
    result = subprocess.run(
        ["bash", str(EXAMPLES / "gpu_quick.sh"), "--threads", "1", "--max-steps", "2", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| setting | vanilla | bn | convnorm | convnorm_bn | sn |" in text and "### SimBA pixel attack" in text
