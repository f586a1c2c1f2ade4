"""The committed benchmark results and what the README says about them."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_table():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_performance_block_is_generated_from_the_committed_results():
    mod = _readme_table()
    text = (ROOT / "README.md").read_text()
    block = text[text.index(mod.BEGIN) + len(mod.BEGIN) + 1:text.index(mod.END)]
    assert block == mod.table(), "README is stale: run .venv/bin/python benchmarks/readme_table.py"


def test_each_results_file_names_one_machine_per_row(tmp_path, monkeypatch):
    mod = _readme_table()
    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    base = {"simd": ["avx2"], "torch": "2.14.1"}
    t = [{"name": "speed", "value": 2.5, "op": ">=", "bound": 2.0, "unit": "x", "passed": True}]
    (res / "a.json").write_text(json.dumps({"machine": {**base, "cpu": "AMD EPYC", "cpu_id": "family 25"}, "targets": t}))
    (res / "b.json").write_text(json.dumps({"machine": {**base, "cpu": "AMD EPYC", "cpu_id": "family 26"}, "targets": t}))
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    out = mod.table()
    assert "- machine A: AMD EPYC (family 25), avx2, torch 2.14.1" in out
    assert "- machine B: AMD EPYC (family 26), avx2, torch 2.14.1" in out
    assert "| [a](benchmarks/results/a.md) | A | speed | 2.5x (required >= 2x) | PASS |" in out
    assert "| [b](benchmarks/results/b.md) | B | speed |" in out


def test_deploy_benchmark_never_mixes_machines_in_one_file(tmp_path, monkeypatch, capsys):
    import sys

    import pytest

    from torchshrink.measure import machine

    here = {**machine.machine_info(), "cpu_id": "AuthenticAMD family 26 model 2 stepping 1"}
    monkeypatch.setattr(machine, "machine_info", lambda: here)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import deploy  # benchmarks/deploy.py

    monkeypatch.setattr(deploy, "OUT", tmp_path)
    deploy._check_machine("deploy")  # no file yet: fine
    (tmp_path / "deploy.json").write_text(json.dumps({"machine": here}))
    deploy._check_machine("deploy")  # the same machine: its parts merge
    (tmp_path / "deploy.json").write_text(json.dumps({"machine": {**here, "cpu_id": "GenuineIntel family 6 model 143"}}))
    with pytest.raises(SystemExit) as e:
        deploy._check_machine("deploy")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "measured on another machine" in err and "--results" in err
    sys.modules.pop("deploy", None)
