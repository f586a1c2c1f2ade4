"""What machine a measurement was taken on."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("unknown", "", "x86_64"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
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
