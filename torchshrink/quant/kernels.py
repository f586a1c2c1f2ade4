"""Activation quantization for INT8 dynamic Linear layers on oneDNN's integer GEMM.

Our C kernels (``_qact.c``: per-row or per-tensor asymmetric uint8 codes in one sweep, and the per-row
epilogue, loaded by :mod:`torchshrink.core.native`) are the torch ops ``torch.ops.torchshrink.quant_rows``,
``quant_tensor``, ``rows_epilogue_``, ``rows_epilogue_codes_`` and ``add_layernorm_`` (a trailing ``_``:
the op writes into its first argument). Without the native library (or with ``TORCHSHRINK_KERNELS=torch``)
each op runs the same arithmetic as torch ops: identical codes, several passes slower.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from torchshrink.core import native

SERIAL_BELOW = 1 << 21


def available() -> bool:
    """True when the C kernels run here (else the torch fallbacks)."""
    return native.library() is not None


def _grid(mn: torch.Tensor, mx: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    mn, mx = mn.clamp_max(0.0), mx.clamp_min(0.0)
    s = (mx - mn) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-mn / s).clamp_(0, qmax)
    return s, z


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return (torch.round(x * (1.0 / s)) + z).clamp_(0, qmax).to(torch.uint8)


def _fake_rows(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(x.shape[0]),
            x.new_empty(x.shape[0], dtype=torch.int32))


@native.kernel_op("quant_rows", fake=_fake_rows)
def quant_rows(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 contiguous -> (codes uint8 [M, K] in [0, qmax], scale float32 [M], zero point int32 [M])."""
    rows, cols = x.shape
    lib = native.library()
    if lib is None:
        mn, mx = torch.aminmax(x, dim=1, keepdim=True)
        s, z = _grid(mn, mx, qmax)
        return _codes(x, s, z, qmax), s.reshape(rows), z.reshape(rows).to(torch.int32)
    q = torch.empty(rows, cols, dtype=torch.uint8)
    s = torch.empty(rows, dtype=torch.float32)
    z = torch.empty(rows, dtype=torch.int32)
    with record_function("torchshrink::quant_rows"):
        lib.ts_quant_rows_u8(x.data_ptr(), rows, cols, q.data_ptr(), s.data_ptr(), z.data_ptr(), qmax, torch.get_num_threads())
    return q, s, z


