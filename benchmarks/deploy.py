"""Deployment chosen by measurement (issue 21), every figure from one machine and named with its CPU.

Parts (each writes its rows into results/<--results, default deploy>.json -- one file per machine kind: a part
measured on another CPU than the file's is refused, exit 2 -- and rebuilds the .md beside it):
- train: the compressed MiniLM: a third of the attention heads and 40% of the FFN neurons removed by data-aware
  importance (fluctuation, on 512 calibration sentences), then sentence distillation from the original
  (embedding cosine + MSE, each block's hidden-state cosine) on docstring sentences that share no 8-word run
  with the 500 held-out sentences, for --minutes; saved to --cache (not committed: 40 MB). --resume DIR goes on
  training a saved student (its record, with the one it resumed from, is kept beside it as train.json). The
  reported student: the four commands of deploy_student.STEPS, in order (~2.5 h).
- minilm: batch 16 x 128 real tokens, 2 threads. Peers on the UNcompressed model -- torch fp32 eager, torch
  bf16 (a plain cast), torch.ao dynamic int8, ONNX Runtime fp32 and its own dynamic int8, OpenVINO fp32 (f32
  hint), OpenVINO with its default settings, OpenVINO int8 through NNCF -- and `deploy` on the uncompressed
  model (quality >= 0.995) and on the compressed one (quality >= 0.97 against the original), all timed
  interleaved in one run; quality of each peer on the 500 held-out sentences.
- resnet50: batch 1 x 3 x 224 x 224, 2 threads, no pretrained weights (speed at a stated structure): peers on
  the unpruned model (torch fp32 / bf16, torch.ao static int8 (x86 backend), OpenVINO fp32 / int8 NNCF, ONNX
  Runtime fp32) and `deploy` of the 50%-MACs channel-pruned model, in one interleaved run.
- smollm2 (issue 22): `deploy_lm` on the float SmolLM2-135M: transformers fp32 / bf16 generate, torchshrink's
  decode engine (int8 / int4 weights), llama.cpp Q8_0 / Q4_0; perplexity on 2,048 held-out Debian-prose tokens
  within 2% of the model's; a 128-token held-out prompt + 128 greedy tokens, 3 interleaved rounds.
- widths: INT8 students at several widths (shares of heads / FFN neurons removed) timed against the peers in one
  run, with the held-out cosine of any trained student of that width found in the cache: the speed / quality frontier.
Timing (minilm, resnet50, widths): every path in one run, twice -- turns of 3 calls back to back with the last 2
timed (the main figures: a model serving requests one after another) and single calls interleaved (each right after
the other models ran), both recorded. Peers are built in deploy_peers.py, the student in deploy_student.py, the
ONNX part lives in deploy_onnx.py.
Run: .venv/bin/python benchmarks/deploy.py --part train|minilm|resnet50|onnx|smollm2|widths|report [--check]
     [--results deploy-epyc-zen5]   (results/deploy.md: AMD EPYC Zen 4; deploy-epyc-zen5.md: AMD EPYC Zen 5)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import deploy_peers as P
import torch
from deploy_onnx import SIZE_BOUND, onnx_part
from deploy_student import CACHE, EPOCHS, FFN, HEADS, LR, prose_sentences, quantize_student, train
from torch import nn

OUT = Path(__file__).parent / "results"
ROUND_TO = 32
PARTS = ("train", "minilm", "resnet50", "onnx", "smollm2", "widths")


def _check_machine(name: str) -> None:
    """Parts measured on different machines never share a file: results/<name>.json must be new or from this kind of
    CPU (name, family / model, SIMD, cores), else exit 2 before anything runs."""
    from torchshrink.measure.bench import previous_results
    from torchshrink.measure.machine import machine_info, machine_markdown, same_machine

    old = previous_results(name, OUT, True).get("machine")
    if old is not None and not same_machine(old, machine_info()):
        sys.stderr.write(f"error: results/{name}.json was measured on another machine ({machine_markdown(old).strip()}); "
                         f"this one is {machine_markdown().strip()}: pass --results deploy-<machine> to write its own file\n")
        raise SystemExit(2)


def _save(part: str, rows: dict[str, Any], name: str = "deploy") -> bool:
    from torchshrink.measure.bench import previous_results

    data = {k: v for k, v in previous_results(name, OUT, True).items() if k in PARTS}
    data[part] = rows
    return report(data, name)


def _time(models: dict[str, Any], example: tuple[torch.Tensor, ...], runs: int, warmup: int = 3) -> dict[str, dict]:
    """Each model timed two ways in one run: turns of 3 calls back to back, the last 2 timed (the latency of serving
    requests one after another: the main figures), and single calls interleaved (each call right after the other
    models ran). Neither way favoured one side consistently across this session's runs; both are recorded."""
    from torchshrink.measure.bench import bench_lock
    from torchshrink.measure.latency import time_interleaved

    with bench_lock():
        single = time_interleaved(models, example, n_threads=2, warmup=warmup, runs=runs)
        burst = time_interleaved(models, example, n_threads=2, warmup=1, runs=runs, burst=3)
    return {k: {"p50_ms": t.p50_ms, "p90_ms": t.p90_ms, "single_p50_ms": single[k].p50_ms} for k, t in burst.items()}


