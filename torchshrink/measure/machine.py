"""What machine a measurement was taken on."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import torch


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return name, flags


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them (``avx512_vnni``, ``amx_bf16``, ...); empty elsewhere."""
    return _cpuinfo()[1]


def machine_info() -> dict[str, Any]:
    cpu, flags = platform.processor() or "unknown", cpu_flags()
    if cpu in ("unknown", "", "x86_64") and _cpuinfo()[0]:
        cpu = _cpuinfo()[0]
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return {
        "cpu": cpu,
        "simd": simd,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quantized_engine": torch.backends.quantized.engine,
    }


def machine_markdown(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    return (
        f"Machine: {info['cpu']} | SIMD: {', '.join(info['simd']) or 'none'} | cores: {info['cores']} | "
        f"torch {info['torch']} | Python {info['python']}\n"
    )
