"""Block-wise (layer-local) reconstruction of factorized layers.

After a factorization, each *chain* of modules (e.g. a transformer FFN: ``intermediate`` then
``output.dense``) is trained on its own to reproduce what the original model's chain computes, on
cached rows of real inputs (padded token positions left out). No full-model forward or backward
runs during the training, so thousands of steps cost seconds per chain -- the idea of layer-wise
reconstruction used by AdaRound / BRECQ (Li et al., ICLR 2021) for quantization, applied to the
factors of a low-rank model.

A chain is a list of module names applied one after the other: ``y = m_k(...m_2(m_1(x)))`` where
``x`` is the input the model gives ``m_1`` and the target is the teacher's output of ``m_k``.
With ``inputs="student"`` the chains are fitted in order, each on the inputs the already refitted
student gives it (so a later chain learns to correct the error the earlier ones leave), against the
teacher chain applied to those same inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.config import check_choice, check_range
from torchshrink.core.errors import ConfigError, DataError
from torchshrink.core.surgery import get_module
from torchshrink.lowrank.common import real_rows, run_calibration

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefitSettings:
    """How each chain is trained: ``steps`` Adam steps of ``batch_rows`` rows at learning rate
    ``lr`` (cosine decay to zero), on at most ``max_rows`` cached rows per chain (a random subset);
    ``holdout`` of the rows is kept out of training to report the error before / after."""

    steps: int = 500
    lr: float = 1e-3
    batch_rows: int = 1024
    max_rows: int = 200_000
    holdout: float = 0.1
    inputs: Literal["teacher", "student"] = "teacher"
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("refit.steps", self.steps, 0, 10_000_000)
        check_range("refit.lr", self.lr, 0.0, 1.0, lo_open=True)
        check_range("refit.batch_rows", self.batch_rows, 1, 10_000_000)
        check_range("refit.max_rows", self.max_rows, 2, 1_000_000_000)
        check_range("refit.holdout", self.holdout, 0.0, 0.9)
        check_choice("refit.inputs", self.inputs, ("teacher", "student"))


def _chain_forward(model: nn.Module, chain: Sequence[str], x: torch.Tensor) -> torch.Tensor:
    for name in chain:
        x = get_module(model, name)(x)
    return x


def _capture(model: nn.Module, data: Any, chains: Sequence[Sequence[str]],
             outputs: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One pass over ``data``: for each chain, the real rows of its first module's input and (with
    ``outputs``) of its last module's output."""
    xs: list[list[torch.Tensor]] = [[] for _ in chains]
    ys: list[list[torch.Tensor]] = [[] for _ in chains]
    state: dict[str, Any] = {}
    grabs: dict[str, list[tuple[list[torch.Tensor], bool]]] = {}
    for i, c in enumerate(chains):
        grabs.setdefault(c[0], []).append((xs[i], True))
        if outputs:
            grabs.setdefault(c[-1], []).append((ys[i], False))

    def hook(m: nn.Module, args: tuple, out: Any, name: str) -> None:
        for store, is_input in grabs[name]:
            t = args[0] if is_input else out
            store.append(real_rows(t.detach(), state.get("mask")).float())

    run_calibration(model, data, {n: (lambda m, a, o, n=n: hook(m, a, o, n)) for n in grabs}, state)
    result = []
    for c, x, y in zip(chains, xs, ys, strict=True):
        if not x or (outputs and not y):
            raise DataError(f"chain {list(c)} was not reached by the data; it cannot be refitted")
        result.append((torch.cat(x), torch.cat(y) if y else None))
    return result


