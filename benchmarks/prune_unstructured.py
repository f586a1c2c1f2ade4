"""Benchmark for issue 3: unstructured + N:M pruning.

1. Digits CNN and MLP: global magnitude + AGP + fine-tune to 90% and 95% sparsity; test-accuracy drop.
2. Saved file size at 90% sparsity vs the dense fp32 file (bytes torchshrink writes).
3. SparseLinear (CSR) vs dense nn.Linear 2048x2048, interleaved in one run: batch 1 and 32, 2 threads
   (and 1 thread at 90%), sparsity 50..95% -> speedup and break-even.
4. Model-level: use_sparse_kernels() on a pruned 3-layer 2048-wide MLP and on the digits models
   (which layers it picked, and the measured model speedup).
5. 2:4 masks on both digits models: every group of 4 holds exactly 2 nonzeros.

Run: flock /tmp/torchshrink-bench.lock .venv/bin/python benchmarks/prune_unstructured.py [--check] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torchshrink as ts
from torchshrink.export.io import saved_bytes
from torchshrink.measure import accuracy, time_interleaved
from torchshrink.measure.machine import machine_info, machine_markdown
from torchshrink.prune import NMConfig, SparseLinear, UnstructuredConfig, use_sparse_kernels
from torchshrink.recipe.recipe import Finetune, Stage
from torchshrink.recipe.runner import run_stage
from torchshrink.recipe.task import digits_task
from torchshrink.zoo.digits import digits_loaders, digits_teacher

OUT = Path(__file__).parent / "results"
NAME = "prune_unstructured"


def sparsity_of(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    ws += [m.dense_weight() for m in model.modules() if isinstance(m, SparseLinear)]
    return 1.0 - sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)


def digits_runs(epochs: int, targets: dict) -> list[dict]:
    rows = []
    _, _, test = digits_loaders()
    task = digits_task()
    for name in ("digits-cnn", "digits-mlp"):
        teacher = digits_teacher(name).eval()
        base_acc = accuracy(teacher, test)
        dense_bytes = saved_bytes(teacher)
        for sp in (0.9, 0.95):
            cfg = UnstructuredConfig(sparsity=sp, scope="global", min_density=0.02, schedule="agp", end=0.6,
                                     update_every=8, sparse_kernel="auto")
            t0 = time.perf_counter()
            stage = Stage(cfg, None, Finetune(epochs=epochs, lr=2e-3, optimizer="adamw"), "finetune")
            pruned, _ = run_stage(teacher, stage, task)
            acc = accuracy(pruned, test)
            drop_pp = (base_acc - acc) * 100
            limit = targets[sp]
            row = {"model": name, "sparsity_target": sp, "sparsity": round(sparsity_of(pruned), 4),
                   "dense_acc": base_acc, "pruned_acc": acc, "drop_pp": round(drop_pp, 2), "limit_pp": limit,
                   "pass": drop_pp <= limit, "seconds": round(time.perf_counter() - t0, 1),
                   "dense_bytes": dense_bytes, "file_bytes": saved_bytes(pruned),
                   "sparse_kernel_layers": [k for k, v in getattr(pruned, "_torchshrink_sparse_kernels", {}).items()
                                            if v["used"]]}
            row["file_ratio"] = round(row["file_bytes"] / dense_bytes, 4)
            rows.append(row)
            print(f"{name} @ {sp:.0%}: acc {base_acc:.4f} -> {acc:.4f} (drop {drop_pp:.2f} pp, limit {limit}) "
                  f"file {row['file_ratio']:.3f}x", flush=True)
        # 2:4 on the same teacher, with the same fine-tune
        stage = Stage(NMConfig(n=2, m=4), None, Finetune(epochs=max(epochs // 2, 1), lr=1e-3), "finetune")
        nm, _ = run_stage(teacher, stage, task)
        groups_ok = groups = 0
        for m in nm.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                w = m.weight if m.weight.dim() == 2 else m.weight.movedim(1, -1)
                if w.shape[-1] % 4:
                    continue
                nz = torch.count_nonzero(w.reshape(-1, 4), dim=-1)
                groups += nz.numel()
                groups_ok += int((nz == 2).sum())
        rows.append({"model": name, "nm": "2:4", "groups": groups, "groups_exactly_2": groups_ok,
                     "pass": groups == groups_ok, "dense_acc": base_acc, "pruned_acc": accuracy(nm, test)})
        print(f"{name} 2:4: {groups_ok}/{groups} groups with exactly 2 nonzeros, acc {rows[-1]['pruned_acc']:.4f}",
              flush=True)
    return rows


def random_sparse(n: int, sp: float, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, n, generator=g) * 0.02)
    return ts.prune(lin_model(lin), UnstructuredConfig(sparsity=sp, sparse_kernel="off"))[0]


def lin_model(lin: nn.Module) -> nn.Sequential:
    return nn.Sequential(lin)


def kernel_runs(quick: bool) -> list[dict]:
    rows = []
    n = 2048
    for sp in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95):
        dense = random_sparse(n, sp)
        sparse = SparseLinear.from_linear(dense)  # backend "c": our kernel, torch's thread count
        ours1 = SparseLinear.from_linear(dense)
        ours1.kernel_threads = 1  # our kernel, no OpenMP region
        torch_csr = SparseLinear.from_linear(dense)
        torch_csr.backend = "torch"
        for batch, thr in ((1, 2), (32, 2)) + (((1, 1), (32, 1)) if sp == 0.9 else ()):
            x = torch.randn(batch, n, generator=torch.Generator().manual_seed(1))
            runs = (60 if quick else 300) if batch == 1 else (15 if quick else 40)
            t = time_interleaved({"dense": dense, "ours_n": sparse, "ours_1": ours1, "torch_csr": torch_csr}, (x,),
                                 n_threads=thr, warmup=10, runs=runs)
            pick = min(("ours_n", "ours_1", "torch_csr"), key=lambda k: t[k].p50_ms)  # what use_sparse_kernels picks
            t["csr"] = t[pick]
            with torch.inference_mode():
                ok = torch.allclose(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
            row = {"sparsity": sp, "batch": batch, "threads": thr, "dense_p50_ms": t["dense"].p50_ms,
                   "dense_p90_ms": t["dense"].p90_ms, "csr_p50_ms": t["csr"].p50_ms, "csr_p90_ms": t["csr"].p90_ms,
                   "speedup": t["dense"].p50_ms / t["csr"].p50_ms, "picked": pick,
                   "ours_n_speedup": t["dense"].p50_ms / t["ours_n"].p50_ms,
                   "ours_1_speedup": t["dense"].p50_ms / t["ours_1"].p50_ms, "torch_csr_p50_ms": t["torch_csr"].p50_ms,
                   "torch_csr_speedup": t["dense"].p50_ms / t["torch_csr"].p50_ms, "runs": t["dense"].runs,
                   "outputs_match": ok}
            rows.append(row)
            print(f"2048x2048 @ {sp:.0%} batch {batch} threads {thr}: dense {row['dense_p50_ms']:.3f} ms, "
                  f"best CSR ({pick}) {row['csr_p50_ms']:.3f} ms -> {row['speedup']:.2f}x; ours/{thr}t "
                  f"{row['ours_n_speedup']:.2f}x, ours/1t {row['ours_1_speedup']:.2f}x, torch CSR "
                  f"{row['torch_csr_speedup']:.2f}x", flush=True)
    return rows


def model_level(quick: bool) -> list[dict]:
    out = []
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 256))
    pruned = ts.prune(mlp, UnstructuredConfig(sparsity=0.9, sparse_kernel="off"),
                      select={"overrides": {"4": {"sparsity": 0.6}}})
    fast = copy.deepcopy(pruned)
    report = use_sparse_kernels(fast, batch=1, threads=2)
    x = torch.randn(1, 2048)
    t = time_interleaved({"dense": pruned, "auto": fast}, (x,), n_threads=2, warmup=10, runs=60 if quick else 300)
    out.append({"model": "mlp-2048x3 (90%, last layer 60%)", "batch": 1, "threads": 2,
                "layers": {k: {"used": v["used"], "backend": v["backend"], "speedup": round(v["speedup"], 2)}
                           for k, v in report.items()},
                "dense_p50_ms": t["dense"].p50_ms, "auto_p50_ms": t["auto"].p50_ms,
                "model_speedup": t["dense"].p50_ms / t["auto"].p50_ms,
                "dense_bytes": saved_bytes(mlp), "file_bytes": saved_bytes(fast)})
    out[-1]["file_ratio"] = out[-1]["file_bytes"] / out[-1]["dense_bytes"]
    print(f"model-level: {out[-1]}", flush=True)
    return out


def markdown(res: dict) -> str:
    L = [f"# {NAME}\n", machine_markdown(res["machine"]), "", res["note"], "", "## Targets\n",
         "| target | measured | result |", "|---|---|---|"]
    for t in res["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {'PASS' if t['pass'] else 'FAIL'} |")
    L += ["", "## Digits: global magnitude + AGP + fine-tune\n",
          "| model | sparsity | dense acc | pruned acc | drop (pp) | file vs dense | sparse-kernel layers |",
          "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["digits"]:
        if "nm" in r:
            continue
        L.append(f"| {r['model']} | {r['sparsity']:.3f} | {r['dense_acc']:.4f} | {r['pruned_acc']:.4f} | "
                 f"{r['drop_pp']:.2f} | {r['file_ratio']:.3f}x | {', '.join(r['sparse_kernel_layers']) or 'none'} |")
    L += ["", "| model | 2:4 groups with exactly 2 nonzeros | acc after 2:4 + fine-tune |", "|---|---:|---:|"]
    for r in res["digits"]:
        if "nm" in r:
            L.append(f"| {r['model']} | {r['groups_exactly_2']}/{r['groups']} | {r['pruned_acc']:.4f} |")
    L += ["", "## CSR Linear 2048x2048 vs dense (same run, interleaved, medians)\n",
          "| sparsity | batch | threads | dense p50 ms | best CSR p50 ms | best CSR p90 ms | speedup (best) | "
          "ours, all threads | ours, 1 thread | torch CSR |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["kernel"]:
        L.append(f"| {r['sparsity']:.2f} | {r['batch']} | {r['threads']} | {r['dense_p50_ms']:.3f} | "
                 f"{r['csr_p50_ms']:.3f} | {r['csr_p90_ms']:.3f} | {r['speedup']:.2f}x | {r['ours_n_speedup']:.2f}x | "
                 f"{r['ours_1_speedup']:.2f}x | {r['torch_csr_speedup']:.2f}x |")
    L += ["", "## Model level: use_sparse_kernels (chosen per layer by measurement)\n"]
    for r in res["model_level"]:
        L.append(f"- {r['model']}, batch {r['batch']}, {r['threads']} threads: layers {r['layers']}; model "
                 f"{r['dense_p50_ms']:.3f} -> {r['auto_p50_ms']:.3f} ms = **{r['model_speedup']:.2f}x**; "
                 f"file {r['file_ratio']:.3f}x of dense")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="exit non-zero if a target fails")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and runs (smoke test, results not saved)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--part", choices=("all", "digits", "timing", "merge"), default="all",
                    help="digits: accuracy runs only (no timing, need no lock), saved to a temp file; "
                         "timing: timed runs, merged with a previous digits part")
    args = ap.parse_args()
    torch.set_num_threads(2)
    targets_pp = {0.9: 0.5, 0.95: 1.5}
    part_file = Path(tempfile.gettempdir()) / f"{NAME}.digits.json"
    if args.part == "digits":
        part_file.write_text(json.dumps(digits_runs(3 if args.quick else args.epochs, targets_pp)))
        return 0
    timing_file = Path(tempfile.gettempdir()) / f"{NAME}.timing.json"
    if args.part == "merge":
        kernel, ml = json.loads(timing_file.read_text())
    else:
        kernel = kernel_runs(args.quick)
        ml = model_level(args.quick)
        timing_file.write_text(json.dumps([kernel, ml]))
    if args.part in ("timing", "merge"):
        if not part_file.is_file():
            print(f"timing saved to {timing_file}; run --part digits, then --part merge")
            return 0
        digits = json.loads(part_file.read_text())
    else:
        digits = digits_runs(3 if args.quick else args.epochs, targets_pp)
    T = []
    for r in digits:
        if "nm" in r:
            T.append({"target": f"{r['model']} 2:4: exactly 2 nonzeros per group of 4", "pass": r["pass"],
                      "measured": f"{r['groups_exactly_2']}/{r['groups']}"})
        else:
            T.append({"target": f"{r['model']} {r['sparsity_target']:.0%}: drop <= {r['limit_pp']} pp",
                      "pass": r["pass"], "measured": f"{r['drop_pp']:.2f} pp (sparsity {r['sparsity']:.3f})"})
            if r["sparsity_target"] == 0.9:
                T.append({"target": f"{r['model']} file at 90% <= 0.15x dense", "pass": r["file_ratio"] <= 0.15,
                          "measured": f"{r['file_ratio']:.3f}x ({r['file_bytes']} / {r['dense_bytes']} B)"})
    k = {(r["sparsity"], r["batch"], r["threads"]): r for r in kernel}
    s90 = k[(0.9, 1, 2)]["speedup"]
    T.append({"target": "CSR Linear 2048^2 @90%, batch 1, 2 threads >= 2.5x dense", "pass": s90 >= 2.5,
              "measured": f"{s90:.2f}x"})
    even = [sp for sp in sorted({r["sparsity"] for r in kernel}) if k[(sp, 1, 2)]["speedup"] >= 1.0]
    be = min(even) if even else None
    T.append({"target": "break-even (batch 1, 2 threads) at or below 75% sparsity", "pass": be is not None and be <= 0.75,
              "measured": f"first sparsity >= 1.0x: {be}"})
    T.append({"target": "model file at 90% (2048 MLP) <= 0.15x dense", "pass": ml[0]["file_ratio"] <= 0.15,
              "measured": f"{ml[0]['file_ratio']:.3f}x"})
    res = {"machine": machine_info(), "targets": T, "digits": digits, "kernel": kernel, "model_level": ml,
           "note": ("Accuracy: test split (360 digits, 1 digit = 0.28 pp) never seen in pruning or fine-tuning. "
                    f"Fine-tune: {args.epochs} epochs AdamW lr 2e-3 cosine, AGP cubic over the first 60% of steps, "
                    "global magnitude, min density 2% per layer. Timings: torchshrink.measure.time_interleaved, "
                    "dense and CSR alternated in one process after warm-up; speedup = ratio of medians.")}
    for t in T:
        print(("PASS " if t["pass"] else "FAIL ") + t["target"] + ": " + t["measured"])
    if not args.quick:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{NAME}.json").write_text(json.dumps(res, indent=1, default=str))
        (OUT / f"{NAME}.md").write_text(markdown(res))
    return 1 if args.check and not all(t["pass"] for t in T) else 0


if __name__ == "__main__":
    sys.exit(main())
