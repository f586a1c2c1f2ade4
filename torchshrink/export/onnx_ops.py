"""The ONNX ops torchshrink's compressed layers export as, and the stand-in modules ("twins") that emit them.

A twin computes what its layer computes with plain torch ops (that is what the tracer runs) and
keeps the layer's stored integers as they are: the ``torch.autograd.Function`` symbolics below write
them as integer initializers plus the ONNX ops that expand them, so the file stays as small as the
layer and nothing is folded back to float32 while exporting (ONNX Runtime folds or fuses them when it
loads the file):

- int8-dynamic: ``DynamicQuantizeLinear`` + ``MatMulInteger`` on the int8 weight;
- ``DequantizeLinear`` of int8 / INT4 codes with per-channel or block scales (weight-only; ONNX
  Runtime fuses it with the MatMul into ``MatMulNBits``);
- bit unpacking (``BitwiseAnd`` with one-bit masks, opset 18) of 1- / 2-bit codes and of k-means
  bit planes, followed by ``Gather`` from the codebook or the sign / ternary values;
- static INT8: ``QuantizeLinear`` / ``DequantizeLinear`` around ``Conv`` / ``Gemm`` / ``Add`` with int8
  per-channel weights and int32 biases (see ``onnx_static.py``).

Blocked / INT4 dequantization needs opset 21, which torch's TorchScript exporter cannot write: it is
exported as the placeholder node ``torchshrink::DequantizeBlocked`` and :func:`finish_blocked` rewrites
it into ``DequantizeLinear`` (``block_size``, INT4 initializer) after the export.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.export.formats import pack_bits

DOMAIN = "torchshrink"  # the placeholder nodes' domain; none is left in a finished file
BLOCKED_OP = "DequantizeBlocked"
_FLOAT, _INT64, _BOOL = 1, 7, 9  # onnx.TensorProto data types (torch.onnx has no enum for them)


def const(g: Any, t: torch.Tensor) -> Any:
    return g.op("Constant", value_t=t)


class DynQuantLinear(torch.autograd.Function):
    """int8-dynamic: DynamicQuantizeLinear(x) -> MatMulInteger with the int8 weight [in, out] -> times the
    input scale x the per-column weight scale, + bias (ONNX Runtime fuses it into DynamicQuantizeMatMul)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, qweight.float() * scale) + bias

    @staticmethod
    def symbolic(g: Any, x: Any, qweight: Any, scale: Any, bias: Any) -> Any:
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("Cast", g.op("MatMulInteger", xq, qweight, xz), to_i=_FLOAT)
        return g.op("Add", g.op("Mul", acc, g.op("Mul", xs, scale)), bias)


class DequantChannel(torch.autograd.Function):
    """DequantizeLinear(int8 codes, scale, zero point 0) along ``axis`` (per channel, opset 13)."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * codes.dim()
        shape[axis] = -1
        return codes.float() * scale.reshape(shape)

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, axis: int) -> Any:
        zero = const(g, torch.zeros(codes.type().sizes()[axis], dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=axis)


class DequantBlocked(torch.autograd.Function):
    """Codes [rows, cols] (int8, or INT4 stored two per byte, low nibble first, flat) times ``scale``: per
    index of the other axis than ``axis`` (``block`` 0) or per block of ``block`` entries along ``axis``.
    Exported as the placeholder that :func:`finish_blocked` turns into an opset-21 DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, stored: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, axis: int, block: int,
                bits: int) -> torch.Tensor:
        from torchshrink.quant.packing import unpack_int4

        codes = (unpack_int4(stored) if bits == 4 else stored).reshape(rows, cols).float()
        if block:
            return codes * scale.repeat_interleave(block, axis)
        return codes * (scale.reshape(1, -1) if axis == 1 else scale.reshape(-1, 1))

    @staticmethod
    def symbolic(g: Any, stored: Any, scale: Any, rows: int, cols: int, axis: int, block: int, bits: int) -> Any:
        out = g.op(f"{DOMAIN}::{BLOCKED_OP}", stored, scale, shape_i=[rows, cols], axis_i=axis, block_size_i=block,
                   bits_i=bits)
        out.setType(scale.type().with_sizes([rows, cols]))
        return out


