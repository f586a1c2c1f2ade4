"""Our CSR kernel (``_spmm.c``), compiled with the system C compiler on first use into the torchshrink
cache (``-O3 -march=native -fopenmp``) and called through ctypes; ``None`` when no compiler works,
in which case SparseLinear uses torch's CSR ops. Set ``TORCHSHRINK_SPARSE_BACKEND=torch`` to skip it."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch

from torchshrink.core.cbuild import build_shared

log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("_spmm.c")
_LIB: ctypes.CDLL | None = None
_TRIED = False


def _build() -> Path | None:
    return build_shared(_SRC, "sparse-kernels", ["-fopenmp"], what="sparse kernel")


def library() -> ctypes.CDLL | None:
    global _LIB, _TRIED
    if _TRIED or os.environ.get("TORCHSHRINK_SPARSE_BACKEND") == "torch":
        return _LIB
    _TRIED = True
    path = _build()
    if path is not None:
        try:
            lib = ctypes.CDLL(str(path))
            lib.csr_spmm_f32.restype = None
            lib.csr_spmm_f32.argtypes = [ctypes.c_int32, ctypes.c_int32] + [ctypes.c_void_p] * 6 + [ctypes.c_int32]
            _LIB = lib
        except OSError as e:
            log.warning("loading the sparse kernel failed (%s); SparseLinear uses torch CSR ops", e)
    return _LIB


def csr_linear(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
               x: torch.Tensor, threads: int = 0) -> torch.Tensor:
    """x [B, in] float32 -> [B, out] with our kernel on ``threads`` threads (0: torch's thread count);
    the caller checks ``library()`` first."""
    lib = library()
    assert lib is not None
    rows, batch = crow.numel() - 1, x.shape[0]
    xt = x.t().contiguous() if batch > 1 else x.contiguous()
    y = torch.empty(rows, batch, dtype=torch.float32)
    lib.csr_spmm_f32(rows, batch, crow.data_ptr(), col.data_ptr(), values.data_ptr(), xt.data_ptr(),
                     bias.data_ptr() if bias is not None else None, y.data_ptr(), threads or torch.get_num_threads())
    return y.t() if batch > 1 else y.reshape(1, rows)
