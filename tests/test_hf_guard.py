"""A compressed Hugging Face model's save_pretrained never writes a folder transformers loads with weights
other than torchshrink's (#21 item 3): refused in one line (nothing written) or an exact round trip."""

import copy

import pytest
import torch

import torchshrink as ts
from torchshrink.core.errors import OutputWriteError
from torchshrink.export.hf_guard import guard_save_pretrained
from torchshrink.llm.sequential import quantize_lm
from torchshrink.llm.wquant import Grid

tf = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2)).eval()


def _bert():
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64)).eval()


def test_a_packed_lm_is_refused_before_anything_is_written(tmp_path):
    m = _llama()
    quantize_lm(m, Grid(4, 32, False), method="rtn", pack=True)
    with pytest.raises(OutputWriteError, match="torchshrink layers \\(PackedLinear\\).*torchshrink.save") as e:
        m.save_pretrained(tmp_path / "out")
    assert len(str(e.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_int8_bert_is_refused(tmp_path):
    q = ts.quantize(_bert(), ts.Int8DynamicConfig())
    with pytest.raises(OutputWriteError, match="random weights"):
        q.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_equal_layer_ffn_pruned_llama_round_trips_exactly(tmp_path):
    m = _llama()
    data = [torch.randint(0, 64, (2, 16))]
    p = ts.prune(m, ts.FfnPruneConfig(amount=0.5), data=data)
    p.save_pretrained(tmp_path / "out")
    back = tf.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    for k, v in p.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]


def test_a_folder_transformers_would_load_differently_is_refused(tmp_path):
    m = guard_save_pretrained(_bert())
    cut = copy.deepcopy(m)
    with torch.no_grad():  # an attention narrower than the config says: transformers cannot rebuild it alone
        a = cut.encoder.layer[0].attention.self
        a.query = torch.nn.Linear(32, 16)
        a.key = torch.nn.Linear(32, 16)
    guard_save_pretrained(cut)
    with pytest.raises(OutputWriteError, match="transformers alone would load this folder with"):
        cut.save_pretrained(tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []
    m.save_pretrained(tmp_path / "good")  # the untouched model writes normally
    assert (tmp_path / "good" / "config.json").is_file()


def test_a_head_pruned_bert_writes_only_for_torchshrinks_loader(tmp_path):
    from torchshrink.prune.structured import from_pretrained

    m, batch = _bert(), {"input_ids": torch.randint(0, 50, (2, 8))}
    p = ts.prune(m, ts.HeadPruneConfig(amount=0.5), data=[batch])
    with pytest.raises(OutputWriteError, match="pass torchshrink_loader=True"):
        p.save_pretrained(tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    p.save_pretrained(tmp_path / "hf", torchshrink_loader=True)
    back = from_pretrained(tmp_path / "hf")
    assert torch.allclose(back(**batch).last_hidden_state, p(**batch).last_hidden_state, atol=1e-5)


def test_gpt2_conv1d_layers_are_reached_and_still_save_for_transformers(tmp_path):
    """GPT-2's Conv1D layers (weights stored (in, out)) are the Linear layers they equal for every technique, so
    INT8 reaches all of them, not just lm_head; a pruned GPT-2 still writes a folder transformers loads exactly."""
    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                         eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (2, 12))
    q = ts.quantize(m, ts.Int8DynamicConfig())
    assert len(ts.report(q)[-1].changed) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp.c_proj per block + lm_head
    assert "conv1d_as_linear" in ts.report(q)[-1].notes
    assert type(m.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the input is untouched
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(ids).logits.flatten(), m(ids).logits.flatten(), dim=0) > 0.99
    p = ts.prune(m, ts.UnstructuredConfig(sparsity=0.5))
    p.save_pretrained(tmp_path / "hf")
    back = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert type(back.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, p(ids).logits, atol=1e-5)
