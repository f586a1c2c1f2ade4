"""ONNX export that keeps each technique's compression: the file runs in ONNX Runtime with the
torchshrink model's outputs on held-out inputs, stores the compressed weights in their own integer
types (no float32 copy), is no larger than 1.15x torchshrink's own saved file for int8 / int4 /
k-means, and ONNX Runtime runs the integer ops it was meant for (read from its optimized graph)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

import torchshrink as ts
from torchshrink.core.config import get_config_class
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.export.io import saved_bytes
from torchshrink.export.onnx import export_onnx, onnx_parity

_G = torch.Generator().manual_seed(0)
CALIB = torch.randn(32, 256, generator=_G)
HELD_OUT = torch.randn(48, 256, generator=_G)  # not the traced / calibration batch, another batch size
IMAGES = torch.randn(16, 3, 8, 8, generator=_G)
HELD_OUT_IMAGES = torch.randn(12, 3, 8, 8, generator=_G)
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def mlp() -> nn.Module:
    """Three 256x256 Linears and a head: large enough that file headers do not dominate."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10)).eval()


class Block(nn.Module):
    """conv-bn-relu, a padded conv with a residual add, max and average pooling, two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.bn(self.conv(h)) + h)
        h = self.avg(self.pool(h)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    net = Block()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (net.stem[1], net.bn):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def compress(kind: str, model: nn.Module, data: torch.Tensor, **fields: Any) -> nn.Module:
    cfg = get_config_class(kind)(**fields)
    train = {"train_data": [(data, torch.randint(0, 10, (data.shape[0],), generator=_G))] * 2} if ts.trains(cfg) else {}
    return ts.apply(model, cfg, data=[data], **train)


def initializers(path: Path) -> list[tuple[int, int, int]]:
    """(data type, element count, bytes in the file) of every initializer."""
    out = []
    for t in onnx.load(str(path)).graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        out.append((t.data_type, n, len(t.raw_data) or n * 4))
    return out


def ort_ops(path: Path) -> set[str]:
    """The op types of the graph ONNX Runtime runs (after its fusions and constant folding)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_suffix(".ort.onnx"))
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


# kind, fields, the weights' ONNX type, what ONNX Runtime runs them as
SIZED = [
    ("int8-dynamic", {}, onnx.TensorProto.INT8, "DynamicQuantizeMatMul"),
    ("weight-only", {"bits": 8, "group_size": 0}, onnx.TensorProto.INT8, "MatMulNBits"),
    ("weight-only", {"bits": 8, "group_size": 64}, onnx.TensorProto.INT8, "MatMulNBits"),
    ("weight-only", {"bits": 4, "group_size": 128}, onnx.TensorProto.INT4, "MatMulNBits"),
    ("weight-only", {"bits": 4, "group_size": 32}, onnx.TensorProto.INT4, "MatMulNBits"),
    ("kmeans", {}, onnx.TensorProto.UINT8, "Gemm"),  # 5 bits: five bit planes; unpacked when ORT loads it
    ("kmeans", {"bits": 3}, onnx.TensorProto.UINT8, "Gemm"),
    ("kmeans", {"bits": 8}, onnx.TensorProto.UINT8, "Gemm"),  # one uint8 index per weight
    ("int8-static", {}, onnx.TensorProto.INT8, "QGemm"),
]