def _fake_tensor(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(()), x.new_empty((), dtype=torch.int32)


@native.kernel_op("quant_tensor", fake=_fake_tensor)
def quant_tensor(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 contiguous -> (codes uint8 in [0, qmax], scale float32 [], zero point int32 []) on one
    grid for the whole tensor."""
    lib = native.library()
    if lib is None:
        mn, mx = torch.aminmax(x)
        s, z = _grid(mn, mx, qmax)
        return _codes(x, s, z, qmax), s.reshape(()), z.reshape(()).to(torch.int32)
    q = torch.empty(x.shape, dtype=torch.uint8)
    s = torch.empty((), dtype=torch.float32)
    z = torch.empty((), dtype=torch.int32)
    # below ~2M values one thread is about as fast as two and skips the region's three synchronisations,
    # each of which costs a scheduler slice on a loaded machine (measured: 25% of MiniLM's time there)
    n_threads = torch.get_num_threads() if x.numel() >= SERIAL_BELOW else 1
    with record_function("torchshrink::quant_tensor"):
        lib.ts_quant_tensor_u8(x.data_ptr(), x.numel(), q.data_ptr(), s.data_ptr(), z.data_ptr(), qmax, n_threads)
    return q, s, z


def _fake_none(*args: object) -> None:
    return None


@native.kernel_op("rows_epilogue_", fake=_fake_none, mutates_args=("acc",))
def _rows_epilogue(acc: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, colsum: torch.Tensor,
                   bias: torch.Tensor | None, gelu: bool) -> None:
    lib = native.library()
    if lib is None:
        acc.sub_(zp.float()[:, None] * colsum[None, :]).mul_(scale[:, None])
        if bias is not None:
            acc.add_(bias)
        if gelu:
            acc.copy_(F.gelu(acc))
        return
    rows, cols = acc.shape
    bias = bias if bias is not None else torch.zeros(cols)
    with record_function("torchshrink::rows_epilogue"):
        lib.ts_rows_epilogue(acc.data_ptr(), rows, cols, scale.data_ptr(), zp.data_ptr(), colsum.data_ptr(),
                             bias.data_ptr(), int(gelu), torch.get_num_threads())


def rows_epilogue(acc: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, colsum: torch.Tensor,
                  bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """In place on acc [M, N] float32: acc = scale[i] * (acc - zp[i] * colsum[j]) + bias[j], then the
    exact (erf) GELU if ``gelu`` (C: rational erf, max error 4.2e-7). Returns acc."""
    _rows_epilogue(acc, scale, zp, colsum, bias, gelu)
    return acc


def _fake_epi_codes(acc: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, colsum: torch.Tensor,
                    bias: torch.Tensor | None, gelu: bool, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fake_rows(acc, qmax)


@native.kernel_op("rows_epilogue_codes_", fake=_fake_epi_codes, mutates_args=("acc",))
def _rows_epilogue_codes(acc: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, colsum: torch.Tensor,
                         bias: torch.Tensor | None, gelu: bool, qmax: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lib = native.library()
    if lib is None:
        _rows_epilogue(acc, scale, zp, colsum, bias, gelu)
        return quant_rows(acc.contiguous(), qmax)
    rows, cols = acc.shape
    bias = bias if bias is not None else torch.zeros(cols)
    q = torch.empty(rows, cols, dtype=torch.uint8)
    s = torch.empty(rows, dtype=torch.float32)
    z = torch.empty(rows, dtype=torch.int32)
    with record_function("torchshrink::rows_epilogue_codes"):
        lib.ts_rows_epilogue_codes(acc.data_ptr(), rows, cols, scale.data_ptr(), zp.data_ptr(), colsum.data_ptr(),
                                   bias.data_ptr(), int(gelu), q.data_ptr(), s.data_ptr(), z.data_ptr(), qmax,
                                   torch.get_num_threads())
    return q, s, z


def rows_epilogue_codes(acc: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, colsum: torch.Tensor,
                        bias: torch.Tensor | None, gelu: bool, qmax: int
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`rows_epilogue` in place on acc, plus ``quant_rows(result, qmax)`` computed in the same sweep."""
    codes = _rows_epilogue_codes(acc, scale, zp, colsum, bias, gelu, qmax)
    return acc, codes


@native.kernel_op("add_layernorm_", fake=_fake_none, mutates_args=("acc",))
def _add_layernorm(acc: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   scale: torch.Tensor | None, zp: torch.Tensor | None, colsum: torch.Tensor | None,
                   lin_bias: torch.Tensor | None) -> None:
    lib = native.library()
    rows, cols = acc.shape
    if lib is None:
        if scale is not None and zp is not None and colsum is not None:
            _rows_epilogue(acc, scale, zp, colsum, lin_bias, False)
        elif lin_bias is not None:
            acc.add_(lin_bias)
        acc.copy_(F.layer_norm(acc + residual, (cols,), weight, bias, eps))
        return
    if scale is not None and zp is not None and colsum is not None:
        lb = lin_bias if lin_bias is not None else torch.zeros(cols)
        ptrs = (scale.data_ptr(), zp.data_ptr(), colsum.data_ptr(), lb.data_ptr())
    else:
        ptrs = (None, None, None, lin_bias.data_ptr() if lin_bias is not None else None)
    with record_function("torchshrink::add_layernorm"):
        lib.ts_add_layernorm(acc.data_ptr(), residual.data_ptr(), rows, cols, *ptrs, weight.data_ptr(),
                             bias.data_ptr(), eps, acc.data_ptr(), torch.get_num_threads())


def add_layernorm(acc: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  lin_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(v + residual) over the last dim of acc [M, N] float32, written into acc, where
    v = acc (+ lin_bias) or, with ``grid = (scale [M], zero point [M], colsum [N])``, the per-row
    epilogue ``scale[i] * (acc - zp[i] * colsum[j]) + lin_bias[j]``. One sweep per row in C."""
    weight, bias = weight.detach().float().contiguous(), bias.detach().float().contiguous()  # 1-D, cheap
    s, z, colsum = grid if grid is not None else (None, None, None)
    _add_layernorm(acc, residual.float().contiguous(), weight, bias, float(eps), s, z, colsum, lin_bias)
    return acc


# --------------------------------------------------------------------------- code hand-over between layers


# per-token codes a producer layer wrote in its epilogue for the next layer:
# .last = (output tensor, its version, qmax, (codes, row scales, row zero points))
_HANDOFF = threading.local()


def take_codes(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The codes a producer layer wrote for exactly this tensor (same object, same code range, and --
    where autograd tracks versions -- not modified in place since), once; None otherwise (the caller
    quantizes x itself). Inference tensors carry no version: ``link_codes`` checks under inference
    mode that the model's output is bit-identical with the hand-over, so an in-place change between
    producer and consumer unlinks the pair there."""
    last = getattr(_HANDOFF, "last", None)
    if last is None or last[0] is not x or last[2] != qmax or (last[1] is not None and last[1] != x._version):
        return None
    _HANDOFF.last = None
    return last[3]


def park_codes(y: torch.Tensor, qmax: int, codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Hand ``codes`` (of ``y``, on a [0, qmax] grid) to the next layer that reads exactly ``y`` (not while
    tracing: a traced graph recomputes them, and a fake tensor must not outlive its trace)."""
    if not native.eager((y,)):
        return
    _HANDOFF.last = (y, None if y.is_inference() else y._version, qmax, codes)