@torch.no_grad()
def _rel_error(model: nn.Module, chain: Sequence[str], x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    err = tot = 0.0
    for i in range(0, x.shape[0], chunk):
        p = _chain_forward(model, chain, x[i:i + chunk])
        err += float((p - y[i:i + chunk]).pow(2).sum())
        tot += float(y[i:i + chunk].pow(2).sum())
    return err / max(tot, 1e-30)


@torch.no_grad()
def _teacher_targets(teacher: nn.Module, chain: Sequence[str], x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([_chain_forward(teacher, chain, x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def _adam(params: list[nn.Parameter], settings: RefitSettings, loss_of_step: Callable[[], torch.Tensor]) -> None:
    """``settings.steps`` Adam steps on ``loss_of_step()`` with a cosine decay of the learning rate."""
    if not params or settings.steps == 0:
        return
    opt = torch.optim.Adam(params, lr=settings.lr)
    for step in range(settings.steps):
        for g in opt.param_groups:
            g["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        loss = loss_of_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _train_chain(student: nn.Module, chain: Sequence[str], x: torch.Tensor, y: torch.Tensor,
                 settings: RefitSettings, gen: torch.Generator) -> None:
    params = [p for n in chain for p in get_module(student, n).parameters() if p.requires_grad]
    scale = float(y.pow(2).mean().clamp_min(1e-30))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, x.shape[0], (min(settings.batch_rows, x.shape[0]),), generator=gen)
        return (_chain_forward(student, chain, x[idx]) - y[idx]).pow(2).mean() / scale

    _adam(params, settings, loss)


def refit(student: nn.Module, teacher: nn.Module, chains: Sequence[Sequence[str]], data: Any,
          settings: RefitSettings | None = None) -> dict[str, dict[str, float]]:
    """Train each chain of ``student`` (in place) to reproduce the same chain of ``teacher``.

    ``chains``: lists of module names (the same names in both models; the student's modules may
    be factorized). ``data``: calibration batches (tensors, tuples of inputs, or tokenizer dicts).
    Only the parameters inside each chain change. Returns ``{chain: {"rows", "error_before",
    "error_after"}}`` with the relative squared error ``|f(x) - y|^2 / |y|^2`` on held-out rows.
    """
    settings = settings or RefitSettings()
    if student is teacher:
        raise ConfigError("refit needs the original model as teacher and a different (compressed) student module")
    if not data:
        raise DataError("refit needs calibration batches (data=[...]); none were given")
    chains = [list(c) for c in chains]
    for c in chains:
        if not c:
            raise ConfigError("refit: every chain needs at least one module name")
        for n in c:  # unknown names fail before any work, in both models
            get_module(student, n)
            get_module(teacher, n)
    gen = torch.Generator().manual_seed(settings.seed)
    cached = _capture(teacher, data, chains) if settings.inputs == "teacher" else []
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    out: dict[str, dict[str, float]] = {}
    try:
        for i, c in enumerate(chains):
            if settings.inputs == "teacher":
                x, y = cached[i]
                cached[i] = (x[:0], None)  # free the rows once used
            else:
                x = _capture(student, data, [c], outputs=False)[0][0]
                y = _teacher_targets(teacher, c, x)
            perm = torch.randperm(x.shape[0], generator=gen)[: settings.max_rows]
            n_hold = int(round(settings.holdout * perm.numel()))
            hold, train = perm[:n_hold], perm[n_hold:]
            if train.numel() == 0:
                raise DataError(f"chain {c} got no training rows from the data")
            check = hold if n_hold else train
            before = _rel_error(student, c, x[check], y[check])
            with torch.enable_grad():
                _train_chain(student, c, x[train], y[train], settings, gen)
            after = _rel_error(student, c, x[check], y[check])
            key = " -> ".join(c)
            out[key] = {"rows": int(train.numel()), "error_before": before, "error_after": after}
            log.info("refit %s: relative error %.4g -> %.4g on %d rows", key, before, after, int(train.numel()))
    finally:
        student.train(was[0])
        teacher.train(was[1])
    return out


# --------------------------------------------------------------------------- whole blocks


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted block input is stored."""


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple | list):
        return type(v)(_detach(x) for x in v)
    return v


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"refit_blocks needs blocks that return a tensor (or a tuple starting with one), got {type(out).__name__}")


@torch.no_grad()
def _block_io(model: nn.Module, data: Any, names: Sequence[str], *, outputs: bool, stop: bool) -> list[dict[str, Any]]:
    """Per batch: ``{"mask", "args": {name: (args, kwargs)}, "out": {name: tensor}}`` of the named
    blocks (inputs always, outputs if asked); with ``stop`` the forward ends after the last input."""
    from torchshrink.lowrank.common import calibration_inputs, token_mask

    batches: list[dict[str, Any]] = []
    handles = []
    for n in names:
        mod = get_module(model, n)

        def pre(m: nn.Module, args: tuple, kwargs: dict, n: str = n) -> None:
            batches[-1]["args"][n] = (_detach(args), _detach(kwargs))
            if stop and len(batches[-1]["args"]) == len(names) and not outputs:
                raise _Stop

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        if outputs:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=n: batches[-1]["out"].__setitem__(n, _first_tensor(o).detach().clone())))
    was = model.training
    model.eval()
    try:
        for inputs in calibration_inputs(data):
            batches.append({"mask": token_mask(inputs), "args": {}, "out": {}})
            try:
                model(*inputs)
            except _Stop:
                pass
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return batches


def _masked_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, sum of squared targets) over the real token positions."""
    if mask is not None and pred.dim() == 3 and tuple(pred.shape[:2]) == tuple(mask.shape):
        w = mask[..., None].to(pred.dtype)
        return ((pred - target).pow(2) * w).sum(), (target.pow(2) * w).sum()
    return (pred - target).pow(2).sum(), target.pow(2).sum()


def _block_params(block: nn.Module, only_factorized: bool) -> list[nn.Parameter]:

    if not only_factorized:
        return [p for p in block.parameters() if p.requires_grad]
    mods = [m for m in block.modules() if state.get(m, "lowrank")]
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def refit_blocks(student: nn.Module, teacher: nn.Module, blocks: Sequence[str], data: Any,
                 settings: RefitSettings | None = None, *, only_factorized: bool = True) -> dict[str, dict[str, float]]:
    """Train each named block of ``student`` (in place; e.g. the layers of a transformer) to
    reproduce the teacher's output of the same block, real tokens only, one block at a time.

    The block runs as a whole (attention, residuals and norms included), so the loss is the error
    of the block's output -- what the next block sees -- not of a factorized layer in isolation.
    Only the factorized modules inside a block are trained (``only_factorized=False``: every
    parameter of the block). With ``settings.inputs == "student"`` each block gets the inputs the
    already refitted student gives it, and learns to reproduce the teacher's output on the teacher's
    inputs, so it also corrects the error of the blocks before it. A step is one calibration batch
    (``batch_rows`` and ``max_rows`` do not apply). Returns ``{block: {"batches", "error_before",
    "error_after"}}`` (relative squared error on the held-out batches).
    """
    settings = settings or RefitSettings()
    if student is teacher:
        raise ConfigError("refit needs the original model as teacher and a different (compressed) student module")
    if not data:
        raise DataError("refit needs calibration batches (data=[...]); none were given")
    if not blocks:
        raise ConfigError("refit_blocks needs at least one block name (e.g. the layers of a transformer)")
    for n in blocks:
        get_module(student, n)
        get_module(teacher, n)
    gen = torch.Generator().manual_seed(settings.seed)
    ref = _block_io(teacher, data, blocks, outputs=True, stop=False)
    n_hold = int(round(settings.holdout * len(ref)))
    order = torch.randperm(len(ref), generator=gen).tolist()
    hold, train = order[:n_hold], order[n_hold:] or order
    check = hold or train
    out: dict[str, dict[str, float]] = {}
    was = student.training
    student.eval()
    try:
        for name in blocks:
            block = get_module(student, name)
            io = (_block_io(student, data, [name], outputs=False, stop=True) if settings.inputs == "student" else ref)

            def error(i: int, grad: bool = False, name: str = name, block: nn.Module = block,
                      io: list = io) -> tuple[torch.Tensor, torch.Tensor]:
                args, kwargs = io[i]["args"][name]
                with torch.set_grad_enabled(grad):
                    pred = _first_tensor(block(*args, **kwargs))
                return _masked_error(pred, ref[i]["out"][name], ref[i]["mask"])

            def rel(idx: list[int], error=error) -> float:  # noqa: ANN001
                e = [error(i) for i in idx]
                return float(sum(a for a, _ in e) / max(float(sum(b for _, b in e)), 1e-30))

            before = rel(check)
            def loss(error=error) -> torch.Tensor:  # noqa: ANN001
                err, tot = error(train[int(torch.randint(0, len(train), (1,), generator=gen))], grad=True)
                return err / tot.clamp_min(1e-30)

            with torch.enable_grad():
                _adam(_block_params(block, only_factorized), settings, loss)
            after = rel(check)
            out[name] = {"batches": len(train), "error_before": before, "error_after": after}
            log.info("refit block %s: relative error %.4g -> %.4g", name, before, after)
    finally:
        student.train(was)
    return out