class UnpackBits(torch.autograd.Function):
    """uint8 [P, nbytes] -> int64 [P, count]: bit ``i % 8`` of byte ``i // 8`` of each row (little bit order).
    ONNX: Unsqueeze, BitwiseAnd with the eight one-bit masks (opset 18), Cast to bool, Cast, Reshape, Slice
    (no BitShift: OpenVINO 2026.4 rounds uint8 right shifts)."""

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, count: int) -> torch.Tensor:
        bits = (packed.unsqueeze(-1) & (1 << torch.arange(8, dtype=torch.uint8))) != 0
        return bits.reshape(packed.shape[0], -1)[:, :count].long()

    @staticmethod
    def symbolic(g: Any, packed: Any, count: int) -> Any:
        rows = packed.type().sizes()[0]
        x = g.op("Unsqueeze", packed, const(g, torch.tensor([-1])))
        x = g.op("BitwiseAnd", x, const(g, (1 << torch.arange(8)).to(torch.uint8)))
        x = g.op("Cast", g.op("Cast", x, to_i=_BOOL), to_i=_INT64)
        x = g.op("Reshape", x, const(g, torch.tensor([rows, -1])))
        out = g.op("Slice", x, const(g, torch.tensor([0])), const(g, torch.tensor([count])), const(g, torch.tensor([1])))
        out.setType(packed.type().with_dtype(torch.int64).with_sizes([rows, count]))
        return out


