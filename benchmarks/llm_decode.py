"""Decoding zoo:smollm2 at batch 1 (#22): torchshrink's int8 KV cache, and its decode engine on its own
int4 / int8 GEMV kernels against transformers' generate (fp32, bf16) and llama.cpp (Q4_0, Q8_0) in one
interleaved run on this machine.

* ``kv``: perplexity of the fp32 model on held-out prose (8,192 tokens, windows of 512) with keys and values
  read back from the int8 / int4 cache (every key and value quantized, as in token-by-token decoding), and
  the cache's bytes per token.
* ``speed``: greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt, medians of ``--reps``
  interleaved rounds (tokens/s over the new tokens), and a 512-token prefill. W4 = W4 g64 asym RTN codes
  (GPTQ / AWQ codes have the same layout and run at the same speed) with the LM head and embeddings in
  8-bit groups of 64; W8 = every Linear and the head in 8-bit groups of 64. llama.cpp files: the F32 GGUF
  torchshrink exports, quantized by llama.cpp's own quantizer (bench extra: llama-cpp-python).
  Quality of the engine: its perplexity (token by token) on the first ``--engine-tokens`` evaluation tokens
  next to the torch model it was built from, same windows.

Run: .venv/bin/python benchmarks/llm_decode.py [--check] [--part kv|speed|all] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from torchshrink.llm import load_causal_lm, perplexity  # noqa: E402
from torchshrink.llm.decode import Decoder  # noqa: E402
from torchshrink.llm.kvcache import bytes_per_token  # noqa: E402
from torchshrink.llm.perplexity import calibration_and_eval  # noqa: E402
from torchshrink.llm.sequential import quantize_lm  # noqa: E402
from torchshrink.llm.wquant import Grid  # noqa: E402
from torchshrink.measure.bench import Target, markdown_table, previous_results, write_results  # noqa: E402

OUT = Path(__file__).parent / "results"


def engine_perplexity(dec: Decoder, ids: torch.Tensor, window: int = 512) -> float:
    nll, count = 0.0, 0
    for w in ids[: ids.numel() // window * window].reshape(-1, window):
        logp = F.log_softmax(dec.logits(w)[:-1].double(), -1)
        nll -= float(logp.gather(-1, w[1:, None]).sum())
        count += window - 1
    return math.exp(nll / count)


class HF:
    """transformers' generate / forward on one model (greedy, no stop at EOS)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def decode(self, prompt: list[int], new: int) -> float:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True)  # the prefill, timed apart as in the others
        t1 = time.perf_counter()
        self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        t2 = time.perf_counter()
        del out
        return new / max((t2 - t1) - (t1 - t0), 1e-9)  # generate's own prefill taken out

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> float:
        t0 = time.perf_counter()  # the last token's logits only, as generate's own prefill computes them
        self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


