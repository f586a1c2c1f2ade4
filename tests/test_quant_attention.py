"""Encoder self-attention on torchshrink's C kernel (quant/_attn.c, quant/attention.py): equal to torch's SDPA
on odd shapes, masks and strided (fused Q/K/V) inputs, swapped into BERT blocks only where it reproduces them,
and saved / reloaded."""

import copy

import pytest
import torch
import torch.nn.functional as F

import torchshrink
from tests.conftest import tiny_bert
from torchshrink.quant import attention as A
from torchshrink.quant import kernels

torch.set_num_threads(2)
needs_c = pytest.mark.skipif(not kernels.available(), reason="no C compiler: only the torch fallback runs")


def _sdpa(q, k, v, heads, mask):
    b, s, w = q.shape
    q4, k4, v4 = (t.reshape(b, s, heads, w // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask).transpose(1, 2).reshape(b, s, w)


@pytest.mark.parametrize("c", [True, False])
@pytest.mark.parametrize("b,s,h,d", [(2, 19, 3, 24), (3, 37, 5, 64), (1, 5, 2, 16), (4, 33, 4, 32)])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "per-query float"])
def test_kernel_equals_sdpa(monkeypatch, c, b, s, h, d, mask_kind):
    if not c:
        monkeypatch.setenv("TORCHSHRINK_KERNELS", "torch")
    elif not kernels.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(b * s + d)
    qkv = torch.randn(b, s, 3 * h * d, generator=g) * 2  # one fused projection: strided slices
    q, k, v = qkv.split(h * d, -1)
    if mask_kind == "padding":
        keep = torch.rand(b, s, generator=g) > 0.3
        keep[:, 0] = True
        mask = keep[:, None, None, :].expand(b, 1, s, s)  # as transformers builds it for SDPA
    elif mask_kind == "per-query float":
        mask = torch.randn(b, 1, s, s, generator=g) * 3
    else:
        mask = None
    ref = _sdpa(q, k, v, h, mask)
    got = A.encoder_attention(q, k, v, h, d ** -0.5, A.additive_mask(mask, b, s))
    assert got.shape == (b, s, h * d)
    assert float((got - ref).abs().max()) < 2e-5 * float(ref.abs().max())
    contiguous = A.encoder_attention(q.contiguous(), k.contiguous(), v.contiguous(), h, d ** -0.5,
                                     A.additive_mask(mask, b, s))
    assert torch.allclose(contiguous, got, atol=1e-6)


@needs_c
def test_fully_masked_query_gives_zeros_and_others_are_unaffected():
    b, s, h, d = 2, 9, 2, 16
    q, k, v = (torch.randn(b, s, h * d) for _ in range(3))
    mask = torch.ones(b, 1, s, s, dtype=torch.bool)
    mask[0, 0, 3] = False  # query 3 of batch 0 may attend to nothing
    got = A.encoder_attention(q, k, v, h, 0.25, A.additive_mask(mask, b, s))
    assert torch.equal(got[0, 3], torch.zeros(h * d))
    ref = _sdpa(q, k, v, h, None)
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[0, 3] = False
    assert torch.allclose(got[keep], ref[keep], atol=1e-5)


def test_additive_mask_forms_and_bad_shape():
    keep = torch.tensor([[True, True, False]])
    expanded = keep[:, None, None, :].expand(1, 1, 3, 3)
    m = A.additive_mask(expanded, 1, 3)
    assert m.shape == (1, 1, 1, 3) and m[0, 0, 0, 2] == A.MASKED and m[0, 0, 0, 0] == 0  # one row, not 3
    eager = torch.zeros(1, 1, 3, 3).masked_fill(~expanded, torch.finfo(torch.float32).min)
    assert A.additive_mask(eager, 1, 3).shape == (1, 1, 3, 3)
    assert A.additive_mask(None, 1, 3) is None
    with pytest.raises(ValueError, match=r"expected \[batch, 1, 1 or 3, 3\]"):
        A.additive_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool), 1, 3)


def _padded(data):
    out = []
    for ids, am in data:
        am = am.clone()
        am[1, 11:] = 0
        am[3, 5:] = 0
        out.append((ids, am))
    return out


def test_float_bert_blocks_swapped_equal_and_round_trip(tmp_path):
    m, data = tiny_bert()
    data = _padded(data)
    fused = copy.deepcopy(m)
    names, why = A.fuse_attention(fused, torchshrink.core.data.Batch(tuple(data[0])))
    assert why is None and names == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    assert all(isinstance(fused.get_submodule(n), A.NativeSelfAttention) for n in names)
    assert set(fused.state_dict()) == set(m.state_dict())  # the children keep their names
    ids, am = data[1]
    with torch.no_grad():
        ref, got = m(ids, am).last_hidden_state, fused(ids, am).last_hidden_state
    assert float((ref - got).abs().max()) < 1e-5
    torchshrink.save(fused, tmp_path / "f")
    back = torchshrink.load(tmp_path / "f", model=tiny_bert()[0])
    assert isinstance(back.encoder.layer[1].attention.self, A.NativeSelfAttention)
    with torch.no_grad():
        assert torch.equal(back(ids, am).last_hidden_state, got)


