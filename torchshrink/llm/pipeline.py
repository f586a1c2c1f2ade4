"""One call from a language model and text to a compressed model with its evidence:
``compress_lm(spec, preset, out_dir, data=None)``.

Presets (``PRESETS``, overridable option by option): ``llm-w8`` (GPTQ W8 per-channel), ``llm-w4`` (AWQ +
GPTQ W4 g64 asymmetric, clipped), ``llm-w3`` (the same at 3 bits), ``llm-gguf-q4_0`` / ``llm-gguf-q8_0``
(the GGUF block grids, written as a .gguf file too), ``llm-sparse-50`` / ``llm-sparse-2of4`` (SparseGPT;
``recover_minutes`` then distills from the original model on the calibration rows with the zeros kept --
benchmarks/results/llm_quant.md: 50% +47% one-shot, +23% after 8 minutes).

Text: with ``data`` (a UTF-8 text file), paragraphs (blank-line separated) are split in order: the last
20% evaluate, the rest calibrate, so no evaluated token is calibrated on; without it, the Debian
documentation prose split by document (``torchshrink.llm.text``). The output folder holds the model
(``model/``, ``ts.load``), its tokenizer, ``report.json`` / ``report.md`` (perplexity before and after
on the same windows, token counts, where the text came from, the machine) and, for GGUF presets,
``model.gguf``. It is written beside the target and moved into place whole.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from torchshrink.core.errors import ConfigError, DataError
from torchshrink.llm.models import load_causal_lm
from torchshrink.llm.perplexity import calibration_and_eval, generate_check, perplexity, token_ids

PRESETS: dict[str, dict[str, Any]] = {
    "llm-w8": {"kind": "quantize", "method": "gptq", "bits": 8, "group": 0, "sym": True, "clip": False},
    "llm-w4": {"kind": "quantize", "method": "awq+gptq", "bits": 4, "group": 64, "sym": False, "clip": True},
    "llm-w3": {"kind": "quantize", "method": "awq+gptq", "bits": 3, "group": 64, "sym": False, "clip": True},
    "llm-gguf-q4_0": {"kind": "quantize", "method": "awq+gptq", "gguf": "Q4_0"},
    "llm-gguf-q8_0": {"kind": "quantize", "method": "rtn", "gguf": "Q8_0"},
    "llm-sparse-50": {"kind": "sparsify", "method": "sparsegpt", "sparsity": 0.5, "nm": None},
    "llm-sparse-2of4": {"kind": "sparsify", "method": "sparsegpt", "sparsity": 0.5, "nm": [2, 4]},
}
OPTIONS = {"kind", "method", "bits", "group", "sym", "clip", "gguf", "sparsity", "nm", "samples", "seq", "window",
           "eval_tokens", "recover_minutes"}
DEFAULTS = {"samples": 64, "seq": 512, "window": 512, "eval_tokens": 8192, "recover_minutes": 0.0}


def resolve(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ConfigError(f"unknown language-model preset {preset!r}; allowed: {', '.join(PRESETS)}")
    opts = {**DEFAULTS, **PRESETS[preset]}
    for k, v in (overrides or {}).items():
        if k not in OPTIONS:
            raise ConfigError(f"unknown option {k!r}; allowed: {', '.join(sorted(OPTIONS))}")
        if v is not None:
            opts[k] = v
    for k in ("samples", "seq", "window", "eval_tokens"):
        if not isinstance(opts[k], int) or opts[k] < 1:
            raise ConfigError(f"{k}={opts[k]!r} must be a whole number of 1 or more")
    if not isinstance(opts["recover_minutes"], int | float) or opts["recover_minutes"] < 0:
        raise ConfigError(f"recover_minutes={opts['recover_minutes']!r} must be a number of minutes >= 0")
    if opts["recover_minutes"] and opts["kind"] != "sparsify":
        raise ConfigError("recover_minutes (distillation from the original model, zeros kept) applies to the sparsity "
                          "presets llm-sparse-50 / llm-sparse-2of4")
    return opts


def text_from_file(tokenizer: Any, path: str | Path, samples: int, seq: int, eval_tokens: int,
                   window: int) -> dict[str, Any]:
    """Calibration rows and evaluation tokens from a user's text file (last 20% of paragraphs evaluate)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data {path}: no such text file")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--data {path}: not UTF-8 text") from None
    paras = [x.strip() for x in raw.split("\n\n") if x.strip()]
    if len(paras) < 5:
        raise DataError(f"--data {path}: {len(paras)} paragraph(s); give at least 5, separated by blank lines "
                        "(the last 20% are held out for evaluation)")
    cut = len(paras) - max(1, len(paras) // 5)
    cal, ev = paras[:cut], paras[cut:]
    cal_ids, ev_ids = token_ids(tokenizer, cal), token_ids(tokenizer, ev)  # each tokenized once
    n_cal, n_ev = len(cal_ids), len(ev_ids)
    rows = min(samples, n_cal // seq)
    if rows < 1:
        raise DataError(f"--data {path}: the calibration part has {n_cal} tokens, fewer than one row of --seq {seq}")
    if n_ev < window:
        raise DataError(f"--data {path}: the held-out 20% has {n_ev} tokens, fewer than one window of {window}; "
                        "give more text or a smaller --window")
    ev_n = min(eval_tokens, n_ev) // window * window
    return {"samples": torch.tensor(cal_ids[: rows * seq], dtype=torch.long).reshape(rows, seq),
            "eval": torch.tensor(ev_ids[:ev_n], dtype=torch.long),
            "provenance": f"{p.name}: {len(cal)} calibration paragraphs ({rows} x {seq} tokens used), "
                          f"{len(ev)} held-out paragraphs ({ev_n} tokens evaluated)",
            "eval_text": f"{p.name}: its last {len(ev)} paragraphs ({ev_n} tokens)"}


def lm_text(tok: Any, data: str | None, o: dict[str, Any]) -> dict[str, Any]:
    if data:
        return text_from_file(tok, data, o["samples"], o["seq"], o["eval_tokens"], o["window"])
    t = calibration_and_eval(tok, o["samples"], o["eval_tokens"], val_tokens=0, window=o["seq"])
    return {"samples": t["samples"], "eval": t["eval"],
            "provenance": f"Debian documentation prose: {len(t['documents']['calibration'])} calibration documents "
                          f"({o['samples']} x {o['seq']} tokens), {len(t['documents']['evaluation'])} held-out "
                          f"documents ({t['eval'].numel()} tokens evaluated)",
            "eval_text": f"Debian documentation prose: {len(t['documents']['evaluation'])} held-out documents "
                         f"({t['eval'].numel()} tokens)"}


def _apply(model: torch.nn.Module, o: dict[str, Any], samples: torch.Tensor) -> dict[str, Any]:
    if o["kind"] == "sparsify":
        from torchshrink.llm.sparse import sparsify_lm

        nm = tuple(o["nm"]) if o.get("nm") else None
        rep = sparsify_lm(model, method=o["method"], sparsity=o["sparsity"], nm=nm, samples=samples)
        pattern = f"{nm[0]}:{nm[1]}" if nm else format(o["sparsity"], ".0%")
        return {"what": f"{o['method']} {pattern} sparsity",
                "seconds": rep["seconds"]}
    from torchshrink.llm.gguf_export import gguf_grid
    from torchshrink.llm.sequential import quantize_lm
    from torchshrink.llm.wquant import Grid

    grid = gguf_grid(o["gguf"]) if o.get("gguf") else Grid(o["bits"], o["group"], o["sym"], o["clip"])
    res = quantize_lm(model, grid, method=o["method"], samples=samples, pack=True)
    return {"what": f"{o['method']} {grid.label}", "layers": len(res.layers)}


def compress_lm(spec: str, preset: str, out_dir: str | Path, *, data: str | None = None, force: bool = False,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress the causal LM ``spec`` with ``preset``; write the folder; return the report."""
    from torchshrink import save
    from torchshrink.measure.machine import machine_info
    from torchshrink.recipe.workdir import MARKER, folder_bytes, written_by_torchshrink

    o = resolve(preset, overrides)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (force and written_by_torchshrink(out)):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder (or --force for one torchshrink wrote)")
    model, tok = load_causal_lm(spec)
    text = lm_text(tok, data, o)
    before = perplexity(model, text["eval"], window=o["window"])
    gen_before = generate_check(model, tok)["text"]
    small = copy.deepcopy(model)
    t0 = time.perf_counter()
    applied = _apply(small, o, text["samples"])
    if o["recover_minutes"]:
        from torchshrink.llm.recover import distill_lm

        rep = distill_lm(small, model, text["samples"], seconds=60 * o["recover_minutes"])
        applied["what"] += f" + {rep['seconds'] / 60:.1f} min distillation ({rep['tokens']:,} calibration tokens)"
        applied["recovery"] = {k: v for k, v in rep.items() if k != "curve"}
    seconds = time.perf_counter() - t0
    after = perplexity(small, text["eval"], window=o["window"])
    origin = str(Path(spec).resolve()) if spec.endswith(".gguf") else spec
    report = {"model": origin, "preset": preset, "options": o, "applied": applied, "seconds": round(seconds, 1),
              "text": text["provenance"], "perplexity_before": before, "perplexity_after": after,
              "increase_pct": 100 * (after["perplexity"] / before["perplexity"] - 1),
              "generation_before": gen_before, "generation_after": generate_check(small, tok)["text"],
              "machine": machine_info()}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(small, tmp / "model")
        tok.save_pretrained(str(tmp / "tokenizer"))
        if o.get("gguf"):
            from torchshrink.llm.gguf_export import export_gguf, source_gguf

            report["gguf"] = export_gguf(small, tmp / "model.gguf", o["gguf"], source=source_gguf(model))
            report["gguf"]["path"] = "model.gguf"
        report["model_bytes"] = folder_bytes(tmp / "model")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "report.md").write_text(markdown(report))
        (tmp / MARKER).write_text("torchshrink lm\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def markdown(r: dict[str, Any]) -> str:
    from torchshrink.measure.machine import cpu_label

    b, a = r["perplexity_before"], r["perplexity_after"]
    m = r["machine"]
    lines = [f"# {r['preset']} on {r['model']}", "",
             f"- applied: {r['applied']['what']} ({r['seconds']} s)",
             f"- text: {r['text']}",
             f"- perplexity: {b['perplexity']:.3f} -> {a['perplexity']:.3f} ({r['increase_pct']:+.2f}%), "
             f"{a['tokens']} scored tokens in windows of {a['window']}",
             f"- saved model: {r['model_bytes'] / 1e6:.2f} MB (model/, load with torchshrink.load)"]
    if "gguf" in r:
        g = r["gguf"]
        lines.append(f"- GGUF: model.gguf {g['qtype']}, {g['bytes'] / 1e6:.2f} MB, {g['bits_per_weight']} bits/weight "
                     "(llama.cpp, ollama, LM Studio)")
    lines += [f"- greedy continuation before: {r['generation_before']!r}",
              f"- greedy continuation after: {r['generation_after']!r}",
              f"- machine: {cpu_label(m)} ({', '.join(m['simd'])}), torch {m['torch']}, {m['torch_threads']} threads", ""]
    return "\n".join(lines)
