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


@functools.cache
def cpu_id() -> str:
    """Vendor, family, model and stepping of the first CPU in /proc/cpuinfo ("AuthenticAMD family 26 model 2
    stepping 1"); "" where there is none. Model names alone do not tell machines apart: a cloud VM's "AMD EPYC" has
    been a Zen 4 (family 25) and a Zen 5 (family 26) here, with different fastest paths."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpu_id(f.read(1 << 20))
    except OSError:
        return ""


def parse_cpu_id(cpuinfo: str) -> str:
    """:func:`cpu_id` of a /proc/cpuinfo text (its first CPU's block)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if not key and fields:  # the first CPU's block ends at a blank line
            break
        if key in ("vendor_id", "cpu family", "model", "stepping"):
            fields.setdefault(key, value.strip())
    if "cpu family" not in fields:
        return ""
    ids = [f"{k.replace('cpu ', '')} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return " ".join([fields.get("vendor_id", ""), *ids]).strip()


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`machine_info` records name the same kind of CPU (name, family / model, SIMD, cores). A
    record without ``cpu_id`` (written before it was recorded) matches nothing: which CPU it was is not known."""
    keys = ("cpu", "cpu_id", "simd", "cores")
    return bool(a.get("cpu_id")) and all(a.get(k) == b.get(k) for k in keys)


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
        "cpu_id": cpu_id(),
        "simd": simd,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quantized_engine": torch.backends.quantized.engine,
    }


def machine_markdown(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    cpu = info["cpu"] + (f" ({info['cpu_id']})" if info.get("cpu_id") else "")
    return (
        f"Machine: {cpu} | SIMD: {', '.join(info['simd']) or 'none'} | cores: {info['cores']} | "
        f"torch {info['torch']} | Python {info['python']}\n"
    )
