"""GGUF export of zoo:smollm2 evaluated by llama.cpp itself (#20): torchshrink's GPTQ / AWQ codes written
as Q4_0 against llama.cpp's own Q4_0 quantization of the same fp32 weights, at the same file size; Q8_0
against F32.

Text as in llm_quant (``torchshrink.llm.perplexity.calibration_and_eval``): calibration rows and
validation tokens from the calibration documents, evaluation tokens from the held-out ones. Every GGUF
file is scored by llama.cpp (llama-cpp-python) on the same token windows of 512 (every token but each
window's first, no BOS added), the same scoring torchshrink's ``perplexity`` uses; torch's perplexity of
the same weights is reported beside it (parity).

Files: F32 (torchshrink export of the fp32 model, the reference), llama.cpp Q4_0 / Q8_0 (llama.cpp's
quantizer run on that F32 file), torchshrink Q4_0 (RTN, GPTQ, AWQ+GPTQ on the Q4_0 grid; the method is
chosen on validation perplexity in torch), torchshrink Q8_0 (RTN). The token embedding is written in
the type llama.cpp's own Q4_0 file uses for it, so file sizes match.

Run: .venv/bin/python benchmarks/llm_gguf.py [--check] [--samples 64] (needs `make llm` and
llama-cpp-python: pip install 'torchshrink[bench]').
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from torchshrink.llm import load_causal_lm, perplexity  # noqa: E402
from torchshrink.llm.gguf_export import export_gguf, gguf_grid  # noqa: E402
from torchshrink.llm.perplexity import calibration_and_eval  # noqa: E402
from torchshrink.llm.sequential import quantize_lm  # noqa: E402
from torchshrink.measure.bench import Target, markdown_table, write_results  # noqa: E402

OUT = Path(__file__).parent / "results"


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype}")


def llama_perplexity(path: Path, ids: torch.Tensor, threads: int, window: int = 512) -> dict:
    """Perplexity by llama.cpp on non-overlapping windows (each window's first token not scored)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    k = ids.numel() // window
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for w in ids[: k * window].reshape(k, window).tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: window - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(window - 1), w[1:]].sum())
        count += window - 1
    secs = time.perf_counter() - t0
    llm.reset()
    out = llm.create_completion("The Debian project is", max_tokens=20, temperature=0.0)
    del llm
    return {"perplexity": math.exp(nll / count), "tokens": count, "seconds": secs,
            "generation": out["choices"][0]["text"].strip()[:80]}


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="rtn,gptq,awq+gptq")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_causal_lm("zoo:smollm2")
    text = calibration_and_eval(tok, a.samples, a.eval_tokens)
    samples, val, ids = text["samples"], text["val"], text["eval"]
    work = Path(tempfile.mkdtemp(prefix="llm_gguf-"))
    rows = []

    def row(name: str, path: Path, source: str, torch_model: torch.nn.Module | None = None, **extra) -> dict:
        r = {"file": name, "source": source, "bytes": path.stat().st_size, **extra,
             "llama_cpp": llama_perplexity(path, ids, a.threads)}
        if torch_model is not None:
            r["torch_perplexity"] = perplexity(torch_model, ids)["perplexity"]
        print(json.dumps(r), flush=True)
        rows.append(r)
        return r

    f32 = work / "f32.gguf"
    export_gguf(model, f32, "F32", embedding_type="F32")
    ref = row("F32", f32, "torchshrink export of the fp32 model", model)
    for qt in ("Q4_0", "Q8_0"):
        llama_quantize(f32, work / f"llama-{qt}.gguf", qt, a.threads)
        row(f"{qt} (llama.cpp)", work / f"llama-{qt}.gguf", "llama.cpp's quantizer on the F32 file")
    emb = tensor_types(work / "llama-Q4_0.gguf")["token_embd.weight"]
    emb_used = emb if emb in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1") else "Q8_0"
    base_val = perplexity(model, val)["perplexity"]
    ours = []
    for method in a.methods.split(","):
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize_lm(q, gguf_grid("Q4_0"), method=method, samples=samples, pack=True)
        secs = time.perf_counter() - t0
        path = work / f"ts-Q4_0-{method}.gguf"
        rep = export_gguf(q, path, "Q4_0", embedding_type=emb_used)
        vinc = 100 * (perplexity(q, val)["perplexity"] / base_val - 1)
        ours.append(row(f"Q4_0 (torchshrink {method})", path, f"torchshrink {method}, {gguf_grid('Q4_0').label}", q,
                        method=method, val_increase_pct=vinc, quantize_seconds=secs,
                        max_decode_diff=rep["max_decode_diff"]))
        del q
    q = copy.deepcopy(model)
    quantize_lm(q, gguf_grid("Q8_0"), method="rtn", pack=True)
    export_gguf(q, work / "ts-Q8_0.gguf", "Q8_0", embedding_type="Q8_0")
    q8 = row("Q8_0 (torchshrink rtn)", work / "ts-Q8_0.gguf", f"torchshrink rtn, {gguf_grid('Q8_0').label}", q)
    del q
    base = ref["llama_cpp"]["perplexity"]
    for r in rows:
        r["increase_pct"] = 100 * (r["llama_cpp"]["perplexity"] / base - 1)
    llama_q4 = next(r for r in rows if r["file"] == "Q4_0 (llama.cpp)")
    best = min(ours, key=lambda r: r["val_increase_pct"])
    size_ratio = best["bytes"] / llama_q4["bytes"]
    targets = [
        Target("torchshrink Q4_0 perplexity below llama.cpp's own Q4_0 (evaluated by llama.cpp; method chosen on "
               "validation)", 100 * (1 - best["llama_cpp"]["perplexity"] / llama_q4["llama_cpp"]["perplexity"]),
               ">=", 7.0, "%", f"{best['method']}: {best['llama_cpp']['perplexity']:.3f} vs "
               f"{llama_q4['llama_cpp']['perplexity']:.3f}"),
        Target("file size torchshrink Q4_0 / llama.cpp Q4_0", size_ratio, "<=", 1.02, "x", "and >= 0.98"),
        Target("file size torchshrink Q4_0 / llama.cpp Q4_0 (lower bound)", size_ratio, ">=", 0.98, "x"),
        Target("torchshrink Q8_0 perplexity increase vs F32 (llama.cpp)", q8["increase_pct"], "<=", 0.5, "%"),
    ]
    tables = {
        "Method": (f"zoo:smollm2 (fp32 dequantized from its Q4_1 GGUF). Evaluation: {ref['llama_cpp']['tokens']} scored "
                   f"tokens of {len(text['documents']['evaluation'])} held-out documents "
                   f"({', '.join(text['documents']['evaluation'])}), windows of 512, scored by llama.cpp "
                   f"(llama-cpp-python, {a.threads} threads) and by torch. Calibration {a.samples} x 512 tokens; "
                   f"validation {val.numel()} tokens (picks the method). Token embedding of every Q4_0 file: {emb_used} "
                   f"(llama.cpp's own Q4_0 uses {emb}); norms F32; LM head tied."),
        "Files": markdown_table(
            ["file", "source", "MB", "perplexity (llama.cpp)", "vs F32", "perplexity (torch)", "validation vs fp32 (torch)",
             "llama.cpp greedy continuation of 'The Debian project is'"],
            [[r["file"], r["source"], f"{r['bytes'] / 1e6:.2f}", f"{r['llama_cpp']['perplexity']:.3f}",
              f"{r['increase_pct']:+.2f}%", f"{r['torch_perplexity']:.3f}" if "torch_perplexity" in r else "",
              f"{r['val_increase_pct']:+.2f}%" if "val_increase_pct" in r else "",
              r["llama_cpp"]["generation"].replace("|", "/").replace("\n", " ")] for r in rows]),
    }
    ok = write_results("llm_gguf", targets, tables, {"rows": rows, "documents": text["documents"],
                                                     "embedding_type": emb_used, "llama_embedding_type": emb}, Path(a.out))
    for t in targets:
        print(f"{'PASS' if t.passed else 'FAIL'}: {t.name} ({t.value:.3f})")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
