"""Tampered saved folders: every payload is refused in one line and its side effect never happens.

Each case writes a real save folder, changes one thing in it the way an attacker would, and loads
it through an entry point (``ts.load``, ``ts.load_model``, or the CLI's inspect / measure /
compress). A payload that ran would create the marker file ``PWNED`` (or import ``evil.py``, which
creates it); every case asserts a ModelLoadError (CLI: exit code 2 and one stderr line) and no marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

import torchshrink as ts
from tests.security_cases import CASES, HF, PY, evil_pt2, graph_model, saved_folder
from torchshrink.core import state
from torchshrink.core.errors import ModelLoadError


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_folder_is_refused_by_load(tmp_path, monkeypatch, case):
    kind, tamper, msg = CASES[case]
    if kind == HF:
        pytest.importorskip("transformers")
    d = saved_folder(tmp_path, kind)
    marker = tmp_path / "PWNED"
    tamper(d, marker)
    monkeypatch.chdir(d)  # evil.py beside the artifact is importable from here
    monkeypatch.syspath_prepend(str(d))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        if msg is None:
            ts.load(d)
        else:
            with pytest.raises(ModelLoadError, match=msg) as err:
                ts.load(d)
            assert "\n" not in str(err.value)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert not marker.exists(), f"{case}: the payload ran"
    assert "evil" not in sys.modules
    assert peak < 64 << 20, f"{case}: loading allocated {peak:,} bytes before refusing"
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("fmt", ["bitmask", "bitmask-zlib", "csr", "relidx", "entropy", "half-exact"])
def test_decoders_check_declared_sizes_before_allocating(fmt):
    import torchshrink.techniques  # noqa: F401  (registers every format)
    from torchshrink.export.formats import decode_tensor, encode_tensor

    t = torch.zeros(64, 64, dtype=torch.uint8 if fmt in ("relidx", "entropy") else torch.float32)
    t[::3, ::5] = 1
    name, parts = encode_tensor(t, fmt)
    dtype = str(t.dtype).removeprefix("torch.")
    assert torch.equal(decode_tensor(name, parts, {"shape": [64, 64], "dtype": dtype}), t)
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match="refused|corrupt"):
            decode_tensor(name, parts, {"shape": [1 << 18, 1 << 18], "dtype": dtype})
        with pytest.raises(ModelLoadError, match="corrupt|declares"):
            decode_tensor(name, parts, {"shape": [32, 64], "dtype": dtype})
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("case", ["graph-node-name", "graph-torch-os-system", "source-factory-beside-artifact",
                                  "module-type-popen", "container-bomb", "manifest-json-list"])
def test_load_model_refuses_the_same_folders(tmp_path, monkeypatch, case):
    kind, tamper, msg = CASES[case]
    d = saved_folder(tmp_path, kind)
    marker = tmp_path / "PWNED"
    tamper(d, marker)
    monkeypatch.chdir(d)
    monkeypatch.syspath_prepend(str(d))
    with pytest.raises(ModelLoadError, match=msg):
        ts.load_model(str(d))
    assert not marker.exists() and "evil" not in sys.modules


def test_torch_export_archive_needs_trust_code(tmp_path):
    marker = tmp_path / "PWNED"
    pt2 = evil_pt2(tmp_path / "m.pt2", marker)
    with pytest.raises(ModelLoadError, match=r"--trust-code"):
        ts.load_model(str(pt2))
    assert not marker.exists()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([PY, "-m", "torchshrink", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("command,case", [
    ("inspect", "source-os-abort"),
    ("measure", "source-factory-beside-artifact"),
    ("compress", "graph-torch-os-system"),
    ("inspect", "module-type-popen"),
    ("measure", "graph-node-name"),
    ("compress", "container-bomb"),
    ("inspect", "pt2"),
])
def test_cli_refuses_tampered_models_in_one_line(tmp_path, command, case):
    marker = tmp_path / "PWNED"
    if case == "pt2":
        target = str(evil_pt2(tmp_path / "m.pt2", marker))
    else:
        kind, tamper, _ = CASES[case]
        d = saved_folder(tmp_path, kind)
        tamper(d, marker)
        target = str(d)
    args = [command, "--model", target]
    if command == "compress":
        args += ["--recipe", "fp16", "--out", str(tmp_path / "out")]
    r = _cli(args, tmp_path / "artifact" if case != "pt2" else tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_legit_graph_model_still_round_trips(tmp_path):
    gm = graph_model()
    ts.save(gm, tmp_path / "g")
    x = torch.randn(3, 8)
    assert torch.equal(ts.load(tmp_path / "g")(x), gm(x))


def test_a_graph_calling_an_unlisted_function_is_refused_at_save(tmp_path):
    class Net(nn.Module):
        def forward(self, x):
            return torch.load.__call__ if False else print_tensor(x)

    gm = torch.fx.symbolic_trace(Net())
    with pytest.raises(TypeError, match="only listed tensor functions are saved"):
        ts.save(gm, tmp_path / "g")
    assert not (tmp_path / "g").exists()


@torch.fx.wrap
def print_tensor(x):
    return x


def test_a_saved_zoo_model_loads_from_its_own_files_without_training(tmp_path, monkeypatch):
    from torchshrink.zoo.digits import DigitsMLP

    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("TORCHSHRINK_CACHE", str(cache))
    net = DigitsMLP().eval()
    state.put(net, source="zoo:digits-mlp")
    ts.save(net, tmp_path / "m")
    t0 = time.perf_counter()
    back = ts.load(tmp_path / "m")
    assert time.perf_counter() - t0 < 5 and not cache.exists()  # no teacher was trained for the skeleton
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(back(x), net(x))


def test_a_reloaded_graph_model_saves_to_the_same_bytes(tmp_path):
    from torchshrink.quant import Int8StaticConfig
    from torchshrink.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    q = ts.quantize(DigitsCNN().eval(), Int8StaticConfig(), data=[torch.rand(4, 1, 8, 8)])
    ts.save(q, tmp_path / "a")
    ts.save(ts.load(tmp_path / "a"), tmp_path / "b")
    for name in ("manifest.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_report_json_is_data(tmp_path):
    """`torchshrink report` on a tampered report.json: markup is escaped; a wrong layout is one line, no rewrite."""
    from torchshrink.measure.machine import machine_info
    from torchshrink.recipe.report import regenerate

    d = tmp_path / "run"
    d.mkdir()
    meas = {"file_bytes": 10, "latency": None, "quality": {"acc": 1.0}, "params": 1, "nonzero_params": 1, "macs": 1}
    evil = "<script>alert(1)</script>"
    report = {"recipe": {"name": evil}, "model": evil, "machine": {**machine_info(), "cpu": evil}, "timing": evil, "primary": "acc",
              "original": meas, "final": meas, "summary": {}, "warnings": [evil],
              "stages": [{"name": evil, "kind": evil, "seconds": 1.0, "measurement": meas, "vs_previous": {}}],
              "layers": [{"layer": evil, "type": evil, "params": 1, "density": 1.0, "bits": 4}]}
    (d / "report.json").write_text(json.dumps(report))
    html = regenerate(d).read_text()
    assert "<script>" not in html and html.count("&lt;script&gt;") >= 5
    (d / "report.md").write_text("mine")
    (d / "report.json").write_text(json.dumps({"stages": "x"}))
    with pytest.raises(ModelLoadError, match="layout torchshrink writes") as err:
        regenerate(d)
    assert "\n" not in str(err.value) and (d / "report.md").read_text() == "mine"
    (d / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match="nested too deeply|layout"):
        regenerate(d)


def test_cli_report_refuses_a_tampered_report_in_one_line(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"stages": [{"name": 1}]}))
    r = _cli(["report", str(tmp_path)], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "layout torchshrink writes" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "report.html").exists()


def test_a_graph_calling_torchvision_stochastic_depth_round_trips(tmp_path):
    """ConvNeXt / EfficientNet traced with fx call torchvision's stochastic_depth: a listed tensor function."""
    tv_ops = pytest.importorskip("torchvision.ops")
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), tv_ops.StochasticDepth(0.2, "row")).eval())
    assert any("stochastic_depth" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    ts.save(gm, tmp_path / "g")
    x = torch.randn(3, 8)
    assert torch.equal(ts.load(tmp_path / "g").eval()(x), gm(x))
