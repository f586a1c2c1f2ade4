"""Activation quantization for INT8 dynamic Linear layers on oneDNN's integer GEMM.

Our C kernel (``_qact.c``: per-row or per-tensor asymmetric uint8 codes in one sweep, and the
per-row epilogue) is compiled on first use into the torchshrink cache and called through ctypes.
Without a C compiler (or with ``TORCHSHRINK_QUANT_BACKEND=torch``) the same arithmetic runs as torch
ops: identical codes, several passes slower.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch
from torch.profiler import record_function

from torchshrink.core.cbuild import build_shared

log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("_qact.c")
_LIB: ctypes.CDLL | None = None
_TRIED = False
SERIAL_BELOW = 1 << 21


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (torch fallback)."""
    global _LIB, _TRIED
    if _TRIED or os.environ.get("TORCHSHRINK_QUANT_BACKEND") == "torch":
        return _LIB
    _TRIED = True
    # finite-math lets gcc turn the clamps into vector min/max (inputs with NaN/inf give undefined codes)
    path = build_shared(_SRC, "quant-kernels", ["-fopenmp", "-ffinite-math-only"], what="activation quantization kernel")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("loading the activation quantization kernel failed (%s); using torch ops", e)
        return None
    vp, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ts_quant_rows_u8.argtypes = [vp, i64, i64, vp, vp, vp, c_int, c_int]
    lib.ts_quant_tensor_u8.argtypes = [vp, i64, vp, vp, vp, c_int, c_int]
    lib.ts_rows_epilogue.argtypes = [vp, i64, i64, vp, vp, vp, vp, c_int, c_int]
    lib.ts_add_layernorm.argtypes = [vp, vp, i64, i64, vp, vp, vp, vp, vp, vp, ctypes.c_float, vp, c_int]
    lib.ts_rows_epilogue_codes.argtypes = [vp, i64, i64, vp, vp, vp, vp, c_int, vp, vp, vp, c_int, c_int]
    for f in (lib.ts_quant_rows_u8, lib.ts_quant_tensor_u8, lib.ts_rows_epilogue, lib.ts_add_layernorm,
              lib.ts_rows_epilogue_codes):
        f.restype = None
    _LIB = lib
    return _LIB


def _grid(mn: torch.Tensor, mx: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    mn, mx = mn.clamp_max(0.0), mx.clamp_min(0.0)
    s = (mx - mn) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-mn / s).clamp_(0, qmax)
    return s, z


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return (torch.round(x * (1.0 / s)) + z).clamp_(0, qmax).to(torch.uint8)


def quant_rows(x: torch.Tensor, qmax: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 contiguous -> (codes uint8 [M, K] in [0, qmax], scale float32 [M], zero point int32 [M])."""
    rows, cols = x.shape
    lib = library()
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


def quant_tensor(x: torch.Tensor, qmax: int = 255) -> tuple[torch.Tensor, float, int]:
    """x float32 contiguous -> (codes uint8 in [0, qmax], scale, zero point) on one grid for the whole tensor."""
    lib = library()
    if lib is None:
        mn, mx = torch.aminmax(x)
        s, z = _grid(mn, mx, qmax)
        return _codes(x, s, z, qmax), float(s), int(z)
    q = torch.empty(x.shape, dtype=torch.uint8)
    s = torch.empty(1, dtype=torch.float32)
    z = torch.empty(1, dtype=torch.int32)
    # below ~2M values one thread is about as fast as two and skips the region's three synchronisations,
    # each of which costs a scheduler slice on a loaded machine (measured: 25% of MiniLM's time there)
    n_threads = torch.get_num_threads() if x.numel() >= SERIAL_BELOW else 1
    with record_function("torchshrink::quant_tensor"):
        lib.ts_quant_tensor_u8(x.data_ptr(), x.numel(), q.data_ptr(), s.data_ptr(), z.data_ptr(), qmax, n_threads)
    return q, float(s), int(z)


def rows_epilogue(acc: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, colsum: torch.Tensor,
                  bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """In place on acc [M, N] float32: acc = scale[i] * (acc - zp[i] * colsum[j]) + bias[j], then the
    exact (erf) GELU if ``gelu`` (C: rational erf, max error 4.2e-7)."""
    lib = library()
    if lib is None:
        acc.sub_(zp.float()[:, None] * colsum[None, :]).mul_(scale[:, None])
        if bias is not None:
            acc.add_(bias)
        return torch.nn.functional.gelu(acc) if gelu else acc
    rows, cols = acc.shape
    bias = bias if bias is not None else torch.zeros(cols)
    with record_function("torchshrink::rows_epilogue"):
        lib.ts_rows_epilogue(acc.data_ptr(), rows, cols, scale.data_ptr(), zp.data_ptr(), colsum.data_ptr(),
                             bias.data_ptr(), int(gelu), torch.get_num_threads())
    return acc


def rows_epilogue_codes(acc: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, colsum: torch.Tensor,
                        bias: torch.Tensor | None, gelu: bool, qmax: int
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`rows_epilogue` in place on acc, plus ``quant_rows(result, qmax)`` computed in the same sweep."""
    lib = library()
    if lib is None:
        y = rows_epilogue(acc, scale, zp, colsum, bias, gelu)
        return y, quant_rows(y.contiguous(), qmax)
    rows, cols = acc.shape
    bias = bias if bias is not None else torch.zeros(cols)
    q = torch.empty(rows, cols, dtype=torch.uint8)
    s = torch.empty(rows, dtype=torch.float32)
    z = torch.empty(rows, dtype=torch.int32)
    with record_function("torchshrink::rows_epilogue_codes"):
        lib.ts_rows_epilogue_codes(acc.data_ptr(), rows, cols, scale.data_ptr(), zp.data_ptr(), colsum.data_ptr(),
                                   bias.data_ptr(), int(gelu), q.data_ptr(), s.data_ptr(), z.data_ptr(), qmax,
                                   torch.get_num_threads())
    return acc, (q, s, z)


def add_layernorm(acc: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  lin_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(v + residual) over the last dim of acc [M, N] float32, written into acc, where
    v = acc (+ lin_bias) or, with ``grid = (scale [M], zero point [M], colsum [N])``, the per-row
    epilogue ``scale[i] * (acc - zp[i] * colsum[j]) + lin_bias[j]``. One sweep per row in C."""
    weight, bias = weight.detach().float().contiguous(), bias.detach().float().contiguous()  # 1-D, cheap
    lib = library()
    rows, cols = acc.shape
    if lib is None:
        v = rows_epilogue(acc, *grid, lin_bias) if grid is not None else (acc + lin_bias if lin_bias is not None else acc)
        return torch.nn.functional.layer_norm(v + residual, (cols,), weight, bias, eps)
    res = residual.float().contiguous()
    if grid is not None:
        s, z, colsum = grid
        lb = lin_bias if lin_bias is not None else torch.zeros(cols)
        ptrs = (s.data_ptr(), z.data_ptr(), colsum.data_ptr(), lb.data_ptr())
    else:
        ptrs = (None, None, None, lin_bias.data_ptr() if lin_bias is not None else None)
    with record_function("torchshrink::add_layernorm"):
        lib.ts_add_layernorm(acc.data_ptr(), res.data_ptr(), rows, cols, *ptrs, weight.data_ptr(), bias.data_ptr(),
                             eps, acc.data_ptr(), torch.get_num_threads())
    return acc
