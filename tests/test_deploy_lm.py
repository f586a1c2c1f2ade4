"""deploy for causal language models (#22 item 4): on a user's own tiny Llama folder and text file, every
runtime candidate is scored on the same held-out windows, the passing ones timed on generation, the fastest
written as a folder that loads back and generates what the candidate generated; bad input is one line."""

import json

import pytest
from typer.testing import CliRunner

from torchshrink.cli import app
from torchshrink.core.errors import ConfigError, ModelLoadError, OutputExistsError, UnsupportedLayerError

tf = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from test_lm_cli import _folder, _text  # noqa: E402

from torchshrink.core import native  # noqa: E402
from torchshrink.deploy import DeployError, deploy, deploy_lm  # noqa: E402
from torchshrink.llm.models import load_causal_lm  # noqa: E402

runner = CliRunner()
SMALL = dict(window=16, eval_tokens=96, prompt_tokens=8, new_tokens=6, runs=1)
# the decode engine runs on torchshrink's native kernels: without them (TORCHSHRINK_KERNELS=torch, no C compiler) its
# rows fail at build, as rows, and the tests of what the engine does there do not apply
needs_engine = pytest.mark.skipif(native.library() is None, reason="the decode engine needs torchshrink's native library")


def _lm(tmp_path):
    folder = _folder(tmp_path)
    model, tok = load_causal_lm(str(folder))
    return folder, model, tok


