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
        p.save_pretrained(tmp_path / f"hf{i}", torchshrink_loader=True)
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


def _bert_calib():
    model, _ = _model("bert")
    g = torch.Generator().manual_seed(1)
    return model, [{"input_ids": torch.randint(0, 100, (4, 12), generator=g)} for _ in range(3)]


def test_auto_importance_is_data_aware_only_with_data():
    model, calib = _bert_calib()
    with_data = torchshrink.prune(model, FfnPruneConfig(amount=0.5), data=calib)
    without = torchshrink.prune(model, FfnPruneConfig(amount=0.5))
    assert torchshrink.report(with_data)[-1].notes["importance"] == "fluctuation"
    assert torchshrink.report(without)[-1].notes["importance"] == "l1"
    assert with_data.config.intermediate_size == without.config.intermediate_size == 32


def test_fluctuation_keeps_the_mean_contribution_of_removed_neurons():
    """FLAP's compensation: over the calibration tokens, the FFN output's mean is unchanged (the removed
    neurons' mean went into the bias), while plain activation ranking without compensation shifts it."""
    model, calib = _bert_calib()
    layer = model.encoder.layer[0]

    def ffn_out_mean(m):
        got = []
        h = m.encoder.layer[0].output.dense.register_forward_hook(lambda mod, a, o: got.append(o.reshape(-1, o.shape[-1])))
        inp = []
        h2 = m.encoder.layer[0].intermediate.register_forward_pre_hook(lambda mod, a: inp.append(a[0]))
        with torch.no_grad():
            for b in calib:
                m(**b)
        h.remove()
        h2.remove()
        return torch.cat(got).mean(0), inp

    ref_mean, inputs = ffn_out_mean(model)
    sel = {"include": ["encoder.layer.0"]}
    for crit, exact in (("fluctuation", True), ("activation", False)):
        p = torchshrink.prune(model, FfnPruneConfig(amount=0.5, importance=crit), data=calib, select=sel)
        assert p.encoder.layer[0].intermediate.dense.out_features == layer.intermediate.dense.out_features // 2
        # the pruned FFN on the ORIGINAL layer-0 inputs (the attention is unchanged)
        with torch.no_grad():
            outs = [p.encoder.layer[0].output.dense(p.encoder.layer[0].intermediate(x)) for x in inputs]
        mean = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]).mean(0)
        err = float((mean - ref_mean).abs().max())
        assert (err < 1e-4) == exact, (crit, err)


def test_data_aware_importance_beats_magnitude_on_a_model_with_dead_looking_weights():
    """A neuron with large weights that never fires is what magnitude keeps and data drops."""
    model, calib = _bert_calib()
    inter = model.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        inter.weight[:8] *= 20  # huge weights ...
        inter.bias[:8] = -1e4  # ... but GELU(-1e4) = 0: these 8 neurons are dead on every token
    sel = {"include": ["encoder.layer.0"]}
    keep = {}
    for crit in ("l1", "activation", "fluctuation"):
        p = torchshrink.prune(model, FfnPruneConfig(amount=0.25, importance=crit), data=calib, select=sel)
        w = p.encoder.layer[0].intermediate.dense.bias
        keep[crit] = int((w < -1e3).sum())
    assert keep == {"l1": 8, "activation": 0, "fluctuation": 0}


def _encdec(arch: str):
    torch.manual_seed(0)
    if arch == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2,
                                                         num_decoder_layers=4, num_heads=4, d_kv=8)).eval()
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_every_stack_is_pruned_and_reloads(arch, tmp_path):
    model = _encdec(arch)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    stacks = {"t5": ("encoder.block", "decoder.block"), "bart": ("model.encoder.layers", "model.decoder.layers")}[arch]
    for i, cfg in enumerate([HeadPruneConfig(amount=0.5), FfnPruneConfig(amount=0.5), LayerDropConfig(amount=0.5)]):
        p = torchshrink.prune(model, cfg, data=[batch])
        out = p(**batch).logits
        assert out.shape == model(**batch).logits.shape
        for s in stacks:
            layers = p.get_submodule(s)
            if cfg.kind == "layer-drop":  # each stack loses half its layers
                assert len(layers) == len(model.get_submodule(s)) // 2
            else:  # every stack (encoder AND decoder) is smaller
                n = sum(x.numel() for x in layers.parameters())
                assert n < 0.9 * sum(x.numel() for x in model.get_submodule(s).parameters()), (cfg.kind, s)
        torchshrink.save(p, tmp_path / f"ts{i}")
        assert torch.allclose(torchshrink.load(tmp_path / f"ts{i}")(**batch).logits, out, atol=1e-5)
        p.save_pretrained(tmp_path / f"hf{i}", torchshrink_loader=True)
        assert torch.allclose(from_pretrained(tmp_path / f"hf{i}", type(model))(**batch).logits, out, atol=1e-5)
        if arch == "t5" or cfg.kind != "head-prune":  # BART derives head size from d_model / heads: no config field
            native = type(model).from_pretrained(tmp_path / f"hf{i}").eval()  # transformers alone: config per stack
            assert torch.allclose(native(**batch).logits, out, atol=1e-5)


def test_t5_layer_drop_keeps_the_block_that_owns_the_position_table():
    model = _encdec("t5")
    ids = torch.randint(0, 100, (2, 8))
    batch = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    p = torchshrink.prune(model, LayerDropConfig(amount=0.75), data=[batch])
    for s in ("encoder.block", "decoder.block"):
        assert p.get_submodule(s)[0].layer[0].SelfAttention.has_relative_attention_bias
    with pytest.raises(torchshrink.core.errors.ConfigError, match="layer stacks"):
        torchshrink.prune(model, LayerDropConfig(layers=(0,)), data=[batch])


def test_albert_heads_prune_its_one_shared_layer():
    torch.manual_seed(0)
    m = tf.AlbertModel(tf.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                                       num_attention_heads=4, intermediate_size=64)).eval()
    ids = {"input_ids": torch.randint(0, 100, (2, 6))}
    p = torchshrink.prune(m, HeadPruneConfig(amount=0.5), data=[ids])
    assert p.config.num_attention_heads == 2 and p(**ids).last_hidden_state.shape == (2, 6, 32)
    with pytest.raises(UnsupportedLayerError, match="one shared group"):
        torchshrink.prune(m, LayerDropConfig(amount=0.5), data=[ids])
