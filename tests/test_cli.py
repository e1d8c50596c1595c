"""The convnorm-fx command line: exit status and printed numbers against the library."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import convnorm_fx
from cli_models import tiny_net
from convnorm_fx.cli import build_model, main
from tolerances import tolerance


def test_inspect_json_matches_library(tmp_path, capsys):
    out = tmp_path / "inspect.json"
    plot = tmp_path / "fig2.png"
    status = main(["inspect", "tiny", "--source", "cli_models:tiny_net", "--input-size", "3", "16", "16",
                   "--repeats", "1", "--batch-size", "2", "--json", str(out), "--plot", str(plot)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "3 conv sites: 3 rewritten" in printed and "PASS" in printed and "ratio" in printed
    data = json.loads(out.read_text())
    assert plot.stat().st_size > 1000
    # The same numbers straight from the library, on the same seeded model.
    torch.manual_seed(0)
    model = tiny_net().eval()
    rewritten = convnorm_fx.apply(model)
    expected = convnorm_fx.spectral_report(rewritten, (3, 16, 16))
    rows = data["spectral"]["rows"]
    assert [r["name"] for r in rows] == [r.name for r in expected.rows]
    for got, want in zip(rows, expected.rows):
        assert got["spectral_norm_before"] == pytest.approx(want.spectral_norm_before, rel=10 * tolerance(torch.float64))
        assert got["spectral_norm_after"] == pytest.approx(want.spectral_norm_after, rel=10 * tolerance(torch.float64))
        assert got["cond_max_before"] == pytest.approx(want.cond_max_before, rel=10 * tolerance(torch.float64))
    assert data["rewrite"]["summary"] == convnorm_fx.rewrite_report(rewritten).summary()
    assert all(c["passed"] and c["bypass_error"] <= 1e-6 and c["tight_frame_error"] <= 1e-6 for c in data["checks"])
    assert data["train_step_ratio"] > 0


def test_inspect_fails_with_reason_when_a_learned_conv_is_left_out(capsys):
    status = main(["inspect", "x", "--source", "cli_models:untraceable_conv_net", "--input-size", "3", "8", "8", "--repeats", "0"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("convnorm-fx: error:") and "not rewritten" in err and len(err.strip().splitlines()) == 1


def test_unknown_model_lists_closest_names(capsys):
    assert main(["inspect", "resnet19", "--source", "torchvision", "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "unknown torchvision model 'resnet19'" in err and "resnet18" in err


def test_build_model_sources():
    model, size = build_model("cifar_resnet18")
    assert size == (3, 32, 32) and type(model).__name__ == "CifarResNet"
    model, size = build_model("resnet18", "torchvision")
    assert size == (3, 64, 64)
    with pytest.raises(Exception, match="--source"):
        build_model("resnet18", "keras")


def test_zoo_command(tmp_path, capsys):
    out = tmp_path / "zoo.json"
    status = main(["zoo", "--source", "torchvision", "--filter", "^(resnet18|squeezenet1_1)$", "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert status == 0
    data = json.loads(out.read_text())
    assert data["totals"]["models"] == 2 and data["totals"]["ok"] == 2
    by_name = {r["model"]: r for r in data["rows"]}
    assert by_name["resnet18"]["sites"] == 20 == by_name["resnet18"]["rewritten"]
    assert by_name["squeezenet1_1"]["sites"] == 26
    assert "total: 2 models, 2 ok" in printed


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "convnorm_fx", "zoo", "--filter", "^nomatch$"], capture_output=True, text=True)
    assert result.returncode == 2 and "no torchvision model matches" in result.stderr
