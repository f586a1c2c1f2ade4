"""`torchshrink lm ...` on a user's own tiny causal LM folder and text file: the compressed folder reloads
with the perplexity it reports; bad input is one line, exit code 2, nothing written."""

import json

import pytest
import torch
from typer.testing import CliRunner

from torchshrink.cli import app
from torchshrink.core import native

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
runner = CliRunner()
WORDS = ("the package manager resolves every dependency and installs each archive from a mirror in order "
         "while the administrator reads the log of changes before upgrading the system").split()


def _folder(tmp_path, causal=True):
    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", "[EOS]", *dict.fromkeys(WORDS)])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)) if causal else tf.ViTModel(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8))
    d = tmp_path / ("lm" if causal else "enc")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def _text(tmp_path, paragraphs=20):
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "text.txt"
    p.write_text("\n\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g))
                             for _ in range(paragraphs)))
    return p


def run(*args):
    res = runner.invoke(app, ["lm", *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def _one_line(code, err, needle):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err)


SMALL = ("--samples", 4, "--seq", 16, "--window", 16, "--eval-tokens", 96)


def test_compress_reports_perplexity_and_the_folder_reloads_with_it(tmp_path):
    model, text, out = _folder(tmp_path), _text(tmp_path), tmp_path / "out"
    code, stdout, err = run("compress", "-m", model, "-r", "llm-w4", "--method", "gptq", "--group", 32, "--data", text,
                            "-o", out, *SMALL)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["applied"]["what"] == "gptq W4 g32 asym clip" and rep["perplexity_after"]["tokens"] == 6 * 15
    assert "text.txt: 16 calibration paragraphs (4 x 16 tokens used), 4 held-out paragraphs" in rep["text"]
    code, stdout, err = run("perplexity", "-m", out, "--data", text, "--window", 16, "--eval-tokens", 96)
    assert code == 0, err
    assert f"perplexity {rep['perplexity_after']['perplexity']:.3f} on 90 scored tokens" in stdout.replace("\n", " ")
    assert sorted(p.name for p in out.iterdir()) == [".torchshrink-run", "model", "report.json", "report.md", "tokenizer"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    model, out = _folder(tmp_path), tmp_path / "out"
    _one_line(*run("compress", "-m", model, "--data", _text(tmp_path, 3), "-o", out, *SMALL)[::2],
              "3 paragraph(s); give at least 5")
    _one_line(*run("compress", "-m", model, "--data", _text(tmp_path), "-o", out, "--window", 4096)[::2],
              "fewer than one window of 4096")
    _one_line(*run("compress", "-m", model, "-r", "llm-w5", "-o", out)[::2], "unknown language-model preset 'llm-w5'")
    _one_line(*run("compress", "-m", model, "--group", 48, "--data", _text(tmp_path), "-o", out, *SMALL)[::2],
              "group=48 must be 0 (per channel) or a power of two")
    _one_line(*run("compress", "-m", _folder(tmp_path, causal=False), "--data", _text(tmp_path), "-o", out)[::2],
              "has no causal-LM head")
    _one_line(*run("export-gguf", "-m", model, "-o", tmp_path / "x.gguf")[::2],
              "copies the tokenizer and metadata from the GGUF file")
    assert not out.exists() and not (tmp_path / "x.gguf").exists()
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.skipif(native.library() is None, reason="no native library: the decode engine needs it")
def test_generate_runs_a_compressed_folder_on_the_decode_kernels(tmp_path):
    model, text, out = _folder(tmp_path), _text(tmp_path), tmp_path / "out"
    assert run("compress", "-m", model, "-r", "llm-w4", "--method", "rtn", "--group", 32, "--data", text, "-o", out,
               *SMALL)[0] == 0
    code, stdout, err = run("generate", "-m", out, "-p", "the package manager", "-n", 5)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("the package manager") and "torchshrink decode kernels" in " ".join(stdout.split())
    # the same model through transformers with an int8 KV cache: the same greedy tokens on this tiny model
    code, stdout2, err = run("generate", "-m", out, "-p", "the package manager", "-n", 5, "--engine", "transformers",
                             "--kv", "int8")
    assert code == 0, err
    assert "transformers generate (int8 KV cache)" in stdout2
    # a float folder under auto: transformers (its weights are not rounded behind the user's back)
    code, stdout3, err = run("generate", "-m", model, "-p", "the package manager", "-n", 3)
    assert code == 0 and "transformers generate (fp32 KV cache)" in stdout3, err
    # a long prompt under --prefill auto: the engine and both GEMM paths timed on it, the choice said
    code, stdout4, err = run("generate", "-m", out, "-p", "the package manager " * 30, "-n", 2)
    flat = " ".join(stdout4.split())  # the console wraps long lines
    assert code == 0 and "prefill paths timed" in flat and "engine" in flat and " prefill)" in flat, err
    code, stdout5, err = run("generate", "-m", out, "-p", "the package manager", "-n", 2, "--prefill", "bf16")
    assert code == 0 and "(bf16 prefill)" in " ".join(stdout5.split()), err
    _one_line(*run("generate", "-m", out, "-p", "x", "--prefill", "fp8")[::2], "allowed: auto, engine, bf16, int8")
    _one_line(*run("generate", "-m", out, "-p", "x", "--kv", "int3")[::2], "--kv 'int3'; allowed: fp32, int8, int4")
    _one_line(*run("generate", "-m", out, "-p", "x", "--engine", "native", "--kv", "int8")[::2], "--engine transformers")
    _one_line(*run("generate", "-m", _folder(tmp_path, causal=False), "-p", "x")[::2], "has no causal-LM head")


def test_sparse_preset_with_recovery_keeps_the_pattern_and_reports_it(tmp_path):
    model, text, out = _folder(tmp_path), _text(tmp_path), tmp_path / "out"
    code, stdout, err = run("compress", "-m", model, "-r", "llm-sparse-2of4", "--recover-minutes", 0.01, "--data", text,
                            "-o", out, *SMALL)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert "distillation" in rep["applied"]["what"] and rep["applied"]["recovery"]["steps"] >= 1
    import torchshrink

    back = torchshrink.load(out / "model")
    w = back.model.layers[0].mlp.down_proj.weight.reshape(-1, 4)
    assert int((w == 0).sum(-1).min()) >= 2  # 2:4 survived the training
    _one_line(*run("compress", "-m", model, "-r", "llm-w4", "--recover-minutes", 1, "--data", text, "-o",
                   tmp_path / "o2", *SMALL)[::2], "applies to the sparsity presets")