def test_bert_int8_recipe_runs_attention_on_the_kernel(tmp_path):
    from torchshrink.recipe.recipe import load_recipe

    m, data = tiny_bert()
    data = _padded(data)
    (stage,) = load_recipe("bert-int8").stages
    q = torchshrink.quantize(m, stage.config, select=stage.select, data=data)
    assert "attention on torchshrink's kernel in 2 blocks" in torchshrink.report(q)[-1].notes["backend"]
    plain = torchshrink.quantize(m, stage.config.replace(fuse_attention=False), select=stage.select, data=data)
    assert not any(isinstance(x, A.NativeSelfAttention) for x in plain.modules())
    ids, am = data[1]
    with torch.no_grad():
        a, b, ref = plain(ids, am).last_hidden_state, q(ids, am).last_hidden_state, m(ids, am).last_hidden_state
    assert float(F.cosine_similarity(a.flatten(1), b.flatten(1)).min()) > 0.999
    assert float(F.cosine_similarity(ref.flatten(1), b.flatten(1)).min()) > 0.99
    torchshrink.save(q, tmp_path / "q")
    back = torchshrink.load(tmp_path / "q", model=tiny_bert()[0])
    with torch.no_grad():
        assert torch.equal(back(ids, am).last_hidden_state, b)


def test_blocks_that_do_not_fit_stay_on_torch(monkeypatch, caplog):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, is_decoder=True)
    dec = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    assert A.attention_blocks(dec) == []  # causal self-attention is not an encoder block
    ids = torch.randint(0, 50, (2, 7))
    assert A.fuse_attention(dec, torchshrink.core.data.Batch((ids,)))[1] == "no BERT-style self-attention block"
    m, data = tiny_bert()
    assert A.fuse_attention(m, None) == ([], "no calibration batch to check the swap on")
    # a kernel that returns something else: every block stays as it was, with the reason logged
    monkeypatch.setattr(A, "encoder_attention", lambda q, k, v, h, s, mask, bf16=False: q * 0)
    names, why = A.fuse_attention(m, torchshrink.core.data.Batch(tuple(data[0])))
    assert names == [] and why == "its output differs"
    assert type(m.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    assert "not in 2 (its output differs)" in caplog.text


def test_onnx_export_of_the_swapped_blocks_runs_the_same_attention(tmp_path):
    from torchshrink.export.onnx import export_twin

    m, data = tiny_bert()
    data = _padded(data)
    fused = copy.deepcopy(m)
    A.fuse_attention(fused, torchshrink.core.data.Batch(tuple(data[0])))
    twin = export_twin(fused)
    assert sum(type(x).__name__ == "_ExportAttention" for x in twin.modules()) == 2
    ids, am = data[1]
    with torch.no_grad():
        ref, got = fused(ids, am).last_hidden_state, twin(ids, am).last_hidden_state
    assert float((ref - got).abs().max()) < 1e-5
    ort = pytest.importorskip("onnxruntime")
    from torchshrink.deploy.runtimes import OrtModule, write_onnx

    path = write_onnx(fused, (ids, am), tmp_path / "m.onnx")
    out = OrtModule(path, 1)(ids, am)
    out = out[0] if isinstance(out, tuple | list) else out
    assert ort is not None and float((torch.as_tensor(out) - ref).abs().max()) < 1e-4


def test_mask_conversion_is_reused_for_the_same_tensor_only():
    keep = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    first = A.additive_mask(keep, 2, 4)
    assert A.additive_mask(keep, 2, 4) is first  # the next block of the same forward
    keep[0, 0, 1, 2] = False  # changed in place: converted again
    again = A.additive_mask(keep, 2, 4)
    assert again is not first and again[0, 0, 1, 2] == A.MASKED
    other = keep.clone()
    assert A.additive_mask(other, 2, 4) is not again


@pytest.mark.parametrize("c", [True, False])
@pytest.mark.parametrize("b,h,hkv,sq,skv,d,causal", [(1, 9, 3, 37, 37, 64, True), (2, 4, 2, 19, 19, 24, True),
                                                      (1, 6, 3, 5, 21, 64, True), (2, 4, 4, 13, 13, 32, False)])
def test_general_kernel_grouped_causal_and_strided(monkeypatch, c, b, h, hkv, sq, skv, d, causal):
    if not c:
        monkeypatch.setenv("TORCHSHRINK_KERNELS", "torch")
    elif not kernels.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(sq * d)
    q = torch.randn(b, sq, h, d, generator=g).transpose(1, 2)  # transformers' views of [B, S, H, D] projections
    k = torch.randn(b, skv, hkv, d, generator=g).transpose(1, 2)
    v = torch.randn(b, hkv, skv, d, generator=g)  # and a contiguous one
    rep = h // hkv
    allowed = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq) if causal else None
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed)
    got = A.attention(q, k, v, d ** -0.5, causal, None)
    assert got.shape == (b, sq, h * d)
    assert float((got - ref.transpose(1, 2).reshape(b, sq, h * d)).abs().max()) < 1e-5