def test_cli_writes_the_fastest_passing_candidate_and_it_reloads(tmp_path):
    folder, text, out = _folder(tmp_path), _text(tmp_path, 40), tmp_path / "out"
    res = runner.invoke(app, ["deploy", "-m", str(folder), "--data", str(text), "-o", str(out), "--window", "16",
                              "--eval-tokens", "96", "--prompt-tokens", "8", "--new-tokens", "6", "--runs", "2",
                              "--max-increase", "0.05"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads((out / "deploy.json").read_text())
    rows = {(r["runtime"], r["precision"]): r for r in rep["candidates"]}
    assert {("torch", "as given"), ("torch", "bf16"), ("torchshrink", "int8 weights (g64, nearest)"),
            ("torchshrink", "int4 weights (g64, nearest)")} <= set(rows)
    ref = rep["reference_perplexity"]
    passed = [r for r in rep["candidates"] if r["status"] == "passed"]
    for r in rep["candidates"]:
        if r["quality"]:  # every scored row: its perplexity decides its status against the budget
            assert (r["quality"]["perplexity"] <= ref * 1.05) == (r["status"] == "passed")
    assert rows["torch", "as given"]["quality"]["perplexity"] == pytest.approx(ref, rel=1e-6)
    chosen = next(r for r in rep["candidates"] if r["chosen"])
    assert chosen["total_s"] == min(r["total_s"] for r in passed)
    assert rep["workload"] == {"prompt_tokens": 8, "new_tokens": 6}
    assert "6 held-out windows of 16 tokens (90 scored tokens)" in rep["provenance"]["quality"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["deploy.json", "deploy.md", *rep["files"]])
    assert f"chosen: {rep['chosen']}" in res.stdout.replace("\n", " ")
    # the written folder loads with torchshrink's LM loader and scores what the row reported
    from torchshrink.deploy.lm import EngineRunner, TorchRunner, _perplexity
    from torchshrink.llm.pipeline import lm_text, resolve

    model, tok = load_causal_lm(str(out))
    o = resolve("llm-w8", {"samples": 1, "seq": 16, "window": 16, "eval_tokens": 96})
    windows = lm_text(tok, str(text), o)["eval"].reshape(-1, 16)
    again = EngineRunner(model, 32, 0) if chosen["runtime"] == "torchshrink" else TorchRunner(model)
    assert _perplexity(again, windows) == pytest.approx(chosen["quality"]["perplexity"], rel=1e-4)


@needs_engine
def test_packed_model_keeps_its_codes_in_the_engine(tmp_path):
    from torchshrink.llm.sequential import quantize_lm
    from torchshrink.llm.wquant import Grid

    _, model, tok = _lm(tmp_path)
    quantize_lm(model, Grid(4, 32, False), method="rtn", pack=True)
    r = deploy_lm(model, tok, data=str(_text(tmp_path, 40)), runtimes=("torch", "torchshrink"), **SMALL)
    rows = {c.name: c for c in r.candidates}
    assert rows["torch / bf16"].status.startswith("skipped: the model holds packed integer weights")
    eng, given = rows["torchshrink / as given"], rows["torch / as given"]
    assert eng.status == "passed" and given.status == "passed"
    # the engine runs the same 4-bit codes: perplexity equal to transformers' on the packed model within rounding
    assert eng.quality["perplexity"] == pytest.approx(given.quality["perplexity"], rel=1e-3)
    assert r.out is None and r.files == []


def test_nothing_written_when_no_candidate_meets_the_reference(tmp_path):
    import copy

    _, model, tok = _lm(tmp_path)
    peaky = copy.deepcopy(model)  # logits x 50: confidently wrong, perplexity far above the original's
    peaky.lm_head.weight.data = model.lm_head.weight.data.clone() * 50
    peaky.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.clone()  # untie
    out = tmp_path / "out"
    with pytest.raises(DeployError, match=r"no candidate met the quality budget \(perplexity <= "):
        deploy_lm(peaky, tok, data=str(_text(tmp_path, 40)), reference=model, out=out, runtimes=("torch",), **SMALL)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_input_is_one_clear_error(tmp_path):
    folder, model, tok = _lm(tmp_path)
    text = str(_text(tmp_path, 40))
    with pytest.raises(ConfigError, match="allowed: torch, torchshrink, llama.cpp"):
        deploy_lm(model, tok, data=text, runtimes=("onnxruntime",))
    with pytest.raises(ConfigError, match="max_increase=-0.1"):
        deploy_lm(model, tok, data=text, max_increase=-0.1)
    with pytest.raises(ConfigError, match="prompt_tokens=0"):
        deploy_lm(model, tok, data=text, prompt_tokens=0)
    with pytest.raises(ConfigError, match="is a causal language model: deploy it with"):
        deploy(model)
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=16, patch_size=8))
    with pytest.raises((ModelLoadError, UnsupportedLayerError), match="causal|decoder"):
        deploy_lm(vit, tok, data=text)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not written by torchshrink deploy"):
        deploy_lm(model, tok, data=text, out=tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    res = runner.invoke(app, ["deploy", "-m", str(folder), "-o", str(tmp_path / "o"), "--runtimes", "openvino"])
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "allowed: torch, torchshrink, llama.cpp" in lines[0]
    assert not (tmp_path / "o").exists()


@needs_engine
def test_a_prompt_path_other_than_the_engine_is_scored_too(tmp_path, monkeypatch):
    import torchshrink.llm.prefill as P

    _, model, tok = _lm(tmp_path)

    def force_bf16(dec, m, tokens=256, modes=P.MODES, rounds=2):
        dec.prefill_with, dec.prefill_mode = P.prefill_model(m, "bf16"), "bf16"
        return {"chosen": "bf16", "seconds": {}, "tokens": tokens}

    monkeypatch.setattr(P, "choose_prefill", force_bf16)
    r = deploy_lm(model, tok, data=str(_text(tmp_path, 60)), runtimes=("torch", "torchshrink"), max_increase=0.05,
                  **{**SMALL, "prompt_tokens": 64})
    eng = next(c for c in r.candidates if c.name == "torchshrink / int8 weights (g64, nearest)")
    assert "prompt path bf16" in eng.note
    bf = next(c for c in r.candidates if c.name == "torch / bf16")
    # the prompt path is the bf16 copy of the int8 weights: scored, and its figure decides with the engine's
    assert eng.quality["prompt_path_perplexity"] == pytest.approx(bf.quality["perplexity"], rel=2e-2)
    worst = max(eng.quality["perplexity"], eng.quality["prompt_path_perplexity"])
    assert (eng.status == "passed") == (worst <= r.reference_perplexity * 1.05)


@needs_engine
def test_a_runtime_that_fails_to_generate_is_a_row(tmp_path, monkeypatch):
    from torchshrink.deploy import lm

    _, model, tok = _lm(tmp_path)

    def broken(self, prompt, new):
        raise RuntimeError("no generation here")

    monkeypatch.setattr(lm.EngineRunner, "generate", broken)
    r = deploy_lm(model, tok, data=str(_text(tmp_path, 40)), runtimes=("torchshrink", "torch"), max_increase=0.5,
                  **SMALL)
    rows = {c.name: c for c in r.candidates}
    failed = rows["torchshrink / int8 weights (g64, nearest)"].status
    assert failed == "failed: generation: RuntimeError: no generation here"
    assert r.winner.runtime == "torch" and r.baseline is rows["torch / as given"]
    r2 = deploy_lm(model, tok, data=str(_text(tmp_path, 40)), runtimes=("torch",), **SMALL)
    assert r2.speedup(r2.winner) is not None
