import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.export.onnx import export_onnx, onnx_parity
from torchshrink.quant import Int8DynamicConfig, Int8StaticConfig, WeightOnlyConfig

torch.set_num_threads(2)


def test_onnx_qdq_export_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64), nn.Linear(64, 10)).eval()
    x = torch.randn(8, 64)
    q = torchshrink.quantize(m, Int8DynamicConfig(), select={"exclude": ["4"]})
    q = torchshrink.quantize(q, WeightOnlyConfig(bits=4, group_size=32), select={"include": ["4"]})
    path = export_onnx(q, (x,), tmp_path / "q.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "DequantizeLinear"} <= ops
    init = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert onnx.TensorProto.INT8 in init.values()  # weights stored as int8 codes
    par = onnx_parity(q, path, (x,))
    assert par["cosine"] > 0.999 and par["qdq"] == 1.0


def test_onnx_static_graph_is_refused_clearly(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    q = torchshrink.quantize(m, Int8StaticConfig(), data=[torch.randn(2, 1, 8, 8)])
    with pytest.raises(UnsupportedLayerError, match="exportable"):
        export_onnx(q, (torch.randn(1, 1, 8, 8),), tmp_path / "s.onnx")
