"""Bring your own model and data (#18): every built-in recipe that applies, run from the CLI on the
walkthrough's own CNN and MLP (examples/byo) with --data, then again without --data.

With data, each run must finish, and the accuracy its report states must equal what a fresh process
measures on the saved model over the same held-out split (exactly). Without data, each run must
either finish with honest labels (agreement on random inputs, never accuracy) or be refused before
any work with one line (exit 2, nothing left behind): none may fail midway.

    .venv/bin/python benchmarks/byo.py [--check] [--recipes a,b]

Writes benchmarks/results/byo.{json,md}. Timings in the table are the runs' own interleaved figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torchshrink.measure.bench import Target, markdown_table, write_results  # noqa: E402
from torchshrink.recipe.builtin import BUILTIN  # noqa: E402

MODELS = {"cnn": ("models:cnn@cnn.safetensors", "data/images", "1,3,32,32"),
          "mlp": ("models:mlp@mlp.safetensors", "data/wine.csv", "1,13")}
SKIP = {"bert-int8": "BERT-family encoders only (fuses Q/K/V and add+LayerNorm)"}
EVAL = ("import json, sys\nfrom torchshrink.models import load_model\n"
        "from torchshrink.recipe.userdata import DataSpec, task_from_data\n"
        "m = load_model(sys.argv[1])\nprint(json.dumps(task_from_data(DataSpec(sys.argv[2]), m).evaluate(m, m)))\n")


def _run(cwd: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchshrink", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--recipes", default=None, help="comma-separated subset (default: every built-in)")
    args = ap.parse_args()
    recipes = [r for r in (args.recipes.split(",") if args.recipes else BUILTIN) if r not in SKIP]
    work = Path(tempfile.mkdtemp(prefix="byo-"))
    for name in ("models.py", "make_data.py", "train.py"):
        shutil.copy(ROOT / "examples" / "byo" / name, work / name)
    for script in ("make_data.py", "train.py"):
        r = subprocess.run([sys.executable, script], cwd=work, capture_output=True, text=True, timeout=600)
        print(r.stdout.strip(), flush=True)
        if r.returncode:
            print(r.stderr[-2000:])
            return 1
    rows, runs, nodata = [], [], []
    equal = finished = 0
    for model, (spec, data, shape) in MODELS.items():
        for recipe in recipes:
            out = f"out-{model}-{recipe}"
            t0 = time.perf_counter()
            r = _run(work, "compress", "-m", spec, "--data", data, "--input-shape", shape, "-r", recipe, "-o", out)
            secs = time.perf_counter() - t0
            rec = {"model": model, "recipe": recipe, "rc": r.returncode, "seconds": round(secs, 1)}
            if r.returncode == 0:
                finished += 1
                rep = json.loads((work / out / "report.json").read_text())
                s = rep["summary"]
                ev = subprocess.run([sys.executable, "-c", EVAL, f"{spec.split('@')[0]}@{out}/model", data], cwd=work,
                                    capture_output=True, text=True, timeout=600)
                fresh = json.loads(ev.stdout)["accuracy"] if ev.returncode == 0 else None
                reported = rep["final"]["quality"]["accuracy"]
                equal += fresh == reported
                rec.update(before=s["accuracy"]["before"], reported=reported, fresh=fresh,
                           size=s["file_bytes"]["ratio"], latency=s["latency_p50_ms"]["ratio"],
                           provenance=rep["provenance"]["quality"], warnings=rep["warnings"])
                rows.append([model, recipe, f"{s['accuracy']['before']:.4f}", f"{reported:.4f}",
                             "yes" if fresh == reported else f"NO ({fresh})", f"{s['file_bytes']['ratio']:.3f}x",
                             f"{1 / s['latency_p50_ms']['ratio']:.2f}x", f"{secs:.0f}"])
            else:
                rec["error"] = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []
                rows.append([model, recipe, "-", "-", f"FAILED: {' '.join(rec['error'])[:120]}", "-", "-", f"{secs:.0f}"])
            runs.append(rec)
            print(rows[-1], flush=True)
            # the same without data: honest labels, or refused before any work in one line
            out2 = f"nodata-{model}-{recipe}"
            r2 = _run(work, "compress", "-m", spec, "--input-shape", shape, "-r", recipe, "-o", out2)
            lines = [x for x in r2.stderr.strip().splitlines() if x.strip()]
            left = sorted(p.name for p in work.iterdir() if p.name.startswith((out2, f".{out2}")))
            if r2.returncode == 0:
                rep2 = json.loads((work / out2 / "report.json").read_text())
                ok = "agreement_mean" in rep2["final"]["quality"] and "accuracy" not in rep2["final"]["quality"]
                outcome = "ran, labelled agreement on random inputs" if ok else "ran WITHOUT an honest label"
            else:
                ok = r2.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and not left
                outcome = ("refused up front: " + lines[-1][7:110]) if ok else f"FAILED midway (rc {r2.returncode})"
            nodata.append({"model": model, "recipe": recipe, "ok": ok, "outcome": outcome})
    n = len(MODELS) * len(recipes)
    honest = sum(x["ok"] for x in nodata)
    targets = [
        Target("with --data: recipes that finish", finished, "==", n, note=f"of {n} (model x recipe)"),
        Target("with --data: reported accuracy == fresh-process evaluation, exactly", equal, "==", n),
        Target("without --data: honest run or refused up front in one line", honest, "==", n),
    ]
    tables = {
        "With --data (20% held out, seed 0; accuracy on it; size and speed vs the original, this machine)":
            markdown_table(["model", "recipe", "accuracy before", "reported after", "fresh process equal",
                            "file", "speed", "s"], rows),
        "Without --data": markdown_table(["model", "recipe", "outcome"],
                                         [[x["model"], x["recipe"], x["outcome"]] for x in nodata]),
        "Not run": markdown_table(["recipe", "why"], [[k, v] for k, v in SKIP.items()]),
    }
    ok = write_results("byo", targets, tables, {"runs": runs, "nodata": nodata, "recipes": recipes})
    for t in targets:
        print(t.row())
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
