"""Structured pruning of zoo:smollm2 (SmolLM2-135M, fp32) with data-aware importance, then recovery by
distillation from the unpruned model (#22).

Text as benchmarks/llm_quant.py (``torchshrink.llm.calibration_and_eval``): documents split by name hash;
importance from ``--samples`` rows of 512 calibration tokens; validation (picks methods / mixes) = the next
4,096 calibration-document tokens; evaluation = 8,192 tokens of the held-out documents in windows of 512.

Parts:
* ``ffn``: 25% of every layer's FFN neurons removed, no fine-tuning, importance fluctuation (FLAP) and
  activation (Wanda-style) against l1, l2 and random.
* ``mix``: candidate ways to remove 20% of all parameters (width: heads + FFN; depth + FFN; FFN alone), no
  fine-tuning; the one with the lowest validation perplexity is distilled.
* ``distill``: that mix distilled from the fp32 teacher for ``--minutes`` of wall clock on ``--threads``
  threads (logit KL, bf16 autocast where the CPU has native bf16), on calibration-document rows only; the
  evaluation perplexity every ``--eval-every`` steps gives the curve against distillation tokens spent.
* ``qat``: W4 g64 symmetric round-to-nearest, then quantization-aware distillation (straight-through fake
  quantization on the same grid) for ``--qat-minutes``; the share of the RTN-to-fp32 gap it closes.

Run: .venv/bin/python benchmarks/llm_structure.py [--check] [--part ffn|mix|distill|all] [--minutes 30]
(needs `make llm`; a part run alone keeps the other parts' committed rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from torchshrink.llm import load_causal_lm, perplexity  # noqa: E402
from torchshrink.llm.perplexity import calibration_and_eval, training_rows  # noqa: E402
from torchshrink.llm.recover import distill_lm  # noqa: E402
from torchshrink.measure.bench import Target, markdown_table, previous_results, write_results  # noqa: E402
from torchshrink.prune.structured import (  # noqa: E402
    FfnPruneConfig,
    HeadPruneConfig,
    LayerDropConfig,
    ffn_prune,
    head_prune,
    layer_drop,
)

OUT = Path(__file__).parent / "results"
IMPORTANCE = ("fluctuation", "activation", "l1", "l2", "random")
# ways to remove ~20% of SmolLM2-135M's 134.5M parameters (embeddings included in the count)
MIXES = {
    "width: 1 of 3 query heads per KV group + 26% FFN": [("heads", 0.34), ("ffn", 0.26)],
    "depth: 4 of 30 layers + 19% FFN": [("layers", 4 / 30 + 1e-6), ("ffn", 0.19)],
    "FFN alone: 34%": [("ffn", 0.34)],
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def prune(model: torch.nn.Module, steps: list[tuple[str, float]], data: torch.Tensor, importance: str = "auto") -> torch.nn.Module:
    q = copy.deepcopy(model)
    for kind, amount in steps:
        if kind == "ffn":
            q = ffn_prune(q, FfnPruneConfig(amount=amount, importance=importance), data=data)
        elif kind == "heads":
            q = head_prune(q, HeadPruneConfig(amount=amount, importance=importance), data=data)
        else:
            q = layer_drop(q, LayerDropConfig(amount=amount), data=data)
    return q


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--part", choices=["ffn", "mix", "distill", "qat", "all", "report"], default="all")
    ap.add_argument("--qat-minutes", type=float, default=15.0)
    ap.add_argument("--samples", type=int, default=16, help="calibration rows of 512 tokens for importance")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--mixes", default="", help="comma-separated mix names to (re)run with --part mix (others' rows kept)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--qat-lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prev = previous_results("llm_structure", a.out, keep=a.part != "all")
    model, tok = load_causal_lm("zoo:smollm2")
    text = calibration_and_eval(tok, a.samples, a.eval_tokens)
    samples, val, ids, docs = text["samples"], text["val"], text["eval"], text["documents"]
    base, base_val = perplexity(model, ids), perplexity(model, val)
    total = n_params(model)
    print("fp32", json.dumps(base), flush=True)

    def score(q: torch.nn.Module, **fields: object) -> dict:
        p, pv = perplexity(q, ids)["perplexity"], perplexity(q, val)["perplexity"]
        row = {**fields, "perplexity": p, "ratio": p / base["perplexity"], "val_ratio": pv / base_val["perplexity"],
               "params": n_params(q), "removed_pct": 100 * (1 - n_params(q) / total)}
        print(json.dumps(row), flush=True)
        return row

    ffn_rows = prev.get("ffn_rows", [])
    if a.part in ("ffn", "all"):
        ffn_rows = []
        for imp in IMPORTANCE:
            t0 = time.perf_counter()
            q = prune(model, [("ffn", 0.25)], samples, imp)
            ffn_rows.append(score(q, importance=imp, seconds=time.perf_counter() - t0))
            del q
    mix_rows = prev.get("mix_rows", [])
    if a.part in ("mix", "all"):
        redo = [m for m in MIXES if not a.mixes or m in a.mixes.split(",")]
        mix_rows = [r for r in mix_rows if r["mix"] in MIXES and r["mix"] not in redo]
        for name in redo:
            steps = MIXES[name]
            t0 = time.perf_counter()
            q = prune(model, steps, samples)
            mix_rows.append(score(q, mix=name, seconds=time.perf_counter() - t0))
            del q
    dist = prev.get("distill", {})
    rows = training_rows(tok, a.samples, val_tokens=val.numel()) if a.part in ("distill", "qat", "all") else None
    if a.part in ("distill", "all"):
        chosen = min(mix_rows, key=lambda r: r["val_ratio"])["mix"]
        student = prune(model, MIXES[chosen], samples)
        print(f"distilling {chosen!r} on {rows.shape[0]} rows x 512 tokens", flush=True)
        rep = distill_lm(student, model, rows, seconds=a.minutes * 60, batch=a.batch, lr=a.lr,
                         evaluate=lambda s: perplexity(s, ids)["perplexity"], eval_every=a.eval_every,
                         log=lambda r: print(json.dumps(r), flush=True))
        dist = {"mix": chosen, **{k: v for k, v in rep.items()}, "rows": rows.shape[0],
                "final": score(student, mix=chosen, stage="distilled")}
    qat = prev.get("qat", {})
    if a.part in ("qat", "all"):
        from torchshrink.llm.recover import qat_lm
        from torchshrink.llm.sequential import quantize_lm
        from torchshrink.llm.wquant import Grid

        grid = Grid(4, 64, True)
        rtn_model = copy.deepcopy(model)
        quantize_lm(rtn_model, grid, method="rtn", pack=True)
        rtn_row = score(rtn_model, stage="W4 g64 sym RTN")
        del rtn_model
        student = copy.deepcopy(model)
        rep = qat_lm(student, model, rows, grid, seconds=a.qat_minutes * 60, batch=a.batch, lr=a.qat_lr,
                     evaluate=lambda s: perplexity(s, ids)["perplexity"], eval_every=a.eval_every,
                     log=lambda r: print(json.dumps(r), flush=True))
        qat = {"grid": grid.label, **rep, "rtn": rtn_row, "final": score(student, stage="W4 g64 sym QAT")}
    for k in ("rtn", "final"):  # a packed model's parameters() miss its codes: no parameter counts for these rows
        for f in ("params", "removed_pct"):
            (qat.get(k) or {}).pop(f, None)
    targets = []
    aware = [r for r in ffn_rows if r["importance"] in ("fluctuation", "activation")]
    if aware:
        best = min(aware, key=lambda r: r["val_ratio"])
        others = ", ".join(f"{r['importance']} {r['ratio']:.2f}x" for r in ffn_rows if r not in aware)
        targets.append(Target("25% of FFN neurons removed, no fine-tuning, data-aware importance (chosen on validation): "
                              "perplexity / fp32", best["ratio"], "<=", 1.6, "x", f"{best['importance']}; {others}"))
    if dist:
        f = dist["final"]
        targets.append(Target(f"{f['removed_pct']:.1f}% of parameters removed ({dist['mix']}) then {dist['seconds'] / 60:.0f} min "
                              f"of distillation ({dist['tokens']:,} tokens): perplexity / fp32", f["ratio"], "<=", 1.25, "x",
                              f"before distillation {dist['curve'][0]['metric'] / base['perplexity']:.2f}x"))
        if f["removed_pct"] < 20:
            targets.append(Target("parameters removed", f["removed_pct"], ">=", 20, "%"))
    if qat:
        r, q = qat["rtn"]["perplexity"], qat["final"]["perplexity"]
        targets.append(Target(f"{qat['grid']}: share of the RTN-to-fp32 perplexity gap closed by {qat['seconds'] / 60:.0f} min of "
                              f"quantization-aware distillation ({qat['tokens']:,} tokens)", 100 * (r - q) / (r - base["perplexity"]),
                              ">=", 60, "%", f"RTN {r:.2f}, QAT {q:.2f}, fp32 {base['perplexity']:.2f}"))
    tables = {
        "Method": (f"zoo:smollm2 in fp32 ({total / 1e6:.1f}M parameters, embeddings included in every count). Evaluation: "
                   f"{base['tokens']} scored tokens of {len(docs['evaluation'])} held-out documents, windows of 512, fp32 "
                   f"perplexity {base['perplexity']:.3f}; validation (picks importance and mix): {val.numel()} "
                   f"calibration-document tokens, fp32 {base_val['perplexity']:.3f}; importance from {a.samples} x 512 "
                   f"calibration tokens. {a.threads} thread(s)."),
        "25% of FFN neurons, no fine-tuning": markdown_table(
            ["importance", "perplexity", "x fp32", "validation x fp32", "params removed", "seconds"],
            [[r["importance"], f"{r['perplexity']:.2f}", f"{r['ratio']:.3f}", f"{r['val_ratio']:.3f}",
              f"{r['removed_pct']:.1f}%", f"{r['seconds']:.0f}"] for r in ffn_rows]),
        "20% of parameters: candidate mixes, no fine-tuning (default importance: fluctuation / block influence)": markdown_table(
            ["mix", "perplexity", "x fp32", "validation x fp32", "params removed", "seconds"],
            [[r["mix"], f"{r['perplexity']:.2f}", f"{r['ratio']:.3f}", f"{r['val_ratio']:.3f}", f"{r['removed_pct']:.1f}%",
              f"{r['seconds']:.0f}"] for r in mix_rows]),
    }
    if dist:
        tables["Distillation curve"] = (
            f"Student: {dist['mix']}; teacher: the fp32 model. Logit KL (temperature {dist['temperature']}), no hard "
            f"labels; AdamW lr {dist['lr']} cosine over the time budget, batch {dist['batch']} x 512 tokens, bf16 autocast "
            f"{dist['autocast_bf16']}, embeddings and tied LM head frozen; {dist['rows']} training rows of 512 tokens from "
            f"the calibration documents (validation tokens excluded). {dist['steps']} steps, {dist['tokens']:,} tokens, "
            f"{dist['seconds'] / 60:.1f} min of training (evaluations not counted).\n\n" + markdown_table(
                ["step", "tokens", "minutes", "perplexity", "x fp32"],
                [[r["step"], f"{r['tokens']:,}", f"{r['seconds'] / 60:.1f}", f"{r['metric']:.2f}",
                  f"{r['metric'] / base['perplexity']:.3f}"] for r in dist["curve"]]))
    if qat:
        tables["W4 recovery: quantization-aware distillation"] = (
            f"{qat['grid']} round-to-nearest on every decoder Linear (embeddings / tied head fp32). QAT: straight-through "
            f"fake quantization on that grid, logit KL from the fp32 model, AdamW lr {qat['lr']}, batch {qat['batch']} x 512, "
            f"{qat['steps']} steps, {qat['tokens']:,} tokens, {qat['seconds'] / 60:.1f} min; then stored round-to-nearest "
            "on the same grid (PackedLinear) -- the perplexities are of the stored model.\n\n" + markdown_table(
                ["step", "tokens", "minutes", "perplexity", "x fp32"],
                [[r["step"], f"{r['tokens']:,}", f"{r['seconds'] / 60:.1f}", f"{r['metric']:.2f}",
                  f"{r['metric'] / base['perplexity']:.3f}"] for r in qat["curve"]]))
    ok = write_results("llm_structure", targets, tables, {"fp32": base, "fp32_val": base_val, "ffn_rows": ffn_rows,
                                                          "mix_rows": mix_rows, "distill": dist, "qat": qat, "documents": docs},
                       Path(a.out))
    for t in targets:
        print(f"{'PASS' if t.passed else 'FAIL'}: {t.name} ({t.value:.3f})")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
