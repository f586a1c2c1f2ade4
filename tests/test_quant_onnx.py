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
    assert {"DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear"} <= ops
    init = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert onnx.TensorProto.INT8 in init.values()  # int8-dynamic weights stored as int8 codes
    assert onnx.TensorProto.INT4 in init.values()  # int4 weight-only as INT4
    par = onnx_parity(q, path, (torch.randn(16, 64),))  # another batch (and size) than the traced one
    assert par["cosine"] > 0.999 and par["qdq"] == 1.0


def test_onnx_static_graph_exports_as_qdq(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    q = torchshrink.quantize(m, Int8StaticConfig(), data=[torch.randn(2, 1, 8, 8)])
    path = export_onnx(q, (torch.randn(1, 1, 8, 8),), tmp_path / "s.onnx")
    par = onnx_parity(q, path, (torch.randn(5, 1, 8, 8),))
    assert par["cosine"] > 0.999 and par["qdq"] == 1.0


def test_onnx_int8_layer_outside_a_static_graph_is_refused_clearly(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    q = torchshrink.quantize(m, Int8StaticConfig(), data=[torch.randn(2, 1, 8, 8)])
    conv = next(x for x in q.modules() if type(x).__name__ == "Int8Conv2d")
    with pytest.raises(UnsupportedLayerError, match="outside a static INT8 graph.*exportable") as e:
        export_onnx(nn.Sequential(conv), (torch.randn(1, 1, 8, 8),), tmp_path / "s.onnx")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_bert_int8_recipe_exports_with_fused_qkv_and_matches_onnxruntime(tmp_path):
    from tests.conftest import tiny_bert
    from torchshrink.recipe.recipe import load_recipe

    bert, data = tiny_bert()

    class Hidden(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.m(ids, mask).last_hidden_state

    (stage,) = load_recipe("bert-int8").stages
    q = Hidden(torchshrink.quantize(bert, stage.config, select=stage.select, data=data)).eval()
    assert type(q.m.encoder.layer[0].attention.self.query).__name__ == "FusedQKV"
    path = export_onnx(q, data[0], tmp_path / "b.onnx", input_names=["ids", "mask"])
    import onnx

    graph = onnx.load(str(path)).graph
    n_quant = sum(n.op_type == "DynamicQuantizeLinear" for n in graph.node)
    n_int = sum(n.op_type == "MatMulInteger" for n in graph.node)
    n_matmul = sum(n.op_type == "MatMul" for n in graph.node)
    # per layer: one quantized input each for the fused Q/K/V GEMM, attention output, FFN input and output
    # (unfused Q/K/V: 6), those 4 integer GEMMs, and the 2 float attention matmuls (SDPA)
    assert (n_quant, n_int, n_matmul) == (2 * 4, 2 * 4, 2 * 2)
    par = onnx_parity(q, path, data[1])  # another batch than the traced one
    assert par["cosine"] > 0.9999 and par["qdq"] == 1.0
