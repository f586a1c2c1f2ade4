"""Unstructured and N:M sparsity for language models, layer by layer on calibration text:

- ``magnitude``: drop the smallest |w| of each output row.
- ``wanda`` (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models"):
  score ``|w_ij| * ||x_j||`` (the input feature's norm over calibration tokens), compared within each
  output row; no weight update.
- ``sparsegpt`` (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot"): columns are processed in blocks; the mask of a block is chosen by ``w^2 / [H^-1]_jj^2``
  and each pruned weight's error is spread over the not-yet-processed columns through the inverse
  Hessian, as GPTQ does for rounding.

``nm=(n, m)`` keeps ``n`` of every ``m`` consecutive input weights (2:4 is ``(2, 4)``)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import ConfigError

SPARSE_METHODS = ("magnitude", "wanda", "sparsegpt")


def _check(sparsity: float, nm: tuple[int, int] | None) -> None:
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ConfigError(f"nm={nm}: keep n of every m with 0 < n < m (2:4 is (2, 4))")
    elif not 0.0 < sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity} must be in (0, 1)")


def _mask_from_scores(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """True where a weight is REMOVED: the lowest scores per row, or per group of m along the row."""
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ConfigError(f"an {n}:{m} pattern needs widths divisible by {m}; a layer has {cols} inputs")
        g = score.reshape(rows, cols // m, m)
        drop = torch.zeros_like(g, dtype=torch.bool)
        drop.scatter_(-1, torch.topk(g, m - n, dim=-1, largest=False).indices, True)
        return drop.reshape(rows, cols)
    k = int(cols * sparsity)
    drop = torch.zeros_like(score, dtype=torch.bool)
    if k:
        drop.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return drop


def magnitude(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    return w.masked_fill(_mask_from_scores(w.abs().float(), sparsity, nm), 0)


def wanda(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """``hessian`` = E[x x^T] of the inputs; its diagonal gives ||x_j||^2 (up to the token count)."""
    score = w.abs().float() * torch.diag(hessian).clamp_min(0).sqrt()[None, :]
    return w.masked_fill(_mask_from_scores(score, sparsity, nm), 0)


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, *,
              damp: float = 0.01, block: int = 128) -> torch.Tensor:
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    if nm is not None and cols % nm[1]:
        raise ConfigError(f"an {nm[0]}:{nm[1]} pattern needs widths divisible by {nm[1]}; a layer has {cols} inputs")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if nm is not None:
        block = nm[1] * max(1, block // nm[1])
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        drop = (_mask_from_scores(W1.pow(2) / d[None, :].pow(2), sparsity, None) if nm is None
                else torch.zeros_like(W1, dtype=torch.bool))
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]].pow(2) / d[i:i + nm[1]][None, :].pow(2)
                drop[:, i:i + nm[1]] = _mask_from_scores(tmp, 0.0, nm)
            w1 = W1[:, i]
            q = w1.masked_fill(drop[:, i], 0)
            err = (w1 - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)


def sparsify_lm(model: nn.Module, *, method: str = "sparsegpt", sparsity: float = 0.5,
                nm: tuple[int, int] | None = None, samples: torch.Tensor | None = None,
                damp: float = 0.01) -> dict[str, Any]:
    """Prune every Linear of every decoder layer in place, layer by layer (each layer sees the already
    pruned previous layers' outputs, as in SparseGPT). Returns per-layer sparsity and seconds."""
    from torchshrink.llm.sequential import hessians, layer_steps

    if method not in SPARSE_METHODS:
        raise ConfigError(f"method={method!r}; allowed: {', '.join(SPARSE_METHODS)}")
    _check(sparsity, nm)
    steps = layer_steps(model, samples, method, data_aware=method != "magnitude")
    report: dict[str, Any] = {"method": method, "sparsity": sparsity, "nm": nm, "layers": {}, "seconds": 0.0}
    for step in steps:
        t0 = time.perf_counter()
        hess = hessians(step.layer, step.linears, step.inputs, step.kwargs) if method != "magnitude" else {}
        for n, m in step.linears.items():
            w = m.weight.detach()
            new = (magnitude(w, sparsity, nm) if method == "magnitude" else
                   wanda(w, hess[n], sparsity, nm) if method == "wanda" else
                   sparsegpt(w, hess[n], sparsity, nm, damp=damp))
            with torch.no_grad():
                m.weight.copy_(new)
            report["layers"][f"{step.name}.{n}"] = float((new == 0).float().mean())
        report["seconds"] += time.perf_counter() - t0
    return report
