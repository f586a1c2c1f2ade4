"""The batch-1 decode engine (#22): its int4 / int8 GEMV equals the dequantize-then-matmul reference on the
int8 activations it uses, on every instruction-set path this CPU has (odd shapes included); the whole-model
step reproduces the transformers model; bad input is one line."""

import copy

import pytest
import torch

from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.core.native import library
from torchshrink.llm.decode import Decoder, QMat, act_qmax, pack_block_codes, qgemv, qmat, unpack_block_codes
from torchshrink.llm.sequential import quantize_lm
from torchshrink.llm.wquant import Grid

tf = pytest.importorskip("transformers")
torch.set_num_threads(2)
lib = library()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler: the decode engine needs the native library")
ISAS = [i for i in (2, 1, 0) if lib is not None and i <= lib.ts_lm_isa()]


@pytest.fixture
def isa_reset():
    yield
    import torchshrink.core.native as native

    native._STATE.clear()  # reload: ts_lm_set_isa only lowers the path for the process
    native._LIB = None


def _mat(rows, cols, group, bits, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g)
    scale = torch.rand(rows, cols // group, generator=g) * 0.02 + 0.001
    zero = torch.randint(0, 2 ** bits, (rows, cols // group), generator=g).float()
    return qmat(codes, scale, zero, bits, group, torch.randn(rows, generator=g) if bias else None)


def _reference(m: QMat, x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Dequantized weight times the int8-per-group activations the kernel computes with (float64)."""
    xg = x.double().reshape(-1, m.group)
    d = xg.abs().amax(-1, keepdim=True) / qmax
    xq = (torch.round(xg / torch.where(d > 0, d, torch.ones_like(d))) * d).reshape(-1)
    y = m.dequantized().double() @ xq
    return y + (m.bias.double() if m.bias is not None else 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_block_codes_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 96))
    packed = pack_block_codes(codes, bits)
    assert packed.shape == (5, 96 // 2 if bits == 4 else 96) and packed.dtype == torch.uint8
    assert torch.equal(unpack_block_codes(packed, bits, 96).long(), codes)


@pytest.mark.parametrize("rows,cols,group,bits", [(7, 96, 32, 4), (33, 128, 64, 4), (5, 64, 64, 8), (19, 96, 32, 8),
                                                  (3, 256, 128, 4)])
def test_gemv_equals_the_dequantized_reference_on_every_isa(rows, cols, group, bits, isa_reset):
    m = _mat(rows, cols, group, bits, bias=rows % 2 == 1)
    x = torch.randn(cols)
    x[:group] = 0  # an all-zero activation group (scale 0) must give exactly the offset-free sum
    outs = {}
    for isa in ISAS:
        lib.ts_lm_set_isa(isa)
        y = qgemv(m, x)
        ref = _reference(m, x, act_qmax(bits))
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (isa, (y - ref).abs().max())
        outs[isa] = y
    # the dequantize-then-matmul float reference (no activation rounding) is close, not equal
    fref = m.dequantized() @ x + (m.bias if m.bias is not None else 0)
    assert float((outs[ISAS[-1]] - fref).abs().max()) < 0.03 * float(fref.abs().max()) + 1e-6


def test_bad_grids_are_refused_in_one_line():
    codes = torch.zeros(4, 96, dtype=torch.long)
    with pytest.raises(ConfigError, match="multiple of 32"):
        qmat(codes, torch.ones(4, 2), torch.zeros(4, 2), 4, 48)
    with pytest.raises(ConfigError, match="4- and 8-bit"):
        qmat(codes, torch.ones(4, 3), torch.zeros(4, 3), 3, 32)
    with pytest.raises(ConfigError, match=r"takes \(96,\)"):
        qgemv(qmat(codes, torch.ones(4, 3), torch.zeros(4, 3), 4, 32), torch.zeros(95))


def _llama(**kw):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, **kw)
    return tf.LlamaForCausalLM(cfg).eval()


def _dequantized_copy(model, dec):
    """The transformers model with every weight replaced by what the engine holds."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer, mats in zip(m.model.layers, dec.mats["layers"], strict=True):
            for n in ("q", "k", "v", "o"):
                getattr(layer.self_attn, n + "_proj").weight.copy_(mats[n].dequantized())
            for n in ("gate", "up", "down"):
                getattr(layer.mlp, n + "_proj").weight.copy_(mats[n].dequantized())
        m.lm_head.weight.copy_(dec.mats["head"].dequantized())
        m.model.embed_tokens.weight.copy_(dec.mats["embed"].dequantized())
    return m


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_reproduces_the_transformers_model(tied):
    model = _llama(tie_word_embeddings=tied)
    dec = Decoder.from_model(model, max_len=32, group=32)
    assert (dec.mats["embed"] is dec.mats["head"]) == tied
    ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(1))
    got = dec.logits(ids)
    with torch.no_grad():
        ref = _dequantized_copy(model, dec)(ids[None]).logits[0]
    assert got.shape == (24, 96)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < 0.05, rel  # int8 activations per group of 32 are the only difference
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9
    # the step is incremental: the same positions again give the same logits
    assert torch.allclose(dec.logits(ids[:10]), got[:10], atol=1e-6)


def test_decoder_runs_quantize_lm_codes_and_generates():
    model = _llama()
    w4 = copy.deepcopy(model)
    quantize_lm(w4, Grid(4, 32, False), method="rtn", pack=True)
    dec = Decoder.from_model(w4, max_len=40)
    layer = w4.model.layers[0].self_attn.q_proj
    assert torch.allclose(dec.mats["layers"][0]["q"].dequantized(), layer.dequantized_weight(), atol=2e-3)
    out = dec.generate([1, 2, 3], 10)
    assert len(out["tokens"]) == 10 and all(0 <= t < 96 for t in out["tokens"]) and out["tokens_per_s"] > 0
    with torch.no_grad():
        ref = _dequantized_copy(model, dec).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out["tokens"][0] == int(ref[0, 3])


def test_decoder_refusals_are_one_line():
    with pytest.raises(UnsupportedLayerError, match="model type 'gpt2'"):
        Decoder.from_model(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    dec = Decoder.from_model(_llama(), max_len=8, group=32)
    with pytest.raises(ConfigError, match="max_len=8"):
        dec.generate([1, 2, 3], 6)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        dec.step(96)
    with pytest.raises(ConfigError, match="float_bits=3"):
        Decoder.from_model(_llama(), float_bits=3)


def test_prefill_in_chunks_equals_token_by_token():
    model = _llama()
    dec = Decoder.from_model(model, max_len=48, group=32, chunk=7)  # chunks of 7 over a 20-token prompt: 3 calls
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(2))
    by_token = dec.logits(ids)[-1].clone()
    kc = dec.kcache.clone()
    dec.reset()
    last = dec.prefill(ids)
    assert torch.allclose(last, by_token, atol=1e-5, rtol=1e-5)
    assert torch.allclose(dec.kcache[:, :, :20], kc[:, :, :20], atol=1e-6)
    assert dec.pos == 20
    nxt = dec.step(int(last.argmax()))
    assert torch.isfinite(nxt).all()


def test_a_config_that_disagrees_with_its_weights_is_refused():
    model = _llama()
    model.config.num_attention_heads = 8  # the C step would read past the attention weights
    with pytest.raises(UnsupportedLayerError, match="layer 0 q_proj is 64x64; the config says 128x64"):
        Decoder.from_model(model)


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_gemm_prefill_fills_the_engine_cache_as_the_engine_would(mode):
    from torchshrink.llm.prefill import choose_prefill, prefill_model

    model = _llama()
    quantize_lm(model, Grid(4, 32, False), method="rtn", pack=True)
    dec = Decoder.from_model(model, max_len=48, chunk=8)
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(3))
    own = dec.prefill(ids).clone()
    kc, vc = dec.kcache[:, :, :20].clone(), dec.vcache[:, :, :20].clone()
    own_next = dec.step(int(own.argmax())).clone()
    dec.reset()
    dec.prefill_with = prefill_model(model, mode)
    got = dec.prefill(ids)
    assert dec.pos == 20
    cos = torch.nn.functional.cosine_similarity
    for ref, new in ((kc, dec.kcache[:, :, :20]), (vc, dec.vcache[:, :, :20])):
        assert float(cos(ref.flatten(), new.flatten(), dim=0)) > 0.99
    assert float(cos(own, got, dim=0)) > 0.98
    nxt = dec.step(int(own.argmax()))  # decoding goes on in the engine from the cache the GEMM path wrote
    assert float(cos(own_next, nxt, dim=0)) > 0.98
    dec.reset()
    dec.step(5)  # not at position 0: the engine's own chunks
    assert torch.isfinite(dec.prefill(ids[:4])).all() and dec.pos == 5
    rep = choose_prefill(dec, model, tokens=16, modes=("engine", mode), rounds=1)
    assert rep["chosen"] in ("engine", mode) and set(rep["seconds"]) == {"engine", mode} and dec.pos == 0
    assert dec.prefill_mode == rep["chosen"]
    with pytest.raises(ConfigError, match="allowed: engine, bf16, int8"):
        choose_prefill(dec, model, modes=("fp8",))
