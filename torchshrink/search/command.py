"""``torchshrink search``: the CLI command (wired in by ``register(app)`` from torchshrink/cli.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``search`` command to the torchshrink typer app."""
    from torchshrink.cli_support import DATA_HELP, err, friendly, out, positive, progress_bar

    @app.command()
    @friendly
    def search(
        model: str = typer.Option(..., "--model", "-m", help="model spec, e.g. zoo:digits-cnn"),
        budget: str = typer.Option(..., "--budget", "-b", help='e.g. "--max-size 0.25x --max-accuracy-drop 1.0"'),
        out_dir: Path = typer.Option(..., "--out", "-o", help="folder for recipe.yaml, search.json, report.md, search.db"),
        data: str = typer.Option("auto", "--data", "-d", help="auto (the zoo model's own data, else none), digits, "
                                 "sentences, or your data: " + DATA_HELP),
        input_shape: str = typer.Option(None, "--input-shape", help="the model's input, e.g. 1,3,32,32"),
        method: str = typer.Option("nsga2", "--method", help="nsga2, tpe or greedy"),
        trials: int = typer.Option(30, "--trials", "-n", help="completed trials to reach (a resumed study counts its finished ones)"),
        storage: str = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite:///OUT/search.db)"),
        study: str = typer.Option("torchshrink-search", "--study", help="study name inside the storage"),
        workers: int = typer.Option(1, "--workers", help="processes running trials on the shared storage"),
        epochs: int = typer.Option(1, "--finetune-epochs", help="fine-tune epochs per stage in every trial (0: none)"),
        options: str = typer.Option(None, "--options", help="comma-separated option labels or kinds to search (default: all registered)"),
        threads: int = typer.Option(1, "--threads", help="torch threads for the latency profile and trials"),
        seed: int = typer.Option(0, "--seed"),
        trust_code: bool = typer.Option(False, "--trust-code", help="allow model files that run code when read (.pt2)"),
    ) -> None:
        """Find per-layer compression settings under a budget; writes a recipe `torchshrink compress` reruns."""
        import torch

        from torchshrink.core import state
        from torchshrink.models import load_model, parse_shape
        from torchshrink.recipe.recipe import Finetune
        from torchshrink.recipe.task import digits_task, sentences_task, task_for
        from torchshrink.recipe.userdata import DataSpec, task_from_data
        from torchshrink.search.budget import parse_budget
        from torchshrink.search.profile import plot_sensitivity
        from torchshrink.search.report import write_search_report
        from torchshrink.search.search import search as run_search

        positive("--threads", threads)
        torch.set_num_threads(threads)
        parsed = parse_budget(budget)  # a bad string fails before any work
        net = load_model(model, trust_code=trust_code).eval()
        if input_shape:
            state.put(net, input={"shape": parse_shape(input_shape), "dtype": "float32"})
        if data == "auto":
            task = task_for(net)
        elif data == "digits":
            task = digits_task()
        elif data == "sentences":
            task = sentences_task(net)
        else:
            task = task_from_data(DataSpec.from_dict(data, "--data"), net)
        out_dir.mkdir(parents=True, exist_ok=True)
        url = storage or f"sqlite:///{(out_dir / 'search.db').resolve()}"
        bar, update = progress_bar()
        with bar:
            result = run_search(net, parsed, task=task, method=method, n_trials=trials, storage=url, study_name=study,
                                finetune=Finetune(epochs=epochs) if epochs > 0 else None, workers=workers,
                                allowed=options.split(",") if options else None, seed=seed, threads=threads,
                                progress=update)
        (out_dir / "recipe.yaml").write_text(result.recipe.to_yaml())
        (out_dir / "search.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
        plot = plot_sensitivity(result.profile, out_dir / "sensitivity.png")
        write_search_report(result, out_dir / "report.md", plot=plot)
        if not result.feasible:
            err.print(f"[yellow]{result.message}[/yellow]", highlight=False, soft_wrap=True)
            err.print(f"the closest point's recipe is in {out_dir / 'recipe.yaml'}")
            raise typer.Exit(3)
        out.print(result.message)
        # the rerun measures on the data and input the search used, or its figures would not be the search's
        extra = ([f"--data {shlex.quote(data)}"] if data not in ("auto", "digits", "sentences") else []) + (
            [f"--input-shape {shlex.quote(input_shape)}"] if input_shape else [])
        out.print(f"wrote {out_dir}/ (recipe.yaml, search.json, report.md); rerun with: torchshrink compress --model "
                  f"{shlex.quote(model)} --recipe {shlex.quote(str(out_dir / 'recipe.yaml'))} {' '.join(extra)} --out OUT"
                  .replace("  ", " "), markup=False)