def _peer_best(rows: dict[str, Any], min_cos: float | None = None) -> tuple[str, float]:
    peers = {k: v for k, v in rows.items() if not k.startswith("deploy(")
             and (min_cos is None or v.get("cosine_mean", 1.0) >= min_cos)}
    name = min(peers, key=lambda k: peers[k]["p50_ms"])
    return name, peers[name]["p50_ms"]


def _ood(d: dict[str, Any], train: dict[str, Any] | None) -> str:
    o = d.get("out_of_domain_cosine_mean") or {}
    if "deploy(compressed)" not in o:
        return f"; out of domain: {o['data']}" if o else ""
    mixed = False  # whether the reported student (or one it went on from) was distilled on Debian prose too
    while train is not None:
        mixed |= train.get("prose", "none") != "none"
        train = train.get("resumed_from")
    where = ("Debian prose of documents never distilled on; the student was distilled on other Debian documents too"
             if mixed else "out of the distillation's domain")
    return (f"; {where} ({o['data']}): {o['deploy(compressed)']:.4f} "
            f"(uncompressed deployed: {o['deploy(uncompressed)']:.4f})")


def _single(rows: dict[str, Any], key: str) -> str:
    """The same ratio from the single-call timing of the run (where it was recorded)."""
    peers = [v["single_p50_ms"] for k, v in rows.items() if not k.startswith("deploy(") and "single_p50_ms" in v]
    if not peers or "single_p50_ms" not in rows[key]:
        return ""
    return f"; timed as single interleaved calls: {min(peers) / rows[key]['single_p50_ms']:.2f}x"


def _table(rows: dict[str, Any], quality: bool) -> str:
    from torchshrink.measure.bench import markdown_table

    head = ["path", "p50 ms", "p90 ms", "speedup vs torch fp32", "p50 ms, single calls"] + \
        (["cosine mean", "cosine min"] if quality else [])
    head.append("deploy chose")
    out = []
    for k, v in sorted(rows.items(), key=lambda kv: kv[1]["p50_ms"]):
        r = [k, f"{v['p50_ms']:.2f}", f"{v['p90_ms']:.2f}", f"{v['speedup_vs_fp32']:.2f}x",
             f"{v['single_p50_ms']:.2f}" if "single_p50_ms" in v else "-"]
        if quality:
            r += [f"{v['cosine_mean']:.4f}" if "cosine_mean" in v else "-",
                  f"{v['cosine_min']:.4f}" if "cosine_min" in v else "-"]
        out.append(r + [v.get("chosen", "")])
    return markdown_table(head, out)


def _deploy_table(rows: list[dict[str, Any]]) -> str:
    from torchshrink.measure.bench import markdown_table

    return markdown_table(["runtime", "precision", "status", "p50 ms", "quality"], [
        [r["runtime"], r["precision"] + (" (chosen)" if r["chosen"] else ""), r["status"][:90],
         "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}",
         ", ".join(f"{k} {v:.4f}" for k, v in r["quality"].items()) or "-"] for r in rows])


