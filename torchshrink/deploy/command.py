"""``torchshrink deploy``: the fastest precision x runtime for a model on this machine, chosen by measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    from torchshrink.cli_support import DATA_HELP, TRUST_HELP, friendly, positive

    @app.command()
    @friendly
    def deploy(
        model: str = typer.Option(..., "--model", "-m", help="model spec: a saved folder, zoo:..., torchvision:..."),
        out_dir: Path = typer.Option(..., "--out", "-o", help="output folder for the chosen artifact and deploy.md "
                                     "(new or empty, unless --force)"),
        reference: str = typer.Option(None, "--reference", help="judge quality against this model (e.g. the original "
                                      "before compression); default: the model itself"),
        data: str = typer.Option(None, "--data", "-d", help=DATA_HELP),
        input_shape: str = typer.Option(None, "--input-shape", help="the input to time, e.g. 1,3,224,224 (default: "
                                        "the model's own)"),
        batch: int = typer.Option(None, "--batch", help="batch size of the default input"),
        threads: int = typer.Option(None, "--threads", help="threads every runtime gets (default: torch's)"),
        min_cosine: float = typer.Option(0.995, "--min-cosine", help="similarity tasks: the lowest mean output "
                                         "cosine vs the reference a candidate may have"),
        max_drop: float = typer.Option(0.005, "--max-drop", help="accuracy tasks: the largest drop below the "
                                       "reference (a fraction: 0.005 = half a point)"),
        runtimes: str = typer.Option(None, "--runtimes", help="comma-separated (default: all): torch, torch.compile, "
                                     "onnxruntime, openvino; for a language model: torch, torchshrink, llama.cpp"),
        compile_: bool = typer.Option(True, "--compile/--no-compile", help="try torch.compile (compiling takes "
                                      "seconds to minutes)"),
        runs: int = typer.Option(None, "--runs", help="timed runs per candidate, interleaved (default 10; language "
                                 "models: 3 generations)"),
        force: bool = typer.Option(False, "--force", help="replace a non-empty output folder"),
        trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_HELP),
        max_increase: float = typer.Option(0.02, "--max-increase", help="language models: the largest held-out "
                                           "perplexity increase over the reference a candidate may have (0.02 = 2%)"),
        prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="language models: prompt length timed"),
        new_tokens: int = typer.Option(128, "--new-tokens", help="language models: new tokens timed (greedy)"),
        eval_tokens: int = typer.Option(2048, "--eval-tokens", help="language models: held-out tokens scored"),
        window: int = typer.Option(512, "--window", help="language models: tokens per perplexity window"),
    ) -> None:
        """Build every precision x runtime candidate, check quality on held-out data, time them interleaved, and
        write the fastest one that passes (with how to load it and the whole table)."""
        import torch

        from torchshrink.deploy import deploy as run
        from torchshrink.models import example_inputs, load_model, parse_shape

        for flag, v in (("--threads", threads), ("--batch", batch), ("--runs", runs), ("--prompt-tokens", prompt_tokens),
                        ("--new-tokens", new_tokens), ("--eval-tokens", eval_tokens), ("--window", window)):
            positive(flag, v)
        names = tuple(r.strip() for r in runtimes.split(",") if r.strip()) if runtimes is not None else None
        _outside_inputs(out_dir, model, reference)
        if lm_spec(model):
            from torchshrink.deploy.lm import LM_RUNTIMES, check_runtimes, deploy_lm
            from torchshrink.llm.command import quiet
            from torchshrink.llm.models import load_causal_lm

            check_runtimes(names or LM_RUNTIMES)  # before anything is loaded
            quiet()
            if threads:
                torch.set_num_threads(threads)
            net, tok = load_causal_lm(model)
            ref = load_causal_lm(reference)[0] if reference else None
            res = deploy_lm(net, tok, data=data, reference=ref, out=out_dir, force=force, max_increase=max_increase,
                            prompt_tokens=prompt_tokens, new_tokens=new_tokens, eval_tokens=eval_tokens, window=window,
                            threads=threads, runtimes=names or LM_RUNTIMES, runs=runs or 3)
            show_lm(res, f"deploy {model}", out_dir)
            return
        names = names or ("torch", "torch.compile", "onnxruntime", "openvino")
        net = load_model(model, trust_code=trust_code)
        ref = load_model(reference, trust_code=trust_code) if reference else None
        example = None
        if input_shape:
            example = (torch.randn(*parse_shape(input_shape), generator=torch.Generator().manual_seed(0)),)
        elif batch:
            example = example_inputs(net, batch=batch)
        result = run(net, example, data=data, reference=ref, out=out_dir, force=force, min_cosine=min_cosine,
                     max_drop=max_drop, threads=threads, runtimes=names, compile=compile_, runs=runs or 10)
        show(result, f"deploy {model}", out_dir)


def lm_spec(spec: str) -> bool:
    """True for what ``torchshrink lm`` loads as a causal LM: zoo:smollm2, a .gguf file, a folder ``lm compress``
    wrote (model/ + tokenizer/), or a Hugging Face folder whose config names a *ForCausalLM / *LMHeadModel class."""
    import json

    if spec == "zoo:smollm2" or spec.endswith(".gguf"):
        return True
    p = Path(spec)
    if p.is_dir() and (p / "model" / "manifest.json").is_file() and (p / "tokenizer").is_dir():
        return True
    try:
        archs = json.loads((p / "config.json").read_text()).get("architectures") or [] if p.is_dir() else []
    except (OSError, ValueError, AttributeError):
        return False
    return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def show_lm(result: Any, title: str, out_dir: Path) -> None:
    """The language-model deploy table, the choice in one line, and how to load it."""
    from rich.markup import escape
    from rich.table import Table

    from torchshrink.cli_support import out

    w = result.workload
    t = Table(title=f"{title} ({result.threads} threads, prompt {w['prompt_tokens']} + {w['new_tokens']} new tokens)")
    for c in ("runtime", "precision", "status", "prompt s", "tokens/s", "total s", "vs given", "perplexity"):
        t.add_column(c, justify="left" if c in ("runtime", "precision", "status") else "right")
    for row in result.rows():
        if row["status"].startswith("skipped"):
            continue
        status = "failed (see deploy.md)" if row["status"].startswith("failed") else row["status"]
        q = row["quality"]
        cells = [row["runtime"], row["precision"] + (" (chosen)" if row["chosen"] else ""), status,
                 *("-" if row.get(k) is None else f"{row[k]:.{d}f}" for k, d in
                   (("prefill_s", 3), ("decode_tokens_per_s", 1), ("total_s", 3))),
                 "-" if row["speedup_vs_given"] is None else f"{row['speedup_vs_given']:.2f}x",
                 f"{q['perplexity']:.3f} ({q['increase_pct']:+.1f}%)" if q else "-"]
        t.add_row(*(escape(c) for c in cells), style="bold green" if row["chosen"] else None)
    out.print(t)
    for row in result.rows():
        if row["status"].startswith("skipped"):
            out.print(f"not tried: {row['runtime']} {row['precision']}: {row['status'].removeprefix('skipped: ')}",
                      highlight=False, markup=False)
    c = result.winner
    vs = result.speedup(c)
    vs_text = f"{vs:.2f}x transformers on the model as given, " if vs is not None else ""
    out.print(f"chosen: {c.name}: {c.timing['total_s']:.3f} s for the prompt + new tokens "
              f"({c.timing['decode_tokens_per_s']:.1f} tokens/s decoding), {vs_text}timed on this machine; "
              f"quality: {result.budget}", markup=False)
    out.print(f"quality data: {result.provenance['quality']}", markup=False)
    out.print(f"wrote {out_dir}/ ({', '.join(result.files)}, deploy.md, deploy.json); load it with:", markup=False)
    out.print(result.snippet(), highlight=False, markup=False)


def _outside_inputs(out_dir: Path, *specs: str | None) -> None:
    """The output may not be, contain or sit inside a model folder it reads (torchshrink never writes over its input)."""
    from torchshrink.core.errors import OutputExistsError
    from torchshrink.recipe.workdir import input_paths

    real = out_dir.resolve()
    for spec in specs:
        for p in input_paths(spec) if spec else []:
            if p == real or real in p.parents or p in real.parents:
                raise OutputExistsError(f"output folder {out_dir} overlaps the input model {p}; torchshrink never writes "
                                        "over its input: choose an --out outside the model's folder")


def show(result: Any, title: str, out_dir: Path) -> None:
    """The deploy table (every candidate, the chosen one marked), the choice in one line, and how to load it."""
    from rich.markup import escape
    from rich.table import Table

    from torchshrink.cli_support import out

    t = Table(title=f"{title} ({result.threads} threads, inputs "
                    f"{' + '.join('x'.join(map(str, s)) for s in result.example)})")
    cols = ["runtime", "precision", "status", "p50 ms", "vs given"] + (["vs reference"] if result.reference else [])
    for c in cols:
        t.add_column(c, justify="right" if c in ("p50 ms", "vs given", "vs reference") else "left")
    skipped: dict[str, list[str]] = {}
    for row in result.rows():
        if row["status"].startswith("skipped"):
            skipped.setdefault(row["status"].removeprefix("skipped: "), []).append(f"{row['runtime']} {row['precision']}")
            continue
        status = "failed (see deploy.md)" if row["status"].startswith("failed") else row["status"]
        cells = [row["runtime"], row["precision"] + (" (chosen)" if row["chosen"] else ""), status,
                 "-" if row["p50_ms"] is None else f"{row['p50_ms']:.3f}",
                 "-" if row["speedup_vs_given"] is None else f"{row['speedup_vs_given']:.2f}x"]
        if result.reference:
            v = row["speedup_vs_reference"]
            cells.append("-" if v is None else f"{v:.2f}x")
        t.add_row(*(escape(c) for c in cells), style="bold green" if row["chosen"] else None)
    out.print(t)
    for why, names in skipped.items():
        out.print(f"not tried: {', '.join(names)}: {why}", highlight=False, markup=False)
    w = result.winner
    vs = (f"{result.speedup(w, result.reference):.2f}x the reference, " if result.reference else "")
    out.print(f"chosen: {w.name}: {w.timing.p50_ms:.3f} ms p50, {vs}{result.speedup(w):.2f}x the model as given "
              f"in torch, timed on this machine; quality: {result.budget}", markup=False)
    for k, v in result.provenance.items():
        if k == "quality":
            out.print(f"quality data: {v}", markup=False)
    out.print(f"wrote {out_dir}/ ({', '.join(result.files)}, deploy.md, deploy.json); load it with:", markup=False)
    out.print(result.snippet(), highlight=False, markup=False)  # code: its [ ] are not rich markup
