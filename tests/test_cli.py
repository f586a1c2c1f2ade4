"""The CLI: user errors are one line on stderr with exit code 2, and leave no output behind."""

import json

import pytest
from typer.testing import CliRunner

from torchshrink.cli import app
from torchshrink.core import state

runner = CliRunner()


def run(*args):
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_measure_prints_a_table():
    code, out, err = run("measure", "--model", "tests.conftest:tiny_net", "--threads", "1")
    assert code == 0, err
    assert "params" in out and "4,698" in out and "latency" in out


def test_inspect_lists_layers_with_macs():
    code, out, err = run("inspect", "--model", "tests.conftest:tiny_net")
    assert code == 0, err
    # fc1: 128*32 weights + 32 biases = 4,128 parameters; 128*32 MACs per sample x batch 2 = 8,192 MACs
    assert "fc1" in out and "Linear" in out and "4,128" in out and "8,192" in out


def test_missing_model_file(tmp_path):
    code, _, err = run("compress", "--model", str(tmp_path / "nope"), "--recipe", "demo", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "no such file or folder")
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"this is not safetensors")
    code, _, err = run("compress", "--model", f"tests.conftest:tiny_net@{tmp_path / 'w.safetensors'}",
                       "--recipe", "demo", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "not a valid safetensors file")
    assert not (tmp_path / "o").exists()


def test_wrong_input_shape(tmp_path):
    code, _, err = run("measure", "--model", "tests.conftest:tiny_net", "--input-shape", "1,5,4,4")
    _one_line_error(code, err, "cannot run on input (1, 5, 4, 4)")


def test_unknown_layer_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - kind: cast\n    select: {include: [fc7]}\n")
    code, _, err = run("compress", "--model", "tests.conftest:tiny_net", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "no layer named 'fc7'", "fc1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_existing_out_dir_is_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    code, _, err = run("compress", "--model", "tests.conftest:tiny_net", "--recipe", "demo", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "already exists", "--force")
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_demo_prints_the_table_and_writes_the_report(tmp_path):
    code, out, err = run("demo", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    assert "file_bytes" in out and "accuracy" in out and "latency_p50_ms" in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["final"]["quality"]["accuracy"] >= 0.97
    assert (tmp_path / "demo" / "model" / "manifest.json").is_file()


def test_finetune_without_training_data_fails_before_any_work(tmp_path):
    code, _, err = run("compress", "--model", "tests.conftest:tiny_net", "--recipe", "prune-quantize", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "stage 1 (unstructured) fine-tunes: it needs training data and no data was given: give --data")
    assert list(tmp_path.iterdir()) == []


def test_measure_of_a_saved_folder_reports_its_bytes_on_disk(tmp_path):
    import torch

    import torchshrink as ts

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    state.put(net, input={"shape": [1, 8], "dtype": "float32"})
    ts.save(net, tmp_path / "m", recipe={"name": "a recipe that makes the manifest longer " * 20})
    on_disk = sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    code, out, err = run("measure", "--model", str(tmp_path / "m"), "--json", "--threads", "1")
    assert code == 0, err
    assert json.loads(out)["file_bytes"] == on_disk > ts.export.saved_bytes(net)  # the recipe is part of it


def test_measure_of_spec_at_folder_reports_the_folders_bytes(tmp_path):
    import torchshrink as ts
    from tests.conftest import tiny_net

    ts.save(tiny_net(), tmp_path / "m", recipe={"name": "x" * 500})
    on_disk = sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    code, out, err = run("measure", "--model", f"tests.conftest:tiny_net@{tmp_path / 'm'}", "--json", "--threads", "1")
    assert code == 0, err
    assert json.loads(out)["file_bytes"] == on_disk
