"""The public lifecycle of every technique: ``prepare -> (calibrate | train, calling step) -> finalize``.

- ``apply(model, cfg, data=...)`` returns the finished, deployable model (packed, integer, sparse
  kernels where they measured faster). For a kind that trains (:func:`trains`: QAT, gradual pruning,
  binary / ternary training) it needs ``train_data=`` and runs the shared loop
  (:func:`torchshrink.core.train.finetune`) between the phases; without it, it says to use:
- ``prepare(model, cfg, data=...)``: the model ready for the user's own training loop, which calls
  ``step(model, i, total)`` before each optimizer step (schedules, mask updates), then
- ``finalize(prepared)``: the deployable model.

:func:`run` is the one stage driver that ``apply``, the recipe runner, DDP fine-tuning and the search
all use: prepare, an optional ``train(prepared, step_hook)`` callable, finalize.

Every call copies the model first (``inplace=True`` to skip the copy); arguments a kind does not
take raise :class:`ConfigError` instead of being dropped.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.config import Config, Entry, get_entry, known_kinds
from torchshrink.core.errors import ConfigError
from torchshrink.core.report import carry, current, note_changes, open_report
from torchshrink.core.select import Select
from torchshrink.core.surgery import get_module, set_module

StepHook = Callable[[nn.Module, int, int], None]
Trainer = Callable[[nn.Module, StepHook], list[dict[str, float]]]


def _check(model: Any, config: Any) -> Entry:
    if not isinstance(config, Config):
        raise ConfigError(f"expected a torchshrink config, got {type(config).__name__}; known kinds: {', '.join(known_kinds())}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return get_entry(config)


def options_of(entry: Entry) -> list[str]:
    """The technique-specific keyword arguments a kind's handler takes (besides select and data)."""
    params = inspect.signature(entry.handler).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name not in ("model", "config", "select", "data")]


