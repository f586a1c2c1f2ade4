"""GGUF export (#20): a tiny Llama written as F32 / Q8_0 / Q4_0 / Q4_1 from torchshrink's own codes reads
back in transformers' GGUF loader as exactly the weights torchshrink evaluated; bad input refused."""

import pytest
import torch

from torchshrink.core.errors import ConfigError, ModelLoadError
from torchshrink.llm.sequential import quantize_lm
from torchshrink.llm.wquant import Grid

tf = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")
from torchshrink.llm.gguf_export import export_gguf, gguf_grid  # noqa: E402

torch.set_num_threads(2)
VOCAB = 96


def _llama(layers=2):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def _source(path, model):
    """A minimal source GGUF: llama metadata and a byte-level tokenizer (what export copies)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _read_back(path):
    return tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_f32_export_reads_back_exactly_with_rope_rows_permuted(tmp_path):
    m = _llama()
    src = _source(tmp_path / "src.gguf", m)
    rep = export_gguf(m, tmp_path / "f32.gguf", "F32", source=src, embedding_type="F32")
    back = _read_back(tmp_path / "f32.gguf")
    assert torch.equal(back.model.layers[1].self_attn.q_proj.weight, m.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(back.model.layers[0].self_attn.k_proj.weight, m.model.layers[0].self_attn.k_proj.weight)
    assert torch.allclose(back(IDS).logits, m(IDS).logits, atol=1e-5)
    assert rep["max_decode_diff"] == 0.0 and rep["tensors"] == 2 + 2 * 9
    r = gguf.GGUFReader(str(tmp_path / "f32.gguf"))
    assert [str(x) for x in r.fields["tokenizer.ggml.tokens"].contents()][:3] == ["t0", "t1", "t2"]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantized_export_is_our_codes(tmp_path, qtype):
    m = _llama()
    src = _source(tmp_path / "src.gguf", m)
    samples = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    quantize_lm(m, gguf_grid(qtype), method="gptq", samples=samples, pack=True)
    rep = export_gguf(m, tmp_path / "q.gguf", qtype, source=src, embedding_type="F32")
    back = _read_back(tmp_path / "q.gguf")
    ours = m.model.layers[0].mlp.down_proj.dequantized_weight()
    tol = rep["max_format_rounding"] + 1e-7  # Q4_1 stores m = -d * zero in fp16; Q4_0 / Q8_0 are exact
    assert (back.model.layers[0].mlp.down_proj.weight - ours).abs().max() <= tol
    assert (rep["max_format_rounding"] == 0.0) == (qtype != "Q4_1")
    assert torch.allclose(back(IDS).logits, m(IDS).logits, atol=1e-3)
    t = {x.name: x.tensor_type.name for x in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert t["blk.0.ffn_down.weight"] == qtype and t["blk.0.attn_norm.weight"] == "F32"


def test_bad_input_is_refused_and_nothing_is_left(tmp_path):
    m = _llama()
    src = _source(tmp_path / "src.gguf", m)
    with pytest.raises(ModelLoadError, match="copies the tokenizer and metadata"):
        export_gguf(m, tmp_path / "x.gguf", "Q4_0")
    with pytest.raises(ConfigError, match="unknown GGUF type 'Q5_K'; allowed: F32, F16, Q8_0, Q4_0, Q4_1"):
        export_gguf(m, tmp_path / "x.gguf", "Q5_K", source=src)
    with pytest.raises(ConfigError, match="is the source GGUF file"):
        export_gguf(m, src, "Q4_0", source=src)
    quantize_lm(m, Grid(4, 64, False), method="rtn", pack=True)
    with pytest.raises(ConfigError, match=r"quantized as W4 g64 asym; GGUF Q4_0 stores W4 g32 sym codes"):
        export_gguf(m, tmp_path / "x.gguf", "Q4_0", source=src)
    with pytest.raises(ModelLoadError, match="Llama-architecture"):
        export_gguf(tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)),
                    tmp_path / "x.gguf", source=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_a_gguf_with_an_unknown_tensor_type_is_one_clear_error(tmp_path, monkeypatch):
    import struct

    from torchshrink.llm import load_causal_lm

    monkeypatch.setenv("TORCHSHRINK_CACHE", str(tmp_path / "cache"))
    m = _llama(layers=1)
    path = export_gguf(m, tmp_path / "m.gguf", "F32", source=_source(tmp_path / "src.gguf", m),
                       embedding_type="F32")["path"]
    raw = bytearray(open(path, "rb").read())
    name = b"blk.0.ffn_down.weight"
    at = raw.index(name) + len(name)  # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, 99)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="bad.gguf is not a GGUF file transformers can read"):
        load_causal_lm(str(bad))
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_a_gguf_declaring_a_model_far_larger_than_its_file_is_refused_before_allocating(tmp_path, monkeypatch):
    """A 1 kB GGUF whose metadata declares 200 layers of width 65536 (55 TB in float32) ran on for minutes in
    transformers; it is now refused from its metadata, built on the meta device, and nothing is cached."""
    from torchshrink.llm import load_causal_lm

    monkeypatch.setenv("TORCHSHRINK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(1 << 16)
    w.add_block_count(200)
    w.add_feed_forward_length(1 << 18)
    w.add_head_count(64)
    w.add_head_count_kv(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert path.stat().st_size < 4096
    with pytest.raises(ModelLoadError, match=r"huge.gguf declares a model of [\d,]+ bytes with [\d,]+ bytes of weights"):
        load_causal_lm(str(path))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))
