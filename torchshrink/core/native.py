"""The one loader of torchshrink's native CPU kernels, and the helper that makes each a torch op.

The C sources that ship with the package (``binary/_xnor.c``, ``prune/_spmm.c``, ``quant/_qact.c``,
``quant/_attn.c``, ``llm/_decode.c``)
are built into ONE shared library per instruction-set level -- ``avx512``, ``avx2`` and ``default``
(the compiler's baseline) -- and the level is chosen when the library is loaded, from what torch
detects on this CPU (``torch.backends.cpu.get_cpu_capability()``), never with ``-march=native``: a
cache copied to another machine loads the variant that machine can run.

* Built ahead of use: ``torchshrink kernels --build`` (``make`` runs it at install)
  builds every level; otherwise the first :func:`library` call builds the one it needs (a warning
  says so), into ``<cache>/kernels/``, atomically, once per source / flags / compiler.
* One OpenMP runtime: the parallel kernels link against the ``libgomp`` that ships inside torch, so
  they share torch's thread pool instead of loading the system's second copy beside it. Where torch
  ships none (other platforms) they build without OpenMP and run on one thread.
* One switch: ``TORCHSHRINK_KERNELS=torch`` runs every kernel's pure-torch (or numpy) fallback, which
  computes the same results; ``TORCHSHRINK_KERNEL_ISA=avx2|default`` forces a lower level. Without a
  working C compiler the fallbacks run (logged once).

:func:`kernel_op` registers a kernel as a ``torch.library`` custom op (``torch.ops.torchshrink.*``) with
a fake implementation, so torch.compile and torch.export see one opaque op with known output shapes;
plain eager calls skip the dispatcher (it costs ~5 us a call, measured) and run the same function.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from torchshrink.core.cache import cache_dir

log = logging.getLogger(__name__)
_PKG = Path(__file__).resolve().parent.parent
# source -> its own flags (xnor: no FMA contraction, so the float epilogue matches the torch path's order;
# qact: finite math lets gcc turn the clamps into vector min/max -- NaN/inf inputs give undefined codes)
SOURCES: dict[str, list[str]] = {
    "binary/_xnor.c": ["-std=c99", "-ffp-contract=off"],
    "prune/_spmm.c": [],
    "quant/_qact.c": ["-ffinite-math-only"],
    # attention: the omp simd reductions (max, sum) vectorize without -fopenmp too
    "quant/_attn.c": ["-fno-math-errno", "-fopenmp-simd"],
    # decode: reassociation lets gcc vectorize the attention dot products / sums (infinities stay: the softmax
    # starts from -inf)
    "llm/_decode.c": ["-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"],
}
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-mbmi", "-mbmi2"]
ISA_FLAGS: dict[str, list[str]] = (
    {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", *_AVX2], "avx2": _AVX2, "default": []}
    if _X86 else {"default": []}
)
LEVELS = tuple(ISA_FLAGS)  # best first
_V, _I64, _I32, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int, ctypes.c_float
# every exported C function: (restype, argtypes)
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ts_has_avx2": (_INT, []),
    "ts_pack_signs": (None, [_V, _I64, _I64, _I64, _V, _I64]),
    "ts_xnor_gemm": (None, [_V, _V, _V, _I64, _I64, _I64, _I64, _INT]),
    "ts_binary_linear": (_INT, [_V, _V, _I64, _I64, _V, _I64, _I64, _V, _V, _V, _V]),
    "csr_spmm_f32": (None, [_I32, _I32, _V, _V, _V, _V, _V, _V, _I32]),
    "ts_quant_rows_u8": (None, [_V, _I64, _I64, _V, _V, _V, _INT, _INT]),
    "ts_quant_tensor_u8": (None, [_V, _I64, _V, _V, _V, _INT, _INT]),
    "ts_rows_epilogue": (None, [_V, _I64, _I64, _V, _V, _V, _V, _INT, _INT]),
    "ts_rows_epilogue_codes": (None, [_V, _I64, _I64, _V, _V, _V, _V, _INT, _V, _V, _V, _INT, _INT]),
    "ts_add_layernorm": (None, [_V, _V, _I64, _I64, _V, _V, _V, _V, _V, _V, _F32, _V, _INT]),
    "ts_attention": (_INT, [_V, _V, _V, *[_I64] * 15, _F32, _V, _I64, _I64, _INT, _INT, _V, _INT]),
    "ts_has_bf16": (_INT, []),
    "ts_lm_isa": (_INT, []),
    "ts_lm_set_isa": (None, [_INT]),
    "ts_qgemv": (None, [_V, _V, _V, _V, _V, _V]),
    "ts_lm_scratch": (_I64, [_V]),
    "ts_lm_forward": (_INT, [_V, _V, _F32, _V, _I64, _I64, _V]),
}
_LIB: ctypes.CDLL | None = None
_STATE: dict[str, Any] = {}


def cpu_level() -> str:
    """The best kernel level this CPU runs, as torch detects it (``avx512`` / ``avx2`` / ``default``)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    level = "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "default"
    return level if level in ISA_FLAGS else "default"


