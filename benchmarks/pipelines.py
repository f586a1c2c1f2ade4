"""Combined pipelines on the digits teachers, run through the real recipe runner.

    .venv/bin/python benchmarks/pipelines.py [--check] [--seeds 1]

Targets (issue 9): Deep Compression on the digits MLP >= 35x smaller file with <= 0.5 pp accuracy
drop (the paper: 40x on LeNet-300-100 / MNIST), on the digits CNN >= 25x; prune-distill-quantize on
the digits CNN >= 8x smaller, <= 1.0 pp drop, latency no worse than fp32 (interleaved, batch 1).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from torchshrink.measure.bench import Target, markdown_table, write_results
from torchshrink.recipe import compress, load_recipe

RESULTS = Path(__file__).parent / "results"


def run(model: str, recipe: str, seed: int, keep_html: str | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        res = compress(model, load_recipe(recipe), out, threads=2, seed=seed)
        if keep_html:
            shutil.copy(out / "report.html", RESULTS / f"{keep_html}.html")
        s = res.summary
        return {
            "model": model, "recipe": recipe, "seed": seed,
            "file_ratio": s["file_bytes"]["before"] / s["file_bytes"]["after"],
            "file_bytes": s["file_bytes"]["after"],
            "acc_before": s["accuracy"]["before"], "acc_after": s["accuracy"]["after"],
            "drop_pp": 100 * (s["accuracy"]["before"] - s["accuracy"]["after"]),
            "latency_ratio": s["latency_p50_ms"]["ratio"],
            "stages": [st.kind for st in res.stages],
        }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    jobs = [("zoo:digits-mlp", "deep-compression", 35.0, 0.5, None),
            ("zoo:digits-cnn", "deep-compression", 25.0, None, None),
            ("zoo:digits-cnn", "prune-distill-quantize", 8.0, 1.0, 1.0)]
    rows, targets, raw = [], [], []
    for model, recipe, size_x, max_drop, max_lat in jobs:
        runs = [run(model, recipe, s, f"pipelines-{recipe}-{model.split(':')[1]}" if s == 0 else None) for s in range(args.seeds)]
        raw += runs
        ratio = statistics.fmean(r["file_ratio"] for r in runs)
        drop = statistics.fmean(r["drop_pp"] for r in runs)
        lat = statistics.fmean(r["latency_ratio"] for r in runs)
        rows.append([model, recipe, len(runs), f"{ratio:.1f}x", f"{runs[0]['file_bytes']:,.0f}",
                     f"{100 * runs[0]['acc_before']:.2f}", f"{drop:+.2f}", f"{lat:.2f}"])
        targets.append(Target(f"{recipe} on {model}: file smaller by", ratio, ">=", size_x, "x"))
        if max_drop is not None:
            targets.append(Target(f"{recipe} on {model}: accuracy drop (pp)", drop, "<=", max_drop))
        if max_lat is not None:
            targets.append(Target(f"{recipe} on {model}: latency vs fp32 (batch 1, 2 threads)", lat, "<=", max_lat, "x"))
    table = markdown_table(["model", "recipe", "seeds", "file smaller", "file bytes", "fp32 acc %", "drop pp", "latency ratio"], rows)
    ok = write_results("pipelines", targets, {"Pipelines (mean over seeds)": table}, {"runs": raw})
    print(table)
    for t in targets:
        print(t.row())
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
