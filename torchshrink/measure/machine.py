"""What machine a measurement was taken on."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import torch


@functools.cache
def _first_cpu_block() -> str:
    """The first CPU's block of /proc/cpuinfo (up to its blank line); "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 20).split("\n\n", 1)[0]
    except OSError:
        return ""


def _field(block: str, key: str) -> str | None:
    for line in block.splitlines():
        k, _, value = line.partition(":")
        if k.strip() == key:
            return value.strip()
    return None


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none."""
    block = _first_cpu_block()
    return _field(block, "model name") or "", frozenset((_field(block, "flags") or "").split())


def cpu_id() -> str:
    """Vendor, family, model and stepping of the first CPU in /proc/cpuinfo ("AuthenticAMD family 26 model 2
    stepping 1"); "" where there is none. Model names alone do not tell machines apart: a cloud VM's "AMD EPYC" has
    been a Zen 4 (family 25) and a Zen 5 (family 26) here, with different fastest paths."""
    return parse_cpu_id(_first_cpu_block())


def parse_cpu_id(cpuinfo: str) -> str:
    """:func:`cpu_id` of a /proc/cpuinfo text (its first CPU's block)."""
    block = cpuinfo.split("\n\n", 1)[0]
    fields = {k: v for k in ("vendor_id", "cpu family", "model", "stepping") if (v := _field(block, k)) is not None}
    if "cpu family" not in fields:
        return ""
    ids = [f"{k.replace('cpu ', '')} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return " ".join([fields.get("vendor_id", ""), *ids]).strip()


def cpu_label(info: dict[str, Any]) -> str:
    """A :func:`machine_info` record's CPU as reports name it: model name, then the id where it was recorded."""
    return info["cpu"] + (f" ({info['cpu_id']})" if info.get("cpu_id") else "")


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
    return (
        f"Machine: {cpu_label(info)} | SIMD: {', '.join(info['simd']) or 'none'} | cores: {info['cores']} | "
        f"torch {info['torch']} | Python {info['python']}\n"
    )
