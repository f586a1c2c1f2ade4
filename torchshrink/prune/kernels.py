"""Our CSR x dense kernel (``_spmm.c``, loaded by :mod:`torchshrink.core.native`) as the torch op
``torch.ops.torchshrink.csr_linear``; without the native library the op runs torch's CSR product."""

from __future__ import annotations

import torch

from torchshrink.core import native


def available() -> bool:
    """True when the C kernel runs here (else the op computes with torch's CSR ops)."""
    return native.library() is not None


def _fake(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
          x: torch.Tensor, threads: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], crow.shape[0] - 1)


@native.kernel_op("csr_linear", fake=_fake)
def csr_linear(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
               x: torch.Tensor, threads: int) -> torch.Tensor:
    """x [B, in] float32 -> [B, out] = x @ W.T + bias for W in CSR (int32 indices), on ``threads`` threads
    (0: torch's thread count)."""
    lib = native.library()
    rows, batch = crow.numel() - 1, x.shape[0]
    if lib is None:
        w = torch.sparse_csr_tensor(crow, col, values, (rows, x.shape[1]), check_invariants=False)
        y = torch.mm(w, x.t()).t()
        return y + bias if bias is not None else y
    xt = x.t().contiguous() if batch > 1 else x.contiguous()
    y = torch.empty(rows, batch, dtype=torch.float32)
    lib.csr_spmm_f32(rows, batch, crow.data_ptr(), col.data_ptr(), values.data_ptr(), xt.data_ptr(),
                     bias.data_ptr() if bias is not None else None, y.data_ptr(), threads or torch.get_num_threads())
    return y.t().contiguous() if batch > 1 else y.reshape(1, rows)
