"""`torchshrink compress` only replaces folders it wrote, never its input; the reported file size is the
bytes on disk; unwritable outputs, a full disk, bad recipes and bad counts are one-line errors (exit
code 2) that leave no partial output behind."""

import errno
import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import torchshrink as ts
from tests.conftest import tiny_net
from torchshrink.cli import app
from torchshrink.measure.report import _fmt_bytes

MODEL = "tests.conftest:tiny_net"
PROGRESS_ROW = re.compile(r"\d+/\d+\s+\d+:\d\d:\d\d$")
TWO_CASTS = "name: two\nstages:\n  - kind: cast\n    dtype: bfloat16\n    select: {include: [fc1]}\n" \
            "  - kind: cast\n    dtype: float16\n    select: {include: [fc2]}\n"


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and one `error:` line on stderr (beside the progress rows of a run that had started)."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip() and not PROGRESS_ROW.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def compress(out: Path, *extra: str, recipe: str = "bf16") -> tuple[int, str, str]:
    return run("compress", "--model", MODEL, "--recipe", recipe, "--out", str(out), "--threads", "1", *extra)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------ --force and the output folder


def test_force_refuses_a_folder_torchshrink_did_not_write(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    code, _, err = compress(tmp_path / "o", "--force")
    one_line_error(code, err, "was not written by torchshrink", "remove it yourself")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_force_replaces_a_torchshrink_output_and_an_empty_folder_is_used(tmp_path):
    (tmp_path / "o").mkdir()
    code, _, err = compress(tmp_path / "o")  # empty: used without --force
    assert code == 0, err
    assert (tmp_path / "o" / ".torchshrink-run").is_file() and (tmp_path / "o" / "report.json").is_file()
    code, _, err = compress(tmp_path / "o", "--force")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # nothing left beside it


@pytest.mark.parametrize("where", ["out-is-input-parent", "out-is-input", "out-inside-input", "partial-holds-input"])
def test_out_overlapping_the_input_is_refused_before_anything_is_deleted(tmp_path, where):
    run_dir = tmp_path / "o"
    run_dir.mkdir()
    (run_dir / ".torchshrink-run").write_text("")
    model_dir = run_dir / "model"
    if where == "partial-holds-input":
        model_dir = tmp_path / ".o.partial" / "model"
        model_dir.parent.mkdir()
        (model_dir.parent / ".torchshrink-run").write_text("")
    ts.save(tiny_net(), model_dir)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = {"out-is-input": model_dir, "out-inside-input": model_dir / "sub"}.get(where, run_dir)
    code, _, err = run("compress", "--model", str(model_dir), "--recipe", "bf16", "--out", str(out), "--force")
    one_line_error(code, err, "overlaps the input model", "never writes over its input")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_dangling_symlink_out_is_a_one_line_error(tmp_path):
    (tmp_path / "o").symlink_to(tmp_path / "nowhere")
    code, _, err = compress(tmp_path / "o")
    one_line_error(code, err, "symbolic link", "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# ------------------------------------------------------------------ reported size = bytes on disk


def test_reported_file_size_is_the_bytes_on_disk(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TWO_CASTS)
    out = tmp_path / "o"
    code, stdout, err = compress(out, recipe=str(recipe))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    on_disk = disk_bytes(out / "model")
    assert report["final"]["file_bytes"] == on_disk == report["summary"]["file_bytes"]["after"]
    ratio = report["summary"]["file_bytes"]["ratio"]
    assert ratio == on_disk / report["original"]["file_bytes"]
    for stage, d in zip(report["stages"], sorted((out / "stages").iterdir()), strict=True):
        assert stage["measurement"]["file_bytes"] == disk_bytes(d / "model")
    assert f"| file_bytes | {_fmt_bytes(report['original']['file_bytes'])} | {_fmt_bytes(on_disk)} |" in (out / "report.md").read_text()
    assert _fmt_bytes(on_disk) in stdout


# ------------------------------------------------------------------ one-line errors, no partial output


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process really cannot create anything in (root ignores chmod: use sysfs then)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    probe = Path("/sys/torchshrink-write-probe")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    pytest.skip("running as root and /sys is writable: no folder here refuses writes")


def test_read_only_output_location(tmp_path):
    parent = _unwritable(tmp_path)
    try:
        code, _, err = compress(parent / "o")
        one_line_error(code, err, "cannot write the output", "writable --out")
        assert not any(p.name.startswith((".o.", "o")) for p in parent.iterdir())
    finally:
        if parent != Path("/sys"):
            parent.chmod(0o755)


@pytest.mark.parametrize("what", ["stage checkpoint", "report"])
def test_disk_full_is_one_line_and_removes_the_partial(tmp_path, monkeypatch, what):
    import torchshrink.recipe.runner as runner

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".o.partial" / "x"))

    if what == "report":
        real = runner.write_atomic
        monkeypatch.setattr(runner, "write_atomic", lambda p, *a, **k: full() if p.name == "report.json" else real(p, *a, **k))
    else:
        monkeypatch.setattr(runner, "write_model_files", full)
    code, _, err = compress(tmp_path / "o")
    one_line_error(code, err, "No space left on device", "the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_resuming_keeps_the_unfinished_run(tmp_path, monkeypatch):
    import torchshrink.recipe.runner as runner

    assert compress(tmp_path / "o")[0] == 0
    os.rename(tmp_path / "o", tmp_path / ".o.partial")  # as killed just before the final rename
    real = runner.write_atomic

    def full(path, *args, **kwargs):
        if path.name == "report.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runner, "write_atomic", full)
    code, _, err = run("compress", "--model", MODEL, "--out", str(tmp_path / "o"), "--threads", "1", "--resume")
    one_line_error(code, err, "the disk is full", "unfinished run is kept", "--resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.partial"]
    assert sorted(p.name for p in (tmp_path / ".o.partial").iterdir() if p.name.startswith(".")) == [".torchshrink-run"]
    monkeypatch.setattr(runner, "write_atomic", real)
    code, _, err = run("compress", "--model", MODEL, "--out", str(tmp_path / "o"), "--threads", "1", "--resume")
    assert code == 0, err


def test_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"name: caf\xe9\nstages:\n  - kind: cast\n")
    code, _, err = compress(tmp_path / "o", recipe=str(recipe))
    one_line_error(code, err, "not UTF-8", "offset 9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("text", ["stages: " + "[" * 5000 + "]" * 5000, "stages: " + "[" * 60 + "]" * 60,
                                  "stages: &a [*a]"])