def test_transformers_attention_function_on_a_llama():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    m = tf.LlamaForCausalLM(cfg).eval()
    fast = copy.deepcopy(m)
    A.use_hf_attention(fast)
    assert m.config._attn_implementation != "torchshrink"  # the copy only
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 23, dtype=torch.long)
    am[1, :4] = 0  # left padding: a mask instead of the causal flag
    with torch.no_grad():
        for kw in ({}, {"attention_mask": am}):
            a, b = m(input_ids=ids, **kw).logits, fast(input_ids=ids, **kw).logits
            keep = slice(None) if not kw else (am.bool())
            assert float((a[keep] - b[keep]).abs().max()) < 1e-4
        # a prompt, then one token against the cache (the causal offset of a later query)
        out_a = m(input_ids=ids[:1, :20], use_cache=True)
        out_b = fast(input_ids=ids[:1, :20], use_cache=True)
        na = m(input_ids=ids[:1, 20:21], past_key_values=out_a.past_key_values).logits
        nb = fast(input_ids=ids[:1, 20:21], past_key_values=out_b.past_key_values).logits
    assert float((na - nb).abs().max()) < 1e-4


def _has_bf16():
    from torchshrink.core import native

    lib = native.library()
    return lib is not None and bool(lib.ts_has_bf16())


@pytest.mark.parametrize("b,h,hkv,sq,skv,d,causal", [(1, 9, 3, 37, 37, 64, True), (2, 4, 4, 13, 13, 32, False),
                                                      (1, 6, 3, 5, 21, 64, True), (3, 2, 2, 33, 33, 32, False)])
def test_bf16_products_stay_within_bfloat16_rounding(b, h, hkv, sq, skv, d, causal):
    if not kernels.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(sq * d + 1)
    q = torch.randn(b, sq, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, skv, hkv, d, generator=g).transpose(1, 2)
    v = torch.randn(b, hkv, skv, d, generator=g)
    mask = torch.zeros(b, 1, 1, skv)
    mask[0, ..., skv // 2:] = A.MASKED  # half the keys of the first sequence padded
    ref = A.attention(q, k, v, d ** -0.5, causal, mask)
    got = A.attention(q, k, v, d ** -0.5, causal, mask, True)
    err = float((got - ref).abs().max() / ref.abs().max())
    if _has_bf16():
        assert 0 < err < 1.5e-2  # bfloat16 products (8-bit mantissa), float32 sums
    else:
        assert err == 0  # no AVX-512 BF16 here: the float32 kernel
    # a head size that is not a multiple of 32 always runs in float32
    q16, k16, v16 = (t[..., :16] for t in (q, k, v))
    assert torch.equal(A.attention(q16, k16, v16, 0.25, causal, mask, True), A.attention(q16, k16, v16, 0.25, causal, mask))


def test_bert_int8_with_bf16_attention_swaps_checks_and_round_trips(tmp_path):
    from torchshrink.recipe.recipe import load_recipe

    m, data = tiny_bert()
    data = _padded(data)
    (stage,) = load_recipe("bert-int8").stages
    q = torchshrink.quantize(m, stage.config.replace(attention_bf16=True), select=stage.select, data=data)
    blocks = [x for x in q.modules() if isinstance(x, A.NativeSelfAttention)]
    assert len(blocks) == 2 and all(x.bf16 for x in blocks)
    fp = torchshrink.quantize(m, stage.config, select=stage.select, data=data)
    ids, am = data[1]
    with torch.no_grad():
        a, b = fp(ids, am).last_hidden_state, q(ids, am).last_hidden_state
    assert float(F.cosine_similarity(a.flatten(1), b.flatten(1)).min()) > 0.99
    torchshrink.save(q, tmp_path / "q")
    back = torchshrink.load(tmp_path / "q", model=tiny_bert()[0])
    assert all(x.bf16 for x in back.modules() if isinstance(x, A.NativeSelfAttention))
    with torch.no_grad():
        assert torch.equal(back(ids, am).last_hidden_state, b)
