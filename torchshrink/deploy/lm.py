"""``deploy`` for causal language models: the workload is generation (a prompt read at once, then new tokens
one at a time, greedy), quality is perplexity on held-out text against the reference model's, and the
candidates are the runtimes an LM is deployed on:

- ``torch``: transformers' ``generate`` on the model as given, and on a bf16 copy (float models);
- ``torchshrink``: torchshrink's decode engine (``llm/_decode.c``; int4 / int8 group-wise GEMV kernels,
  static KV cache, prompt path -- engine, bf16 or INT8 GEMMs -- chosen by timing a prompt of the workload's
  length): the model's own codes where it holds packed weights, else its Linears rounded to nearest on 8-bit
  and on 4-bit groups of 64 (asymmetric);
- ``llama.cpp`` (``llama-cpp-python``, the ``bench`` / ``llm`` extras): GGUF Q8_0 and Q4_0 written by
  :func:`torchshrink.llm.gguf_export.export_gguf` (a model loaded from a GGUF file).

Every candidate scores the same held-out windows (each window from an empty cache), passes when its
perplexity is at most ``(1 + max_increase)`` times the reference's, and every one that passes is timed on the
same real prompt, rounds interleaved; the fastest (prompt + new tokens, median) is written with how to load
it and the whole table. A candidate this machine cannot build is a row saying why, not an error."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import ConfigError
from torchshrink.deploy import runtimes as rt
from torchshrink.deploy.candidates import one_line
from torchshrink.measure.latency import threads as pinned
from torchshrink.measure.machine import machine_info, machine_markdown

log = logging.getLogger(__name__)

LM_RUNTIMES = ("torch", "torchshrink", "llama.cpp")
AS_GIVEN = "as given"
CHECK_TOKENS = 16  # greedy tokens the written artifact must reproduce


# --------------------------------------------------------------------------- runners: one per runtime

class _TimeFirst:
    """A transformers logits processor that notes when the first new token's logits arrive (end of prefill)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class TorchRunner:
    """transformers' generate (greedy, exactly ``new`` tokens) on ``model``; ``dtype`` casts it."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = model.eval() if dtype is None else copy.deepcopy(model).to(dtype).eval()

    @torch.inference_mode()
    def window_nll(self, ids: torch.Tensor) -> float:
        logits = self.model(ids[None]).logits[0, :-1].float()
        return -float(F.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum())

    @torch.inference_mode()
    def generate(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        from transformers import LogitsProcessorList

        stamp = _TimeFirst()
        ids = torch.tensor([prompt])
        eos = getattr(self.model.config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list | tuple) and eos else eos) or 0
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, logits_processor=LogitsProcessorList([stamp]), pad_token_id=pad)
        t2 = time.perf_counter()
        t1 = stamp.at or t2
        return out[0, len(prompt):].tolist(), t1 - t0, t2 - t1


class EngineRunner:
    """torchshrink's decode engine (:class:`torchshrink.llm.decode.Decoder`)."""

    def __init__(self, model: nn.Module, max_len: int, prompt_tokens: int) -> None:
        from torchshrink.llm.decode import Decoder

        self.dec = Decoder.from_model(model, max_len=max_len)
        self.prefill = "engine"
        if prompt_tokens >= 64:  # the prompt path (engine, bf16 / INT8 GEMMs) timed at the workload's length
            from torchshrink.llm.prefill import choose_prefill

            self.prefill = choose_prefill(self.dec, model, tokens=prompt_tokens, rounds=1)["chosen"]

    def window_nll(self, ids: torch.Tensor) -> float:
        logits = self.dec.logits(ids)[:-1].float()  # token by token from position 0: the decode path itself
        return -float(F.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum())

    def prompt_runner(self) -> TorchRunner | None:
        """The prompt path when it is not the engine (a bf16 / INT8 torch copy that writes the KV cache): it is
        scored too, since a prompt's cache comes from it."""
        pm = self.dec.prefill_with
        return TorchRunner(pm) if pm is not None else None

    def generate(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        r = self.dec.generate(prompt, new)
        return r["tokens"], r["prefill_s"], r["decode_s"]


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on a GGUF file; greedy on the last logits, one token per call."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        self.path, self.threads, self.n_ctx = path, threads, n_ctx
        self.llm = self._open(logits_all=False)

    def _open(self, logits_all: bool) -> Any:
        from llama_cpp import Llama

        return Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=512, n_ubatch=512, n_threads=self.threads,
                     n_threads_batch=self.threads, logits_all=logits_all, verbose=False)

    def window_nll(self, ids: torch.Tensor) -> float:
        if not hasattr(self, "scorer"):
            self.scorer = self._open(logits_all=True)
        self.scorer.reset()
        self.scorer.eval(ids.tolist())
        logits = torch.from_numpy(self.scorer.scores[: ids.numel() - 1].copy()).double()
        return -float(F.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum())

    def done_scoring(self) -> None:
        self.__dict__.pop("scorer", None)

    def generate(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        out = [int(llm.scores[llm.n_tokens - 1].argmax())]
        t1 = time.perf_counter()
        while len(out) < new:
            llm.eval([out[-1]])
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        return out, t1 - t0, time.perf_counter() - t1


# --------------------------------------------------------------------------- candidates

@dataclasses.dataclass
class LMCandidate:
    runtime: str
    precision: str
    runner: Any = None
    status: str = "built"  # built | skipped: why | failed: why | passed | below budget
    build_s: float = 0.0
    note: str = ""
    quality: dict[str, float] = dataclasses.field(default_factory=dict)
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    write: Callable[[Path], list[Path]] | None = None
    snippet: str = ""
    reload: Callable[[Path], Any] | None = None  # the written artifact as a runner, loaded as the snippet loads it

    @property
    def name(self) -> str:
        return f"{self.runtime} / {self.precision}"

    @property
    def ok(self) -> bool:
        return self.runner is not None and not self.status.startswith(("skipped", "failed"))


def _packed(model: nn.Module) -> bool:
    from torchshrink.llm.modules import PackedLinear

    return any(isinstance(m, PackedLinear) for m in model.modules())


def _folder_writer(model: nn.Module, tokenizer: Any) -> Callable[[Path], list[Path]]:
    """model/ (ts.save) + tokenizer/: the folder ``load_causal_lm`` and ``torchshrink lm generate`` read."""
    def write(folder: Path) -> list[Path]:
        from torchshrink import save

        save(model, folder / "model")
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        return [folder / "model", folder / "tokenizer"]
    return write


TORCH_SNIPPET = ("import torch\nfrom torchshrink.llm import load_causal_lm\n"
                 "model, tok = load_causal_lm('{{dir}}'){cast}\n"
                 "ids = tok('The Debian project is', return_tensors='pt').input_ids\n"
                 "print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0]))")
ENGINE_SNIPPET = ("from torchshrink.llm import load_causal_lm\nfrom torchshrink.llm.decode import Decoder\n"
                  "model, tok = load_causal_lm('{dir}')\n"
                  "dec = Decoder.from_model(model, max_len=2048)  # the packed codes as they are\n"
                  "r = dec.generate(tok('The Debian project is').input_ids, 64)\n"
                  "print(tok.decode(r['tokens']), r['tokens_per_s'])\n"
                  "# or: torchshrink lm generate -m {dir} -p 'The Debian project is'")
LLAMA_SNIPPET = ("from llama_cpp import Llama\n"
                 "llm = Llama(model_path='{dir}/model.gguf', n_ctx=2048)\n"
                 "print(llm('The Debian project is', max_tokens=64, temperature=0.0)['choices'][0]['text'])")


def _build(runtime: str, precision: str, make: Callable[[], LMCandidate]) -> LMCandidate:
    t0 = time.perf_counter()
    try:
        c = make()
    except Exception as e:  # a candidate this machine cannot build is a row, not an error
        log.info("deploy candidate %s / %s failed: %s", runtime, precision, e)
        c = LMCandidate(runtime, precision, status=f"failed: {one_line(e)}")
    c.build_s = time.perf_counter() - t0
    return c


def build_lm_candidates(model: nn.Module, tokenizer: Any, runtimes: Sequence[str], threads: int, max_len: int,
                        prompt_tokens: int, scratch: Path) -> list[LMCandidate]:
    from torchshrink.llm.models import load_causal_lm

    out: list[LMCandidate] = []
    packed = _packed(model)
    given = _folder_writer(model, tokenizer)

    def torch_reload(dtype: torch.dtype | None) -> Callable[[Path], Any]:
        return lambda folder: TorchRunner(load_causal_lm(str(folder))[0], dtype)

    if "torch" in runtimes:
        out.append(_build("torch", AS_GIVEN, lambda: LMCandidate(
            "torch", AS_GIVEN, TorchRunner(model), write=given, snippet=TORCH_SNIPPET.format(cast=""),
            reload=torch_reload(None))))
        if packed:
            out.append(LMCandidate("torch", "bf16", status="skipped: the model holds packed integer weights"))
        else:
            out.append(_build("torch", "bf16", lambda: LMCandidate(
                "torch", "bf16", TorchRunner(model, torch.bfloat16), write=given,
                snippet=TORCH_SNIPPET.format(cast="\nmodel = model.to(torch.bfloat16)"),
                reload=torch_reload(torch.bfloat16))))

    def engine(m: nn.Module, precision: str) -> LMCandidate:
        r = EngineRunner(m, max_len, prompt_tokens)
        return LMCandidate("torchshrink", precision, r, note=f"{r.dec.nbytes() / 1e6:.1f} MB of weights; prompt path "
                           f"{r.prefill}", write=_folder_writer(m, tokenizer), snippet=ENGINE_SNIPPET,
                           reload=lambda folder: EngineRunner(load_causal_lm(str(folder))[0], max_len, 0))

    if "torchshrink" in runtimes:
        if packed:
            out.append(_build("torchshrink", AS_GIVEN, lambda: engine(model, AS_GIVEN)))
        else:
            for bits in (8, 4):
                def rounded(bits: int = bits) -> LMCandidate:
                    from torchshrink.llm.sequential import quantize_lm
                    from torchshrink.llm.wquant import Grid

                    m = copy.deepcopy(model)
                    quantize_lm(m, Grid(bits, 64, False), method="rtn", pack=True)
                    return engine(m, f"int{bits} weights (g64, nearest)")
                out.append(_build("torchshrink", f"int{bits} weights (g64, nearest)", rounded))

    if "llama.cpp" in runtimes:
        why = rt.missing("llama_cpp") or rt.missing("gguf")
        from torchshrink.llm.gguf_export import source_gguf

        if why is None and source_gguf(model) is None:
            why = "GGUF export copies the tokenizer from the GGUF file the model was loaded from; this one was not"
        for qtype in ("Q8_0", "Q4_0"):
            if why:
                out.append(LMCandidate("llama.cpp", qtype, status=f"skipped: {why}"))
                continue

            def gguf(qtype: str = qtype) -> LMCandidate:
                from torchshrink.llm.gguf_export import export_gguf

                path = scratch / f"model-{qtype}.gguf"
                rep = export_gguf(model, path, qtype)
                return LMCandidate("llama.cpp", qtype, LlamaCppRunner(path, threads, max_len),
                                   note=f"{rep['bytes'] / 1e6:.1f} MB file", snippet=LLAMA_SNIPPET,
                                   write=lambda folder, p=path: [Path(shutil.copyfile(p, folder / "model.gguf"))],
                                   reload=lambda folder: LlamaCppRunner(folder / "model.gguf", threads, max_len))
            out.append(_build("llama.cpp", qtype, gguf))
    return out


# --------------------------------------------------------------------------- the whole deploy

@dataclasses.dataclass
class LMDeployResult:
    candidates: list[LMCandidate]
    winner: LMCandidate
    baseline: LMCandidate | None  # transformers on the model as given (None where torch was not asked for)
    reference_perplexity: float
    budget: str
    provenance: dict[str, str]
    machine: dict[str, Any]
    workload: dict[str, int]
    threads: int
    out: Path | None = None
    files: list[str] = dataclasses.field(default_factory=list)

    def speedup(self, c: LMCandidate) -> float | None:
        a = self.baseline.timing.get("total_s") if self.baseline is not None else None
        b = c.timing.get("total_s")
        return a / b if a and b else None

    def snippet(self) -> str:
        return self.winner.snippet.format(dir=str(self.out) if self.out else "OUT")

    def rows(self) -> list[dict[str, Any]]:
        return [{"runtime": c.runtime, "precision": c.precision, "status": c.status, **c.timing,
                 "speedup_vs_given": self.speedup(c), "quality": c.quality, "note": c.note,
                 "build_s": round(c.build_s, 2), "chosen": c is self.winner} for c in self.candidates]

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.winner.name, "budget": self.budget, "reference_perplexity": self.reference_perplexity,
                "workload": self.workload, "threads": self.threads, "machine": self.machine,
                "provenance": self.provenance, "candidates": self.rows(), "files": self.files,
                "snippet": self.snippet()}


