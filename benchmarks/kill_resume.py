"""Kill `torchshrink compress` with SIGKILL at many points of a run, recover, and check the result is the
uninterrupted run's: the same model tensors (and file bytes) and the same report figures.

Each case runs `torchshrink compress --model zoo:digits-mlp --recipe prune-quantize` (magnitude pruning
with 20 fine-tune epochs, then static INT8; about 5 s) in a subprocess and kills it either at a named
point (the test hook: TORCHSHRINK_KILL_AT=<point> makes the process SIGKILL itself there, see
torchshrink/recipe/workdir.py) or after a fixed time. Then it runs `--resume`; where that says there is
nothing to resume and to run again without --resume, it runs the plain command again; where it says the
run already finished, the output is checked as it is. Named points cover every step of the output's
life, including the three windows that used to strand a run: (a) the work folder exists but run.json
does not, (b) run.json is half written, (c) the finish step is done but .partial is not yet renamed.

Run: flock /tmp/torchshrink-bench.lock .venv/bin/python benchmarks/kill_resume.py [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from torchshrink.measure.bench import Target, markdown_table, write_results

OUT = Path(__file__).parent / "results"
MODEL, RECIPE = "zoo:digits-mlp", "prune-quantize"
WINDOWS = {"work:created": "a", "work:run-json:half": "b", "finish:before-rename": "c"}
STAGE_POINTS = ("trained", "model-written", "stage-json:half", "before-commit", "committed")
POINTS = (["validated", "work:created", "work:run-json:half", "work:before-rename", "work:ready"]
          + [f"stage{n}:{p}" for n in (1, 2) for p in STAGE_POINTS]
          + ["final:timed", "finish:model-tmp", "finish:model-written", "finish:report-json:half",
             "finish:before-rename", "finish:renamed"])
N_TIMED = 8
CHECKS = ("tensors", "weights_file", "figures", "size_is_disk", "clean")  # what "finished identically" means


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torchshrink", "compress", "--model", MODEL, "--out", str(out), "--threads", "1", *extra]


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip().startswith("error:")]
    return lines[0] if lines else ""


def _left(out: Path) -> str:
    """What a killed run left beside OUT, in words."""
    work = out.with_name(f".{out.name}.partial")
    temps = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and ".tmp-" in p.name]
    if out.is_dir():
        return "OUT complete"
    if work.is_dir():
        stages = sorted(p.name for p in (work / "stages").glob("[0-9]*") if (p / "stage.json").is_file())
        return f".partial, {len(stages)} stage(s) done"
    return "start temp folder" if temps else "nothing"


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """Everything in report.json that must not depend on an interruption (not latency, seconds, machine)."""
    def meas(m: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in m.items() if k not in ("latency", "name")}

    def rows(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if not k.startswith("latency")}

    return {"original": meas(report["original"]), "final": meas(report["final"]), "summary": rows(report["summary"]),
            "stages": [{"kind": s["kind"], "measurement": meas(s["measurement"]), "vs_previous": rows(s["vs_previous"]),
                        "history": s["finetune_history"]} for s in report["stages"]],
            "layers": report["layers"], "recipe": report["recipe"]}


def _same(out: Path, ref: Path) -> dict[str, Any]:
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(ref / "model" / "model.safetensors"))
    tensors = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
    weights = (out / "model" / "model.safetensors").read_bytes() == (ref / "model" / "model.safetensors").read_bytes()
    manifest = (out / "model" / "manifest.json").read_bytes() == (ref / "model" / "manifest.json").read_bytes()
    report = json.loads((out / "report.json").read_text())
    figures = _figures(report) == _figures(json.loads((ref / "report.json").read_text()))
    on_disk = sum(p.stat().st_size for p in (out / "model").iterdir() if p.is_file())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return {"tensors": tensors, "weights_file": weights, "manifest_file": manifest, "figures": figures, "size_is_disk": report["final"]["file_bytes"] == on_disk,
            "clean": not leftovers}


def _case(name: str, out: Path, env: dict[str, str], ref: Path, point: str | None, after: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    run_env = dict(env, TORCHSHRINK_KILL_AT=point) if point else env
    proc = subprocess.Popen(_cmd(out, "--recipe", RECIPE), env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if after is not None:
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=600)
    row: dict[str, Any] = {"case": name, "window": WINDOWS.get(point or "", ""), "killed": proc.returncode == -signal.SIGKILL,
                           "left": _left(out)}
    res = _run(_cmd(out, "--resume"), env)
    row["recovery"], row["message"] = "--resume", _error_line(res).replace(str(out.parent) + os.sep, "").replace(out.name, "OUT")
    if res.returncode == 2 and "without --resume" in row["message"]:
        res = _run(_cmd(out, "--recipe", RECIPE), env)
        row["recovery"] = "--resume, then plain rerun"
    elif res.returncode == 2 and "already finished" in row["message"]:
        row["recovery"] = "--resume: already finished"
        res = subprocess.CompletedProcess(res.args, 0, "", "")
    row["rc"] = res.returncode
    if res.returncode != 0:
        row.update(ok=False, error=_error_line(res) or res.stderr.strip().splitlines()[-1:])
    else:
        row.update(_same(out, ref))
        row["ok"] = all(row[k] for k in CHECKS)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 unless every killed run finished identically")
    ap.add_argument("--timed", type=int, default=N_TIMED, help="kills after a fixed time, spread over the run")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="torchshrink-kill-"))
    try:
        return _bench(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bench(args: argparse.Namespace, root: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHSHRINK_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
    env.pop("TORCHSHRINK_KILL_AT", None)
    subprocess.run([sys.executable, "-c", f"from torchshrink.models import load_model; load_model({MODEL!r})"],
                   env=env, check=True, timeout=600)  # the teacher is trained once, before anything is timed
    ref = root / "reference"
    t0 = time.perf_counter()
    res = _run(_cmd(ref, "--recipe", RECIPE), env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return 1
    print(f"uninterrupted run: {wall:.1f} s", flush=True)
    cases = [(p, p, None) for p in POINTS]
    cases += [(f"after {wall * (k + 0.5) / args.timed:.1f} s", None, wall * (k + 0.5) / args.timed) for k in range(args.timed)]
    rows = [_case(name, root / f"k{i:02d}", env, ref, point, after) for i, (name, point, after) in enumerate(cases)]
    killed = [r for r in rows if r["killed"]]
    ok = sum(r["ok"] for r in killed)
    windows = [r for r in rows if r["window"]]
    targets = [
        Target("killed runs that finished identically (same tensors, weights file bytes, report figures, nothing left over)", ok, "==", len(killed),
               note=f"{len(killed)} kills ({len(POINTS)} named points, {len(rows) - len(POINTS)} timed); uninterrupted run {wall:.1f} s"),
        Target("kills", len(killed), ">=", 20),
        Target("windows (a) work folder without run.json, (b) run.json half written, (c) finish before rename: identical",
               sum(r["ok"] and r["killed"] for r in windows), "==", 3),
    ]
    table = markdown_table(
        ["kill point", "window", "killed", "state left", "recovery", "message of --resume", "same tensors",
         "same weights file", "same report figures", "size = bytes on disk", "nothing left beside OUT", "same manifest bytes", "s"],
        [[r["case"], r["window"] or "-", "yes" if r["killed"] else "no (finished first)", r["left"], r["recovery"],
          r["message"] or "-", *("yes" if r.get(k) else "NO" for k in (*CHECKS, "manifest_file")), r["seconds"]] for r in rows])
    print(table)
    note = ("Same report figures: every figure of report.json but latency, seconds and the machine (sizes, counts, "
            "accuracies, fine-tune history, ratios). Same manifest bytes is shown, not required: a model loaded from a "
            "stage checkpoint lists its modules in another order in manifest.json (same modules and values).")
    passed = write_results("kill_resume", targets, {f"{MODEL} / {RECIPE}: SIGKILL, then recover": note + "\n\n" + table},
                           {"model": MODEL, "recipe": RECIPE, "uninterrupted_seconds": round(wall, 1), "cases": rows}, OUT)
    print(f"{ok}/{len(killed)} killed runs finished identically")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
