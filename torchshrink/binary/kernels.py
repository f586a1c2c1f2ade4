"""XNOR + popcount GEMM for fully binary Linear and Conv2d layers.

Two backends compute the same integers:

- ``c``: ``_xnor.c`` (our own source, loaded by :mod:`torchshrink.core.native`; AVX2 nibble-lookup
  popcount in the avx2 / avx512 builds). ``TORCHSHRINK_KERNELS=torch`` turns it off.
- ``numpy``: ``np.packbits`` + ``np.bitwise_count`` on uint64 words, chunked. Always available;
  used when the native library is not (no compiler, or turned off).

Each primitive is a torch op (``torch.ops.torchshrink.pack_signs``, ``xnor_gemm``, ``binary_linear``)
with a fake implementation, so a packed binary model traces with torch.export / torch.compile.
For a fully binary Linear the C backend runs the whole layer in one call (:func:`binary_linear_fused`:
sign + pack of the input, GEMM, float epilogue), so a batch-1 call costs one crossing instead of a dozen
torch ops (in a network those ops, like the weights, come back from DRAM on every call: they were most
of the old batch-1 time).

``benchmarks/binary.py`` times both against fp32 torch; the C backend is the default because it
measured faster (see benchmarks/results/binary.md).

A packed operand is a ``[rows, words]`` int64 tensor (uint64 bit patterns): bit ``j`` of word ``w``
is column ``64 w + j``, 1 for +1 (value >= 0). Padding bits are 0 in both operands, so
``dot = k - 2 * popcount(a ^ b)`` over the ``k`` real columns is exact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from torchshrink.core import native
from torchshrink.core.errors import ConfigError

BACKENDS = ("auto", "c", "numpy")


def words_for(k: int) -> int:
    return (k + 63) // 64


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"binary kernel backend={backend!r}; allowed: {', '.join(BACKENDS)}")


def resolve_backend(backend: str = "auto") -> str:
    """The backend that will run: ``c`` when asked for (or auto) and the native library loads, else ``numpy``."""
    check_backend_name(backend)
    if backend == "numpy":
        return "numpy"
    if native.library() is None:
        if backend == "c":
            raise ConfigError("the C XNOR kernel is not available here (no working C compiler, or "
                              "TORCHSHRINK_KERNELS=torch); use backend='numpy'")
        return "numpy"
    return "c"


def describe_backend() -> str:
    lib = native.library()
    if lib is None:
        return "numpy (np.bitwise_count)"
    return f"c ({'AVX2 popcount' if lib.ts_has_avx2() else 'scalar popcnt'}; {native.describe()})"


# --------------------------------------------------------------------------- primitives


def _fake_pack(x: torch.Tensor, backend: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], words_for(x.shape[1]), dtype=torch.int64)


@native.kernel_op("pack_signs", fake=_fake_pack)
def _pack_signs(x: torch.Tensor, backend: str) -> torch.Tensor:
    rows, k = x.shape
    words = words_for(k)
    lib = native.library() if backend == "c" else None  # "c" baked into a program run where nothing was built: numpy
    if lib is not None:
        out = torch.empty(rows, words, dtype=torch.int64)
        lib.ts_pack_signs(x.data_ptr(), rows, k, k, out.data_ptr(), words)
        return out
    bits = (x >= 0).numpy()
    if k != words * 64:
        bits = np.pad(bits, ((0, 0), (0, words * 64 - k)))
    packed = np.packbits(bits, axis=1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int64).reshape(rows, words))


def pack_signs(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``[rows, k]`` float -> ``[rows, words]`` int64 of sign bits (1 where x >= 0), padding bits 0."""
    if x.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-d tensor, got shape {tuple(x.shape)}")
    return _pack_signs(x.detach().to(torch.float32).contiguous(), resolve_backend(backend))


