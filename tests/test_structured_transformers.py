"""Head / FFN / layer pruning of Hugging Face architectures built from small configs (no download)."""

import pytest
import torch

import torchshrink
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.prune.structured import FfnPruneConfig, HeadPruneConfig, LayerDropConfig, from_pretrained

torch.set_num_threads(2)
tf = pytest.importorskip("transformers")


def _model(arch: str):
    torch.manual_seed(0)
    tok = {"input_ids": torch.randint(0, 100, (2, 6))}
    if arch == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=100)).eval(), tok
    if arch == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)).eval(), tok
    if arch == "llama":
        return tf.LlamaModel(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=100)).eval(), tok
    return tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=8)).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "vit"])
def test_heads_ffn_layers_round_trip(arch, tmp_path):
    model, batch = _model(arch)
    ref = model(**batch).last_hidden_state
    for i, cfg in enumerate([HeadPruneConfig(amount=0.5), FfnPruneConfig(amount=0.5), LayerDropConfig(amount=0.5)]):
        p = torchshrink.prune(model, cfg, data=[batch])
        out = p(**batch).last_hidden_state
        assert out.shape == ref.shape
        assert sum(x.numel() for x in p.parameters()) < sum(x.numel() for x in model.parameters())
        p.save_pretrained(tmp_path / f"hf{i}")
        back = from_pretrained(tmp_path / f"hf{i}")
        assert torch.allclose(back(**batch).last_hidden_state, out, atol=1e-5)
        torchshrink.save(p, tmp_path / f"ts{i}")
        assert torch.allclose(torchshrink.load(tmp_path / f"ts{i}")(**batch).last_hidden_state, out, atol=1e-5)
    cfgs = [HeadPruneConfig(amount=0.5), FfnPruneConfig(amount=0.5), LayerDropConfig(amount=0.5)]
    p = torchshrink.prune(model, cfgs[0], data=[batch])
    c = p.config
    assert c.num_attention_heads == (4 if arch == "llama" else 2)
    p = torchshrink.prune(model, cfgs[2], data=[batch])
    assert p.config.num_hidden_layers == 1


def test_gqa_keeps_head_to_kv_mapping():
    model, batch = _model("llama")
    att = model.layers[0].self_attn
    p = torchshrink.prune(model, HeadPruneConfig(amount=0.5), data=[batch])
    a2 = p.layers[0].self_attn
    assert a2.q_proj.out_features == 4 * 4 and a2.k_proj.out_features == att.k_proj.out_features
    assert p.config.num_key_value_heads == 2 and a2.num_key_value_groups == 2
    # each kept query head keeps its own KV group: heads 0-3 read KV 0, heads 4-7 KV 1
    q_old = att.q_proj.weight.reshape(8, 4, -1)
    q_new = a2.q_proj.weight.reshape(4, 4, -1)
    kept = [next(h for h in range(8) if torch.equal(q_old[h], q_new[j])) for j in range(4)]
    assert [h // 4 for h in kept] == [0, 0, 1, 1]


def test_native_from_pretrained_for_llama_and_ffn(tmp_path):
    model, batch = _model("llama")
    p = torchshrink.prune(torchshrink.prune(model, HeadPruneConfig(amount=0.5)), FfnPruneConfig(amount=0.25, round_to=8))
    p.save_pretrained(tmp_path / "m")
    back = tf.LlamaModel.from_pretrained(tmp_path / "m").eval()
    assert back.config.intermediate_size == 48 and back.config.head_dim == 4
    assert torch.allclose(back(**batch).last_hidden_state, p(**batch).last_hidden_state, atol=1e-5)


def test_not_a_transformer_is_a_clear_error(tiny):
    with pytest.raises(UnsupportedLayerError, match="no stack of transformer layers"):
        torchshrink.prune(tiny, HeadPruneConfig())


def test_distilbert_ffn_and_head_pruning_find_its_units_and_reload(tmp_path):
    """DistilBERT names its projections q_lin / out_lin and its FFN width hidden_dim (no intermediate_size):
    the FFN pair is pruned (not the attention), heads are found, and both reload."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=100, dim=64, n_heads=4, n_layers=2, hidden_dim=128,
                                        max_position_embeddings=64)
    m = transformers.DistilBertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    ffn = torchshrink.prune(m, torchshrink.FfnPruneConfig(amount=0.5))
    layer = ffn.transformer.layer[0]
    assert layer.ffn.lin1.out_features == 64 and layer.attention.q_lin.out_features == 64 and ffn.config.hidden_dim == 64
    heads = torchshrink.prune(m, torchshrink.HeadPruneConfig(amount=0.5))
    assert heads.transformer.layer[0].attention.q_lin.out_features == 32 and heads.config.n_heads == 2
    for i, p in enumerate((ffn, heads)):
        torchshrink.save(p, tmp_path / str(i))
        back = torchshrink.load(tmp_path / str(i))
        assert torch.allclose(back(ids).last_hidden_state, p(ids).last_hidden_state, atol=1e-5)


def test_layer_drop_that_would_remove_nothing_refuses_in_one_line():
    """ALBERT-style: one shared layer group -- any amount used to leave the model as it was (MACs x1.00)."""
    torch.manual_seed(0)
    cfg = tf.AlbertConfig(vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=64)
    m = tf.AlbertModel(cfg).eval()
    with pytest.raises(UnsupportedLayerError, match="removes none") as e:
        torchshrink.prune(m, LayerDropConfig(amount=0.5))
    assert "\n" not in str(e.value)
