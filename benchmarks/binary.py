"""Binary / ternary networks: storage, XNOR-popcount kernel speed, digits accuracy (issue 8).

    flock /tmp/torchshrink-bench.lock .venv/bin/python benchmarks/binary.py [--check] [--epochs 8] [--seeds 3]

Run it under the shared benchmark lock (as above) so no other timing run overlaps ours; or pass
``--lock /tmp/torchshrink-bench.lock`` to train and measure sizes first and take the lock only
for the timed section (then do not wrap it in flock). Models are
finalized as a recipe stage does (default config: float16 scales, scales / biases folded into
neighbours, first / last layers stored at keep_dtype), so sizes and accuracies are those of what
is saved. Writes benchmarks/results/binary.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchshrink
from torchshrink.binary import BNNConfig, BWNConfig, TTQConfig, TWNConfig, XNORConfig
from torchshrink.binary import kernels as K
from torchshrink.binary.configs import BinarizeConfig
from torchshrink.binary.ste import sign
from torchshrink.export import saved_bytes
from torchshrink.measure.bench import Target, markdown_table, write_results
from torchshrink.measure.latency import time_interleaved
from torchshrink.recipe.recipe import Finetune, Stage
from torchshrink.recipe.runner import prepare_stage
from torchshrink.recipe.task import digits_task
from torchshrink.recipe.train import finetune, recovery_loss
from torchshrink.zoo import digits_loaders
from torchshrink.zoo.digits import train_digits

OUT = Path(__file__).parent / "results"


def finalized(model: nn.Module, cfg: BinarizeConfig, data: list | None = None) -> nn.Module:
    """What a recipe stage saves: binarize, then finalize (pack, fold, store kept layers)."""
    return torchshrink.run(model, cfg, data=data)[0]


def packed_fully_binary(layer: nn.Module, backend: str) -> nn.Module:
    """A float layer turned into a packed BNN layer (threshold 0, no bias): output = sign(x) (*) sign(W)."""
    m = finalized(nn.Sequential(layer), BNNConfig(keep_first_last=False, backend=backend))[0]
    if m.bias is not None:
        m.bias.zero_()
    return m


def kernel_section() -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    rows: list[dict] = []
    lin = nn.Linear(4096, 4096, bias=False).eval()
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).eval()
    bl = {b: packed_fully_binary(lin, b) for b in ("c", "numpy")}
    bc = {b: packed_fully_binary(conv, b) for b in ("c", "numpy")}
    # exactness: integer outputs equal the float computation of the same signs
    exact = {}
    with torch.no_grad():
        for b in ("c", "numpy"):
            for bs in (1, 64):
                x = torch.randn(bs, 4096)
                exact[f"linear_{b}_b{bs}"] = bool(torch.equal(bl[b](x), sign(x) @ sign(lin.weight).T))
            xc = torch.randn(2, 256, 14, 14)
            exact[f"conv_{b}"] = bool(torch.equal(bc[b](xc), F.conv2d(sign(xc), sign(conv.weight), padding=1)))
    dyn = None
    with contextlib.suppress(Exception):
        dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    cases = [("linear 4096x4096", lin, bl, (1, 4096), 200), ("linear 4096x4096", lin, bl, (64, 4096), 30),
             ("conv3x3 256->256 14x14", conv, bc, (1, 256, 14, 14), 200)]
    for threads in (1, 2):
        for name, ref, packed, shape, runs in cases:
            x = torch.randn(*shape)
            cands = {"fp32 torch": ref, "xnor c": packed["c"], "xnor numpy": packed["numpy"]}
            if dyn is not None and name.startswith("linear"):
                cands["torch.ao dynamic int8"] = dyn
            t = time_interleaved(cands, (x,), n_threads=threads, warmup=10, runs=runs, min_seconds=1.0)
            base = t["fp32 torch"].p50_ms
            for k, v in t.items():
                rows.append({"layer": name, "batch": shape[0], "threads": threads, "path": k,
                             "p50_ms": round(v.p50_ms, 4), "p90_ms": round(v.p90_ms, 4), "runs": v.runs,
                             "speedup_vs_fp32": round(base / v.p50_ms, 2)})
    return rows, exact


def _layer_tensor_bytes(model: nn.Module, names: list[str]) -> int:
    total = 0
    for n in names:
        for t in torchshrink.core.get_module(model, n).state_dict().values():
            total += t.numel() * t.element_size()
    return total


def storage_section(teacher: nn.Module, calib: list[torch.Tensor]) -> list[dict]:
    """Sizes of finalized models; fully binary ones are calibrated (``calib``: digits training
    batches; random inputs for the single layers) so their activation thresholds are real, not 0."""
    rows = []
    torch.manual_seed(0)
    for label, layer, x in (("linear 4096x4096", nn.Linear(4096, 4096), torch.randn(16, 4096)),
                            ("conv3x3 256->256", nn.Conv2d(256, 256, 3, padding=1), torch.randn(2, 256, 14, 14))):
        fp = saved_bytes(nn.Sequential(layer))
        for cfg in (BWNConfig(keep_first_last=False), XNORConfig(keep_first_last=False), TWNConfig(keep_first_last=False)):
            b = saved_bytes(finalized(nn.Sequential(layer), cfg, [x]))
            rows.append({"what": f"{label} (file)", "kind": cfg.kind, "fp32_bytes": fp, "bytes": b, "ratio": round(fp / b, 2)})
    fp_file = saved_bytes(teacher)
    variants = [("", BWNConfig()), ("", XNORConfig()), ("", TWNConfig()), ("", TTQConfig()),
                (" (ReLUs kept, thresholds stored: fold_threshold false)", XNORConfig(fold_threshold=False)),
                (" (first/last binarized too)", BWNConfig(keep_first_last=False)),
                (" (kept layers float16)", BWNConfig(keep_dtype="float16")),
                (" (kept layers float32)", BWNConfig(keep_dtype="float32")),
                (" (all float32, no folding: the previous storage)",
                 BWNConfig(keep_dtype="float32", param_dtype="float32", fold=False))]
    for tag, cfg in variants:
        m = finalized(teacher, cfg, calib)
        names = torchshrink.report(m)[-1].notes["binarized"]
        fp_t, b_t = _layer_tensor_bytes(teacher, names), _layer_tensor_bytes(m, names)
        rows.append({"what": "digits-cnn binarized layers (tensors)", "kind": cfg.kind + tag, "fp32_bytes": fp_t,
                     "bytes": b_t, "ratio": round(fp_t / b_t, 2)})
        b = saved_bytes(m)
        rows.append({"what": "digits-cnn whole model (file)", "kind": cfg.kind + tag, "fp32_bytes": fp_file, "bytes": b,
                     "ratio": round(fp_file / b, 2)})
    return rows


def accuracy_section(teachers: list[nn.Module], epochs: int) -> dict[str, list[float]]:
    """Each kind is trained once per seed, then finalized with the default config (the reported
    number) and, for BWN, with other storage choices for the kept first / last layers."""
    task = digits_task()
    out: dict[str, list[float]] = {"fp32": [float(task.evaluate(t, t)["accuracy"]) for t in teachers]}
    extra = {"bwn": [("bwn, kept layers float32", {"keep_dtype": "float32"}),
                     ("bwn, kept layers float16", {"keep_dtype": "float16"}),
                     ("bwn, all float32, no folding", {"keep_dtype": "float32", "param_dtype": "float32", "fold": False})]}
    for cfg in (BWNConfig(), XNORConfig(), XNORConfig(fold_threshold=False), TWNConfig(), TTQConfig()):
        kind = cfg.kind + ("" if getattr(cfg, "fold_threshold", True) else ", ReLUs kept, thresholds stored")
        for seed, t in enumerate(teachers):
            t0 = time.perf_counter()
            stage = Stage(cfg, None, Finetune(epochs=epochs, lr=1e-3, seed=seed))
            trained = prepare_stage(t, stage, task)
            finetune(trained, task.require_train(), stage.finetune, loss_fn=recovery_loss(stage.recovery, t, stage.finetune))
            for label, change in [(kind, {})] + extra.get(kind, []):
                m = torchshrink.finalize(trained, dataclasses.replace(cfg, **change))
                out.setdefault(label, []).append(float(task.evaluate(m, t)["accuracy"]))
            print(f"  {kind} seed {seed}: {out[kind][-1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lock", default=None, help="take this flock only while timing (instead of an outer flock)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("backend:", K.describe_backend(), flush=True)
    teachers = [train_digits("digits-cnn", seed=s) for s in range(args.seeds)]
    calib = [x for x, _ in itertools.islice(digits_loaders(64, 0)[0], 8)]
    storage = storage_section(teachers[0], calib)
    print("storage done", flush=True)
    acc = accuracy_section(teachers, args.epochs)
    with open(args.lock, "a") if args.lock else contextlib.nullcontext() as lock:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        load = [os.getloadavg()[0]]
        kernel_rows, exact = kernel_section()
        load.append(os.getloadavg()[0])
    print("kernel done", flush=True)

    def speed(layer: str, batch: int) -> float:
        return next(r["speedup_vs_fp32"] for r in kernel_rows
                    if r["layer"] == layer and r["batch"] == batch and r["threads"] == 1 and r["path"] == "xnor c")

    def ratio(what: str, kind: str) -> float:
        return next(r["ratio"] for r in storage if r["what"] == what and r["kind"] == kind)

    mean = {k: statistics.fmean(v) for k, v in acc.items()}
    drop = {k: round(100 * (mean["fp32"] - mean[k]), 2) for k in mean}
    layers = "digits-cnn binarized layers (tensors)"
    digits_layers = {k: ratio(layers, k) for k in ("bwn", "xnor")}
    stored = ratio(layers, "xnor (ReLUs kept, thresholds stored: fold_threshold false)")
    xnor_note = (f"xnor's 352 activation thresholds fold into the BatchNorms before its layers (with them stored: "
                 f"{stored}x)")
    targets = [
        Target("storage: binarized layers >= 31x (4096x4096 Linear file, bwn)", ratio("linear 4096x4096 (file)", "bwn"), ">=", 31, "x"),
        Target("storage: binarized layers >= 31x (256ch 3x3 conv file, bwn)", ratio("conv3x3 256->256 (file)", "bwn"), ">=", 31, "x"),
        Target("storage: binarized layers >= 31x (digits-cnn layers, min of bwn/xnor)", min(digits_layers.values()), ">=", 31,
               "x", f"bwn {digits_layers['bwn']}x, xnor {digits_layers['xnor']}x. {xnor_note}".strip()),
        Target("storage: whole digits model >= 20x (bwn, file)", ratio("digits-cnn whole model (file)", "bwn"), ">=", 20, "x"),
        Target("storage: ternary >= 15x (4096x4096 Linear file, twn)", ratio("linear 4096x4096 (file)", "twn"), ">=", 15, "x"),
        Target("storage: ternary >= 15x (digits-cnn layers, twn)", ratio(layers, "twn"), ">=", 15, "x"),
        Target("kernel: Linear 4096 batch 1, 1 thread >= 10x", speed("linear 4096x4096", 1), ">=", 10, "x"),
        Target("kernel: Linear 4096 batch 64, 1 thread >= 3x", speed("linear 4096x4096", 64), ">=", 3, "x"),
        Target("kernel: conv 256->256 14x14 batch 1, 1 thread >= 3x", speed("conv3x3 256->256 14x14", 1), ">=", 3, "x"),
        Target("kernel: outputs equal float of same signs (all cases)", float(all(exact.values())), ">=", 1),
        Target("accuracy: BWN within 2.0 pp of fp32 (mean drop, pp)", drop["bwn"], "<=", 2.0, "", "stored model"),
        Target("accuracy: XNOR within 6 pp of fp32 (mean drop, pp)", drop["xnor"], "<=", 6.0, "", "stored model"),
        Target("accuracy: TWN within 1.5 pp of fp32 (mean drop, pp)", drop["twn"], "<=", 1.5, "", "stored model"),
    ]
    tables = {
        "Notes": (f"XNOR kernel backend: {K.describe_backend()}. Timings: interleaved in one run (each candidate "
                  "runs after another's 64 MB fp32 or 16 MB int8 weights went through the cache, as in a network), "
                  "median (p50) and p90. 'xnor' rows are whole packed BNN modules: for Linear on the C backend one "
                  "call does sign + pack of the input, the XNOR-popcount GEMM and the float epilogue. The kernel is "
                  "single-threaded, so the 2-thread rows compare it with 2-thread torch. 1-minute load average "
                  f"of the 2-core machine before / after the timed section: {load[0]:.1f} / {load[1]:.1f}"
                  + (" (other jobs on the machine; fp32's 64 MB weight stream suffers more from that than the 2 MB one)"
                     if max(load) > 1.5 else "") + ".\n\n"
                  f"Exactness (integer output == float conv/matmul of the same signs): {exact}\n\n"
                  "Storage: packed bits go into the compact container (one LZMA stream for manifest + tensors); "
                  "scales, biases and thresholds are float16; a binary layer's scale and bias fold into a following "
                  "BatchNorm, or its scale through ReLU into the next float layer; the first / last layers are kept "
                  "unbinarized and stored at keep_dtype (default int8: Linear int8 per-channel weight-only, Conv2d "
                  "float16), chosen by the digits accuracy below. For xnor / bnn the binarize stage replaces a ReLU "
                  "between a BatchNorm and a fully binary layer by Identity (XNOR-Net's BN -> sign -> binary layer "
                  "order), so finalize folds each layer's activation threshold into that BatchNorm's bias exactly "
                  "and stores none (the Linear after Flatten shares one threshold per channel); 'ReLUs kept, "
                  "thresholds stored' rows show the previous layout. Storage rows of fully binary models are "
                  "calibrated (digits training batches), so their thresholds are not 0."),
        "Kernel timing": markdown_table(
            ["layer", "batch", "threads", "path", "p50 ms", "p90 ms", "runs", "speed-up vs fp32"],
            [[r["layer"], r["batch"], r["threads"], r["path"], r["p50_ms"], r["p90_ms"], r["runs"], f"{r['speedup_vs_fp32']}x"]
             for r in kernel_rows]),
        "Storage (bytes torchshrink writes; 'tensors' = state tensors of the binarized layers)": markdown_table(
            ["what", "kind", "fp32 bytes", "bytes", "ratio"],
            [[r["what"], r["kind"], r["fp32_bytes"], r["bytes"], f"{r['ratio']}x"] for r in storage]),
        f"Digits accuracy (test set, 360 images; {args.epochs} fine-tune epochs, one teacher per seed; stored models)":
            markdown_table(["model", "per seed", "mean", "drop vs fp32 (pp)"],
                           [[k, ", ".join(f"{a:.4f}" for a in v), f"{mean[k]:.4f}", drop[k]] for k, v in acc.items()]),
    }
    data = {"load_average": load, "backend": K.describe_backend(), "kernel": kernel_rows, "exact": exact, "storage": storage, "accuracy": acc,
            "accuracy_mean": mean, "accuracy_drop_pp": drop, "epochs": args.epochs}
    ok = write_results("binary", targets, tables, data, OUT)
    for t in targets:
        print(f"{'PASS' if t.passed else 'FAIL'}  {t.name}: {t.value}")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
