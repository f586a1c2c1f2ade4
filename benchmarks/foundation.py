"""Foundation acceptance figures: resnet18 counts, latency-harness self-consistency, digits teachers
from a fresh cache, the packaged MiniLM and the sentence set.

    .venv/bin/python benchmarks/foundation.py [--check]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

import torchshrink as ts
from torchshrink.measure import accuracy, count_macs, count_params, time_interleaved
from torchshrink.measure.bench import Target, markdown_table, write_results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    targets, tables, data = [], {}, {}

    r18 = ts.load_model("torchvision:resnet18")
    params, macs = count_params(r18), count_macs(r18, (torch.randn(1, 3, 224, 224),))
    targets.append(Target("resnet18 parameters", params, "==", 11_689_512))
    targets.append(Target("resnet18 MACs / 1.82G (within 1%)", abs(macs / 1.82e9 - 1), "<=", 0.01, note=f"{macs:,} MACs"))
    data["resnet18"] = {"params": params, "macs": macs}

    ratios = []
    for threads in (1, 2):
        twin = copy.deepcopy(r18)
        t = time_interleaved({"a": r18, "b": twin}, (torch.randn(1, 3, 224, 224),), n_threads=threads, warmup=10, runs=40)
        ratio = t["b"].p50_ms / t["a"].p50_ms
        ratios.append([threads, t["a"].p50_ms, t["b"].p50_ms, ratio])
        targets.append(Target(f"latency harness: twin median ratio ({threads} thr)", abs(ratio - 1), "<=", 0.05,
                              note=f"ratio {ratio:.3f}"))
    tables["Latency harness: resnet18 vs its deep copy, interleaved"] = markdown_table(
        ["threads", "A p50 ms", "B p50 ms", "B/A"], ratios)

    from torchshrink.zoo import digits_loaders
    from torchshrink.zoo.digits import digits_teacher

    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHSHRINK_CACHE"] = cache
        rows = []
        _, _, test = digits_loaders()
        for name, bound in (("digits-cnn", 0.980), ("digits-mlp", 0.965)):
            t0 = time.perf_counter()
            model = digits_teacher(name)
            secs = time.perf_counter() - t0
            acc = accuracy(model, test)
            rows.append([name, count_params(model), acc, secs])
            targets.append(Target(f"{name} test accuracy (fresh cache)", acc, ">=", bound))
            targets.append(Target(f"{name} training time", secs, "<=", 60.0, "s"))
        tables["Digits teachers"] = markdown_table(["model", "params", "test accuracy", "train s"], rows)

    try:
        from torchshrink.zoo.minilm import load_minilm
        from torchshrink.zoo.text import english_sentences

        mini = load_minilm()
        data["minilm"] = {"params": count_params(mini), "sentences": len(english_sentences())}
        targets.append(Target("real English sentences", len(english_sentences()), ">=", 500))
    except ts.TorchshrinkError as e:
        data["minilm"] = {"error": str(e)}

    ok = write_results("foundation", targets, tables, data)
    for t in targets:
        print(t.row())
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
