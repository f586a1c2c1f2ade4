"""Sparse execution: a CSR Linear, used per layer only where it measured faster than dense here.

:class:`SparseLinear` keeps its weight as a CSR matrix (int32 indices) and multiplies with our C
kernel (``backend="c"``: the op ``torchshrink::csr_linear``, see kernels.py) or torch's CSR ops (``backend="torch"``: ``torch.mv`` for
one row, ``torch.mm`` for a batch). Its state dict holds the dense ``weight`` like ``nn.Linear``
does, so the saved file uses the exporter's bitmask format (packed mask + nonzero values), reloads
bit for bit, and loads into a plain Linear too. :func:`use_sparse_kernels` times each candidate
layer dense vs CSR, interleaved, on this machine and swaps only the ones that are faster.
Also registers an optional ``csr`` tensor storage format (not picked automatically).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.report import current
from torchshrink.core.select import is_plain
from torchshrink.core.surgery import set_module
from torchshrink.export.formats import Encoded, Format, register_format
from torchshrink.export.modules import register_module
from torchshrink.prune.kernels import available, csr_linear

log = logging.getLogger(__name__)


def to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense 2-D weight -> (row pointers, column indices, values) with int32 indices (measured faster
    than int64 here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = weight.detach().to_sparse_csr()
    return csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values().clone()


@register_module
class SparseLinear(nn.Module):
    """``nn.Linear`` whose weight is stored and multiplied as CSR (inference only). The CSR parts are
    plain buffers (``crow``, ``col``, ``values``: deep copies, ``.to()`` and tracing treat them like any
    tensor); the product is the op ``torch.ops.torchshrink.csr_linear`` (``backend="c"``) or torch's
    CSR product (``"torch"``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight: torch.Tensor | None = None, backend: str = "c", kernel_threads: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.kernel_threads = kernel_threads  # our kernel's threads; 0 = torch.get_num_threads()
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # the state dict holds the dense weight instead (see _save_to_state_dict): not persistent
        if weight is None:  # an empty CSR of the declared shape (nothing dense allocated; meta-device safe)
            self._set_parts(torch.zeros(out_features + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                            torch.zeros(0))
        else:
            self._set_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new

    def _set_parts(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> None:
        self.register_buffer("crow", crow, persistent=False)
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("values", values, persistent=False)

    def _set_weight(self, weight: torch.Tensor) -> None:
        self._set_parts(*to_csr(weight.float() if not weight.dtype.is_floating_point else weight))

    def csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.out_features, self.in_features),
                                       check_invariants=False)

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def dense_weight(self) -> torch.Tensor:
        if self.values.is_meta:
            return torch.empty(self.out_features, self.in_features, device="meta")
        with torch.inference_mode(self.values.is_inference()):  # built under inference_mode: densify there
            w = self.csr().to_dense()
        return w.clone() if w.is_inference() else w

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def logical_params(self) -> int:
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    def logical_nonzero(self) -> int:
        return self.nnz + (int(torch.count_nonzero(self.bias)) if self.bias is not None else 0)

    def macs(self, args: tuple, output: Any) -> int:
        return self.nnz * (args[0].numel() // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.values.dtype)
        bias = self.bias.detach() if self.bias is not None else None
        if self.backend == "c" and flat.dtype == torch.float32 and not flat.requires_grad:
            y = csr_linear(self.crow, self.col, self.values, bias, flat, self.kernel_threads)
            return y.reshape(*x.shape[:-1], self.out_features)
        w = self.csr()
        y = torch.mv(w, flat[0]).unsqueeze(0) if flat.shape[0] == 1 else torch.mm(w, flat.t()).t()
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: {tuple(w.shape)} vs "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self._set_weight(w)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        density = self.nnz / max(self.in_features * self.out_features, 1)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"


def dense_twin(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` with every :class:`SparseLinear` back as a plain ``nn.Linear`` holding the same
    (zero-filled) weights -- the same stored weights and outputs -- or None when it has none."""
    import copy

    names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    if not names:
        return None
    twin = copy.deepcopy(model)
    for name in names:
        sp = twin.get_submodule(name)
        lin = nn.Linear(sp.in_features, sp.out_features, bias=sp.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(sp.dense_weight())
            if sp.bias is not None:
                lin.bias.copy_(sp.bias)
        set_module(twin, name, lin.eval())
    return twin


def _sparsity(w: torch.Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(w)) / max(w.numel(), 1)


def time_dense_vs_sparse(linear: nn.Linear, sparse: SparseLinear, batch: int, threads: int | None = None,
                         runs: int = 30) -> tuple[float, float]:
    from torchshrink.measure.latency import time_interleaved

    x = torch.randn(batch, linear.in_features, generator=torch.Generator().manual_seed(0))
    t = time_interleaved({"dense": lambda: F.linear(x, linear.weight, linear.bias), "sparse": lambda: sparse(x)},
                         n_threads=threads, warmup=5, runs=runs)
    return t["dense"].p50_ms, t["sparse"].p50_ms


def _fastest_backend(linear: nn.Linear, batch: int, threads: int | None, runs: int) -> tuple[SparseLinear, float, float]:
    """The fastest of our C kernel (all threads, or one: an OpenMP region can cost more than a small
    product) and torch's CSR ops for this layer, with (dense_ms, sparse_ms)."""
    best: tuple[SparseLinear, float, float] | None = None
    options = [("c", 0), ("c", 1), ("torch", 0)] if available() else [("torch", 0)]
    for backend, kthreads in options:
        cand = SparseLinear.from_linear(linear)
        cand.backend, cand.kernel_threads = backend, kthreads
        dense_ms, sparse_ms = time_dense_vs_sparse(linear, cand, batch, threads, runs)
        if best is None or dense_ms / sparse_ms > best[1] / best[2]:
            best = (cand, dense_ms, sparse_ms)
    assert best is not None
    return best


def use_sparse_kernels(model: nn.Module, *, batch: int = 1, threads: int | None = None, min_speedup: float = 1.1,
                       min_sparsity: float = 0.5, min_numel: int = 1 << 16, runs: int = 30) -> dict[str, dict]:
    """Swap each plain ``nn.Linear`` with at least ``min_sparsity`` zeros and ``min_numel`` weights for a
    :class:`SparseLinear` where CSR timed at least ``min_speedup`` x faster (medians, interleaved) at
    ``batch`` rows. Smaller or denser layers are never timed (CSR cannot pay there). Returns, and stores
    in ``ts.report(model)[-1].notes['sparse_kernels']``, a record per candidate layer."""
    report: dict[str, dict] = {}
    for name, m in list(model.named_modules()):
        if not is_plain(m, nn.Linear) or m.weight.numel() < min_numel:
            continue
        sp = _sparsity(m.weight.detach())
        if sp < min_sparsity:
            continue
        cand, dense_ms, sparse_ms = _fastest_backend(m, batch, threads, runs)
        used = dense_ms / sparse_ms >= min_speedup
        report[name] = {"sparsity": round(sp, 4), "batch": batch, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                        "speedup": dense_ms / sparse_ms, "backend": cand.backend,
                        "kernel_threads": cand.kernel_threads, "used": used}
        if used:
            set_module(model, name, cand)
        log.info("%s: sparsity %.3f, dense %.3f ms, CSR %.3f ms -> %s", name, sp, dense_ms, sparse_ms,
                 "CSR" if used else "dense")
    current(model).notes["sparse_kernels"] = report
    return report


# --------------------------------------------------------------------------- optional CSR storage


def _csr_encode(t: torch.Tensor) -> Encoded:
    m = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
    rows, cols = m.shape
    nz = m != 0
    col_idx = nz.nonzero()[:, 1]
    idx_dtype = torch.int16 if cols <= np.iinfo(np.int16).max else torch.int32
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = nz.sum(1).cumsum(0)
    return {"crow": crow.to(torch.int32), "col": col_idx.to(idx_dtype), "values": m[nz].contiguous()}


def _csr_decode(parts: Encoded, meta: dict[str, Any]) -> torch.Tensor:
    shape = meta["shape"]
    rows = shape[0] if len(shape) >= 2 else 1
    cols = int(np.prod(shape)) // max(rows, 1) if shape else 1
    crow = parts["crow"].to(torch.int64)
    nnz = parts["values"].numel()
    col = parts["col"].to(torch.int64)
    if crow.dim() != 1 or crow.numel() != rows + 1 or col.numel() != nnz or int(crow[0]) != 0 or int(crow[-1]) != nnz \
            or bool((crow[1:] < crow[:-1]).any()) or (nnz and (int(col.min()) < 0 or int(col.max()) >= cols)):
        raise ValueError("CSR row pointers, column indices and values do not describe the declared shape")
    row_idx = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    out = torch.zeros(rows, cols, dtype=parts["values"].dtype)
    out[row_idx, col] = parts["values"]
    return out.reshape(shape)


register_format(Format("csr", _csr_encode, _csr_decode, auto=False))
