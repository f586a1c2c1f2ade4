"""The output folder of a ``compress`` run: checks made before any work, atomic creation and commit,
and a test hook that kills the process at a named point.

Every state a killed run can leave is either resumable or replaced by a plain rerun:

- nothing, or a temp folder ``.OUT.partial.tmp-*`` (killed while starting): a plain rerun removes it;
- ``.OUT.partial/`` holding a valid ``run.json`` (the folder only ever appears with it inside):
  ``--resume`` continues from its finished stages; half-written pieces in it (``.*.tmp-*``) are
  removed first. A ``.partial`` without a readable run.json and without finished stages is an
  abandoned start (written by an older version) that a plain rerun replaces, with a note;
- ``OUT/`` complete: renaming ``.OUT.partial`` to ``OUT`` is the commit, so the run finished.

Every folder torchshrink creates carries the marker file ``.torchshrink-run``; ``--force`` only ever
replaces a folder that has it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchshrink.core.errors import ConfigError, OutputExistsError, OutputWriteError, TorchshrinkError
from torchshrink.core.files import commit, kill_point, temp_dir, write_atomic

log = logging.getLogger(__name__)
MARKER = ".torchshrink-run"
# what a run folder of a torchshrink from before the marker held
_LEGACY = frozenset({"model", "stages", "tensorboard", "recipe.yaml", "report.json", "report.md", "report.html", "run.json"})
_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space and run again",
    errno.EDQUOT: "the disk quota is exceeded; free some space and run again",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "choose a writable --out",
    errno.EPERM: "choose a writable --out",
}


def work_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of every file under ``folder`` (what a user copies when sharing it)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def written_by_torchshrink(folder: Path) -> bool:
    """Whether ``folder`` is one torchshrink created: it has the marker (or is an older run's output)."""
    if (folder / MARKER).is_file():
        return True
    names = {p.name for p in folder.iterdir()}
    return bool(names) and names <= _LEGACY and bool(names & {"report.json", "run.json"})


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def sweep_temps(work: Path) -> None:
    """Remove the half-written pieces (``.*.tmp-*``) a killed run left inside its work folder."""
    for folder in (work, work / "stages"):
        if folder.is_dir():
            for p in folder.iterdir():
                if _is_temp(p.name):
                    _remove(p)


def sweep_beside(out: Path) -> None:
    """Remove what a killed start or commit left beside ``out``: ``.OUT.partial.tmp-*``, ``.OUT.old-*``."""
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if p.name.startswith((f".{out.name}.partial.tmp-", f".{out.name}.old-")) and p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()) or written_by_torchshrink(p):
                _remove(p)