@pytest.mark.parametrize("kind, fields, wtype, runs_as", SIZED, ids=[f"{k}-{f}" for k, f, _, _ in SIZED])
def test_compressed_weights_stay_compressed_and_match(tmp_path, kind, fields, wtype, runs_as):
    q = compress(kind, mlp(), CALIB, **fields)
    path = export_onnx(q, (CALIB,), tmp_path / "m.onnx")
    par = onnx_parity(q, path, (HELD_OUT,))
    assert par["cosine"] >= 0.999, par
    size = path.stat().st_size
    assert size <= 1.15 * saved_bytes(q), (size, saved_bytes(q))
    inits = initializers(path)
    packed = sum(n for t, n, _ in inits if t == wtype)
    if kind == "kmeans":  # bit planes: ceil(n / 8) bytes per bit of a code, or one uint8 index per weight
        bits = fields.get("bits", 5)
        assert packed == sum(bits * (-(-n // 8)) if bits < 8 else n for n in (65536,) * 3 + (2560,))
    else:  # every weight once, in the integer type
        assert packed == 3 * 256 * 256 + 256 * 10, packed
    # scales, codebooks and biases only: no float copy of a weight
    assert max(n for t, n, _ in inits if t in FLOATS) <= 256 * 256 // 32
    ops = ort_ops(path)
    assert runs_as in ops, ops
    leftover = {"BitwiseAnd"} | (set() if kind == "int8-static" else {"DequantizeLinear"})
    assert not ops & leftover, ops  # fused into the integer op, or unpacked once when the session loads


def test_pruned_kmeans_stores_only_the_nonzero_codes(tmp_path):
    """Deep Compression's prune -> cluster: a 1-bit mask places the 5-bit codes of the nonzero weights. ONNX
    has no entropy coding, so torchshrink's LZMA-coded file stays smaller (about 1.4x at 50% zeros)."""
    q = compress("kmeans", compress("unstructured", mlp(), CALIB, sparsity=0.5), CALIB)
    path = export_onnx(q, (CALIB,), tmp_path / "pk.onnx")
    par = onnx_parity(q, path, (HELD_OUT,))
    assert par["cosine"] >= 0.99999 and par["max_abs_diff"] < 1e-4, par
    stored = sum(b for t, _, b in initializers(path) if t == onnx.TensorProto.UINT8)
    weights = 3 * 256 * 256 + 256 * 10
    assert stored <= weights * (1 + 5 * 0.5) / 8 * 1.01  # mask + nonzero codes, not 5 bits per weight
    assert path.stat().st_size <= 1.45 * saved_bytes(q)
    assert "CumSum" not in ort_ops(path)  # the weights are rebuilt once, when the session loads


def test_static_int8_cnn_runs_on_onnxruntime_int8_kernels(tmp_path):
    q = compress("int8-static", cnn(), IMAGES)
    path = export_onnx(q, (IMAGES,), tmp_path / "s.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 2 and ops.count("Add") == 1
    types = {t.name: t.data_type for t in graph.initializer}
    assert sum(t == onnx.TensorProto.INT8 for t in types.values()) == 4  # 2 conv + 2 linear weights
    assert sum(t == onnx.TensorProto.INT32 for t in types.values()) == 4  # their biases
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= ort_ops(path)
    par = onnx_parity(q, path, (HELD_OUT_IMAGES,))
    assert par["cosine"] >= 0.9999 and par["max_abs_diff"] < 0.05, par


def test_a_bias_too_large_for_int32_on_a_tiny_activation_grid_still_matches(tmp_path):
    """Activations of ~1e-6 (a randomly initialised, channel-pruned ShuffleNetV2's classifier input) put the
    classifier's bias at ~1e9 steps of in_scale x w_scale: past int32 once the accumulation is added. Those
    channels take a coarser weight scale, so the file still runs on ONNX Runtime's integer kernels with parity."""
    from torchshrink.export.onnx_static import fit_int32_bias

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-6)
        model[0].bias.zero_()
        model[2].bias.uniform_(-0.1, 0.1)
    q = compress("int8-static", model, CALIB)
    path = export_onnx(q, (CALIB,), tmp_path / "tiny.onnx")  # refused (cosine < 0.99) without the coarser scale
    assert "QGemm" in ort_ops(path)
    par = onnx_parity(q, path, (HELD_OUT,))
    assert par["cosine"] >= 0.9999, par
    biases = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
              if t.data_type == onnx.TensorProto.INT32]
    assert max(int(abs(b.astype("int64")).max()) for b in biases) < 2**31 - 255 * 128 * 64  # the classifier reads 64 inputs

    qw = torch.tensor([[100, -50], [3, 4]], dtype=torch.int8)
    scale = torch.tensor([1e-3, 1e-3], dtype=torch.float64)
    w2, s2 = fit_int32_bias(qw, scale, torch.tensor([0.0, 1.0], dtype=torch.float64), in_scale=1e-9)
    assert torch.equal(w2[0], qw[0]) and s2[0] == scale[0]  # a channel that fits is bit-identical
    assert s2[1] > scale[1] and 1.0 / (1e-9 * float(s2[1])) <= 2**31 - 255 * 128 * 2
    assert torch.allclose(w2[1].double() * s2[1], qw[1].double() * scale[1], atol=float(s2[1]) / 2 + 1e-12)


def test_csr_sparse_layers_export_dense(tmp_path):
    from torchshrink.core.surgery import set_module
    from torchshrink.prune.sparse import SparseLinear

    q = compress("unstructured", mlp(), CALIB, sparsity=0.8)
    for name in ("0", "2", "4"):
        set_module(q, name, SparseLinear.from_linear(q.get_submodule(name)))
    assert sum(isinstance(m, SparseLinear) for m in q.modules()) == 3
    path = export_onnx(q, (CALIB,), tmp_path / "csr.onnx")
    par = onnx_parity(q, path, (HELD_OUT,))
    assert par["cosine"] >= 0.99999 and par["max_abs_diff"] < 1e-4, par
    zeros = [t for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 2 and t.dims[0] == 256]
    assert len(zeros) == 3  # the dense weights, zeros included


@pytest.mark.parametrize("kind", ["binaryconnect", "bwn", "bnn", "xnor", "twn", "ttq"])
def test_binary_and_ternary_layers_export_packed(tmp_path, kind):
    from torchshrink.binary.modules import PACKED_MODULES

    q = compress(kind, cnn(), IMAGES)
    packed = [m for m in q.modules() if isinstance(m, PACKED_MODULES)]
    assert len(packed) >= 2  # the middle conv and fc1 (first conv and last Linear kept)
    path = export_onnx(q, (IMAGES,), tmp_path / "b.onnx")
    par = onnx_parity(q, path, (HELD_OUT_IMAGES,))
    assert par["cosine"] >= 0.999, par
    per_byte = 4 if kind in ("twn", "ttq") else 8
    codes = sorted(n for t, n, _ in initializers(path) if t == onnx.TensorProto.UINT8)
    want = sorted(-(-(16 * 16 * 9) // per_byte) if m.is_conv else -(-(64 * 64) // per_byte) for m in packed)
    assert codes == want  # 1 or 2 bits per weight, no float copy of the packed weights
    assert max(n for t, n, _ in initializers(path) if t in FLOATS) < 16 * 16 * 9


@pytest.mark.parametrize("keep_first_last", [False, True])
@pytest.mark.parametrize("kind", ["bnn", "xnor"])
def test_fully_binary_mlp_is_exact_in_onnxruntime(tmp_path, kind, keep_first_last):
    """Sign activations flip on tiny input differences: an MLP binarized throughout, or with its first and
    last Linear kept as int8 weight-only, gives ONNX Runtime the same outputs to float rounding (the kept
    layers run as float Gemm there, not as MatMulNBits, which would round the activations to int8)."""
    q = compress(kind, mlp(), CALIB, keep_first_last=keep_first_last)
    path = export_onnx(q, (CALIB,), tmp_path / "b.onnx")
    par = onnx_parity(q, path, (HELD_OUT,))
    with torch.no_grad():
        scale = max(1.0, float(q(HELD_OUT).abs().max()))
    assert par["max_abs_diff"] < 1e-4 * scale, par
    ops = ort_ops(path)
    assert "Where" in ops and "MatMulNBits" not in ops


def test_weight_only_float_matmul_layout(tmp_path):
    """The layout used next to fully binary layers: codes [out, in], blocks along in, Gemm with transB."""
    from torchshrink.export.onnx_ops import ExportWeightOnly
    from torchshrink.quant.modules import WeightOnlyLinear

    torch.manual_seed(0)
    for bits, group in ((4, 32), (8, 64), (8, 0)):
        layer = WeightOnlyLinear.from_float(nn.Linear(256, 64), bits=bits, group_size=group).eval()
        path = export_onnx(nn.Sequential(ExportWeightOnly(layer, float_matmul=True), nn.ReLU()), (CALIB,),
                           tmp_path / f"w{bits}{group}.onnx")
        par = onnx_parity(nn.Sequential(layer, nn.ReLU()), path, (HELD_OUT,))
        assert par["max_abs_diff"] < 1e-5, (bits, group, par)
        assert "MatMulNBits" not in ort_ops(path)


@pytest.mark.parametrize("dtype, onnx_type", [("float16", onnx.TensorProto.FLOAT16),
                                              ("bfloat16", onnx.TensorProto.BFLOAT16)])
def test_cast_layers_keep_half_precision_weights(tmp_path, dtype, onnx_type):
    q = compress("cast", mlp(), CALIB, dtype=dtype)
    path = export_onnx(q, (CALIB,), tmp_path / "c.onnx")
    par = onnx_parity(q, path, (HELD_OUT,))
    assert par["cosine"] >= 0.99999, par
    big = [t for t, n, _ in initializers(path) if n >= 2560]
    assert big and set(big) == {onnx_type}
    assert path.stat().st_size <= 1.15 * saved_bytes(q)


def test_too_low_an_opset_is_refused_in_one_line_and_leaves_no_file(tmp_path):
    q = compress("weight-only", mlp(), CALIB, bits=4)
    with pytest.raises(UnsupportedLayerError, match=r"layer '0' exports with DequantizeLinear of INT4.*"
                                                    r"opset >= 21; got opset 20; allowed: opset 21"):
        export_onnx(q, (CALIB,), tmp_path / "a.onnx", opset=20)
    k = compress("kmeans", mlp(), CALIB)
    with pytest.raises(UnsupportedLayerError, match="BitwiseAnd.*opset >= 18; got opset 17; allowed: opset 18 to 21"):
        export_onnx(k, (CALIB,), tmp_path / "b.onnx", opset=17)
    with pytest.raises(UnsupportedLayerError, match="opset 12 is not supported; allowed: 13 to 21"):
        export_onnx(mlp(), (CALIB,), tmp_path / "c.onnx", opset=12)
    assert not list(tmp_path.iterdir())
    q8 = compress("int8-dynamic", mlp(), CALIB)  # needs nothing newer than 13
    assert onnx_parity(q8, export_onnx(q8, (CALIB,), tmp_path / "d.onnx", opset=13), (HELD_OUT,))["cosine"] >= 0.999


def test_an_input_that_does_not_fit_fails_in_one_line_without_a_partial_file(tmp_path):
    q = compress("kmeans", mlp(), CALIB)
    out = tmp_path / "m.onnx"
    with pytest.raises(UnsupportedLayerError, match="ONNX export of Sequential failed: RuntimeError") as e:
        export_onnx(q, (torch.randn(4, 100),), out)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_a_layer_used_twice_exports_its_packed_weight_once(tmp_path):
    """ALBERT runs one block several times: the 4-bit weight becomes one INT4 initializer that both uses read."""
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.block = nn.Linear(256, 128), nn.Linear(128, 128)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(torch.relu(self.block(self.inp(x))))

    torch.manual_seed(0)
    q = ts.apply(Shared().eval(), ts.WeightOnlyConfig(bits=4, group_size=64))
    path = export_onnx(q, (CALIB,), tmp_path / "shared.onnx")
    par = onnx_parity(q, path, (HELD_OUT,))
    assert par["cosine"] > 0.9999, par
    g = onnx.load(str(path)).graph
    int4 = [t for t in g.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 2 and sum(n.op_type == "DequantizeLinear" for n in g.node) >= 3  # inp + block (twice)


def test_a_file_that_computes_something_else_in_onnx_runtime_is_refused(tmp_path, monkeypatch):
    """export_onnx runs the written file in ONNX Runtime on the export inputs: below cosine 0.99 it is refused and
    removed (found: a channel-pruned static-INT8 ShuffleNetV2 gave 0.03 there while torch's was exact)."""
    import torchshrink.export.onnx as ox

    model = nn.Sequential(nn.Linear(256, 16)).eval()
    assert export_onnx(model, (CALIB,), tmp_path / "ok.onnx").is_file()  # the check passes on a faithful file
    monkeypatch.setattr(ox, "onnx_parity", lambda *a, **k: {"cosine": 0.03})
    with pytest.raises(UnsupportedLayerError, match=r"computes something else in ONNX Runtime \(output cosine 0.0300"):
        export_onnx(model, (CALIB,), tmp_path / "bad.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]
    assert export_onnx(model, (CALIB,), tmp_path / "unchecked.onnx", check=False).is_file()


def test_a_model_built_on_torch_transformer_layers_is_compressed_exported_and_reloaded(tmp_path):
    """nn.TransformerEncoderLayer's inference fast path hands linear1 / linear2 / norm weights to one fused kernel
    (aten::_transformer_encoder_layer_fwd, which has no ONNX form: every such model failed to export), bypassing the
    layers: swapping kinds used to skip them (cast crashed on norm1.eps). They are now swapped and the layer (and its
    nn.TransformerEncoder, whose nested-tensor path reads the first layer's weights when a padding mask is given)
    runs torch's composite path, kept through save / load; the FFN is compressed, with and without a mask."""
    torch.manual_seed(0)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
            self.head = nn.Linear(32, 5)

        def forward(self, x, pad=None):
            h = self.enc(x, src_key_padding_mask=pad)
            keep = torch.ones(h.shape[:2]) if pad is None else (~pad).float()
            return self.head((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))

    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[:, 5:] = True
    for kind, swapped in (("int8-dynamic", "Int8DynamicLinear"), ("weight-only", "WeightOnlyLinear"),
                          ("cast", "CastWrapper")):
        model = Enc().eval()
        with torch.no_grad():
            ref, ref_pad = model(x), model(x, pad)
        q = compress(kind, model, x)
        assert type(q.get_submodule("enc.layers.1.linear2")).__name__ == swapped
        assert "composite_path" in ts.report(q)[-1].notes
        with torch.no_grad():
            out, out_pad = q(x), q(x, pad)
        assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
        assert torch.nn.functional.cosine_similarity(out_pad.flatten(), ref_pad.flatten(), dim=0) > 0.99
        ts.save(q, tmp_path / kind)
        back = ts.load(tmp_path / kind, model=Enc()).eval()
        with torch.no_grad():
            assert torch.equal(back(x), out) and torch.equal(back(x, pad), out_pad)
        path = export_onnx(q, (x,), tmp_path / f"{kind}.onnx")
        assert onnx_parity(q, path, (torch.randn(5, 7, 32),))["cosine"] > 0.9999
    skipped = ts.report(q)[-1].skipped
    assert "enc.layers.0.self_attn.out_proj" in skipped  # MultiheadAttention reads it on every path
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the export