def _check_options(entry: Entry, config: Config, options: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    allowed = options_of(entry)
    for k in options:
        if k not in allowed:
            everything = ["select", "data", "inplace", *extra, *allowed]
            close = difflib.get_close_matches(k, everything, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown argument {k!r} for kind {config.kind!r}{hint}; allowed: {', '.join(everything)}")


def trains(config: Config) -> bool:
    """Whether ``config``'s kind needs training between prepare and finalize."""
    t = get_entry(config).trains
    return bool(t(config) if callable(t) else t)


def prepare(model: nn.Module, config: Config, *, select: Select | dict[str, Any] | None = None, data: Any = None,
            inplace: bool = False, **options: Any) -> nn.Module:
    """Apply ``config``'s first phase to (a copy of) ``model``: for a one-shot kind the result of its
    handler, for a training kind the model ready to train. :func:`finalize` completes it."""
    entry = _check(model, config)
    _check_options(entry, config, options)
    sel = Select.from_dict(select) if isinstance(select, dict) else select
    work = model if inplace else copy.deepcopy(model)
    rep = open_report(work, config.kind)
    if converted := conv1d_as_linear(work):
        rep.notes["conv1d_as_linear"] = (f"{len(converted)} Hugging Face Conv1D layer(s) (GPT-2's (in, out) weights) "
                                         "re-expressed as the Linear layers they equal, so Linear techniques reach them")
    out = entry.handler(work, config, select=sel, data=data, **options)
    carry(work, out)
    state.inherit(model, out, ("source", "input", "recipe"))
    if state.get(out, "source") is None and type(model).__module__.startswith("torchvision.models."):
        # a torchvision model given as an instance: name its builder now, while its module tree is the builder's
        # (once SVD / Tucker put Sequentials where its layers were, the saved folder could not name it)
        from torchshrink.export.skeleton import guess_torchvision_source

        state.put(out, source=guess_torchvision_source(model))
    state.put(out, pending=[*state.get(model, "pending", []), config],
              history=[*state.get(model, "history", []), config.to_dict()])
    return out


def conv1d_as_linear(model: nn.Module) -> list[str]:
    """Replace every Hugging Face ``Conv1D`` (GPT-2's layers: ``x @ W + b`` with W stored (in, out)) by the
    ``nn.Linear`` it equals, in place; returns their names. Techniques that select Linear layers otherwise see
    only GPT-2's lm_head."""
    if "transformers" not in sys.modules:  # no transformers model can be here
        return []
    names = [n for n, m in model.named_modules() if n and type(m).__name__ == "Conv1D"
             and type(m).__module__ == "transformers.pytorch_utils"]
    for name in names:
        old = get_module(model, name)
        nx, nf = old.weight.shape
        lin = nn.Linear(nx, nf, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(old.weight.t())
            if old.bias is not None:
                lin.bias.copy_(old.bias)
        lin.train(old.training)
        set_module(model, name, lin)
    return names


def step(model: nn.Module, step: int, total: int) -> None:
    """The per-step hook of every kind prepared on ``model`` (gradual schedules, held masks): call it
    before each optimizer step of your loop with the step index and the total number of steps."""
    for config in state.get(model, "pending", []):
        entry = get_entry(config)
        if entry.on_step is not None:
            entry.on_step(model, config, step, total)


def finalize(model: nn.Module, config: Config | None = None, *, data: Any = None, inplace: bool = False) -> nn.Module:
    """Turn a prepared (and trained) model into the deployable one: fake-quant into integer modules,
    masks into sparse weights and kernels, training layers into packed ones. ``config`` (of the kind
    prepared last) finalizes with other finalize-time settings (e.g. the stored dtype); ``data``
    calibrates kinds whose finalize measures activations (QAT's integer activation scales)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    pending = list(state.get(model, "pending", []))
    if config is not None:
        if not pending or pending[-1].kind != config.kind:
            last = pending[-1].kind if pending else "nothing"
            raise ConfigError(f"finalize(config={config.kind!r}) on a model prepared with {last!r}: give a config of that kind")
        pending[-1] = config
    out = model if inplace else copy.deepcopy(model)
    for config in pending:
        entry = get_entry(config)
        if entry.finalize is not None:
            takes_data = "data" in inspect.signature(entry.finalize).parameters
            new = entry.finalize(out, config, data=data) if takes_data else entry.finalize(out, config)
            carry(out, new)
            state.inherit(out, new)
            out = new
    state.put(out, pending=[])
    from torchshrink.export.hf_guard import guard_save_pretrained

    return guard_save_pretrained(out.eval())


def run(model: nn.Module, config: Config, *, select: Select | dict[str, Any] | None = None, data: Any = None,
        train: Trainer | None = None, inplace: bool = False, **options: Any) -> tuple[nn.Module, list[dict[str, float]]]:
    """The one stage driver: prepare, ``train(prepared, step)`` when given, finalize. Returns the
    finished model and the training history."""
    original = model if not inplace else None
    prepared = prepare(model, config, select=select, data=data, inplace=inplace, **options)
    history = train(prepared, step) if train is not None else []
    out = finalize(prepared, data=data, inplace=True)
    if original is not None:
        note_changes(original, out)
    if history:
        current(out).notes.setdefault("history", history)
    return out, history


def apply(
    model: nn.Module,
    config: Config,
    *,
    select: Select | dict[str, Any] | None = None,
    data: Any = None,
    train_data: Any = None,
    finetune: Any = None,
    loss: Any = None,
    inplace: bool = False,
    **options: Any,
) -> nn.Module:
    """Compress ``model`` as ``config`` says and return the finished model.

    ``data`` calibrates (batches in any form :mod:`torchshrink.core.data` reads). A kind
    that trains also needs ``train_data`` (labelled batches), with ``finetune`` settings
    (:class:`torchshrink.core.train.Finetune`) and an optional ``loss(model, inputs, labels)``.
    The input model is left untouched unless ``inplace=True``.
    """
    entry = _check(model, config)
    _check_options(entry, config, options, ("train_data", "finetune", "loss"))
    training = trains(config)
    if "train_data" in options_of(entry):  # the kind trains inside its handler (distill: epochs, lr in its config)
        if finetune is not None or loss is not None:
            raise ConfigError(f"kind {config.kind!r} takes its training settings from its config, not finetune/loss")
        options["train_data"] = train_data
    elif training:
        if train_data is None:
            raise ConfigError(
                f"kind {config.kind!r} trains: give apply(..., train_data=labelled_batches, finetune=Finetune(...)), "
                "or run your own loop: m = ts.prepare(model, cfg); train calling ts.step(m, i, total); ts.finalize(m)"
            )
    elif train_data is not None or finetune is not None or loss is not None:
        raise ConfigError(f"kind {config.kind!r} does not train: drop train_data/finetune/loss "
                          "(to fine-tune after it, use a recipe stage with `finetune:`)")
    trainer: Trainer | None = None
    if training and train_data is not None:
        from torchshrink.core.train import Finetune
        from torchshrink.core.train import finetune as loop

        settings = finetune if finetune is not None else Finetune()

        def trainer(m: nn.Module, hook: StepHook) -> list[dict[str, float]]:
            return loop(m, train_data, settings, loss_fn=loss, on_step=hook)

    out, _ = run(model, config, select=select, data=data, train=trainer, inplace=inplace, **options)
    return out


def _family_apply(family: str, model: nn.Module, config: Config, kwargs: dict[str, Any]) -> nn.Module:
    if getattr(config, "family", None) != family:
        raise ConfigError(
            f"{family}() got a config of kind {getattr(config, 'kind', '?')!r}; "
            f"{family} kinds: {', '.join(known_kinds(family)) or '(none registered)'}"
        )
    return apply(model, config, **kwargs)


def prune(model: nn.Module, config: Config, **kwargs: Any) -> nn.Module:
    """Prune ``model`` with a pruning config (``known_kinds('prune')``); arguments as :func:`apply`."""
    return _family_apply("prune", model, config, kwargs)


def quantize(model: nn.Module, config: Config, **kwargs: Any) -> nn.Module:
    """Quantize or cast ``model`` with a quantization config; arguments as :func:`apply`."""
    return _family_apply("quantize", model, config, kwargs)


def factorize(model: nn.Module, config: Config, **kwargs: Any) -> nn.Module:
    """Factorize layers of ``model`` with a low-rank config; arguments as :func:`apply`."""
    return _family_apply("factorize", model, config, kwargs)


def binarize(model: nn.Module, config: Config, **kwargs: Any) -> nn.Module:
    """Binarize / ternarize layers of ``model``; arguments as :func:`apply`."""
    return _family_apply("binarize", model, config, kwargs)


def distill(model: nn.Module, config: Config, **kwargs: Any) -> nn.Module:
    """Distill with a distillation config (``model`` is the teacher, or the student with ``teacher=``)."""
    return _family_apply("distill", model, config, kwargs)
