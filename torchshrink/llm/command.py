"""``torchshrink lm ...``: language-model commands (wired in by ``register(app)`` from torchshrink/cli.py)."""

from __future__ import annotations

from pathlib import Path

import typer

MODEL_HELP = "zoo:smollm2, FILE.gguf, a Hugging Face causal-LM folder, or a folder `torchshrink lm compress` wrote"
TEXT_HELP = ("a UTF-8 text file (paragraphs separated by blank lines; the last 20% are held out for evaluation); "
             "default: the Debian documentation prose `make llm` installs")


def quiet() -> None:
    """No transformers progress bars on the terminal: a command prints its result, or one error line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def register(app: typer.Typer) -> None:
    """Add the ``lm`` command group to the torchshrink typer app."""
    from torchshrink.cli_support import friendly, out, positive

    lm = typer.Typer(no_args_is_help=True, help="Language models: quantize (GPTQ/AWQ), sparsify, perplexity, GGUF.",
                     callback=quiet)
    app.add_typer(lm, name="lm")

    @lm.command()
    @friendly
    def compress(
        model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
        preset: str = typer.Option("llm-w4", "--preset", "-r", help="llm-w8, llm-w4, llm-w3, llm-gguf-q4_0, "
                                   "llm-gguf-q8_0, llm-sparse-50, llm-sparse-2of4"),
        out_dir: Path = typer.Option(..., "--out", "-o", help="output folder (new or empty, unless --force)"),
        data: str = typer.Option(None, "--data", "-d", help=TEXT_HELP),
        method: str = typer.Option(None, "--method", help="override: rtn, gptq, awq, awq+gptq (quantize); "
                                   "magnitude, wanda, sparsegpt (sparsify)"),
        bits: int = typer.Option(None, "--bits", help="override: 2, 3, 4 or 8"),
        group: int = typer.Option(None, "--group", help="override: 0 (per channel), 32, 64, 128"),
        sym: bool = typer.Option(None, "--sym/--asym", help="override: symmetric or asymmetric grid"),
        samples: int = typer.Option(None, "--samples", help="calibration rows (default 64)"),
        seq: int = typer.Option(None, "--seq", help="tokens per calibration row (default 512)"),
        window: int = typer.Option(None, "--window", help="perplexity window (default 512)"),
        eval_tokens: int = typer.Option(None, "--eval-tokens", help="held-out tokens to evaluate (default 8192)"),
        threads: int = typer.Option(None, "--threads", help="torch threads"),
        recover_minutes: float = typer.Option(None, "--recover-minutes", help="sparsity presets: then distill from "
                                              "the original model on the calibration rows this long (zeros kept)"),
        force: bool = typer.Option(False, "--force", help="replace an output folder torchshrink wrote"),
    ) -> None:
        """Compress a causal LM with a preset; write model/, tokenizer/, report.md (perplexity before/after)."""
        import torch

        from torchshrink.llm.pipeline import compress_lm

        for flag, v in (("--threads", threads), ("--samples", samples), ("--seq", seq), ("--window", window),
                        ("--eval-tokens", eval_tokens)):
            positive(flag, v)
        if threads:
            torch.set_num_threads(threads)
        r = compress_lm(model, preset, out_dir, data=data, force=force,
                        overrides={"method": method, "bits": bits, "group": group, "sym": sym, "samples": samples,
                                   "seq": seq, "window": window, "eval_tokens": eval_tokens,
                                   "recover_minutes": recover_minutes})
        b, a = r["perplexity_before"], r["perplexity_after"]
        out.print(f"{r['applied']['what']}: perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f} "
                  f"({r['increase_pct']:+.2f}%) on {a['tokens']} held-out tokens; {r['text']}")
        out.print(f"wrote {out_dir}/ (model/, tokenizer/, report.md, report.json{', model.gguf' if 'gguf' in r else ''})")

    @lm.command("perplexity")
    @friendly
    def perplexity_cmd(
        model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
        data: str = typer.Option(None, "--data", "-d", help=TEXT_HELP),
        window: int = typer.Option(512, "--window", help="tokens per window"),
        eval_tokens: int = typer.Option(8192, "--eval-tokens", help="held-out tokens to evaluate"),
    ) -> None:
        """Perplexity of a causal LM on held-out text (the same split `lm compress` evaluates on)."""
        from torchshrink.llm.models import load_causal_lm
        from torchshrink.llm.perplexity import perplexity
        from torchshrink.llm.pipeline import lm_text, resolve

        positive("--window", window)
        positive("--eval-tokens", eval_tokens)
        net, tok = load_causal_lm(model)
        o = resolve("llm-w4", {"window": window, "eval_tokens": eval_tokens, "samples": 1, "seq": window})
        t = lm_text(tok, data, o)
        p = perplexity(net, t["eval"], window=window)
        out.print(f"perplexity {p['perplexity']:.3f} on {p['tokens']} scored tokens (windows of {window}); "
                  f"{t['eval_text']}")

    @lm.command("export-gguf")
    @friendly
    def export_gguf_cmd(
        model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
        out_file: Path = typer.Option(..., "--out", "-o", help="the .gguf file to write"),
        qtype: str = typer.Option("Q8_0", "--type", "-t", help="F32, F16, Q8_0, Q4_0, Q4_1 (a quantized folder "
                                  "keeps its own codes; float weights are rounded to nearest)"),
        embedding_type: str = typer.Option("Q8_0", "--embedding-type", help="type of the token embedding"),
        source: Path = typer.Option(None, "--source", help="GGUF file to copy tokenizer and metadata from "
                                    "(default: the one the model came from)"),
    ) -> None:
        """Write a Llama-family LM as a GGUF file for llama.cpp / ollama / LM Studio."""
        from torchshrink.core.errors import ConfigError
        from torchshrink.llm.gguf_export import export_gguf
        from torchshrink.llm.models import load_causal_lm

        if out_file.exists():
            raise ConfigError(f"{out_file} exists; choose a new file name")
        net, _ = load_causal_lm(model)
        r = export_gguf(net, out_file, qtype, source=source, embedding_type=embedding_type)
        out.print(f"wrote {out_file}: {r['qtype']}, {r['bytes'] / 1e6:.2f} MB, {r['bits_per_weight']} bits/weight; "
                  f"decoded back to the evaluated weights (largest difference {r['max_decode_diff']:.3g})")

    @lm.command("generate")
    @friendly
    def generate_cmd(
        model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
        prompt: str = typer.Option(..., "--prompt", "-p", help="the text to continue"),
        new_tokens: int = typer.Option(64, "--new", "-n", help="tokens to generate (greedy)"),
        engine: str = typer.Option("auto", "--engine", help="auto: torchshrink's int4/int8 decode kernels for a model "
                                   "`lm compress` quantized, else transformers; native (a float model's Linears are "
                                   "rounded to 8-bit groups for it); transformers"),
        kv: str = typer.Option("fp32", "--kv", help="KV cache of the transformers path: fp32, int8, int4"),
        prefill: str = typer.Option("auto", "--prefill", help="the native engine's prompt path: auto (prompts of 64 "
                                    "tokens or more: engine, bf16 and int8 GEMMs timed here on the prompt's length, "
                                    "the fastest kept), engine, bf16, int8"),
        threads: int = typer.Option(None, "--threads", help="threads"),
    ) -> None:
        """Greedy continuation of a prompt, with tokens/s on this machine."""
        import time

        import torch

        from torchshrink.core.errors import ConfigError
        from torchshrink.llm.models import load_causal_lm

        positive("--new", new_tokens)
        positive("--threads", threads)
        if engine not in ("auto", "native", "transformers"):
            raise ConfigError(f"--engine {engine!r}; allowed: auto, native, transformers")
        if prefill not in ("auto", "engine", "bf16", "int8"):
            raise ConfigError(f"--prefill {prefill!r}; allowed: auto, engine, bf16, int8")
        if kv not in ("fp32", "int8", "int4"):
            raise ConfigError(f"--kv {kv!r}; allowed: fp32, int8, int4")
        if threads:
            torch.set_num_threads(threads)
        net, tok = load_causal_lm(model)
        ids = tok(prompt, return_tensors="pt").input_ids
        if ids.numel() == 0:
            raise ConfigError("--prompt gives no tokens; give some text")
        from torchshrink.llm.modules import PackedLinear

        dec = None
        if engine == "auto":
            engine = "native" if any(isinstance(m, PackedLinear) for m in net.modules()) else "transformers"
        if engine == "native" and kv == "fp32":
            from torchshrink.llm.decode import Decoder

            dec = Decoder.from_model(net, max_len=ids.numel() + new_tokens)
            from torchshrink.llm.prefill import choose_prefill, prefill_model

            if prefill in ("bf16", "int8"):
                dec.prefill_with, dec.prefill_mode = prefill_model(net, prefill), prefill
            elif prefill == "auto" and ids.numel() >= 64:
                pick = choose_prefill(dec, net, tokens=ids.numel(), rounds=1)
                out.print("prefill paths timed on a prompt of this length: " + ", ".join(
                    f"{k} {v:.2f} s" for k, v in pick["seconds"].items()) + f"; using {pick['chosen']}")
        elif engine == "native":
            raise ConfigError("--engine native keeps an fp32 KV cache; --kv int8/int4 is for --engine transformers")
        if dec is not None:
            r = dec.generate(ids[0], new_tokens, eos=tok.eos_token_id)
            new, what = r["tokens"], (f"torchshrink decode kernels ({dec.nbytes() / 1e6:.1f} MB of weights), prompt "
                                      f"of {ids.numel()} tokens in {r['prefill_s']:.2f} s ({dec.prefill_mode} prefill)")
            speed = r["tokens_per_s"]
        else:
            from torchshrink.llm.kvcache import cache_kwarg, quantized_cache

            extra = {} if kv == "fp32" else {cache_kwarg(net): quantized_cache(net, 8 if kv == "int8" else 4)}
            t0 = time.perf_counter()
            with torch.inference_mode():
                out_ids = net.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=tok.eos_token_id, **extra)
            new = out_ids[0, ids.shape[1]:].tolist()
            speed, what = len(new) / (time.perf_counter() - t0), f"transformers generate ({kv} KV cache)"
        out.print(prompt + tok.decode(new, skip_special_tokens=True))
        out.print(f"{len(new)} tokens, {speed:.1f} tokens/s; {what}")
