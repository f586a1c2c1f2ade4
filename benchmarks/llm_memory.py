"""Peak memory of layer-by-layer W4 GPTQ (#20): zoo:smollm2 and a 1B-class Llama config (TinyLlama-1.1B's
shape, random weights: the memory figure does not depend on their values), each in its own process so
the peak resident set size (ru_maxrss) is that run's alone.

Run: .venv/bin/python benchmarks/llm_memory.py [--check] [--samples 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

OUT = Path(__file__).parent / "results"
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048)


def child(case: str, samples: int, seq: int) -> dict:
    import logging

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from torchshrink.llm.sequential import quantize_lm
    from torchshrink.llm.wquant import Grid

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if case == "smollm2":
        from torchshrink.llm import load_causal_lm

        model, _ = load_causal_lm("zoo:smollm2")
    else:
        import transformers as tf

        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**ONE_B)).eval()
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ids = torch.randint(0, model.config.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    quantize_lm(model, Grid(4, 64, False), method="gptq", samples=ids, pack=True)
    secs = time.perf_counter() - t0
    out = model(ids[:1, :16]).logits
    return {"case": case, "params": params, "fp32_gib": params * 4 / 2**30, "load_seconds": load_s,
            "quantize_seconds": secs, "peak_rss_after_load_gib": rss_loaded,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "runs_after": bool(torch.isfinite(out).all()), "samples": samples, "seq": seq}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.samples, a.seq)), flush=True)
        return 0
    from torchshrink.measure.bench import Target, markdown_table, write_results

    rows = []
    for case in ("smollm2", "llama-1.1b"):
        p = subprocess.run([sys.executable, __file__, "--child", case, "--samples", str(a.samples), "--seq", str(a.seq)],
                           capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"case": case, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    big = next(r for r in rows if r["case"] == "llama-1.1b")
    targets = [Target("1B-class W4 GPTQ completes on this machine (24 GiB) and the model runs after",
                      1.0 if big.get("runs_after") else 0.0, ">=", 1.0, "", f"peak RSS {big.get('peak_rss_gib', float('nan')):.2f} GiB")]
    table = markdown_table(
        ["model", "parameters", "fp32 weights (GiB)", "peak RSS after load (GiB)", "peak RSS (GiB)", "GPTQ seconds",
         "calibration"],
        [[r["case"], f"{r.get('params', 0) / 1e6:.1f}M", f"{r.get('fp32_gib', 0):.2f}",
          f"{r.get('peak_rss_after_load_gib', 0):.2f}", f"{r.get('peak_rss_gib', 0):.2f}", f"{r.get('quantize_seconds', 0):.0f}",
          f"{r.get('samples')} x {r.get('seq')} tokens" if "error" not in r else r["error"]] for r in rows])
    ok = write_results("llm_memory", targets, {
        "Peak memory of W4 g64 GPTQ, layer by layer (each model in its own process)": table,
        "Method": ("quantize_lm(method='gptq', Grid(4, 64, asym), pack=True) with random calibration token rows (memory "
                   "does not depend on the text); the 1B-class model is TinyLlama-1.1B's config with random weights. Peak "
                   "RSS includes the fp32 model itself, one layer's calibration activations and the Hessians of one "
                   "layer. Other jobs may have shared the 2 cores: the seconds are indicative.")}, {"rows": rows}, Path(a.out))
    for t in targets:
        print(f"{'PASS' if t.passed else 'FAIL'}: {t.name} ({t.value})")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
