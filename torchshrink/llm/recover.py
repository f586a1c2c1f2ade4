"""Recovery of a pruned or sparsified causal LM by distillation from its unpruned teacher on real text.

``distill_lm(student, teacher, rows, seconds=..., steps=...)`` trains the student on token rows with the
teacher's soft next-token distribution (KL at ``temperature``, times T^2) and, with ``hidden_weight``, a
cosine term between the two models' final hidden states (the normed residual stream both LM heads read;
it exists for any depth or width of the student's layers, so depth- and width-pruned students alike
are covered). No hard-label term by default: the student moves toward the teacher, not toward the
training text, so a recovered perplexity says how much of the teacher came back (``label_weight`` adds
next-token cross-entropy for users who also want the text's domain).

* Budget by wall-clock ``seconds`` (a cosine learning rate over the time, after a short warmup) or by
  ``steps``; either way the report says how many tokens it spent.
* Zeros stay zeros: weights that are exactly 0 when training starts (unstructured / N:M sparsity) are
  re-zeroed after every step, so the sparsity pattern and its storage survive.
* Embeddings (and a tied LM head) are frozen by default: the gradient of a 49k x 576 output matrix costs
  a third of the LM head's backward and 2 x its size in optimizer state, and pruning never touched it.
* ``evaluate(student) -> float`` is called every ``eval_every`` steps (and at the start and end), giving
  the curve of the metric against tokens spent.
* ``autocast``: bf16 autocast for both forwards where the CPU has native bf16 (AVX-512 BF16 / AMX);
  master weights and the optimizer stay fp32.
* Data-parallel: called in every process of an initialized ``torch.distributed`` group (e.g. a script
  started with ``torchrun --nproc-per-node N`` that calls ``torch.distributed.init_process_group("gloo")``
  first), each process trains on its own ``batch`` rows of a global batch of ``batch x N`` (the same seeded
  row order everywhere), gradients are averaged over the processes before each step, and the first
  process decides when the budget is spent and runs ``evaluate``; N processes of ``batch`` rows take the
  same steps as one process of ``batch x N`` rows. The processes are checked to end with equal weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import ConfigError, DataError
from torchshrink.llm.models import causal_lm


def _check(rows: torch.Tensor, batch: int, seconds: float | None, steps: int | None, temperature: float,
           warmup: int) -> None:
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.is_floating_point():
        raise DataError("distill_lm needs token rows: an integer tensor of shape (rows, tokens)")
    if rows.shape[1] < 2 or rows.shape[0] < 1:
        raise DataError(f"token rows of shape {tuple(rows.shape)}: at least one row of 2 tokens is needed")
    if batch < 1:
        raise ConfigError(f"batch={batch} must be >= 1")
    if (seconds is None) == (steps is None):
        raise ConfigError("give exactly one budget: seconds=... (wall clock) or steps=...")
    if seconds is not None and seconds <= 0 or steps is not None and steps < 1:
        raise ConfigError(f"budget seconds={seconds} / steps={steps} must be positive")
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    if warmup < 0:
        raise ConfigError(f"warmup={warmup} must be >= 0 steps")


def _hidden_and_logits(model: nn.Module, x: torch.Tensor, hidden: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    out = model(input_ids=x, use_cache=False, output_hidden_states=hidden)
    return (out.hidden_states[-1] if hidden else None), out.logits


def bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX), where autocast pays."""
    from torchshrink.measure.machine import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def distill_lm(student: nn.Module, teacher: nn.Module, rows: torch.Tensor, *, seconds: float | None = None,
               steps: int | None = None, batch: int = 4, lr: float = 1e-4, temperature: float = 1.0,
               hidden_weight: float = 0.0, label_weight: float = 0.0, freeze_embeddings: bool = True,
               autocast: bool | None = None, warmup: int = 10, evaluate: Callable[[nn.Module], float] | None = None,
               eval_every: int = 50, seed: int = 0, log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` in place (see the module docstring). Returns the report:
    steps, tokens, seconds, final loss, and ``curve`` = [{"step", "tokens", "seconds", "metric"}]."""
    import torch.distributed as dist

    causal_lm(student)
    causal_lm(teacher)
    _check(rows, batch, seconds, steps, temperature, warmup)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if world > 1 and rows.shape[0] < batch * world:
        raise DataError(f"{rows.shape[0]} token rows cannot fill a batch of {batch} rows in each of {world} processes")
    autocast = bf16_native() if autocast is None else autocast
    gen = torch.Generator().manual_seed(seed)
    frozen = set()
    if freeze_embeddings:
        for m in student.modules():
            if isinstance(m, nn.Embedding):
                frozen.add(id(m.weight))
        head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
        if head is not None and any(head.weight is m.weight for m in student.modules() if isinstance(m, nn.Embedding)):
            frozen.add(id(head.weight))
    params = [p for p in student.parameters() if id(p) not in frozen and p.is_floating_point()]
    if not params:
        raise ConfigError("the student has no trainable parameters left (everything frozen or quantized)")
    zeros = {p: p.detach() == 0 for p in params if p.dim() == 2 and bool((p.detach() == 0).any())}
    was = [p.requires_grad for p in student.parameters()]
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen and p.is_floating_point())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    t_was, s_was = teacher.training, student.training
    teacher.eval()
    student.train()
    curve: list[dict] = []
    tokens, eval_time = 0, 0.0
    t0 = time.perf_counter()

    def point(step: int) -> None:
        """One curve point; its time is not training time (neither the budget nor the report counts it)."""
        nonlocal eval_time
        if evaluate is None or rank != 0:
            return
        e0 = time.perf_counter()
        student.eval()
        row = {"step": step, "tokens": tokens, "seconds": round(e0 - t0 - eval_time, 1), "metric": float(evaluate(student))}
        curve.append(row)
        if log:
            log(row)
        student.train()
        eval_time += time.perf_counter() - e0

    order = torch.randperm(rows.shape[0], generator=gen)
    pos, step, loss_v = 0, 0, float("nan")
    try:
        point(0)
        while True:
            elapsed = time.perf_counter() - t0 - eval_time
            stop = steps is not None and step >= steps or seconds is not None and elapsed >= seconds
            frac = step / steps if steps is not None else elapsed / seconds
            if world > 1:  # the first process's clock decides for all (the same step count and learning rate)
                flag = torch.tensor([float(stop), frac], dtype=torch.float64)
                dist.broadcast(flag, 0)
                stop, frac = bool(flag[0]), float(flag[1])
            if stop:
                break
            scale = min(1.0, (step + 1) / warmup if warmup else 1.0) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            for g in opt.param_groups:
                g["lr"] = lr * max(scale, 0.02)
            if pos + batch * world > len(order):
                order, pos = torch.randperm(rows.shape[0], generator=gen), 0
            x = rows[order[pos + rank * batch:pos + (rank + 1) * batch]]
            pos += batch * world
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with torch.no_grad():
                    th, tl = _hidden_and_logits(teacher, x, hidden_weight > 0)
                sh, sl = _hidden_and_logits(student, x, hidden_weight > 0)
            T = temperature
            loss = F.kl_div(F.log_softmax(sl.float() / T, -1), F.log_softmax(tl.float() / T, -1),
                            log_target=True, reduction="batchmean") * T * T / x.shape[1]
            if hidden_weight > 0:
                loss = loss + hidden_weight * (1 - F.cosine_similarity(sh.float(), th.float(), dim=-1).mean())
            if label_weight > 0:
                loss = loss + label_weight * F.cross_entropy(sl[:, :-1].float().reshape(-1, sl.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _average_gradients(params, world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                for p, z in zeros.items():
                    p.masked_fill_(z, 0)
            step += 1
            tokens += x.numel() * world
            loss_v = loss.item()
            if evaluate is not None and step % eval_every == 0:
                point(step)
        train_seconds = time.perf_counter() - t0 - eval_time
        if evaluate is not None and (not curve or curve[-1]["step"] != step):
            point(step)
        if world > 1:
            from torchshrink.recipe.distributed import check_in_sync

            check_in_sync(student)
    finally:
        for p, r in zip(student.parameters(), was, strict=True):
            p.requires_grad_(r)
        teacher.train(t_was)
        student.train(s_was)
    return {"steps": step, "tokens": tokens, "seconds": train_seconds, "loss": loss_v,
            "autocast_bf16": autocast, "batch": batch, "lr": lr, "temperature": temperature,
            "hidden_weight": hidden_weight, "label_weight": label_weight, "kept_zeros": len(zeros), "curve": curve,
            "processes": world}


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Every process's gradients replaced by their mean over the processes (one flat all-reduce)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        p.grad = g


class _FakeQuant(nn.Module):
    """Parametrization: the weight on its grid in the forward, the identity in the backward (straight-through);
    scales from the current weight each call (round-to-nearest, exactly what ``quantize_lm(method="rtn")``
    then stores)."""

    def __init__(self, grid: Any) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from torchshrink.llm.wquant import rtn

        with torch.no_grad():
            q = rtn(w.detach(), self.grid).dequantized().to(w.dtype)
        return w + (q - w).detach()


def qat_lm(student: nn.Module, teacher: nn.Module, rows: torch.Tensor, grid: Any, **distill: Any) -> dict[str, Any]:
    """Quantization-aware distillation of a causal LM's decoder Linears onto ``grid`` (weight-only,
    straight-through fake quantization, logit KL from ``teacher``), then the trained weights are quantized
    round-to-nearest on the same grid and packed (:class:`~torchshrink.llm.modules.PackedLinear`): what was
    trained is what is stored. ``distill`` goes to :func:`distill_lm` (``seconds`` / ``steps`` budget, ...)."""
    from torch.nn.utils import parametrize

    from torchshrink.llm.models import decoder_layers
    from torchshrink.llm.sequential import quantize_lm

    if grid.clip:
        raise ConfigError("qat_lm trains against round-to-nearest without the clipping search; give a grid with clip=False")
    from torchshrink.core.errors import UnsupportedLayerError

    try:
        _, layers = decoder_layers(student)
    except UnsupportedLayerError:
        layers = []
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("the student has no float Linear in its decoder layers to train (already quantized?)")
    for m in linears:
        parametrize.register_parametrization(m, "weight", _FakeQuant(grid.for_width(m.in_features)))
    try:
        report = distill_lm(student, teacher, rows, **distill)
    finally:
        for m in linears:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    quantize_lm(student, grid, method="rtn", pack=True)
    return report
