"""Regenerate the README's performance section from benchmarks/results/*.json (never by hand).

    .venv/bin/python benchmarks/readme_table.py          # rewrite the README block
    .venv/bin/python benchmarks/readme_table.py --print  # print the table, touch nothing
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _passed(v: object) -> bool:
    """True/False, or the strings "PASS"/"FAIL" some scripts write (a non-empty "FAIL" is not a pass)."""
    return v.strip().upper() == "PASS" if isinstance(v, str) else bool(v)


def _normalize(t: object) -> tuple[str, str, bool]:
    """(target, measured, passed) from the shapes benchmark scripts write: a dict with name/target,
    value (+unit, op, bound) or figures, pass/passed; or a list [target, passed, figures]."""
    if isinstance(t, list | tuple):
        return str(t[0]), str(t[2]) if len(t) > 2 else "", _passed(t[1])
    assert isinstance(t, dict)
    name = t.get("name") or t.get("target", "?")
    value = t.get("value")
    if isinstance(value, int | float) and not isinstance(value, bool):
        bound = t.get("bound")
        req = f" (required {t.get('op', '')} {bound:g}{t.get('unit', '')})" if isinstance(bound, int | float) else ""
        measured = f"{value:.4g}{t.get('unit', '')}{req}"
    else:
        measured = str(t.get("figures", value if value is not None else ""))
    return name, measured, _passed(t.get("passed", t.get("pass", False)))


def _machine(m: dict) -> str:
    cpu = f"{m.get('cpu')}" + (f" ({m['cpu_id']})" if m.get("cpu_id") else "")
    return f"{cpu}, {', '.join(m.get('simd', []))}, torch {m.get('torch')}"


def table() -> str:
    """One row per target; each names the machine its file was measured on (results of different CPU kinds sit in
    different files, e.g. deploy.json and deploy-epyc-zen5.json)."""
    rows = ["| benchmark | machine | target | measured | result |", "|---|---|---|---|---|"]
    machines: dict[str, str] = {}
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        m = data.get("machine") or {}
        tag = machines.setdefault(_machine(m), chr(ord("A") + len(machines))) if m else "?"
        targets = data.get("targets", [])
        if isinstance(targets, dict):  # {target: passed}
            targets = [[k, v, ""] for k, v in targets.items()]
        for t in targets:
            name, measured, passed = _normalize(t)
            rows.append(f"| [{path.stem}](benchmarks/results/{path.stem}.md) | {tag} | {name} | {measured} | "
                        f"{'PASS' if passed else 'FAIL'} |")
    head = "".join(f"- machine {tag}: {m}\n" for m, tag in machines.items())
    return ("Measured on:\n\n" + head + "\n" if machines else "") + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the generated table instead of rewriting README.md")
    if ap.parse_args().print:
        print(table(), end="")
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{BEGIN}\n{table()}{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Performance (generated from benchmarks/results)\n\n{block}\n"
    readme.write_text(text)


if __name__ == "__main__":
    main()