def report(data: dict[str, Any], name: str = "deploy", machine: dict[str, Any] | None = None) -> bool:
    from torchshrink.measure.bench import Target, markdown_table, write_results

    targets: list[Target] = []
    tables: dict[str, str] = {}
    if "minilm" in data:
        d = data["minilm"]
        rows = d["rows"]
        peer, best = _peer_best(rows)
        peer_q, best_q = _peer_best(rows, 0.995)
        comp, full = rows["deploy(compressed)"], rows["deploy(uncompressed)"]
        targets += [
            Target("MiniLM compressed, deployed: speed vs the fastest peer on the uncompressed model", best / comp["p50_ms"],
                   ">=", 2.0, "x", f"{comp['chosen']} {comp['p50_ms']:.1f} ms vs {peer} {best:.1f} ms"
                   + _single(rows, "deploy(compressed)")),
            Target("MiniLM compressed, deployed: held-out cosine mean vs the original", comp.get("cosine_mean"), ">=", 0.97,
                   "", f"min {comp.get('cosine_min', float('nan')):.4f}; {d['quality_data']}" + _ood(d, data.get("train"))),
            Target("MiniLM uncompressed, deployed (quality >= 0.995): speed vs the fastest peer", best / full["p50_ms"],
                   ">=", 1.0, "x", f"{full['chosen']} {full['p50_ms']:.1f} ms vs {peer} {best:.1f} ms; vs the fastest "
                   f"peer at cosine >= 0.995 ({peer_q}): {best_q / full['p50_ms']:.2f}x" + _single(rows, "deploy(uncompressed)")),
        ]
        tables[f"MiniLM, {d['example']}, {d['runs']} interleaved runs, 2 threads (quality: {d['quality_data']})"] = \
            _table(rows, True)
        tables["deploy on the uncompressed MiniLM (its own candidates and checks)"] = _deploy_table(d["deploy_uncompressed"])
        how = d.get("compressed")
        how = f": {how['recipe']}, student {how['student']} (float held-out cosine {how['float_student_cosine_mean']:.4f})" \
            if how else ""
        tables[f"deploy on the compressed MiniLM{how} (each candidate against the compressed model; the table above: "
               "against the original)"] = _deploy_table(d["deploy_compressed"])
        if d.get("failed_peers"):
            tables["MiniLM peers that did not build"] = markdown_table(["peer", "why"], list(d["failed_peers"].items()))
    if "onnx" in data:
        rows = data["onnx"]["rows"]
        ok = [r for r in rows if "cosine" in r]
        sized = [r for r in ok if r["kind"] in SIZE_BOUND and r["model"] == "mlp"]
        worst = min(ok, key=lambda r: r["cosine"]) if ok else None
        big = max(sized, key=lambda r: r["size_ratio"]) if sized else None
        targets += [
            Target("ONNX: techniques that export and run in ONNX Runtime", len(ok), "==", len(rows), "",
                   ", ".join(f"{r['kind']}: {r['error']}" for r in rows if "error" in r)),
            Target("ONNX: lowest output cosine vs torchshrink's model (held-out inputs)", worst and worst["cosine"],
                   ">=", 0.999, "", worst and f"{worst['kind']} {worst['fields']}"),
            Target("ONNX: largest .onnx / torchshrink file for int8, int4, k-means", big and big["size_ratio"], "<=", 1.15,
                   "", big and f"{big['kind']} {big['fields']}"),
        ]
        tables[f"ONNX export of every technique (ONNX Runtime {data['onnx']['onnxruntime']}; {data['onnx']['held_out']})"] = \
            markdown_table(["kind", "settings", "model", "cosine", "max abs diff", ".onnx bytes", "torchshrink bytes",
                            "ratio", "ops kept in the graph"],
                           [[r["kind"], json.dumps(r["fields"]), r["model"], f"{r['cosine']:.6f}", f"{r['max_abs_diff']:.2e}",
                             f"{r['onnx_bytes']:,}", f"{r['torchshrink_bytes']:,}", f"{r['size_ratio']:.3f}",
                             ", ".join(r["ops"])] if "cosine" in r else [r["kind"], json.dumps(r["fields"]), r["model"],
                                                                       r["error"], "", "", "", "", ""] for r in rows])
    if "train" in data:
        t = data["train"]
        keys = [k for k in t if k not in ("history", "resumed_from", "machine")]
        stages, r = [], t
        while r is not None:  # the training it went on from, oldest last
            curve = [round(h["heldout_cosine"], 4) for h in r.get("history", [])] or r.get("history_heldout_cosine", [])
            prose = [round(h["prose_cosine"], 4) for h in r.get("history", []) if "prose_cosine" in h]
            stages.append([r["epochs"], r["lr"], r.get("output_weight", 2.0), r.get("autocast", "none"),
                           r["train_sentences"], r.get("prose", "none"), round(r["train_seconds"]),
                           ", ".join(map(str, curve)), ", ".join(map(str, prose)) or "-"])
            r = r.get("resumed_from")
        tables["the compressed MiniLM"] = markdown_table(keys, [[t[k] for k in keys]]) + "\n\n" + markdown_table(
            ["epochs", "peak lr", "output loss weight", "autocast", "docstring sentences", "prose mixed in", "seconds",
             "held-out cosine by epoch", "out-of-domain (Debian prose) cosine by epoch"],
            stages[::-1])
    if "widths" in data:
        d = data["widths"]
        tables[f"MiniLM student widths (INT8 as the compression recipe builds it: {d['int8']}), {d['example']}, {d['runs']} interleaved "
               f"runs, 2 threads; speed vs the fastest peer in the same run ({d['peer']}); quality of the students "
               "trained so far"] = markdown_table(
            ["heads removed", "FFN removed", "params", "p50 ms", "speedup vs fastest peer", "same, single calls",
             "trained student", "held-out cosine (INT8)"],
            [[r["heads"], r["ffn"], f"{r['params']:,}", f"{r['p50_ms']:.2f}", f"{r['speedup']:.2f}x",
              f"{r['speedup_single_calls']:.2f}x" if "speedup_single_calls" in r else "-",
              r.get("trained", "-"), f"{r['cosine_mean']:.4f}" if "cosine_mean" in r else "-"] for r in d["rows"]])
    if "resnet50" in data:
        d = data["resnet50"]
        rows = d["rows"]
        peer, best = _peer_best(rows)
        dep = rows["deploy(pruned)"]
        targets.append(Target("ResNet-50 50%-MACs pruned, deployed: speed vs the fastest peer on the unpruned model",
                              best / dep["p50_ms"], ">=", 1.7, "x",
                              f"{dep['chosen']} {dep['p50_ms']:.2f} ms vs {peer} {best:.2f} ms; MACs {d['macs_ratio']:.3f}x, "
                              f"channels rounded to {d.get('round_to', 8)}" + _single(rows, "deploy(pruned)")))
        tables[f"ResNet-50, {d['example']}, {d['runs']} interleaved runs, 2 threads"] = _table(rows, False)
        tables[f"deploy on the pruned ResNet-50 (quality: {d['quality_data']})"] = _deploy_table(d["deploy_pruned"])
    if "smollm2" in data:
        d = data["smollm2"]
        rows = {(r["runtime"], r["precision"]): r for r in d["candidates"]}
        chosen = next(r for r in d["candidates"] if r["chosen"])
        fp32 = rows[("torch", "as given")]
        llama = [r for r in d["candidates"] if r["runtime"] == "llama.cpp" and r["status"] == "passed"]
        targets.append(Target("SmolLM2 deployed (perplexity within 2%): generation vs transformers fp32 generate",
                              fp32["total_s"] / chosen["total_s"], ">=", 4.0, "x",
                              f"{d['chosen']} {chosen['total_s']:.2f} s vs {fp32['total_s']:.2f} s; prompt "
                              f"{d['workload']['prompt_tokens']} + {d['workload']['new_tokens']} new tokens"))
        if llama:
            best = min(llama, key=lambda r: r["total_s"])
            targets.append(Target("SmolLM2 deployed: generation vs the fastest llama.cpp type within the same budget",
                                  best["total_s"] / chosen["total_s"], ">=", 1.0, "x",
                                  f"llama.cpp {best['precision']} {best['total_s']:.2f} s"))
        tables[f"deploy on SmolLM2-135M (zoo:smollm2, fp32): {d['budget']}; {d['provenance']['quality']}; "
               f"{d['provenance']['prompt']}"] = markdown_table(
            ["runtime", "precision", "status", "prompt s", "decode tokens/s", "total s", "vs transformers fp32",
             "perplexity", "note"],
            [[r["runtime"], r["precision"] + (" (chosen)" if r["chosen"] else ""), r["status"][:90],
              *("-" if r.get(k) is None else f"{r[k]:.{n}f}" for k, n in
                (("prefill_s", 3), ("decode_tokens_per_s", 1), ("total_s", 3))),
              "-" if r.get("speedup_vs_given") is None else f"{r['speedup_vs_given']:.2f}x",
              (f"{r['quality']['perplexity']:.3f} ({r['quality']['increase_pct']:+.2f}%)" if r["quality"] else "-")
              + (f"; prompt path {r['quality']['prompt_path_perplexity']:.3f}" if "prompt_path_perplexity" in
                 r["quality"] else ""),
              r["note"] or "-"] for r in d["candidates"]])
    return write_results(name, targets, tables, data, OUT, machine)


