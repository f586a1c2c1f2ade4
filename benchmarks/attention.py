"""Encoder self-attention: torchshrink's C kernel (quant/_attn.c) vs torch's CPU attention, at the shapes
MiniLM runs (batch 16 x 128 tokens, heads of 32; 12 heads, the 8 the deploy student keeps, the 6 of a half-head-pruned one),
2 threads, one interleaved run. Inputs: random Q/K/V as slices of one fused projection output (as the
INT8 recipe hands them over), a key-padding mask with a quarter of the keys of each sequence masked.
Paths: torch SDPA float32 (its flash kernel, what transformers' "sdpa" runs), SDPA in bf16 (inputs cast,
output cast back), the eager formula (matmul, softmax, matmul), and ours. Agreement: max |difference| to
float32 SDPA relative to its largest output.

Run: .venv/bin/python benchmarks/attention.py [--runs 40]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).parent / "results"


def case(heads: int, runs: int) -> list[list[object]]:
    from torchshrink.measure.latency import time_interleaved
    from torchshrink.quant.attention import additive_mask, encoder_attention

    b, s, d = 16, 128, 32
    g = torch.Generator().manual_seed(heads)
    qkv = torch.randn(b, s, 3 * heads * d, generator=g)
    q, k, v = qkv.split(heads * d, -1)
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[:, 3 * s // 4:] = False
    mask = keep[:, None, None, :].expand(b, 1, s, s)
    q4, k4, v4 = (t.reshape(b, s, heads, d).transpose(1, 2) for t in (q, k, v))

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask).transpose(1, 2).reshape(b, s, -1)

    def sdpa_bf16() -> torch.Tensor:
        o = F.scaled_dot_product_attention(q4.bfloat16(), k4.bfloat16(), v4.bfloat16(), attn_mask=mask)
        return o.float().transpose(1, 2).reshape(b, s, -1)

    add = torch.zeros(b, 1, 1, s).masked_fill(~keep[:, None, None, :], -1e30)

    def eager() -> torch.Tensor:
        p = (torch.matmul(q4, k4.transpose(-1, -2)) * d ** -0.5 + add).softmax(-1)
        return torch.matmul(p, v4).transpose(1, 2).reshape(b, s, -1)

    def ours() -> torch.Tensor:
        return encoder_attention(q, k, v, heads, d ** -0.5, additive_mask(mask, b, s))

    paths = {"torch SDPA float32": sdpa, "torch SDPA bf16": sdpa_bf16, "eager formula float32": eager,
             "torchshrink kernel float32": ours}
    t = time_interleaved(paths, n_threads=2, warmup=5, runs=runs)
    with torch.inference_mode():
        ref = sdpa()
        err = {k: float((f() - ref).abs().max() / ref.abs().max()) for k, f in paths.items()}
    base = t["torch SDPA float32"].p50_ms
    return [[f"{heads} heads", k, round(t[k].p50_ms, 3), round(t[k].p90_ms, 3), f"{base / t[k].p50_ms:.2f}x",
             f"{err[k]:.1e}"] for k in paths]


def main() -> int:
    from torchshrink.measure.bench import Target, markdown_table, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    a = ap.parse_args()
    rows = case(12, a.runs) + case(8, a.runs) + case(6, a.runs)
    mine = {r[0]: float(r[4][:-1]) for r in rows if r[1] == "torchshrink kernel float32"}
    targets = [Target(f"kernel vs torch SDPA float32, {h}", v, ">=", 1.0, "x", "interleaved medians")
               for h, v in mine.items()]
    table = markdown_table(["shape", "path", "p50 ms", "p90 ms", "speed vs SDPA float32", "max rel. diff"], rows)
    ok = write_results("attention", targets, {"16 x 128 tokens, heads of 32, 2 threads": table},
                       {"rows": rows}, OUT)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