def test_recipe_nested_too_deep(tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, _, err = compress(tmp_path / "o", recipe=str(recipe))
    one_line_error(code, err, "nested", "levels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("args", [
    ["compress", "--model", MODEL, "--recipe", "bf16", "--out", "OUT", "--threads", "0"],
    ["compress", "--model", MODEL, "--recipe", "bf16", "--out", "OUT", "--threads", "-2"],
    ["measure", "--model", MODEL, "--threads", "0"],
    ["measure", "--model", MODEL, "--batch", "0"],
    ["search", "--model", MODEL, "--budget", "--max-size 0.5x", "--out", "OUT", "--threads", "0"],
])
def test_counts_below_one_are_refused(tmp_path, args):
    flag = args[-2]
    code, _, err = run(*[str(tmp_path / "o") if a == "OUT" else a for a in args])
    one_line_error(code, err, f"{flag} {args[-1]}", "1 or more")
    assert list(tmp_path.iterdir()) == []


def test_a_stage_that_fails_on_the_model_leaves_no_partial_or_keeps_the_finished_stages(tmp_path):
    """A stage that refuses the model (SVD pointed at Conv2d layers) is one line. As the first stage nothing is left
    behind (a .partial used to be, and blocked the next run); after a finished stage, .partial is kept for --resume
    and the line says so."""
    first = "stages:\n  - kind: svd\n    select: {types: [Conv2d]}\n"
    code, _, err = compress(tmp_path / "a", recipe=str(_recipe(tmp_path, "a.yaml", first)))
    one_line_error(code, err, "svd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml"]
    second = "stages:\n  - kind: cast\n    dtype: bfloat16\n    select: {include: [fc1]}\n" + first[len("stages:\n"):]
    code, _, err = compress(tmp_path / "b", recipe=str(_recipe(tmp_path, "b.yaml", second)))
    one_line_error(code, err, "svd", "stage(s) 1-1 are kept in", ".b.partial: --resume continues")
    assert (tmp_path / ".b.partial" / "stages").is_dir() and not (tmp_path / "b").exists()


def _recipe(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text)
    return d / name
