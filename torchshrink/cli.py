"""The ``torchshrink`` command: a thin typer app over the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from torchshrink.cli_support import DATA_HELP, TRUST_HELP, friendly, out, positive, progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make trained PyTorch models smaller and faster, with measured evidence.")
def _inputs(model: Any, input_shape: str | None, batch: int | None) -> tuple:
    import torch

    from torchshrink.models import example_inputs, parse_shape

    if input_shape:
        return (torch.randn(*parse_shape(input_shape), generator=torch.Generator().manual_seed(0)),)
    return example_inputs(model, batch=batch)


@app.command()
@friendly
def measure(
    model: str = typer.Option(..., "--model", "-m", help="model spec, e.g. torchvision:resnet18, zoo:digits-cnn, a saved folder"),
    input_shape: str = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224 (default: the model's own)"),
    batch: int = typer.Option(None, "--batch", help="batch size for the default input"),
    threads: int = typer.Option(None, "--threads", help="torch threads for timing"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
) -> None:
    """Parameters, nonzeros, file bytes, MACs and latency of a model."""
    from torchshrink.measure.report import measure as do_measure
    from torchshrink.models import load_model

    positive("--threads", threads)
    positive("--batch", batch)
    net = load_model(model, trust_code=trust_code)
    m = do_measure(net, _inputs(net, input_shape, batch), threads=threads)
    folder = Path(model.rpartition("@")[2] or model)  # FOLDER, or SPEC@FOLDER for a class of the user's own
    if folder.is_dir() and (folder / "manifest.json").is_file():  # a saved model: its bytes on disk
        import dataclasses

        from torchshrink.recipe.workdir import folder_bytes

        m = dataclasses.replace(m, file_bytes=folder_bytes(folder))
    if as_json:
        out.print_json(json.dumps(m.to_dict()))
        return
    t = Table(title=f"{model}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in m.to_dict().items():
        if k == "latency" and v:
            t.add_row("latency p50 / p90", f"{v['p50_ms']:.3f} / {v['p90_ms']:.3f} ms ({v['threads']} threads)")
        elif k not in ("name", "quality"):
            t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    out.print(t)


@app.command()
@friendly
def inspect(
    model: str = typer.Option(..., "--model", "-m", help="model spec"),
    input_shape: str = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224"),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
) -> None:
    """Layers with their type, weight shape, parameters and MACs."""
    from torchshrink.measure.counts import count_macs
    from torchshrink.models import load_model

    net = load_model(model, trust_code=trust_code)
    macs = count_macs(net, _inputs(net, input_shape, None), per_module=True)
    t = Table(title=f"{model}: layers")
    for c in ("layer", "type", "weight shape", "params", "MACs"):
        t.add_column(c, justify="right" if c in ("params", "MACs") else "left")
    for name, mod in net.named_modules():
        if not name or any(True for _ in mod.children()):
            continue
        w = getattr(mod, "weight", None)
        shape = "x".join(map(str, w.shape)) if hasattr(w, "shape") else "-"
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        t.add_row(name, type(mod).__name__, shape, f"{params:,}", f"{macs.get(name, 0):,}")
    out.print(t)


@app.command()
@friendly
def compress(
    model: str = typer.Option(..., "--model", "-m", help="model spec"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="recipe YAML file or built-in name (not needed with --resume)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="output folder (new or empty, unless --force)"),
    force: bool = typer.Option(False, "--force", help="replace an output folder an earlier torchshrink run wrote"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last finished stage"),
    threads: int = typer.Option(None, "--threads", help="torch threads for timing"),
    seed: int = typer.Option(0, "--seed", help="seed for every stage's randomness"),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
    data: str = typer.Option(None, "--data", "-d", help=DATA_HELP),
    input_shape: str = typer.Option(None, "--input-shape", help="the model's input, e.g. 1,3,32,32 (needed where "
                                    "the model does not declare one)"),
) -> None:
    """Run a recipe and write the compressed model, stage checkpoints, the recipe and a report into --out."""
    from torchshrink.core.errors import ConfigError
    from torchshrink.measure.report import compare_table
    from torchshrink.models import parse_shape
    from torchshrink.recipe import compress as run
    from torchshrink.recipe import load_recipe

    positive("--threads", threads)
    if recipe is None and not resume:
        raise ConfigError("--recipe is required (a YAML file or a built-in name) unless --resume is given")
    rec = load_recipe(recipe) if recipe else None
    bar, update = progress_bar()
    shape = parse_shape(input_shape) if input_shape else None
    with bar:
        result = run(model, rec, out_dir, force=force, resume=resume, threads=threads, progress=update, seed=seed,
                     trust_code=trust_code, data=data, input_shape=shape)
    name = rec.name if rec else "resumed run"
    out.print(compare_table(result.summary, title=f"{name} on {model}: original -> compressed"))
    if result.resumed_from:
        out.print(f"resumed after stage {result.resumed_from}")
    for k, v in result.provenance.items():
        if k != "search":  # the data a search steers by: not a figure of this run
            out.print(f"{k}: {v}", markup=False)
    for w in result.warnings:
        out.print(f"[yellow]warning:[/yellow] {escape(str(w))}")
    out.print(f"{result.timing_note}\nwrote {out_dir}/ (model/, stages/, recipe.yaml, report.md, report.html, report.json)",
              markup=False)


@app.command()
@friendly
def report(directory: Path = typer.Argument(..., help="output folder of `torchshrink compress`")) -> None:
    """Regenerate report.md and report.html from a run's report.json."""
    from torchshrink.recipe.report import regenerate

    out.print(f"wrote {regenerate(directory)}", markup=False)


@app.command()
@friendly
def demo(
    out_dir: Path = typer.Option(Path("demo-out"), "--out", "-o", help="output folder for the report"),
    recipe: str = typer.Option("demo", "--recipe", "-r", help="recipe to run (built-in name or file)"),
    model: str = typer.Option("zoo:digits-cnn", "--model", "-m", help="model spec"),
) -> None:
    """Train (or load) the digits CNN teacher, compress it with a built-in recipe, print the table; then deploy the
    compressed model: every precision x runtime on this machine, the fastest one within a point of the original's
    accuracy chosen by measurement and written to OUT/deploy."""
    from torchshrink.deploy import deploy as run_deploy
    from torchshrink.deploy.command import show
    from torchshrink.models import load_model

    compress(model=model, recipe=recipe, out_dir=out_dir, force=True, resume=False, threads=None, seed=0, trust_code=False,
             data=None, input_shape=None)
    original = load_model(model)
    result = run_deploy(load_model(str(out_dir / "model")), reference=original, out=out_dir / "deploy", force=True,
                        max_drop=0.01, compile=False)
    show(result, f"deploy of {out_dir / 'model'} (quality and speed against {model})", out_dir / "deploy")


@app.command()
@friendly
def kernels(
    build: bool = typer.Option(False, "--build", help="build every instruction-set level into the cache now"),
    force: bool = typer.Option(False, "--force", help="rebuild even where a build is cached"),
) -> None:
    """Say which native kernels run on this machine; build them ahead of use (`make` does at install)."""
    from torchshrink.core import native

    if build or force:
        for level in native.LEVELS:
            out.print(f"{level}: {native.build(level, force=force) or 'not built: the torch fallbacks run'}")
    out.print(native.describe())


def _register_extensions() -> None:
    from torchshrink.deploy.command import register as register_deploy
    from torchshrink.llm.command import register as register_lm
    from torchshrink.search.command import register as register_search

    register_search(app)
    register_lm(app)
    register_deploy(app)


_register_extensions()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