class Engine:
    def __init__(self, dec: Decoder) -> None:
        self.dec = dec

    def decode(self, prompt: list[int], new: int) -> float:
        r = self.dec.generate(prompt, new)
        return r["tokens_per_s"]

    def prefill(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self.dec.reset()
        self.dec.prefill(ids)  # in chunks (Decoder.chunk tokens a call)
        return time.perf_counter() - t0


class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int = 1024) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def decode(self, prompt: list[int], new: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        t0 = time.perf_counter()
        n = 0
        for _ in range(new):  # greedy: the argmax of the last logits, fed back (llama.cpp computes one token a step)
            tok = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            self.llm.eval([tok])
            n += 1
        return n / (time.perf_counter() - t0)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--part", choices=["kv", "speed", "all"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engine-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prev = previous_results("llm_decode", a.out, keep=a.part != "all")
    model, tok = load_causal_lm("zoo:smollm2")
    text = calibration_and_eval(tok, 1, 8192)
    ids = text["eval"]
    kv = prev.get("kv", {})
    if a.part in ("kv", "all"):
        base = perplexity(model, ids)
        kv = {"fp32": base["perplexity"], "tokens": base["tokens"], "rows": []}
        for bits in (8, 4):
            p = perplexity(model, ids, kv_bits=bits)["perplexity"]
            kv["rows"].append({"bits": bits, "perplexity": p, "increase_pct": 100 * (p / base["perplexity"] - 1),
                               "bytes_per_token": bytes_per_token(model, bits)})
            print(json.dumps(kv["rows"][-1]), flush=True)
        kv["fp32_bytes"] = bytes_per_token(model, None)
        kv["bf16_bytes"] = bytes_per_token(model, None, dtype=torch.bfloat16)
    speed = prev.get("speed", {})
    if a.part in ("speed", "all"):
        speed = run_speed(model, ids, a)
    targets = []
    if kv:
        r8 = next(r for r in kv["rows"] if r["bits"] == 8)
        targets.append(Target("int8 KV cache: perplexity increase vs fp32 cache", r8["increase_pct"], "<=", 0.5, "%",
                              f"int4: {next(r for r in kv['rows'] if r['bits'] == 4)['increase_pct']:+.2f}%"))
        targets.append(Target("int8 KV cache bytes / the fp32 cache this model runs with", r8["bytes_per_token"] / kv["fp32_bytes"],
                              "<=", 0.5, "x", f"{r8['bytes_per_token'] / kv['bf16_bytes']:.3f}x of a bf16 cache"))
    if speed:
        s = speed["decode"]
        targets.append(Target("decode W4 (torchshrink engine) / transformers fp32 generate, tokens/s", s["ts-w4"] / s["hf-fp32"],
                              ">=", 4.0, "x", f"{s['ts-w4']:.1f} vs {s['hf-fp32']:.1f} tokens/s"))
        if "llama-q4_0" in s:
            targets.append(Target("decode W4 (torchshrink engine) / llama.cpp Q4_0, tokens/s", s["ts-w4"] / s["llama-q4_0"],
                                  ">=", 0.8, "x", f"{s['ts-w4']:.1f} vs {s['llama-q4_0']:.1f} tokens/s"))
        p = speed["prefill"]
        best = min(p["hf-fp32"], p["hf-bf16"])
        targets.append(Target("prefill of 512 tokens: best fp32/bf16 path seconds / torchshrink W4 engine seconds",
                              best / p["ts-w4"], ">=", 1.0, "x", f"{p['ts-w4']:.2f} s vs {best:.2f} s"))
    tables = {}
    if kv:
        tables["KV cache"] = (
            f"fp32 model, {kv['tokens']} held-out tokens in windows of 512; fp32 cache perplexity {kv['fp32']:.3f}. Every key "
            "and value (the current token's too) read back from the quantized cache.\n\n" + markdown_table(
                ["cache", "perplexity", "vs fp32 cache", "bytes / token (30 layers)", "vs fp32 cache", "vs bf16 cache"],
                [["fp32", f"{kv['fp32']:.3f}", "-", kv["fp32_bytes"], "1.00x", f"{kv['fp32_bytes'] / kv['bf16_bytes']:.2f}x"]] +
                [[f"int{r['bits']} per token and head", f"{r['perplexity']:.3f}", f"{r['increase_pct']:+.3f}%", r["bytes_per_token"],
                  f"{r['bytes_per_token'] / kv['fp32_bytes']:.3f}x", f"{r['bytes_per_token'] / kv['bf16_bytes']:.3f}x"]
                 for r in kv["rows"]]))
    if speed:
        tables["Decode and prefill (batch 1)"] = (
            f"{a.threads} threads; greedy decoding of {speed['new']} new tokens after a {speed['prompt']}-token prompt, "
            f"median of {speed['reps']} interleaved rounds; prefill: one 512-token prompt (transformers: the last "
            f"token's logits only, as generate computes them). Engine kernels: {speed['engine_isa']}."
            + (f" ts-w4's prompt path, chosen by measurement (best of 2 on a 512-token prompt): "
               f"{speed['prefill_choice']['chosen']} ("
               + ", ".join(f"{k} {v:.2f} s" for k, v in speed["prefill_choice"]["seconds"].items()) + ")"
               if "prefill_choice" in speed else "") + "\n\n" + markdown_table(
                ["path", "decode tokens/s", "x transformers fp32", "prefill 512 s", "weights MB", "perplexity (engine, first "
                 f"{speed['engine_tokens']} eval tokens)"],
                [[k, f"{v:.1f}", f"{v / speed['decode']['hf-fp32']:.2f}x", f"{speed['prefill'].get(k, float('nan')):.2f}",
                  f"{speed['mbytes'].get(k, float('nan')):.1f}", speed["quality"].get(k, "")] for k, v in speed["decode"].items()]))
    ok = write_results("llm_decode", targets, tables, {"kv": kv, "speed": speed}, Path(a.out))
    for t in targets:
        print(f"{'PASS' if t.passed else 'FAIL'}: {t.name} ({t.value:.3f})")
    return 1 if a.check and not ok else 0


def run_speed(model: torch.nn.Module, ids: torch.Tensor, a: argparse.Namespace) -> dict:
    w4 = copy.deepcopy(model)
    quantize_lm(w4, Grid(4, 64, False, clip=True), method="rtn", pack=True)
    dec_w4 = Decoder.from_model(w4, max_len=1024)
    dec_w8 = Decoder.from_model(model, max_len=1024, float_bits=8)
    ev = ids[: a.engine_tokens]
    quality = {
        "ts-w4": f"{engine_perplexity(dec_w4, ev):.3f} (torch W4 model: {perplexity(w4, ev)['perplexity']:.3f})",
        "ts-w8": f"{engine_perplexity(dec_w8, ev):.3f} (fp32 model: {perplexity(model, ev)['perplexity']:.3f})",
    }
    print(json.dumps(quality), flush=True)
    from torchshrink.llm.prefill import choose_prefill

    # the engine's prompt path chosen by measurement on a 512-token prompt: its own chunks, bf16 or int8 GEMMs
    pick = choose_prefill(dec_w4, w4, tokens=512, rounds=2)
    print("prefill paths", json.dumps(pick), flush=True)
    del w4
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    paths: dict = {"hf-fp32": HF(model), "hf-bf16": HF(bf16), "ts-w4": Engine(dec_w4), "ts-w8": Engine(dec_w8)}
    mbytes = {"hf-fp32": sum(p.numel() * 4 for p in model.parameters()) / 1e6,
              "hf-bf16": sum(p.numel() * 2 for p in bf16.parameters()) / 1e6,
              "ts-w4": dec_w4.nbytes() / 1e6, "ts-w8": dec_w8.nbytes() / 1e6}
    try:
        import llama_cpp  # noqa: F401
        from llm_gguf import llama_quantize  # the benchmarks folder is on sys.path

        from torchshrink.llm.gguf_export import export_gguf

        work = Path(tempfile.mkdtemp(prefix="llm_decode-"))
        f32 = work / "f32.gguf"
        export_gguf(model, f32, "F32", embedding_type="F32")
        for qt in ("Q4_0", "Q8_0"):
            dst = work / f"{qt}.gguf"
            llama_quantize(f32, dst, qt, a.threads)
            paths[f"llama-{qt.lower()}"] = LlamaCpp(dst, a.threads)
            mbytes[f"llama-{qt.lower()}"] = dst.stat().st_size / 1e6
            quality[f"llama-{qt.lower()}"] = "see llm_gguf"
    except ImportError:
        quality["llama.cpp"] = "not installed (pip install 'torchshrink[bench]')"
    prompt = ids[1000:1000 + a.prompt].tolist()
    long = ids[2000:2512].tolist()
    dec: dict[str, list[float]] = {k: [] for k in paths}
    pre: dict[str, list[float]] = {k: [] for k in paths}
    for p in paths.values():  # warm-up
        p.decode(prompt, 8)
    for _ in range(a.reps):
        for k, p in paths.items():
            dec[k].append(p.decode(prompt, a.new))
            pre[k].append(p.prefill(long))
            print(k, f"{dec[k][-1]:.1f} tok/s, prefill {pre[k][-1]:.2f} s", flush=True)
    from torchshrink.core.native import library

    isa = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C"}[library().ts_lm_isa()]
    return {"decode": {k: statistics.median(v) for k, v in dec.items()}, "prefill": {k: statistics.median(v) for k, v in pre.items()},
            "runs": {"decode": dec, "prefill": pre}, "mbytes": mbytes, "quality": quality, "new": a.new, "prompt": a.prompt,
            "reps": a.reps, "engine_isa": isa, "engine_tokens": int(ev.numel()), "prefill_choice": pick}


if __name__ == "__main__":
    sys.exit(main())