def read_run_key(work: Path) -> dict[str, Any] | None:
    """The run.json of an unfinished run, or None when it is missing or unreadable."""
    try:
        key = json.loads((work / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return key if isinstance(key, dict) else None


def finished_stages(work: Path) -> list[str]:
    stages = work / "stages"
    if not stages.is_dir():
        return []
    return sorted(p.name for p in stages.iterdir() if not p.name.startswith(".") and (p / "stage.json").is_file())


def input_paths(spec: str) -> list[Path]:
    """The files and folders a model spec reads (``folder``, ``arch@weights``), resolved."""
    parts = spec.split("@") if "@" in spec and not spec.startswith("@") else [spec]
    return [Path(p).resolve() for p in parts if p and Path(p).exists()]


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(out: Path, spec: str, *, force: bool, resume: bool) -> None:
    """Refuse an output that cannot or must not be written, before any work and before anything is deleted."""
    if out.is_symlink():
        target = os.readlink(out)
        state = "" if out.exists() else ", which does not exist"
        raise ConfigError(f"output folder {out} is a symbolic link (to {target}{state}); give the real folder path as --out")
    real_out, real_work = out.resolve(), work_dir(out).resolve()
    for p in input_paths(spec):
        for folder in (real_out, real_work):
            if p == folder or folder in p.parents or p in folder.parents:
                raise OutputExistsError(f"output folder {out} overlaps the input model {p}; torchshrink never writes over "
                                        "its input: choose an --out outside the model's folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder; choose another --out")
    if not resume and out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(f"output folder {out} already exists; pass --force to replace it")
        if not written_by_torchshrink(out):
            raise OutputExistsError(f"--out {out} exists and was not written by torchshrink; choose another folder or "
                                    "remove it yourself")
    anchor = _nearest_existing(out.parent)
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write the output folder {out}: {anchor} is not a writable folder; "
                               "choose a writable --out")


def plan_work(out: Path, key: dict[str, Any], *, force: bool, resume: bool) -> str:
    """What to do with ``.OUT.partial``: 'resume', 'new', or 'replace' it (checked, nothing changed yet)."""
    work = work_dir(out)
    found = read_run_key(work) if work.is_dir() else None
    if resume:
        if not work.is_dir():
            if out.is_dir() and (out / "report.json").is_file():
                raise ConfigError(f"nothing to resume at {out}: that run already finished (its report is {out / 'report.json'})")
            raise ConfigError(f"nothing to resume at {out}: no unfinished run ({work.name} is missing); "
                              "run again without --resume to start it")
        if found is None:
            if finished_stages(work):
                raise ConfigError(f"{work} holds finished stages but no readable run.json; pass --force to start over")
            raise ConfigError(f"nothing to resume at {out}: {work.name} is an abandoned start (it holds no finished "
                              "stage); run again without --resume to start over")
        if found != json.loads(json.dumps(key)):
            raise ConfigError(f"the unfinished run at {out} used another model, recipe or seed; rerun without --resume")
        return "resume"
    if not work.exists() and not work.is_symlink():
        return "new"
    if not work.is_dir() or work.is_symlink() or not (written_by_torchshrink(work) or not any(work.iterdir())):
        raise OutputExistsError(f"{work} exists and was not written by torchshrink; remove it yourself")
    if found is None and not finished_stages(work):
        return "replace"  # an abandoned start: no finished work to lose
    if not force:
        raise OutputExistsError(f"an unfinished run exists at {work}; pass --resume to continue it or --force to start over")
    return "replace"


def start_work(out: Path, key: dict[str, Any], recipe_yaml: str, action: str) -> Path:
    """Create ``.OUT.partial`` atomically, with its marker, recipe.yaml and run.json already inside."""
    work = work_dir(out)
    sweep_beside(out)
    if action == "resume":
        sweep_temps(work)
        return work
    if action == "replace":
        if read_run_key(work) is None and not finished_stages(work):
            log.warning("removed an abandoned start at %s (killed before its first stage; it held no finished work)", work)
        shutil.rmtree(work)
    tmp = temp_dir(work)
    try:
        kill_point("work:created")
        (tmp / MARKER).write_text("written by torchshrink compress; `--force` may replace this folder\n")
        write_atomic(tmp / "recipe.yaml", recipe_yaml)
        write_atomic(tmp / "run.json", json.dumps(key, indent=1), point="work:run-json")
        kill_point("work:before-rename")
        commit(tmp, work)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kill_point("work:ready")
    return work


def commit_run(work: Path, out: Path) -> None:
    """The commit of a run: rename ``.OUT.partial`` to ``OUT`` (replacing an older torchshrink output)."""
    if out.is_dir() and any(out.iterdir()) and not written_by_torchshrink(out):
        raise OutputExistsError(f"--out {out} was filled by something else during the run; the finished run is kept "
                                f"in {work}: move it into place yourself")
    commit(work, out)


@contextlib.contextmanager
def writing(out: Path, remove: Path | None) -> Iterator[None]:
    """Turn an OSError while writing the output into a one-line OutputWriteError; ``remove`` (the work
    folder this process created) is deleted first, so no partial output is left."""
    try:
        yield
    except OSError as e:
        if isinstance(e, TorchshrinkError):
            raise
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
            sweep_beside(out)
        kept = "" if remove is not None else f"; the unfinished run is kept in {work_dir(out)}: fix this and pass --resume"
        what = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename else ""
        advice = _ADVICE.get(e.errno or 0, "choose another --out")
        raise OutputWriteError(f"cannot write the output {out}: {what}{where}; {advice}{kept}") from None


@contextlib.contextmanager
def stage_errors(out: Path | None, created: Path | None, stages: list[Any]) -> Iterator[None]:
    """A stage that fails on the user's input (a layer a technique does not handle, data it cannot use) leaves no
    half-written output: the work folder this run made is removed when no stage finished; when some did, it is
    kept for --resume and the error line says so."""
    try:
        yield
    except TorchshrinkError as e:
        if out is None:
            raise
        if not stages:  # nothing finished: what this run created goes (a resumed folder stays as it was)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
                sweep_beside(out)
            raise
        line = (str(e).splitlines() or [type(e).__name__])[0]
        raise type(e)(f"{line}; stage(s) 1-{len(stages)} are kept in {work_dir(out)}: --resume continues after "
                      "the fix, --force starts over") from None