def bit_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat codes in [0, 2**bits) -> uint8 [bits, ceil(n / 8)]: plane ``j`` holds bit ``j`` of every code."""
    c = codes.reshape(-1).long()
    return torch.stack([pack_bits(((c >> j) & 1).bool()) for j in range(bits)])


def _buffer(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


class Twin(nn.Module):
    """Base of the twins: ``min_opset`` (and what needs it) is checked before exporting."""

    min_opset = 13
    needs = ""


class ExportDyn(Twin):
    """Int8DynamicLinear (SmoothQuant divisor applied first) through :class:`DynQuantLinear`."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.register_buffer("qweight", m.qweight.t().contiguous())  # [in, out]: MatMulInteger's B
        self.register_buffer("scale", m.w_scale.float().clone())
        self.register_buffer("bias", m.bias.clone() if m.bias is not None else torch.zeros(m.out_features))
        self.register_buffer("smooth", _buffer(m.smooth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        return DynQuantLinear.apply(x, self.qweight, self.scale, self.bias)


class ExportWeightOnly(Twin):
    """WeightOnlyLinear as DequantizeLinear of its codes: int8 per channel (opset 13), or int8 per group /
    INT4 (opset 21, ``block_size``). By default MatMul(x, DQ(codes [in, out])) + bias, which ONNX Runtime
    fuses into MatMulNBits; that kernel quantizes the activations to int8 per block unless the session
    sets ``session.qdq_matmulnbits_accuracy_level`` to 0. ``float_matmul``: Gemm(x, DQ(codes [out, in]),
    bias, transB=1) instead, which ONNX Runtime runs in float32 like the torch layer (the weight is
    dequantized per call)."""

    def __init__(self, m: nn.Module, float_matmul: bool = False) -> None:
        super().__init__()
        from torchshrink.quant.packing import pack_int4

        self.float_matmul = float_matmul
        self.block, self.bits = int(m.group_size or 0), int(m.bits)
        codes, scale = m.codes(), m.scale  # [out, in], blocks along in
        if not float_matmul:  # [in, out]: MatMul's B, blocks along its rows
            codes, scale = codes.t(), (scale.t() if self.block else scale)
        self.rows, self.cols = codes.shape
        self.axis = (1 if self.block else 0) if float_matmul else (0 if self.block else 1)
        codes = codes.contiguous()
        self.register_buffer("stored", pack_int4(codes.reshape(-1)) if self.bits == 4 else codes.to(torch.int8))
        self.register_buffer("scale", scale.contiguous().float())
        self.register_buffer("bias", _buffer(m.bias))
        if self.bits == 4 or self.block:
            self.min_opset, self.needs = 21, f"DequantizeLinear of {'INT4' if self.bits == 4 else 'int8 blocks'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.min_opset > 13:
            w = DequantBlocked.apply(self.stored, self.scale, self.rows, self.cols, self.axis, self.block, self.bits)
        else:
            w = DequantChannel.apply(self.stored, self.scale, self.axis)
        if self.float_matmul:
            return F.linear(x, w, self.bias)
        # a 2-D input goes through the MatMul as [1, M, K]: ONNX Runtime would otherwise fuse MatMul + Add
        # (+ ReLU) into a float Gemm before it can fuse the DequantizeLinear into MatMulNBits
        flat = x.dim() == 2
        y = torch.matmul(x.unsqueeze(0) if flat else x, w)
        y = y if self.bias is None else y + self.bias
        return y.squeeze(0) if flat else y


class _ExportAddNorm(nn.Module):
    """LinearAddNorm as plain ops: LayerNorm(dense(x) + residual); ``dense`` is swapped for its twin next."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.dense, self.LayerNorm = m.dense, m.LayerNorm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class _ExportAttention(nn.Module):
    """NativeSelfAttention as plain ops (matmul, softmax, matmul); its query / key / value are swapped next."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.query, self.key, self.value = m.query, m.key, m.value
        self.heads, self.scaling = m.num_attention_heads, float(m.scaling)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        q, k, v = self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)
        b, s, w = q.shape
        q4, k4, v4 = (t.reshape(b, s, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q4, k4.transpose(-1, -2)) * self.scaling
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros(attention_mask.shape, dtype=scores.dtype).masked_fill(~attention_mask, -1e30)
            scores = scores + attention_mask
        out = torch.matmul(scores.softmax(-1), v4)
        return out.transpose(1, 2).reshape(b, s, w), None


class _WeightOp(Twin):
    """A twin that rebuilds a Linear / Conv2d weight and applies the float op with the layer's geometry."""

    def _geometry(self, op: str, conv: dict[str, Any]) -> None:
        self.op = op
        self.conv = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in conv.items()}

    def apply_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.op == "linear":
            return F.linear(x, w, bias)
        c = self.conv
        return F.conv2d(x, w, bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def channel(self, v: torch.Tensor, dims: int) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over a ``dims``-D weight."""
        return v.float().reshape(-1, *([1] * (dims - 1)))


class ExportClustered(_WeightOp):
    """k-means ClusteredLayer: codes as ``bits`` bit planes (or uint8 for 8 bits), Gather from the codebook.
    With many zero codes (pruned weights) the planes hold only the nonzero codes, placed by a 1-bit mask
    (CumSum over the mask indexes them): ``1 + bits * nonzero / n`` bits per weight."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self._geometry(m.op, m.conv)
        self.shape, self.n, self.bits = tuple(m.shape), int(m.codes.numel()), int(m.bits)
        self.register_buffer("codebook", (m.centroids * m.live).detach().float().clone())
        codes = m.codes.reshape(-1).long()
        nonzero = codes != 0
        self.nnz = int(nonzero.sum())
        self.masked = 0 < self.nnz and self.n + self.bits * self.nnz < self.bits * self.n
        self.register_buffer("mask", pack_bits(nonzero).reshape(1, -1) if self.masked else None)
        if self.bits >= 8 and not self.masked:
            self.register_buffer("codes", m.codes.to(torch.uint8).reshape(-1).clone())
        else:
            self.register_buffer("codes", bit_planes(codes[nonzero] if self.masked else codes, self.bits))
            self.register_buffer("place", (1 << torch.arange(self.bits)).reshape(-1, 1))
            self.min_opset, self.needs = 18, "BitwiseAnd to unpack the code bits"
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.min_opset == 13:
            idx = self.codes.long()
        else:
            idx = (UnpackBits.apply(self.codes, self.nnz if self.masked else self.n) * self.place).sum(0)
        if self.mask is not None:
            keep = UnpackBits.apply(self.mask, self.n)[0]
            idx = torch.where(keep > 0, idx[(torch.cumsum(keep, 0) - 1).clamp(min=0)], 0)
        return self.apply_op(x, self.codebook[idx].reshape(self.shape), self.bias)


class _ExportPacked(_WeightOp):
    """Shared by the binary / ternary twins: packed codes, geometry and the float buffers as stored."""

    min_opset, needs = 18, "BitwiseAnd to unpack the packed weight bits"

    def __init__(self, m: nn.Module, packed: torch.Tensor, names: tuple[str, ...]) -> None:
        super().__init__()
        self._geometry("conv2d" if m.is_conv else "linear", m.geometry_args() if m.is_conv else {})
        self.kernel_size = tuple(m.kernel_size) if m.is_conv else ()
        self.shape, self.n = tuple(m.weight_shape), math.prod(m.weight_shape)
        self.register_buffer("packed", packed.reshape(1, -1).clone())
        for name in names:  # float16 buffers stay float16 in the file, cast where used
            self.register_buffer(name, _buffer(getattr(m, name, None)))

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        b = self.bias
        return y if b is None else y + b.float().reshape((-1, 1, 1) if self.op == "conv2d" else (-1,))


class ExportBinary(_ExportPacked):
    """Packed binary layer: 1-bit signs unpacked to +-1 (times ``scale``); bnn / xnor also binarize the
    input (``x - act_threshold >= 0`` -> +1, else -1) and xnor multiplies by the activation scale."""

    def __init__(self, m: nn.Module) -> None:
        from torchshrink.binary.layers import FULLY_BINARY

        super().__init__(m, m.weight_bits, ("scale", "act_threshold", "bias"))
        self.mode, self.fully_binary = m.mode, m.mode in FULLY_BINARY

    def signs(self) -> torch.Tensor:
        return (UnpackBits.apply(self.packed, self.n)[0] * 2 - 1).float().reshape(self.shape)

    def beta(self, xs: torch.Tensor) -> torch.Tensor:
        """XNOR-Net's activation scale (as ``binary.geometry``): mean |xs| over the inputs (and the kernel window)."""
        if self.op == "linear":
            return xs.abs().mean(-1, keepdim=True)
        kh, kw = self.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw))
        c = self.conv
        return F.conv2d(xs.abs().mean(1, keepdim=True), box, None, c["stride"], c["padding"], c["dilation"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, cs = self.signs(), (-1, 1, 1) if self.op == "conv2d" else (-1,)
        if not self.fully_binary:
            if self.scale is not None:
                w = w * self.channel(self.scale, w.dim())
            return self.add_bias(self.apply_op(x, w))
        xs = x.float() if self.act_threshold is None else x.float() - self.act_threshold.float().reshape(cs)
        y = self.apply_op(torch.where(xs >= 0, 1.0, -1.0), w)
        if self.scale is not None:
            y = y * self.scale.float().reshape(cs)
        if self.mode == "xnor":
            y = y * self.beta(xs)
        return self.add_bias(y)


class ExportTernary(_ExportPacked):
    """Packed ternary layer: 2-bit codes (1: +pos_scale, 2: -neg_scale, 0: 0) unpacked in the graph."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__(m, m.weight_codes, ("pos_scale", "neg_scale", "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = UnpackBits.apply(self.packed, 2 * self.n)[0].reshape(self.n, 2).float()  # code 1: low bit, 2: high bit
        pos, neg, d = bits[:, 0].reshape(self.shape), bits[:, 1].reshape(self.shape), len(self.shape)
        w = pos * self.channel(self.pos_scale, d) - neg * self.channel(self.neg_scale, d)
        return self.add_bias(self.apply_op(x, w))


class _ToFloat(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()


class ExportCast(Twin):
    """CastWrapper: the inner layer's float16 / bfloat16 tensors stay so in the file and are cast to float32
    where used; the input and output are rounded to that dtype as the layer does, the op runs in float32
    (ONNX Runtime's CPU kernels have no bfloat16 Conv / Gemm)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        from torch.nn.utils import parametrize

        self.inner, self.dtype = m.inner, getattr(torch, m.dtype_name)
        for mod in list(self.inner.modules()):
            for name, p in list(mod.named_parameters(recurse=False)):
                if p.is_floating_point():
                    parametrize.register_parametrization(mod, name, _ToFloat(), unsafe=True)
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point():
                    setattr(mod, name, b.float())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        xin = x.to(self.dtype).float() if x.is_floating_point() else x
        out = self.inner(xin, *args, **kwargs)
        return out.to(self.dtype).to(x.dtype if x.is_floating_point() else torch.float32)


def dense_linear(m: nn.Module) -> nn.Linear:
    """A CSR SparseLinear as the dense Linear it equals (zeros stored)."""
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(m.dense_weight())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin.eval()


def _skip_initializer_identities(graph: Any, inits: dict[str, Any]) -> None:
    """The exporter stores equal initializers once and feeds the copies through Identity nodes (the layers of a
    fresh nn.TransformerEncoder are deep copies of one layer): readers of such a copy read the initializer itself,
    and the Identity nodes go."""
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    for n in list(graph.node):
        if n.op_type == "Identity" and n.output[0] in alias:
            graph.node.remove(n)
            continue
        for k, name in enumerate(n.input):
            if name in alias:
                n.input[k] = alias[name]


def finish_blocked(model: Any) -> None:
    """Rewrite every ``torchshrink::DequantizeBlocked`` placeholder of an ONNX ModelProto (in place) into an
    opset-21 DequantizeLinear on an int8 or INT4 initializer of the codes' shape."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    _skip_initializer_identities(graph, inits)
    converted: dict[str, str] = {}  # a layer used several times (ALBERT shares its blocks) has one initializer
    for i, node in enumerate(list(graph.node)):
        if node.domain != DOMAIN:
            continue
        if node.op_type != BLOCKED_OP or (node.input[0] not in inits and node.input[0] not in converted):
            raise ValueError(f"unexpected placeholder node {node.op_type} on {node.input[0]!r}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.input[0] not in converted:
            stored = inits[node.input[0]]
            raw = numpy_helper.to_array(stored).tobytes()
            dtype = onnx.TensorProto.INT4 if attrs["bits"] == 4 else onnx.TensorProto.INT8
            codes = helper.make_tensor(f"{stored.name}.codes", dtype, list(attrs["shape"]), raw, raw=True)
            graph.initializer.remove(stored)
            graph.initializer.append(codes)
            converted[stored.name] = codes.name
        kw = {"axis": attrs["axis"], **({"block_size": attrs["block_size"]} if attrs["block_size"] else {})}
        dq = helper.make_node("DequantizeLinear", [converted[node.input[0]], node.input[1]], list(node.output),
                              name=node.name, **kw)
        graph.node.remove(node)
        graph.node.insert(i, dq)
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