def chosen_level() -> str:
    """:func:`cpu_level`, or the lower level ``TORCHSHRINK_KERNEL_ISA`` asks for (never a higher one)."""
    best, asked = cpu_level(), os.environ.get("TORCHSHRINK_KERNEL_ISA", "").strip().lower()
    if not asked:
        return best
    if asked not in ISA_FLAGS:
        raise ValueError(f"TORCHSHRINK_KERNEL_ISA={asked!r}; allowed: {', '.join(ISA_FLAGS)}")
    return asked if LEVELS.index(asked) >= LEVELS.index(best) else best


def torch_openmp() -> Path | None:
    """The OpenMP runtime torch itself loaded (the kernels link this one), or None."""
    root = Path(torch.__file__).resolve().parent
    for folder in (root / "lib", root.parent / "torch.libs"):
        hits = sorted(folder.glob("libgomp*.so*")) if folder.is_dir() else []
        if hits:
            return hits[0]
    return None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


def _key(level: str, cc: str, omp: Path | None) -> str:
    h = hashlib.sha256()
    for rel, flags in SOURCES.items():
        h.update(rel.encode() + (_PKG / rel).read_bytes() + " ".join(flags).encode())
    h.update(f"{level} {' '.join(ISA_FLAGS[level])} {cc} {omp} {sys.platform}".encode())
    return h.hexdigest()[:16]


def library_path(level: str) -> Path | None:
    """Where the library for ``level`` lives in the cache (built or not); None without a compiler."""
    cc = _compiler()
    if cc is None or any(not (_PKG / rel).is_file() for rel in SOURCES):
        return None
    return cache_dir() / "kernels" / f"torchshrink-kernels-{level}-{_key(level, cc, torch_openmp())}.so"


def build(level: str, *, force: bool = False) -> Path | None:
    """Compile every source for ``level`` and link them into one library (atomically); None on failure."""
    path = library_path(level)
    if path is None:
        log.warning("no C compiler (or a kernel source is missing); torchshrink's kernels use their torch fallbacks")
        return None
    if path.is_file() and not force:
        return path
    cc, omp = _compiler(), torch_openmp()
    assert cc is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objs, cmds = [], []
        for rel, flags in SOURCES.items():
            obj = Path(tmp) / (Path(rel).stem.lstrip("_") + ".o")
            cmds.append([cc, "-O3", "-fPIC", "-c", *ISA_FLAGS[level], *flags, *(["-fopenmp"] if omp else []),
                         str(_PKG / rel), "-o", str(obj)])
            objs.append(str(obj))
        out = Path(tmp) / "lib.so"
        # the OpenMP runtime is named by file, with torch's folder as the run path: never the system libgomp
        link = ["-Wl,-rpath," + str(omp.parent), str(omp)] if omp else []
        cmds.append([cc, "-shared", *objs, *link, "-o", str(out)])
        for cmd in cmds:
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("building torchshrink's %s kernels failed (%s); using the torch fallbacks", level, e)
                return None
            if res.returncode != 0:
                log.warning("building torchshrink's %s kernels failed: %s: %s", level, " ".join(cmd), res.stderr[-500:])
                return None
        os.chmod(out, 0o755)
        os.replace(out, path)
    return path


def library() -> ctypes.CDLL | None:
    """The kernel library for this CPU (built on first use if no install step built it), or None: every
    caller then runs its torch fallback. Loaded once per process."""
    global _LIB
    if os.environ.get("TORCHSHRINK_KERNELS", "native").strip().lower() == "torch":
        return None
    if "tried" in _STATE:
        return _LIB
    _STATE["tried"] = True
    level = chosen_level()
    path = library_path(level)
    if path is not None and not path.is_file():
        log.warning("building torchshrink's %s kernels now (seconds; `torchshrink kernels --build` does it "
                    "ahead of time)", level)
    path = build(level) if path is not None else None
    lib = load(path) if path is not None else None
    if lib is not None:
        _STATE.update(level=level, path=path)
        _LIB = lib
    return lib


def load(path: Path) -> ctypes.CDLL | None:
    """Open a built kernel library and declare every function's C signature; None (logged) on failure."""
    try:
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as e:
        log.warning("loading %s failed (%s); torchshrink's kernels use their torch fallbacks", path, e)
        return None
    return lib


def describe() -> str:
    """One line for reports and benchmarks: which kernels run here."""
    lib = library()
    if lib is None:
        why = "TORCHSHRINK_KERNELS=torch" if os.environ.get("TORCHSHRINK_KERNELS", "").lower() == "torch" else "no build"
        return f"torch fallbacks ({why})"
    omp = torch_openmp()
    return f"native {_STATE['level']} (CPU best: {cpu_level()}; OpenMP: {'torch libgomp' if omp else 'none, 1 thread'})"


# --------------------------------------------------------------------------- kernels as torch ops


def eager(args: Sequence[Any]) -> bool:
    """True for a plain eager call (real tensors, nothing tracing): it can skip the dispatcher."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return all(type(a) is torch.Tensor or type(a) is torch.nn.Parameter for a in args if isinstance(a, torch.Tensor))


def kernel_op(name: str, *, fake: Callable[..., Any], mutates_args: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the custom op ``torch.ops.torchshrink.<name>`` with the ``fake`` implementation
    (output shapes for tracing); the returned callable runs ``fn`` directly in plain eager mode."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"torchshrink::{name}", fn, mutates_args=tuple(mutates_args), device_types="cpu")
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args) if eager(args) else op(*args)

        call.op = op  # type: ignore[attr-defined]
        return call

    return wrap
