"""deploy: precision x runtime candidates, quality budget, interleaved timing, the written artifact."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import torchshrink as ts
from torchshrink.core.errors import ConfigError, OutputExistsError
from torchshrink.deploy import DeployError, deploy
from torchshrink.deploy import runtimes as rt
from torchshrink.deploy.report import reload

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_OV = importlib.util.find_spec("openvino") is not None


@pytest.fixture(autouse=True)
def short_timing(monkeypatch):
    """The tests check what deploy does, not how fast: no minimum timing time."""
    monkeypatch.setattr("torchshrink.deploy.api.MIN_SECONDS", 0.0)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return MLP().eval(), [torch.randn(8, 64, generator=g) for _ in range(4)]


def _row(result, runtime: str, precision: str) -> dict:
    return next(r for r in result.rows() if (r["runtime"], r["precision"]) == (runtime, precision))


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")
def test_deploy_writes_the_fastest_passing_candidate(tmp_path):
    model, data = _mlp()
    out = tmp_path / "dep"
    r = deploy(model, (data[0],), data=data, out=out, runtimes=("torch", "onnxruntime"), threads=1, runs=3, warmup=1)
    rows = r.rows()
    assert {(x["runtime"], x["precision"]) for x in rows} >= {
        ("torch", "as given"), ("torch", "bf16"), ("torch", "int8 (torchshrink)"), ("onnxruntime", "as given")}
    passed = [x for x in rows if x["status"] == "passed"]
    assert passed and all(x["quality"]["cosine_mean"] >= 0.995 and x["p50_ms"] > 0 for x in passed)
    chosen = [x for x in rows if x["chosen"]]
    assert len(chosen) == 1 and chosen[0]["p50_ms"] == min(x["p50_ms"] for x in passed)
    assert _row(r, "torch", "as given")["quality"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert _row(r, "torch", "as given")["speedup_vs_given"] == pytest.approx(1.0)
    # the artifact loads back as the snippet says and reproduces the chosen candidate
    again = reload(r.winner, out, 1)
    x = data[1]
    assert torch.nn.functional.cosine_similarity(again(x).float().flatten(), r.module(x).float().flatten(), dim=0) > 0.999
    report = json.loads((out / "deploy.json").read_text())
    assert report["chosen"] == r.winner.name and "32 samples" in report["provenance"]["quality"]
    md = (out / "deploy.md").read_text()
    assert "(chosen)" in md and "Machine:" in md and str(out) in md
    assert all((out / f).exists() for f in report["files"])


def test_deploy_holds_candidates_to_the_budget_and_refuses_when_none_passes(tmp_path):
    model, data = _mlp()
    other = MLP().eval()  # a different model as the reference: nothing agrees with it
    with pytest.raises(DeployError, match="no candidate met the quality budget"):
        deploy(model, (data[0],), data=data, reference=other, out=tmp_path / "x", runtimes=("torch",), threads=1,
               runs=2, warmup=1)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    r = deploy(model, (data[0],), data=data, runtimes=("torch",), threads=1, runs=2, warmup=1, min_cosine=0.99999)
    int4 = _row(r, "torch", "int4 weight-only")
    assert int4["status"] == "below budget" and int4["p50_ms"] is None and int4["quality"]["cosine_mean"] < 0.99999


def test_bad_arguments_are_one_line_and_nothing_is_overwritten(tmp_path):
    model, data = _mlp()
    with pytest.raises(ConfigError, match="allowed: torch, torch.compile, onnxruntime, openvino"):
        deploy(model, (data[0],), data=data, runtimes=("tensorrt",))
    with pytest.raises(ConfigError, match="min_cosine"):
        deploy(model, (data[0],), data=data, min_cosine=1.5)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("user file")
    with pytest.raises(OutputExistsError, match="already exists"):
        deploy(model, (data[0],), data=data, out=keep, runtimes=("torch",))
    with pytest.raises(OutputExistsError, match="not written by torchshrink deploy"):
        deploy(model, (data[0],), data=data, out=keep, runtimes=("torch",), force=True)
    assert (keep / "mine.txt").read_text() == "user file"


def test_a_compressed_model_keeps_its_precision_and_missing_runtimes_say_how_to_install(monkeypatch):
    model, data = _mlp()
    q = ts.quantize(model, ts.Int8DynamicConfig(), data=data)
    real = rt.missing
    monkeypatch.setattr(rt, "missing", lambda p: "not installed: pip install 'torchshrink[deploy]' (openvino)"
                        if p == "openvino" else real(p))
    r = deploy(q, (data[0],), data=data, reference=model, runtimes=("torch", "openvino"), threads=1, runs=2,
               warmup=1, min_cosine=0.99)
    assert _row(r, "torch", "bf16")["status"].startswith("skipped: the model is already compressed")
    assert _row(r, "openvino", "any precision")["status"] == "skipped: not installed: pip install 'torchshrink[deploy]' (openvino)"
    assert r.winner.name == "torch / as given" and r.winner.quality["cosine_mean"] >= 0.99


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_openvino_candidates_run_with_parity():
    model, data = _mlp()
    r = deploy(model, (data[0],), data=data, runtimes=("torch", "openvino"), threads=1, runs=2, warmup=1,
               min_cosine=0.99)
    fp32 = _row(r, "openvino", "fp32")
    assert fp32["status"] == "passed" and fp32["quality"]["cosine_mean"] > 0.9999


def test_input_names_and_dynamic_axes():
    class Two(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return input_ids * attention_mask

    ids = torch.ones(2, 5, dtype=torch.long)
    names = rt.input_names(Two(), (ids, ids))
    assert names == ["input_ids", "attention_mask"]
    assert rt.dynamic_axes(names, (ids, ids)) == {"input_ids": {0: "batch", 1: "sequence"},
                                                 "attention_mask": {0: "batch", 1: "sequence"}}
    assert rt.dynamic_axes(["x"], (torch.randn(1, 3, 8, 8),)) == {"x": {0: "batch"}}


def test_cli_deploy(tmp_path, monkeypatch):
    from torchshrink.cli import app

    runner = CliRunner()
    out = tmp_path / "d"
    monkeypatch.setattr(rt, "missing", lambda p: "not installed: pip install 'torchshrink[deploy]' (openvino)")
    res = runner.invoke(app, ["deploy", "-m", "zoo:digits-mlp", "-o", str(out), "--runtimes", "torch,openvino",
                              "--no-compile", "--runs", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())  # the console wraps long lines
    assert "chosen:" in flat and "accuracy" in flat and (out / "deploy.md").exists()
    assert "torchshrink[deploy]" in flat  # printed as text, not eaten as console markup
    assert "model = ts.load(" in flat and "y = model(*inputs)" in flat
    bad = runner.invoke(app, ["deploy", "-m", "zoo:digits-mlp", "-o", str(tmp_path / "e"), "--runtimes", "trt"])
    assert bad.exit_code == 2 and "allowed: torch" in bad.output and not (tmp_path / "e").exists()
    again = runner.invoke(app, ["deploy", "-m", "zoo:digits-mlp", "-o", str(out), "--runtimes", "torch"])
    assert again.exit_code == 2 and "already exists" in again.output
    # a saved model folder as its own output (or inside it) is refused before anything is read or written
    saved = tmp_path / "saved"
    ts.save(ts.load_model("zoo:digits-mlp"), saved)
    before = sorted(p.name for p in saved.iterdir())
    for target in (saved, saved / "deploy"):
        res = runner.invoke(app, ["deploy", "-m", str(saved), "-o", str(target), "--force", "--runtimes", "torch"])
        assert res.exit_code == 2 and "overlaps the input model" in " ".join(res.output.split()), res.output
    assert sorted(p.name for p in saved.iterdir()) == before


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")
def test_onnxruntime_sessions_do_not_spin_between_runs(tmp_path):
    # spinning ORT workers took the cores from whatever deploy timed next (a torch model 67 -> 107 ms)
    from torchshrink.deploy.runtimes import OrtModule, write_onnx

    model, data = _mlp()
    m = OrtModule(write_onnx(model, (data[0],), tmp_path / "m.onnx"), 2)
    assert m.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert torch.allclose(torch.as_tensor(m(data[0])), model(data[0]), atol=1e-5)


class DictTwoIn(nn.Module):
    """Two inputs and a dict output: the shapes a user's own model has that no zoo model does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(32, 64), nn.Linear(8, 64), nn.Linear(64, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.a(x) + self.b(y))
        return {"logits": self.head(h), "features": h}


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")
def test_a_two_input_dict_output_model_deploys_and_its_artifact_reloads(tmp_path):
    torch.manual_seed(0)
    model = DictTwoIn().eval()
    ex = (torch.randn(4, 32), torch.randn(4, 8))
    r = deploy(model, ex, out=tmp_path / "d", runtimes=("torch", "onnxruntime"), threads=1, runs=2, warmup=1)
    assert _row(r, "torch", "as given")["quality"]["agreement_mean"] == pytest.approx(1.0)
    assert _row(r, "onnxruntime", "as given")["status"] == "passed"
    assert (tmp_path / "d" / "deploy.json").is_file()
    assert r.module(*ex) is not None


