"""ONNX part of benchmarks/deploy.py (`--part onnx`): every technique's finalized output exported to ONNX, run in ONNX
Runtime on held-out inputs, compared with torchshrink's model and with the size of torchshrink's own file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

# (kind, fields, model): every technique's finalized output on an MLP of three 256x256 Linears (or a small CNN
# with a residual add for the convolution-only kinds)
TECHNIQUES = [
    ("int8-dynamic", {}, "mlp"), ("int8-static", {}, "mlp"), ("int8-static", {}, "cnn"),
    ("weight-only", {"bits": 8, "group_size": 0}, "mlp"), ("weight-only", {"bits": 4, "group_size": 128}, "mlp"),
    ("weight-only", {"bits": 4, "group_size": 32}, "mlp"), ("kmeans", {"bits": 5}, "mlp"),
    ("cast", {"dtype": "float16"}, "mlp"), ("cast", {"dtype": "bfloat16"}, "mlp"),
    ("unstructured", {"sparsity": 0.8}, "mlp"), ("nm", {}, "mlp"), ("channel-prune", {"amount": 0.5}, "cnn"),
    ("svd", {"ratio": 0.25}, "mlp"), ("binaryconnect", {}, "mlp"), ("bwn", {}, "mlp"), ("bnn", {}, "mlp"),
    ("xnor", {}, "mlp"), ("twn", {}, "mlp"), ("ttq", {}, "mlp"), ("qat", {}, "mlp"),
]
SIZE_BOUND = ("int8-dynamic", "int8-static", "weight-only", "kmeans")


def onnx_part() -> dict[str, Any]:
    """Export each technique's output, run it in ONNX Runtime on held-out inputs, compare with torchshrink's model
    and with torchshrink's own file size."""
    import tempfile

    import onnx

    import torchshrink as ts
    from torchshrink.core.config import get_config_class
    from torchshrink.export.io import saved_bytes
    from torchshrink.export.onnx import export_onnx, onnx_parity

    g = torch.Generator().manual_seed(0)
    data = {"mlp": (torch.randn(32, 256, generator=g), torch.randn(48, 256, generator=g)),
            "cnn": (torch.randn(16, 3, 8, 8, generator=g), torch.randn(12, 3, 8, 8, generator=g))}

    def build(name: str) -> nn.Module:
        torch.manual_seed(0)
        if name == "mlp":
            return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                                 nn.ReLU(), nn.Linear(256, 10)).eval()
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for kind, fields, arch in TECHNIQUES:
            calib, held = data[arch]
            cfg = get_config_class(kind)(**fields)
            train = {"train_data": [(calib, torch.randint(0, 10, (calib.shape[0],), generator=g))] * 2} \
                if ts.trains(cfg) else {}
            path = Path(d) / f"{len(rows)}.onnx"
            row: dict[str, Any] = {"kind": kind, "fields": fields, "model": arch}
            try:
                model = ts.apply(build(arch), cfg, data=[calib], **train).eval()
                export_onnx(model, (calib,), path)
                par = onnx_parity(model, path, (held,))
                ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node} & {
                    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "Gather",
                    "BitwiseAnd", "Where", "Cast"})
                row.update(cosine=par["cosine"], max_abs_diff=par["max_abs_diff"], onnx_bytes=path.stat().st_size,
                           torchshrink_bytes=saved_bytes(model), ops=ops)
                row["size_ratio"] = row["onnx_bytes"] / row["torchshrink_bytes"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    import onnxruntime

    return {"rows": rows, "held_out": "48 random rows (MLP) / 12 random 3x8x8 images (CNN), never traced or calibrated on",
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
