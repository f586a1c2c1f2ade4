"""Combined pipelines on the digits teachers, run through the real recipe runner.

    flock /tmp/torchshrink-bench.lock .venv/bin/python benchmarks/pipelines.py [--check] [--seeds 3]
 or .venv/bin/python benchmarks/pipelines.py --lock /tmp/torchshrink-bench.lock [--check] [--seeds 3]
    (trains without the shared lock and takes it only around each interleaved timing run)

Targets (issue 9): Deep Compression on the digits MLP >= 35x smaller file with <= 0.5 pp accuracy
drop (the paper: 40x on LeNet-300-100 / MNIST), on the digits CNN >= 25x; prune-distill-quantize on
the digits CNN >= 8x smaller, <= 1.0 pp drop, latency no worse than fp32 (interleaved, batch 1).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from torchshrink.export import load
from torchshrink.measure.bench import Target, markdown_table, write_results
from torchshrink.recipe import compress, load_recipe, runner
from torchshrink.zoo import digits_loaders

RESULTS = Path(__file__).parent / "results"


def lock_timing(path: str) -> None:
    """Hold the shared benchmark flock around every interleaved timing run of the recipe runner."""
    inner = runner._timed_pair

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with open(path, "a") as f, contextlib.ExitStack() as stack:
            fcntl.flock(f, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
            return inner(*args, **kwargs)

    runner._timed_pair = timed


def run(model: str, recipe: str, seed: int, keep_html: str | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        res = compress(model, load_recipe(recipe), out, threads=2, seed=seed)
        if keep_html:
            shutil.copy(out / "report.html", RESULTS / f"{keep_html}.html")
        # the saved model (as written to OUT/model) must give the same outputs as the one measured
        back = load(out / "model")
        x = torch.cat([xb for xb, _ in digits_loaders(batch_size=128)[2]])
        with torch.inference_mode():
            reload_exact = bool(torch.equal(back(x), res.model(x)))
        s = res.summary
        return {
            "model": model, "recipe": recipe, "seed": seed,
            "file_ratio": s["file_bytes"]["before"] / s["file_bytes"]["after"],
            "file_bytes": s["file_bytes"]["after"],
            "acc_before": s["accuracy"]["before"], "acc_after": s["accuracy"]["after"],
            "drop_pp": 100 * (s["accuracy"]["before"] - s["accuracy"]["after"]),
            "latency_ratio": s["latency_p50_ms"]["ratio"],
            "stages": [st.kind for st in res.stages],
            "files": sorted(p.name for p in (out / "model").iterdir()),
            "reload_exact": reload_exact,
        }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--lock", default=None, help="take this flock only while timing (instead of an outer flock)")
    args = ap.parse_args()
    if args.lock:
        lock_timing(args.lock)
    # training runs on one thread (a shared, loaded machine makes two spinning threads slower);
    # every latency figure is still taken at 2 threads (compress(threads=2) pins them while timing)
    torch.set_num_threads(1)
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
        exact = all(r["reload_exact"] for r in runs)  # a size only counts if the file reloads to the same outputs
        rows.append([model, recipe, len(runs), f"{ratio:.1f}x", f"{runs[0]['file_bytes']:,.0f}",
                     f"{100 * runs[0]['acc_before']:.2f}", f"{drop:+.2f}", f"{lat:.2f}",
                     " + ".join(runs[0]["files"]), "yes" if exact else "NO"])
        targets.append(Target(f"{recipe} on {model}: file smaller by", ratio if exact else None, ">=", size_x, "x",
                              f"{' + '.join(runs[0]['files'])}; " + ("reloads to identical outputs" if exact else "RELOAD MISMATCH")))
        if max_drop is not None:
            targets.append(Target(f"{recipe} on {model}: accuracy drop (pp)", drop, "<=", max_drop))
        if max_lat is not None:
            targets.append(Target(f"{recipe} on {model}: latency vs fp32 (batch 1, 2 threads)", lat, "<=", max_lat, "x"))
    table = markdown_table(["model", "recipe", "seeds", "file smaller", "file bytes", "fp32 acc %", "drop pp", "latency ratio", "files", "reload exact"], rows)
    torch.set_num_threads(2)  # the machine line reports the threads the latencies were taken at
    ok = write_results("pipelines", targets, {"Pipelines (mean over seeds)": table}, {"runs": raw})
    print(table)
    for t in targets:
        print(t.row())
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
