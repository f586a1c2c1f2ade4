"""A run killed with SIGKILL in the middle resumes from its last finished stage and ends with the
same model as an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import torchshrink as ts
from torchshrink.cli import app

RECIPE = """\
name: three-stages
stages:
  - kind: cast
    dtype: bfloat16
    select: {include: ["net.1"]}
    finetune: {epochs: 1, lr: 0.001}
  - kind: cast
    dtype: bfloat16
    select: {include: ["net.3"]}
    finetune: {epochs: 40, lr: 0.001}
  - kind: cast
    dtype: bfloat16
    select: {include: ["net.5"]}
    finetune: {epochs: 1, lr: 0.001}
"""


def _cmd(out, *extra):
    return [sys.executable, "-m", "torchshrink", "compress", "--model", "zoo:digits-mlp", "--out", str(out), *extra]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, digits_mlp):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, "--recipe", str(recipe), "--threads", "1"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".killed.partial" / "stages"
    deadline = time.time() + 300
    while not (partial / "01-cast" / "stage.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.exists()  # no finished-looking output from a killed run
    # any half-written stage is a temp folder, never a stage folder with stage.json
    assert all((p / "stage.json").is_file() for p in partial.iterdir() if not p.name.startswith("."))

    res = subprocess.run(_cmd(killed, "--resume", "--threads", "1"), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resumed after stage 1" in res.stdout or "resumed after stage 2" in res.stdout

    whole = tmp_path / "whole"
    res = subprocess.run(_cmd(whole, "--recipe", str(recipe), "--threads", "1"), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    a, b = ts.load(killed / "model"), ts.load(whole / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not (tmp_path / ".killed.partial").exists()


def test_resume_without_an_unfinished_run_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["compress", "--model", "tests.conftest:tiny_net", "--out", str(tmp_path / "x"), "--resume"])
    assert res.exit_code == 2
    assert "nothing to resume" in res.stderr


@pytest.mark.parametrize("flag", [[], ["--force"]])
def test_unfinished_run_is_not_silently_overwritten(tmp_path, flag):
    (tmp_path / ".o.partial").mkdir()
    (tmp_path / ".o.partial" / "run.json").write_text("{}")
    res = CliRunner().invoke(app, ["compress", "--model", "tests.conftest:tiny_net", "--recipe", "bf16", "--out", str(tmp_path / "o"), *flag])
    if flag:
        assert res.exit_code == 0, res.stderr
        assert (tmp_path / "o" / "report.json").is_file() and not (tmp_path / ".o.partial").exists()
    else:
        assert res.exit_code == 2 and "--resume" in res.stderr


def test_each_kill_window_resumes_or_restarts_to_the_same_model(tmp_path, digits_mlp):
    """The three windows that used to strand a run (work folder without run.json, run.json half written,
    finish step done but not renamed), hit with the TORCHSHRINK_KILL_AT hook in three killed processes."""
    from safetensors.torch import load_file

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: one\nstages:\n  - kind: cast\n    dtype: bfloat16\n    select: {include: [\"net.1\"]}\n")
    points = {"a": "work:created", "b": "work:run-json:half", "c": "finish:before-rename"}
    procs = {w: subprocess.Popen(_cmd(tmp_path / w, "--recipe", str(recipe), "--threads", "1"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1", TORCHSHRINK_KILL_AT=p))
             for w, p in points.items()}
    ref = tmp_path / "ref"
    res = CliRunner().invoke(app, ["compress", "--model", "zoo:digits-mlp", "--recipe", str(recipe), "--out", str(ref), "--threads", "1"])
    assert res.exit_code == 0, res.stderr
    for w, proc in procs.items():
        assert proc.wait(timeout=300) == -signal.SIGKILL, w
        res = CliRunner().invoke(app, ["compress", "--model", "zoo:digits-mlp", "--out", str(tmp_path / w), "--resume", "--threads", "1"])
        if w == "c":
            assert res.exit_code == 0, res.stderr
        else:  # killed before the run existed: --resume says so in one line, a plain rerun starts cleanly
            assert res.exit_code == 2 and "run again without --resume" in res.stderr, res.stderr
            res = CliRunner().invoke(app, ["compress", "--model", "zoo:digits-mlp", "--recipe", str(recipe), "--out",
                                           str(tmp_path / w), "--threads", "1"])
            assert res.exit_code == 0, res.stderr
        a, b = load_file(str(tmp_path / w / "model" / "model.safetensors")), load_file(str(ref / "model" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), w
        assert json.loads((tmp_path / w / "report.json").read_text())["final"]["file_bytes"] == \
            json.loads((ref / "report.json").read_text())["final"]["file_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "r.yaml", "ref"]  # no temp or .partial left


@pytest.mark.parametrize("left", ["empty", "half run.json"])
def test_an_abandoned_start_of_an_older_version_is_replaced_by_a_plain_rerun(tmp_path, left, caplog):
    work = tmp_path / ".o.partial"
    work.mkdir()
    if left != "empty":
        (work / "run.json").write_text('{"model": "tests.conf')
    args = ["compress", "--model", "tests.conftest:tiny_net", "--out", str(tmp_path / "o"), "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 2 and "abandoned start" in res.stderr and "without --resume" in res.stderr, res.stderr
    res = CliRunner().invoke(app, [*args, "--recipe", "bf16"])
    assert res.exit_code == 0, res.stderr
    assert [r.getMessage() for r in caplog.records if "abandoned start" in r.getMessage()], "a one-line note says so"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_resume_cleans_half_written_stage_folders(tmp_path):
    """A stage checkpoint temp folder (`.NN-kind.tmp-*`) left by a kill is ignored and removed on resume."""
    out = tmp_path / "o"
    args = ["compress", "--model", "tests.conftest:tiny_net", "--out", str(out), "--threads", "1"]
    assert CliRunner().invoke(app, [*args, "--recipe", "bf16"]).exit_code == 0
    os.rename(out, tmp_path / ".o.partial")  # the state a kill just before the final rename leaves ...
    half = tmp_path / ".o.partial" / "stages" / ".02-cast.tmp-x1y2"
    half.mkdir()
    (half / "stage.json").write_text('{"na')  # ... plus a half-written checkpoint of a stage
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["01-cast"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
