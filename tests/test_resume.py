"""A run killed with SIGKILL in the middle resumes from its last finished stage and ends with the
same model as an uninterrupted run with the same seed."""

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