WIDTHS = ((0.34, 0.5), (0.34, 0.4), (0.34, 0.3), (0.5, 0.3), (0.25, 0.4))


def widths(runs: int) -> dict[str, Any]:
    """Speed of INT8 students at several widths (untrained: speed depends on the shapes only) against the peers on the
    uncompressed model in one interleaved run; held-out cosine of any trained student of that width in the cache
    (``deploy-minilm-h{heads}-f{ffn}-*``)."""
    import tempfile

    import torchshrink as ts
    from torchshrink.measure.quality import fidelity
    from torchshrink.prune.structured import FfnPruneConfig, HeadPruneConfig
    from torchshrink.zoo.minilm import load_minilm, tokenize
    from torchshrink.zoo.text import sentence_split

    torch.set_num_threads(2)
    m = load_minilm().eval()
    train_s, held = sentence_split()
    calib = tokenize(train_s[:128], batch_size=32)
    held_b = tokenize(held, batch_size=100)
    ids = tokenize(held[:16], batch_size=16, max_length=128, pad_to_max=True)[0][0]
    example = (ids, torch.ones_like(ids))
    rows, paths, how = [], {}, ""
    for h, f in WIDTHS:
        s = ts.prune(m, HeadPruneConfig(amount=h, importance="fluctuation"), data=calib[:2])
        s = ts.prune(s, FfnPruneConfig(amount=f, importance="fluctuation"), data=calib[:2])
        row: dict[str, Any] = {"heads": h, "ffn": f, "params": sum(p.numel() for p in s.parameters())}
        paths[f"h{h}/f{f}"], how = quantize_student(s.eval(), calib)
        # the most recently trained student of this width
        trained = sorted(CACHE.parent.glob(f"deploy-minilm-h{round(h * 100)}-f{round(f * 100)}-*"),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        if (h, f) == (HEADS, FFN) and (CACHE / "manifest.json").exists():
            trained.insert(0, CACHE)
        for t in trained[:1]:
            q = quantize_student(ts.load(t).eval(), calib)[0]
            fid = fidelity(q, m, held_b)
            row.update(trained=t.name, cosine_mean=fid["cosine_mean"], cosine_min=fid["cosine_min"])
        rows.append(row)
    with tempfile.TemporaryDirectory() as d:
        peers = {"OpenVINO bf16 (bf16 hint)": P.ov(m, example, Path(d), "bf16"),
                 "OpenVINO int8 (NNCF)": P.ov(m, example, Path(d), None, calib, True),
                 "torch.ao int8": torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear}, dtype=torch.qint8)}
        t = _time({**peers, **paths}, example, runs)
    peer = min(peers, key=lambda k: t[k]["p50_ms"])
    for r in rows:
        r.update(t[f"h{r['heads']}/f{r['ffn']}"])
        r["speedup"] = t[peer]["p50_ms"] / r["p50_ms"]
        r["speedup_single_calls"] = min(t[k]["single_p50_ms"] for k in peers) / r["single_p50_ms"]
    return {"example": "16 x 128 real tokens", "runs": runs,
            "int8": how, "peer": f"{peer} {t[peer]['p50_ms']:.1f} ms",
            "rows": rows}