def check_runtimes(runtimes: Sequence[str]) -> None:
    bad = [r for r in runtimes if r not in LM_RUNTIMES]
    if bad or not runtimes:
        raise ConfigError(f"runtime {bad[0] if bad else '(none)'!r} is not one deploy knows for a language model; "
                          f"allowed: {', '.join(LM_RUNTIMES)}")


def _check_args(runtimes: Sequence[str], max_increase: float, prompt_tokens: int, new_tokens: int, window: int,
                out: Path | None, force: bool) -> None:
    check_runtimes(runtimes)
    if not 0.0 <= max_increase < 10.0:
        raise ConfigError(f"max_increase={max_increase}: must be in [0, 10) (a fraction: 0.02 allows perplexity 2% "
                          "above the reference's)")
    for name, v in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("window", window)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r} must be a whole number of 1 or more")
    if window < 2:
        raise ConfigError(f"window={window} must be 2 or more (a window's first token is not scored)")
    from torchshrink.deploy.api import check_out

    check_out(out, force)


def _perplexity(runner: Any, windows: torch.Tensor) -> float:
    nll = sum(runner.window_nll(w) for w in windows)
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def deploy_lm(model: nn.Module, tokenizer: Any, *, data: str | None = None, reference: nn.Module | None = None,
              out: str | Path | None = None, force: bool = False, max_increase: float = 0.02,
              prompt_tokens: int = 128, new_tokens: int = 128, eval_tokens: int = 2048, window: int = 512,
              threads: int | None = None, runtimes: Sequence[str] = LM_RUNTIMES, runs: int = 3) -> LMDeployResult:
    """Choose, by measurement on this machine, the fastest way to generate with the causal LM ``model`` whose
    held-out perplexity stays within ``max_increase`` (a fraction) of ``reference``'s (default the model itself).

    ``data``: a UTF-8 text file (its last 20% of paragraphs are the held-out text; default the Debian
    documentation prose split by document); ``prompt_tokens`` / ``new_tokens``: the workload timed (a real
    held-out prompt, exactly that many greedy tokens); ``out``: a folder for the chosen artifact, ``deploy.md``
    and ``deploy.json``, written whole or not at all."""
    from torchshrink.core.files import write_atomic
    from torchshrink.llm.models import full_attention_config
    from torchshrink.llm.pipeline import lm_text, resolve

    out_path = Path(out) if out is not None else None
    _check_args(runtimes, max_increase, prompt_tokens, new_tokens, window, out_path, force)
    if runs < 1:
        raise ConfigError(f"runs={runs} must be 1 or more")
    full_attention_config(model, "deploy for language models")  # one line for anything but a decoder-only LM
    model = model.eval()
    ref = (reference if reference is not None else model).eval()
    n = threads or torch.get_num_threads()
    o = resolve("llm-w8", {"samples": 1, "seq": window, "window": window, "eval_tokens": max(eval_tokens, window)})
    text = lm_text(tokenizer, data, o)
    ids = text["eval"]
    k = ids.numel() // window
    windows = ids[: k * window].reshape(k, window)
    prompt = ids[:prompt_tokens].tolist()
    if len(prompt) < prompt_tokens:
        raise ConfigError(f"prompt_tokens={prompt_tokens} is longer than the held-out text ({ids.numel()} tokens)")
    max_len = prompt_tokens + new_tokens
    with pinned(n), tempfile.TemporaryDirectory(prefix="torchshrink-deploy-lm-") as d:
        scratch = Path(d)
        ref_ppl = _perplexity(TorchRunner(ref), windows)
        limit = ref_ppl * (1 + max_increase)
        budget = f"perplexity <= {limit:.4f} (the reference's {ref_ppl:.4f} + {100 * max_increase:g}%)"
        cands = build_lm_candidates(model, tokenizer, runtimes, n, max(max_len, window), prompt_tokens, scratch)
        for c in cands:
            if not c.ok:
                continue
            try:
                ppl = _perplexity(c.runner, windows)
                c.quality = {"perplexity": ppl, "increase_pct": 100 * (ppl / ref_ppl - 1)}
                prompt_path = c.runner.prompt_runner() if hasattr(c.runner, "prompt_runner") else None
                if prompt_path is not None:  # the prompt's KV cache comes from another path: it is held to the budget too
                    c.quality["prompt_path_perplexity"] = pp_ = _perplexity(prompt_path, windows)
                    ppl = max(ppl, pp_)
                c.status = "passed" if ppl <= limit else "below budget"
            except Exception as e:
                c.status = f"failed: {one_line(e)}"
            if hasattr(c.runner, "done_scoring"):
                c.runner.done_scoring()
        timed = [c for c in cands if c.status == "passed" or (c.runtime, c.precision) == ("torch", AS_GIVEN)
                 and c.ok]
        samples: dict[str, list[tuple[float, float]]] = {c.name: [] for c in timed}
        tokens: dict[str, list[int]] = {}
        for r in range(runs + 1):  # the first round warms up
            for c in list(timed):
                try:
                    new, pre, dec = c.runner.generate(prompt, new_tokens)
                except Exception as e:  # a runtime that cannot generate here is a row, not an error
                    c.status = f"failed: generation: {one_line(e)}"
                    timed.remove(c)
                    continue
                tokens.setdefault(c.name, new)
                if r:
                    samples[c.name].append((pre, dec))
        for c in timed:
            pre = statistics.median(s[0] for s in samples[c.name])
            dec = statistics.median(s[1] for s in samples[c.name])
            c.timing = {"prefill_s": pre, "decode_s": dec, "total_s": statistics.median(a + b for a, b in samples[c.name]),
                        "decode_tokens_per_s": (new_tokens - 1) / dec if dec > 0 else float("nan")}
        passed = [c for c in cands if c.status == "passed"]
        if not passed:
            from torchshrink.deploy.api import DeployError

            raise DeployError(f"no candidate met the quality budget ({budget}); loosen it (--max-increase) or check "
                              "the model")
        winner = min(passed, key=lambda c: c.timing["total_s"])
        baseline = next((c for c in timed if (c.runtime, c.precision) == ("torch", AS_GIVEN)), None)
        result = LMDeployResult(
            cands, winner, baseline, ref_ppl, budget,
            {"quality": f"perplexity on {k} held-out windows of {window} tokens ({k * (window - 1)} scored tokens), "
                        f"each from an empty cache; {text['eval_text']}",
             "prompt": f"the first {prompt_tokens} held-out tokens, then {new_tokens} greedy tokens (no early stop); "
                       f"median of {runs} interleaved rounds after one warm-up round"},
            machine_info(), {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens}, n)
        if out_path is not None:
            from torchshrink.deploy.report import publish

            def fill(tmp: Path) -> None:
                assert winner.write is not None and winner.reload is not None
                files = winner.write(tmp)
                check = min(CHECK_TOKENS, new_tokens)
                again = winner.reload(tmp).generate(prompt, check)[0]
                if again != tokens[winner.name][:check]:
                    from torchshrink.deploy.api import DeployError

                    raise DeployError(f"the written {winner.name} artifact does not reproduce its candidate's first "
                                      f"{check} greedy tokens; nothing was written")
                result.out = out_path
                result.files = sorted(str(f.relative_to(tmp)) for f in files)
                write_atomic(tmp / "deploy.json", json.dumps(result.to_dict(), indent=1, default=str))
                write_atomic(tmp / "deploy.md", markdown(result))
            try:
                publish(out_path, fill)
            except BaseException:
                result.out = None
                raise
    return result


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(r: LMDeployResult) -> str:
    w = r.workload
    lines = [f"# deploy: {r.winner.name}", "", machine_markdown(r.machine).strip(), "",
             f"Timed: a prompt of {w['prompt_tokens']} tokens, then {w['new_tokens']} new tokens at batch 1, "
             f"{r.threads} thread(s); every row that passed, rounds interleaved.", f"Quality budget: {r.budget}.", ""]
    lines += [f"- {k}: {v}" for k, v in r.provenance.items()]
    lines += ["", "| runtime | precision | status | prompt s | decode tokens/s | total s | speedup vs given | "
              "perplexity | note | build s |", "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in r.rows():
        mark = " **(chosen)**" if row["chosen"] else ""
        q = row["quality"]
        lines.append(f"| {row['runtime']} | {row['precision']}{mark} | {row['status']} | "
                     f"{_f(row.get('prefill_s'), '.3f')} | {_f(row.get('decode_tokens_per_s'), '.1f')} | "
                     f"{_f(row.get('total_s'), '.4f')} | {_f(row['speedup_vs_given'], '.2f')} | "
                     + (f"{q['perplexity']:.4f} ({q['increase_pct']:+.2f}%)" if q else "-")
                     + (f"; prompt path {q['prompt_path_perplexity']:.4f}" if "prompt_path_perplexity" in q else "")
                     + f" | {row['note'] or '-'} | {row['build_s']:.1f} |")
    lines += ["", "## Load it", "", "```python", r.snippet(), "```", ""]
    return "\n".join(lines)


__all__ = ["LM_RUNTIMES", "LMCandidate", "LMDeployResult", "deploy_lm"]
