"""The int8 / int4 per-token KV cache (torchshrink.llm.kvcache) and perplexity's ``kv_bits``, on tiny
Llama configs (no download)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import ConfigError, ModelLoadError, TorchshrinkError, UnsupportedLayerError
from torchshrink.llm.kvcache import (
    KV_BITS,
    bytes_per_token,
    cache_kwarg,
    dequantize_tokens,
    kv_bytes,
    quantize_tokens,
    quantized_cache,
)
from torchshrink.llm.perplexity import perplexity

tf = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _llama(**over):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY, **over})).eval()


def _ids(batch=2, length=12, seed=0):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids, cache=None):
    with torch.no_grad():
        if cache is None:
            return model(input_ids=ids, use_cache=False).logits
        return model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits


# ---------------------------------------------------------------- quantize / dequantize round trip

def _x(shape=(2, 3, 5, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.linspace(0.1, 4.0, shape[-1])  # channels of different range
    x[0, 0, 0] = 0.0  # an all-zero vector must round-trip to zero, not NaN
    return x


def test_int8_round_trip_within_half_a_step_per_vector():
    x = _x()
    codes, scale, zero = quantize_tokens(x, 8, 32)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and zero is None
    assert scale.shape == (*x.shape[:-1], 1)
    assert torch.allclose(scale, x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127)
    assert int(codes.abs().max()) <= 127
    back = dequantize_tokens(codes, scale, zero, 8, 32, torch.float32)
    assert back.shape == x.shape and back.dtype == torch.float32
    err = (back - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-7).all())
    assert torch.equal(back[0, 0, 0], torch.zeros(64))
    # the largest magnitude of every vector is exact (it maps to +-127)
    idx = x.abs().argmax(-1, keepdim=True)
    assert torch.allclose(back.gather(-1, idx), x.gather(-1, idx), rtol=1e-6, atol=0)
    # and the dtype asked for is the dtype returned
    assert dequantize_tokens(codes, scale, zero, 8, 32, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("group", [16, 32])
def test_int4_round_trip_within_half_a_step_per_group_and_packed(group):
    x = _x(seed=group)
    d = x.shape[-1]
    codes, scale, zero = quantize_tokens(x, 4, group)
    assert codes.dtype == torch.uint8 and codes.shape == (*x.shape[:-1], d // 2)  # two codes per byte
    assert scale.shape == (*x.shape[:-1], d // group) and zero.shape == scale.shape
    g = x.reshape(*x.shape[:-1], d // group, group)
    assert torch.allclose(zero, g.amin(-1))
    assert torch.allclose(scale, ((g.amax(-1) - g.amin(-1)) / 15).clamp_min(1e-8))
    back = dequantize_tokens(codes, scale, zero, 4, group, torch.float32)
    assert back.shape == x.shape
    err = (back - x).reshape(g.shape).abs()
    assert bool((err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-6).all())
    assert float(err.max()) > 0  # 4 bits over a real range do lose something
    # both nibbles carry information: unpacking low / high halves gives the even / odd channels' codes
    q = torch.round((g - zero[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(x.shape)
    assert torch.equal(codes & 15, q[..., 0::2]) and torch.equal(codes >> 4, q[..., 1::2])


def test_int4_error_larger_than_int8_error():
    x = _x(seed=3)
    e8 = (dequantize_tokens(*quantize_tokens(x, 8, 32), 8, 32, torch.float32) - x).abs().mean()
    e4 = (dequantize_tokens(*quantize_tokens(x, 4, 32), 4, 32, torch.float32) - x).abs().mean()
    assert e4 > 2 * e8


# ---------------------------------------------------------------- forwards through the cache

def test_forward_with_quantized_cache_is_close_to_plain_forward():
    m = _llama()
    ids = _ids()
    ref = _forward(m, ids)
    big = float(ref.abs().max())
    err8 = float((_forward(m, ids, quantized_cache(m, 8)) - ref).abs().max())
    out4 = _forward(m, ids, quantized_cache(m, 4))
    err4 = float((out4 - ref).abs().max())
    assert 0 < err8 < 2e-2 * big  # quantized (not a pass-through) yet close
    assert bool(torch.isfinite(out4).all()) and err4 > err8
    assert err4 < 0.2 * big


@pytest.mark.parametrize("bits", [8, 4])
def test_token_by_token_decoding_equals_whole_sequence_forward(bits):
    m = _llama()
    ids = _ids(length=12)
    whole_cache = quantized_cache(m, bits)
    whole = _forward(m, ids, whole_cache)
    cache = quantized_cache(m, bits)
    parts = [_forward(m, ids[:, :5], cache)]
    for t in range(5, ids.shape[1]):
        parts.append(_forward(m, ids[:, t:t + 1], cache))
    stepped = torch.cat(parts, 1)
    assert stepped.shape == whole.shape == (2, 12, 64)
    assert torch.allclose(stepped, whole, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == whole_cache.get_seq_length() == 12
    assert kv_bytes(cache) == kv_bytes(whole_cache)
    # and it is the quantized store that was read: a plain forward differs by more than float rounding
    assert float((whole - _forward(m, ids)).abs().max()) > 1e-4


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 16), (4, 32), (4, 64)])
def test_kv_bytes_counts_what_is_stored(bits, group):
    m = _llama(head_dim=64)  # head_dim 64, 2 KV heads, 2 layers
    b, t = 2, 10
    cache = quantized_cache(m, bits, group)
    assert kv_bytes(cache) == 0
    _forward(m, _ids(b, t), cache)
    per_tok = bytes_per_token(m, bits, group)
    assert kv_bytes(cache) == per_tok * t * b
    per_head = 64 + 4 if bits == 8 else 64 // 2 + 8 * (64 // group)
    assert per_tok == 2 * 2 * 2 * per_head  # K and V, layers, KV heads
    bf16 = bytes_per_token(m, None, dtype=torch.bfloat16)
    assert bf16 == 2 * 2 * 2 * 64 * 2 and bytes_per_token(m, None) == 2 * bf16  # fp32 default
    if bits == 8:
        assert kv_bytes(cache) < 0.55 * bf16 * t * b
    else:
        assert kv_bytes(cache) < bytes_per_token(m, 8) * t * b  # int4 (fp32 scale + zero per group) below int8
    # appending one more token adds exactly one token's bytes
    _forward(m, _ids(b, 1, seed=1), cache)
    assert kv_bytes(cache) == per_tok * (t + 1) * b


def test_kv_bytes_of_a_tiny_head_dim_model():
    m = _llama()  # head_dim 8: int4's default group is 8
    cache = quantized_cache(m, 4)
    _forward(m, _ids(1, 7), cache)
    assert kv_bytes(cache) == bytes_per_token(m, 4, 8) * 7


def test_generate_with_quantized_cache():
    m = _llama()
    ids = _ids(1, 6)
    cache = quantized_cache(m, 8)
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **{cache_kwarg(m): cache})
    assert out.shape == (1, 6 + 8) and torch.equal(out[:, :6], ids)
    assert cache.get_seq_length() == 6 + 7  # the cache given is the one generate filled (last token not fed)
    assert kv_bytes(cache) == bytes_per_token(m, 8) * 13


@pytest.mark.parametrize("bits", [8, 4])
def test_reorder_cache_moves_codes_and_scales_with_the_beams(bits):
    m = _llama()
    ids = _ids(2, 9)
    cache = quantized_cache(m, bits)
    _forward(m, ids[:, :8], cache)
    cache.reorder_cache(torch.tensor([1, 0]))
    last = _forward(m, ids.flip(0)[:, 8:], cache)
    fresh = _forward(m, ids.flip(0), quantized_cache(m, bits))[:, -1:]
    assert torch.allclose(last, fresh, atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_beam_search_with_quantized_cache():
    m = _llama()
    ids = _ids(1, 6)
    cache = quantized_cache(m, 8)
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0,
                         **{cache_kwarg(m): cache})
    assert out.shape == (3, 6 + 5) and torch.equal(out[:, :6], ids.expand(3, 6))
    assert kv_bytes(cache) > 0


def test_generate_keyword_name():
    m = _llama()
    import inspect

    want = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
    assert cache_kwarg(m) == want


# ---------------------------------------------------------------- perplexity kv_bits

@pytest.mark.parametrize("bits", [8, 4])
def test_perplexity_kv_bits_is_the_quantized_cache_perplexity(bits):
    m = _llama()
    ids = torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(0))
    plain = perplexity(m, ids, window=32)
    got = perplexity(m, ids, window=32, kv_bits=bits)
    assert got["tokens"] == plain["tokens"] == 8 * 31
    assert math.isclose(got["perplexity"], plain["perplexity"], rel_tol=1e-2)
    assert got["perplexity"] != plain["perplexity"]  # kv_bits took effect
    wins = ids.reshape(8, 32)
    nll = 0.0
    for i in range(0, 8, 4):
        x = wins[i:i + 4]
        logp = F.log_softmax(_forward(m, x, quantized_cache(m, bits))[:, :-1], -1)
        nll -= float(logp.gather(-1, x[:, 1:, None]).sum())
    assert math.isclose(got["perplexity"], math.exp(nll / (8 * 31)), rel_tol=1e-6)


def test_perplexity_kv_bits_refuses_bad_bits():
    m = _llama()
    ids = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="allowed: 8, 4"):
        perplexity(m, ids, window=32, kv_bits=3)


# ---------------------------------------------------------------- refusals

def _one_line(e):
    assert "\n" not in str(e.value) and str(e.value)


def test_refuses_bits_other_than_8_and_4():
    assert KV_BITS == (8, 4)
    m = _llama()
    for bits in (3, 16, 2):
        with pytest.raises(ConfigError, match=rf"kv bits={bits}; allowed: 8, 4") as e:
            quantized_cache(m, bits)
        _one_line(e)


@pytest.mark.parametrize("group", [16, 6, 3])
def test_refuses_int4_group_not_dividing_head_dim(group):
    m = _llama()  # head_dim 8
    with pytest.raises(ConfigError, match=rf"groups of {group} channels.*head dimension 8") as e:
        quantized_cache(m, 4, group)
    _one_line(e)
    quantized_cache(m, 4, 4)  # a dividing even group is fine
    quantized_cache(m, 8, 3)  # the group is irrelevant to int8


def test_int4_group_check_at_first_update_too():
    # a layer built by hand (bypassing quantized_cache's check) still refuses at its first update
    m = _llama()
    cache = quantized_cache(m, 4, 4)
    for layer in cache.layers:
        layer.group = 3
    with pytest.raises(ConfigError, match="groups of 3 channels"):
        _forward(m, _ids(1, 4), cache)


@pytest.mark.parametrize("make", [
    lambda: tf.MistralConfig(sliding_window=16, **TINY),
    lambda: tf.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=0, **TINY),
    lambda: tf.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, **TINY),
], ids=["mistral-sliding", "qwen2-all-sliding", "qwen2-mixed"])
def test_refuses_sliding_window_models(make):
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(make()).eval()
    with pytest.raises(UnsupportedLayerError, match="full-attention layers only") as e:
        quantized_cache(m, 8)
    _one_line(e)
    assert "sliding" in str(e.value)
    with pytest.raises(UnsupportedLayerError):
        bytes_per_token(m, 8)


@pytest.mark.parametrize("make", [
    lambda: tf.MistralConfig(sliding_window=None, **TINY),
    lambda: tf.Qwen2Config(**TINY),
], ids=["mistral-full", "qwen2-full"])
def test_accepts_full_attention_relatives(make):
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(make()).eval()
    ids = _ids(1, 6)
    ref = _forward(m, ids)
    out = _forward(m, ids, quantized_cache(m, 8))
    assert float((out - ref).abs().max()) < 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("make", [lambda: nn.Linear(4, 4), lambda: tf.LlamaModel(tf.LlamaConfig(**TINY))],
                         ids=["linear", "llama-no-head"])
def test_refuses_non_lm_modules(make):
    model = make()
    with pytest.raises(ModelLoadError, match="not a causal language model") as e:
        quantized_cache(model, 8)
    assert isinstance(e.value, TorchshrinkError)
    _one_line(e)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        bytes_per_token(model, 8)


def test_bytes_per_token_default_group_matches_the_cache_default():
    m = _llama()  # head_dim 8
    cache = quantized_cache(m, 4)
    _forward(m, _ids(1, 7), cache)
    assert kv_bytes(cache) == bytes_per_token(m, 4) * 7
