"""Peer paths of benchmarks/deploy.py: what a user could run instead of torchshrink on the uncompressed model (ONNX
Runtime, OpenVINO, NNCF int8, torch bf16 / torch.ao), each built the way its own documentation shows."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


def ort(model: nn.Module, example: tuple[torch.Tensor, ...], folder: Path, int8: bool = False) -> nn.Module:
    from torchshrink.deploy.runtimes import OrtModule, write_onnx

    path = write_onnx(model, example, folder / "peer-fp32.onnx")
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = folder / "peer-int8.onnx"
        quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8)
        path = q
    return OrtModule(path, 2)


def ov(model: nn.Module, example: tuple[torch.Tensor, ...], folder: Path, hint: str | None,
       calibration: list[tuple[torch.Tensor, ...]] | None = None, transformer: bool = False) -> nn.Module:
    """OpenVINO from the ONNX export: f32 / bf16 hint, or None for OpenVINO's own defaults (2 threads, latency);
    with ``calibration``, NNCF's INT8 first."""
    from torchshrink.deploy.runtimes import OvModule, ov_int8, ov_read, write_onnx

    path = folder / "ov-src.onnx"
    if not path.exists():
        write_onnx(model, example, path)
    m = ov_int8(path, calibration, transformer=transformer) if calibration else ov_read(path)
    return OvModule(m, 2, hint)


def peers(model: nn.Module, example: tuple[torch.Tensor, ...], folder: Path, calibration: list[tuple[torch.Tensor, ...]],
          *, transformer: bool, torch_int8: nn.Module) -> dict[str, nn.Module | str]:
    """Every peer path a user could pick on the uncompressed model (a string: why it did not build)."""
    from torchshrink.deploy.runtimes import Cast

    out: dict[str, nn.Module | str] = {"torch fp32 eager": model,
                                       "torch bf16 (model.to(bfloat16))": Cast(copy.deepcopy(model), torch.bfloat16),
                                       "torch.ao int8": torch_int8}
    for name, make in (("ONNX Runtime fp32", lambda: ort(model, example, folder)),
                       ("ONNX Runtime int8 (quantize_dynamic)", lambda: ort(model, example, folder, int8=True)),
                       ("OpenVINO fp32 (f32 hint)", lambda: ov(model, example, folder, "f32")),
                       ("OpenVINO bf16 (bf16 hint)", lambda: ov(model, example, folder, "bf16")),
                       ("OpenVINO defaults", lambda: ov(model, example, folder, None)),
                       ("OpenVINO int8 (NNCF)", lambda: ov(model, example, folder, None, calibration, transformer))):
        try:
            out[name] = make()
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def ao_static(model: nn.Module, x: torch.Tensor, calib: list[torch.Tensor]) -> nn.Module | str:
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        p = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for c in calib:
                p(c)
        return convert_fx(p)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