def smollm2() -> dict[str, Any]:
    """``deploy`` on the float SmolLM2-135M: every LM runtime, perplexity within 2% of the model's, generation timed."""
    import tempfile

    from torchshrink.deploy import deploy_lm
    from torchshrink.llm.models import load_causal_lm
    from torchshrink.measure.bench import bench_lock

    torch.set_num_threads(2)
    model, tok = load_causal_lm("zoo:smollm2")
    with tempfile.TemporaryDirectory() as d, bench_lock():
        r = deploy_lm(model, tok, out=Path(d) / "out", threads=2, runs=3)
        files = r.files
    return {**r.to_dict(), "files": files}


def _deploy_rows(r: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "build_s"} for row in r.rows()]


def minilm(cache: Path, runs: int, quantize: bool = True) -> dict[str, Any]:
    import tempfile

    import torchshrink as ts
    from torchshrink.deploy import deploy
    from torchshrink.measure.quality import fidelity
    from torchshrink.zoo.minilm import load_minilm, tokenize
    from torchshrink.zoo.text import sentence_split

    if not (cache / "manifest.json").exists():
        raise SystemExit(f"no compressed MiniLM in {cache}: run --part train first")
    torch.set_num_threads(2)
    m = load_minilm().eval()
    student = small = ts.load(cache).eval()
    train_s, held = sentence_split()
    held_b = tokenize(held, batch_size=100)
    calib = tokenize(train_s[:128], batch_size=32)
    recipe = "pruned + distilled (float)"
    if quantize:  # the compression recipe's last step; deploy then picks among what that model can run as
        small, how = quantize_student(student, calib)
        recipe = f"pruned + distilled + {how}"
    ids = tokenize(held[:16], batch_size=16, max_length=128, pad_to_max=True)[0][0]
    example = (ids, torch.ones_like(ids))  # 16 real sentences, every position attended (16 x 128 real tokens)
    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as d:
        peers = P.peers(m, example, Path(d), calib, transformer=True, torch_int8=ao)
        t0 = time.perf_counter()
        full = deploy(m, example, min_cosine=0.995, threads=2, runs=runs)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        # deploy holds each candidate to the compressed model itself (it must not lose what the compression kept);
        # the figure against the original is measured below on the chosen candidate
        comp = deploy(small, example, min_cosine=0.995, threads=2, runs=runs)
        t_comp = time.perf_counter() - t0
        ok = {k: v for k, v in peers.items() if isinstance(v, nn.Module)}
        quality = {k: fidelity(v, m, held_b) for k, v in ok.items()}
        quality["deploy(compressed)"] = fidelity(comp.module, m, held_b)
        quality["deploy(uncompressed)"] = fidelity(full.module, m, held_b)
        prose, prose_src = prose_sentences(500)  # Debian prose of documents never distilled on
        out_of_domain: dict[str, Any] = {"data": prose_src}
        if prose:
            prose_b = tokenize(prose, batch_size=100)
            out_of_domain |= {k: fidelity(v, m, prose_b)["cosine_mean"]
                              for k, v in (("deploy(compressed)", comp.module), ("deploy(uncompressed)", full.module))}
        timed = {**ok, "deploy(uncompressed)": full.module, "deploy(compressed)": comp.module}
        times = _time(timed, example, runs)
    base = times["torch fp32 eager"]["p50_ms"]
    rows = {k: {**t, "speedup_vs_fp32": base / t["p50_ms"],
                **{q: v for q, v in quality.get(k, {}).items() if q.startswith("cosine")}} for k, t in times.items()}
    rows["deploy(uncompressed)"]["chosen"] = full.winner.name
    rows["deploy(compressed)"]["chosen"] = comp.winner.name
    return {"example": "16 x 128 real tokens (16 held-out sentences padded to 128, mask 1)",
            "quality_data": f"{len(held)} held-out sentences, embedding cosine vs the uncompressed fp32 model",
            "rows": rows, "failed_peers": {k: v for k, v in peers.items() if isinstance(v, str)},
            "deploy_uncompressed": _deploy_rows(full), "deploy_compressed": _deploy_rows(comp),
            "deploy_seconds": {"uncompressed": t_full, "compressed": t_comp}, "runs": runs,
            "params": {"uncompressed": sum(p.numel() for p in m.parameters()),
                       "compressed": sum(p.numel() for p in student.parameters())},
            "out_of_domain_cosine_mean": out_of_domain,
            "compressed": {"recipe": recipe, "student": cache.name,
                           "float_student_cosine_mean": fidelity(student, m, held_b)["cosine_mean"]}}