def _fake_gemm(a: torch.Tensor, b: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


@native.kernel_op("xnor_gemm", fake=_fake_gemm)
def _xnor_gemm(a: torch.Tensor, b: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    m, n, words = a.shape[0], b.shape[0], a.shape[1]
    lib = native.library() if backend == "c" else None
    if lib is not None:
        out = torch.empty(m, n, dtype=torch.int32)
        lib.ts_xnor_gemm(a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, words, k, 1)
        return out
    an, bn = a.numpy().view(np.uint64), b.numpy().view(np.uint64)
    out_np = np.empty((m, n), dtype=np.int32)
    chunk = max(1, (1 << 20) // max(1, n * words))  # ~8 MB of uint64 temporaries per chunk
    for s in range(0, m, chunk):
        pc = np.bitwise_count(an[s:s + chunk, None, :] ^ bn[None, :, :]).sum(-1, dtype=np.int32)
        out_np[s:s + chunk] = k - 2 * pc
    return torch.from_numpy(out_np)


def xnor_gemm(a: torch.Tensor, b: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """``[M, words]`` x ``[N, words]`` packed signs -> ``[M, N]`` int32 dot products over ``k`` columns."""
    if a.dtype != torch.int64 or b.dtype != torch.int64 or a.shape[1] != b.shape[1]:
        raise ValueError(f"xnor_gemm needs int64 [M, W] and [N, W] operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _xnor_gemm(a.contiguous(), b.contiguous(), k, resolve_backend(backend))


# --------------------------------------------------------------------------- layers


def pack_linear_weight(w_sign: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``[out, in]`` +-1 weight -> ``[out, words]`` kernel operand."""
    return pack_signs(w_sign, backend)


def binary_linear(x: torch.Tensor, w_packed: torch.Tensor, in_features: int, backend: str = "auto") -> torch.Tensor:
    """Integer ``sign(x) @ sign(W).T`` for ``x`` of shape ``[..., in]`` -> ``[..., out]`` int32."""
    lead = x.shape[:-1]
    a = pack_signs(x.reshape(-1, in_features), backend)
    return xnor_gemm(a, w_packed, in_features, backend).reshape(*lead, w_packed.shape[0])


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _fake_fused(x: torch.Tensor, tau: torch.Tensor | None, w_packed: torch.Tensor, scale: torch.Tensor | None,
                bias: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w_packed.shape[0])


@native.kernel_op("binary_linear", fake=_fake_fused)
def _binary_linear(x: torch.Tensor, tau: torch.Tensor | None, w_packed: torch.Tensor, scale: torch.Tensor | None,
                   bias: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
    lib = native.library()
    k, n = x.shape[-1], w_packed.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if lib is None:  # the same float operations in torch (exported programs run where nothing was built)
        xs = x if tau is None else x - tau
        dot = _xnor_gemm(_pack_signs(xs.reshape(-1, k), "numpy"), w_packed, k, "numpy").reshape(out.shape).float()
        dot = dot if scale is None else dot * scale
        dot = dot if beta is None else dot * beta
        return dot if bias is None else dot + bias
    rc = lib.ts_binary_linear(x.data_ptr(), _ptr(tau), x.numel() // max(k, 1), k, w_packed.data_ptr(), n,
                              w_packed.shape[1], _ptr(scale), _ptr(beta), _ptr(bias), out.data_ptr())
    if rc != 0:
        raise MemoryError("binary_linear_fused: out of memory for the packed input")
    return out


def binary_linear_fused(
    x: torch.Tensor, tau: torch.Tensor | None, w_packed: torch.Tensor, scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """A whole fully binary Linear in one C call, float32 ``[..., out]``:
    ``(sign(x - tau) . sign(W)) * scale * beta + bias``, in that order of float operations (the
    same as the torch path, so both give the same floats). The dot products are exact integers;
    ``tau``, ``scale``, ``bias`` are float32 vectors, ``beta`` float32 ``[..., 1]``, or None."""
    x = x.to(torch.float32).contiguous()
    if w_packed.shape[1] != words_for(x.shape[-1]):
        raise ValueError(f"packed weight of {w_packed.shape[1]} words does not fit {x.shape[-1]} input features")
    return _binary_linear(x, tau, w_packed, scale, bias, beta)


def pack_conv_weight(w_sign: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``[out, C, kh, kw]`` +-1 weight -> ``[out, kh*kw*Cw]`` kernel operand (pixel-major, channels packed)."""
    n, c, kh, kw = w_sign.shape
    pix = w_sign.permute(0, 2, 3, 1).reshape(n * kh * kw, c)
    return pack_signs(pix, backend).reshape(n, kh * kw * words_for(c))


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def padding_correction(
    w_sign: torch.Tensor, h: int, w: int, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """``[Ho*Wo, out]`` int32: what the padding pixels add when they are packed as +1 instead of 0.

    The kernel packs zero padding as +1 bits; subtracting this (the conv of the padding ring with
    sign(W)) gives the zero-padded result exactly.
    """
    c = w_sign.shape[1]
    ring = torch.ones(1, c, h + 2 * padding[0], w + 2 * padding[1])
    ring[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = 0
    corr = F.conv2d(ring, w_sign.float(), stride=stride, dilation=dilation)
    return corr[0].permute(1, 2, 0).reshape(-1, w_sign.shape[0]).round().to(torch.int32)


def binary_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    in_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    correction: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Integer ``conv2d(sign(x), sign(W))`` with zero padding, groups=1 -> ``[B, out, Ho, Wo]`` int32.

    im2col on packed words: each pixel's channels are packed once, then the ``kh*kw`` word groups
    of every output position are gathered (a strided view, copied) and fed to :func:`xnor_gemm`.
    ``correction`` is :func:`padding_correction` for this input size (required when padding > 0).
    """
    bsz, c, h, w = x.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    cw = words_for(c)
    nhwc = x.permute(0, 2, 3, 1)
    if ph or pw:
        nhwc = F.pad(nhwc, (0, 0, pw, pw, ph, ph), value=1.0)
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    words = pack_signs(nhwc.reshape(-1, c), backend).reshape(bsz, hp, wp, cw)
    s = words.stride()
    cols = words.as_strided(
        (bsz, ho, wo, kh, kw, cw), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3])
    ).reshape(bsz * ho * wo, kh * kw * cw)
    out = xnor_gemm(cols, w_packed, c * kh * kw, backend).reshape(bsz, ho * wo, -1)
    if ph or pw:
        if correction is None:
            raise ValueError("binary_conv2d with padding needs the padding correction for this input size")
        out = out - correction.unsqueeze(0)
    return out.reshape(bsz, ho, wo, -1).permute(0, 3, 1, 2)