def test_a_model_whose_output_cannot_be_judged_is_one_line_naming_why(tmp_path):
    class Words(nn.Module):
        def forward(self, x):
            return {"words": ["a"] * len(x)}

    with pytest.raises(DeployError, match="quality check could not run on the model as given: .*cannot find an output"):
        deploy(Words(), (torch.randn(2, 3),), out=tmp_path / "w", runtimes=("torch",), threads=1, runs=1, warmup=0)
    assert not (tmp_path / "w").exists()


def test_when_the_fastest_artifact_cannot_be_written_the_next_one_is(tmp_path):
    from torchshrink.deploy.api import _write_fastest

    model, data = _mlp()
    r = deploy(model, (data[0],), data=data, runtimes=("torch",), threads=1, runs=2, warmup=1, min_cosine=0.9)
    ranked = sorted((c for c in r.candidates if c.status == "passed"), key=lambda c: c.timing.p50_ms)
    assert len(ranked) >= 2

    def refuse(folder):
        raise TypeError("cannot save a graph that calls foo.bar: only listed tensor functions are saved")
    ranked[0].write = refuse
    with torch.inference_mode():  # as deploy writes
        _write_fastest(r, ranked, tmp_path / "out", (data[0],))
    assert r.winner is ranked[1] and ranked[0].status.startswith("passed; not written: TypeError: cannot save")
    saved = json.loads((tmp_path / "out" / "deploy.json").read_text())
    assert saved["chosen"] == ranked[1].name
    # MLP is the test's own class: the folder loads into it, and the snippet says so
    assert "ts.load('" + str(tmp_path / "out") + "/model', model=MLP(...))" in saved["snippet"]
    with torch.inference_mode():
        again = reload(r.winner, tmp_path / "out", 1, skeleton=MLP())
        cos = torch.nn.functional.cosine_similarity(again(data[1]).float().flatten(), r.module(data[1]).float().flatten(),
                                                    dim=0)
    assert cos > 0.999
    for c in ranked:
        c.write = refuse
    with pytest.raises(DeployError, match="no candidate that passed could be written; the fastest, .*cannot save"), \
            torch.inference_mode():
        _write_fastest(r, ranked, tmp_path / "out2", (data[0],))
    assert not (tmp_path / "out2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_input_that_does_not_fit_or_is_too_large_is_one_line(tmp_path):
    from torchshrink.core.errors import InputShapeError, ModelLoadError
    from torchshrink.models import parse_shape

    model, _ = _mlp()
    with pytest.raises(InputShapeError, match=r"MLP cannot run on input \(2, 7\):float32: mat1 and mat2"):
        deploy(model, (torch.randn(2, 7),), out=tmp_path / "o", runtimes=("torch",), threads=1, runs=1)
    assert not (tmp_path / "o").exists()
    assert parse_shape("1x3x8x8") == [1, 3, 8, 8] and parse_shape(" 2, 64 ") == [2, 64]
    for bad in ("1,x", "0,4", "", "1,,4", "-1,4", "1,2,3,4,5,6,7,8,9"):
        with pytest.raises(ModelLoadError, match="invalid input shape"):
            parse_shape(bad)
    with pytest.raises(ModelLoadError, match="has 399,999,999,996 elements; at most"):
        parse_shape("1,4,99999999999")


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_openvino_runs_a_qdq_graph_compiled_for_each_input_shape(tmp_path):
    """OpenVINO's low-precision passes mishandle torchshrink's QDQ graphs compiled with a dynamic batch (a static-INT8
    Swin-T: cosine 0.88 against torch, 0.9994 compiled for its shape): those rows compile once per input shape, and
    the written snippet reshapes the model to the inputs before compiling."""
    import torchshrink as ts
    from torchshrink.deploy.candidates import _ov_snippet

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    q = ts.quantize(cnn, ts.Int8StaticConfig(), data=[torch.randn(8, 3, 8, 8)])
    path = rt.write_onnx(q, (torch.randn(2, 3, 8, 8),), tmp_path / "q.onnx")
    ov_model = rt.ov_read(path)
    m = rt.OvModule(ov_model, 1, "f32", per_shape=True)
    for batch in (2, 5, 2):
        x = torch.randn(batch, 3, 8, 8)
        assert torch.nn.functional.cosine_similarity(m(x).flatten(), q(x).flatten(), dim=0) > 0.999
    assert sorted(k[0][0] for k in m._compiled) == [2, 5]  # compiled once per shape, reused
    rt.ov_save(ov_model, tmp_path / "model.xml")
    snippet = _ov_snippet("f32", 1, per_shape=True).format(dir=tmp_path)
    assert "m.reshape(" in snippet
    x = torch.randn(3, 3, 8, 8)
    scope = {"inputs": (x,)}
    exec(snippet, scope)  # noqa: S102 - the snippet deploy writes, run as a user would
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(scope["y"]).flatten(), q(x).flatten(), dim=0) > 0.999