def resnet50(runs: int) -> dict[str, Any]:
    import tempfile

    import torchvision

    import torchshrink as ts
    from torchshrink.deploy import deploy
    from torchshrink.measure.counts import count_macs
    from torchshrink.prune.structured import ChannelPruneConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    m = torchvision.models.resnet50(weights=None).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 224, 224, generator=g)
    calib = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(4)]
    # channel counts in multiples of 32: the int8 kernels block channels by 16 / 32 (one interleaved run, OpenVINO
    # int8 of the pruned model vs OpenVINO int8 NNCF of the unpruned: round_to 8 1.62x, 16 1.70x, 32 1.74x)
    pruned = ts.prune(m, ChannelPruneConfig(amount=0.5, target="macs", round_to=ROUND_TO, allocation="latency"),
                      data=[x]).eval()
    ao = P.ao_static(m, x, calib)
    with tempfile.TemporaryDirectory() as d:
        peers = P.peers(m, (x,), Path(d), [(c,) for c in calib], transformer=False,
                        torch_int8=ao if isinstance(ao, nn.Module) else m)
        if not isinstance(ao, nn.Module):
            peers["torch.ao int8"] = ao
        t0 = time.perf_counter()
        dep = deploy(pruned, (x,), threads=2, runs=runs, min_cosine=0.99)
        t_dep = time.perf_counter() - t0
        ok = {k: v for k, v in peers.items() if isinstance(v, nn.Module)}
        times = _time({**ok, "deploy(pruned)": dep.module}, (x,), runs, warmup=5)
    base = times["torch fp32 eager"]["p50_ms"]
    rows = {k: {**t, "speedup_vs_fp32": base / t["p50_ms"]} for k, t in times.items()}
    rows["deploy(pruned)"].update(chosen=dep.winner.name, **dep.winner.quality)
    macs = count_macs(m, (x,))
    return {"example": "1 x 3 x 224 x 224, random weights (none pretrained exist here)",
            "rows": rows, "failed_peers": {k: v for k, v in peers.items() if isinstance(v, str)},
            "deploy_pruned": _deploy_rows(dep), "deploy_seconds": t_dep, "runs": runs,
            "macs_ratio": count_macs(pruned, (x,)) / macs, "quality_data": dep.provenance.get("quality", ""),
            "round_to": ROUND_TO}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=(*PARTS, "report"), required=True)
    ap.add_argument("--minutes", type=float, default=40.0, help="train: distillation budget")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--sentences", type=int, default=None, help="train: sentences per epoch (default: what the "
                    "measured rate fits in --minutes; a rate measured while the machine is busy undersizes it)")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per path, interleaved")
    ap.add_argument("--heads", type=float, default=HEADS, help="train: share of attention heads removed per layer")
    ap.add_argument("--ffn", type=float, default=FFN, help="train: share of FFN neurons removed")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="train: epochs")
    ap.add_argument("--autocast", choices=("none", "bf16"), default="none", help="train: bf16 autocast forward passes")
    ap.add_argument("--resume", type=Path, default=None, help="train: go on training the student saved in this folder")
    ap.add_argument("--lr", type=float, default=LR, help="train: peak learning rate (cosine schedule)")
    ap.add_argument("--output-weight", type=float, default=2.0, help="train: weight of the embedding cosine loss "
                    "(each layer's hidden-state cosine weighs 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="train: shuffling seed")
    ap.add_argument("--prose-repeat", type=int, default=0, help="train: add the Debian prose of the calibration "
                    "documents (never the evaluation ones the out-of-domain check reads) this many times to each epoch")
    ap.add_argument("--float-student", action="store_true", help="minilm: hand deploy the float student (deploy "
                    "then builds the INT8 candidates itself) instead of the recipe's INT8 one")
    ap.add_argument("--results", default="deploy", help="results/<name>.json and .md to write (one per machine kind: "
                    "parts measured on different CPUs are never mixed in one file)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    args = ap.parse_args()
    from torchshrink.measure.bench import previous_results
    from torchshrink.measure.machine import machine_info

    if not all(c.isalnum() or c in "-_." for c in args.results) or args.results.startswith("."):
        ap.error(f"--results {args.results!r}: a file name of letters, digits, '-', '_' and '.', not a path")
    if args.part != "report":
        _check_machine(args.results)
    if args.part == "train":
        rows = train(args.minutes, args.cache, args.sentences, args.heads, args.ffn, args.epochs, args.autocast,
                     args.resume, args.lr, args.output_weight, args.seed, args.prose_repeat)
    elif args.part == "minilm":
        rows = minilm(args.cache, args.runs, not args.float_student)
    elif args.part == "resnet50":
        rows = resnet50(args.runs)
    elif args.part == "onnx":
        rows = onnx_part()
    elif args.part == "smollm2":
        rows = smollm2()
    elif args.part == "widths":
        rows = widths(args.runs)
    if args.part == "report":
        old = previous_results(args.results, OUT, True)  # rebuilt from what was stored, with the machine it names
        ok = report({k: v for k, v in old.items() if k in PARTS}, args.results, old.get("machine"))
    else:
        ok = _save(args.part, {**rows, "machine": machine_info()}, args.results)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
