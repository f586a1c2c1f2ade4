"""Static INT8 PTQ for CNNs on PyTorch's quantized kernels.

trace (torch.fx) -> fold BatchNorm into the preceding Conv2d -> fuse ReLU into Conv/Linear/add ->
calibrate (observers on every value that enters or leaves an integer op) -> convert: Int8Conv2d /
Int8Linear / QuantizedAdd on quint8 activations; quantize at the entry of each integer region,
dequantize where a float op needs its input. Pools / flatten / relu run on quantized tensors.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchshrink.core import state
from torchshrink.core.config import Config, check_range, register
from torchshrink.core.errors import DataError, UnsupportedLayerError
from torchshrink.core.report import carry, current
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.quant.common import Engine, calibration_batches, note_float, resolve_engine
from torchshrink.quant.modules import DequantizeActivation, Int8Conv2d, Int8Linear, QuantizeActivation, QuantizedAdd
from torchshrink.quant.observers import Observer, make_observer

_RELU_FN = (torch.relu, F.relu)
_ADD_FN = (operator.add, operator.iadd, torch.add)
_PASS_MODULES = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.ReLU, nn.Identity, nn.Dropout)
_PASS_FN = (torch.flatten, torch.relu, F.relu, F.max_pool2d, F.adaptive_avg_pool2d, torch.nn.functional.dropout)
_PASS_METHODS = ("view", "reshape", "flatten", "relu", "contiguous", "size", "dim")


class _Fused(nn.Module):
    """Float stand-in during calibration: (folded) conv/linear [+ relu], or add [+ relu]."""

    def __init__(self, kind: str, layer: nn.Module | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 relu: bool, src: str) -> None:
        super().__init__()
        self.kind, self.layer, self.relu, self.src = kind, layer, relu, src
        self.weight, self.bias = weight, bias

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.kind == "add":
            y = args[0] + args[1]
        elif self.kind == "conv":
            c = self.layer
            assert isinstance(c, nn.Conv2d)
            y = F.conv2d(args[0], self.weight, self.bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            y = F.linear(args[0], self.weight, self.bias)
        return torch.relu(y) if self.relu else y


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), nn.ReLU)
    return (n.op == "call_function" and n.target in _RELU_FN) or (n.op == "call_method" and n.target in ("relu", "relu_"))


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0])
    inv = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(b)
    return w * inv.reshape(-1, 1, 1, 1), (b - bn.running_mean) * inv + beta


def fuse_graph(gm: fx.GraphModule, targets: set[str]) -> fx.GraphModule:
    """Replace Conv2d(+BN)(+ReLU), Linear(+ReLU), add(+ReLU) by _Fused modules (in place)."""
    g = gm.graph
    count = 0
    for n in list(g.nodes):
        kind, layer, w, b = None, None, None, None
        if n.op == "call_module" and str(n.target) in targets:
            layer = gm.get_submodule(str(n.target))
            kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
            w = layer.weight.detach().float()
            b = layer.bias.detach().float() if layer.bias is not None else None
        elif (n.op == "call_function" and n.target in _ADD_FN) or (n.op == "call_method" and n.target in ("add", "add_")):
            if len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) and not n.kwargs:
                kind = "add"
        if kind is None:
            continue
        last = n
        users = list(last.users)
        if kind == "conv" and len(users) == 1 and users[0].op == "call_module" and \
                isinstance(gm.get_submodule(str(users[0].target)), nn.BatchNorm2d):
            w, b = _fold_bn(layer, gm.get_submodule(str(users[0].target)))  # type: ignore[arg-type]
            last = users[0]
            users = list(last.users)
        relu = len(users) == 1 and _is_relu(gm, users[0])
        if relu:
            last = users[0]
        name = f"_ts_fused_{count}"
        count += 1
        fused = _Fused(kind, layer, w, b, relu, str(n.target) if kind != "add" else n.name)
        chain, node = [], last  # what it replaces, in the user's names: conv1+bn1+relu
        while True:
            chain.append(str(node.target) if node.op == "call_module" else node.name)
            if node is n:
                break
            node = node.args[0]  # type: ignore[assignment]
        state.put(fused, fused_from="+".join(reversed(chain)))
        gm.add_module(name, fused)
        with g.inserting_after(last):
            new = g.call_module(name, tuple(n.args[:2]) if kind == "add" else (n.args[0],))
        last.replace_all_uses_with(new)
        # erase the replaced chain (last -> ... -> n)
        chain = [last]
        while chain[-1] is not n:
            chain.append(chain[-1].args[0])  # type: ignore[arg-type]
        for old in chain:
            g.erase_node(old)
    g.lint()
    gm.recompile()
    return gm


class _Calibrator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[str, Observer]) -> None:
        super().__init__(gm)
        self.watch = watch

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.watch and isinstance(out, torch.Tensor):
            self.watch[n.name].update(out)
        return out


def _is_pass(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _PASS_MODULES)
    if n.op == "call_function":
        return n.target in _PASS_FN
    return n.op == "call_method" and n.target in _PASS_METHODS


def convert_graph(gm: fx.GraphModule, observers: dict[str, Observer], engine: str, bits: dict[str, int]) -> fx.GraphModule:
    g = gm.graph
    quantized: set[str] = set()
    qcache: dict[str, fx.Node] = {}
    dq_cache: dict[str, fx.Node] = {}
    gm.add_module("_ts_dequant", DequantizeActivation())
    k = 0

    def as_q(a: fx.Node, before: fx.Node) -> fx.Node:
        nonlocal k
        if a.name in quantized:
            return a
        if a.name not in qcache:
            s, z = observers[a.name].qparams(bits=8, signed=False, symmetric=False)
            name = f"_ts_quant_{k}"
            k += 1
            gm.add_module(name, QuantizeActivation(s, z))
            with g.inserting_after(a):
                qcache[a.name] = g.call_module(name, (a,))
        return qcache[a.name]

    def as_f(a: fx.Node) -> fx.Node:
        if a.name not in quantized:
            return a
        if a.name not in dq_cache:
            with g.inserting_after(a):
                dq_cache[a.name] = g.call_module("_ts_dequant", (a,))
        return dq_cache[a.name]

    for n in list(g.nodes):
        if n.op == "call_module" and str(n.target).startswith("_ts_fused_"):
            f = gm.get_submodule(str(n.target))
            s, z = observers[n.name].qparams(bits=8, signed=False, symmetric=False)
            if f.kind == "add":
                new_mod: nn.Module = QuantizedAdd(f.relu, s, z)
            elif f.kind == "conv":
                new_mod = Int8Conv2d.from_float(f.weight, f.bias, f.layer, relu=f.relu, out_scale=s, out_zero_point=z,
                                                engine=engine, bits=bits.get(f.src, 8))
            else:
                new_mod = Int8Linear.from_float(f.weight, f.bias, relu=f.relu, out_scale=s, out_zero_point=z,
                                                engine=engine, bits=bits.get(f.src, 8))
            state.put(new_mod, fused_from=state.get(f, "fused_from"))
            setattr(gm, str(n.target), new_mod)
            n.args = tuple(as_q(a, n) if isinstance(a, fx.Node) else a for a in n.args)
            quantized.add(n.name)
        elif n.op == "output":
            n.args = tuple(fx.node.map_arg(n.args, as_f) for _ in [0])[0]
        elif n.op in ("call_module", "call_function", "call_method"):
            first = n.args[0] if n.args else None
            if _is_pass(gm, n) and isinstance(first, fx.Node) and first.name in quantized:
                if not (n.op == "call_method" and n.target in ("size", "dim")):
                    quantized.add(n.name)
                continue
            n.args = fx.node.map_arg(n.args, as_f)
            n.kwargs = fx.node.map_arg(n.kwargs, as_f)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


SATURATION = 1e-3  # share of a layer's outputs more than one step off the exact integer result


def _exact_codes(mod: Int8Conv2d | Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer's integer arithmetic gives exactly (int32 accumulation, float requantization), as uint8."""
    w = mod.dequantized_weight()
    xf = x.dequantize()
    y = (F.conv2d(xf, w, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
         if isinstance(mod, Int8Conv2d) else F.linear(xf, w, mod.bias))
    if mod.relu:
        y = F.relu(y)
    return torch.clamp(torch.round(y / mod.out_scale) + mod.out_zero_point, 0, 255)


def narrow_saturating(gm: fx.GraphModule, inputs: tuple) -> dict[str, float]:
    """Run the converted graph once on a calibration batch and measure each integer layer against its exact
    integer result. x86 kernels that multiply uint8 activations by int8 weights in pairs summed in int16
    (``vpmaddubsw``) saturate when both are near full range: fbgemm's 3x3 depthwise convolution does so even on
    VNNI CPUs (timm's EfficientNet-B0: torch INT8 cosine 0.964 vs float, the exact integer math 0.995), and on CPUs
    without VNNI every GEMM may. A layer with more than SATURATION of its outputs off by more than one step gets
    7-bit weights (pairs then stay within int16), and is named in the report; others are untouched."""
    taps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class _Tap(fx.Interpreter):
        def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_module(target, args, kwargs)
            mod = self.module.get_submodule(str(target))
            if isinstance(mod, Int8Conv2d | Int8Linear) and args and isinstance(args[0], torch.Tensor):
                taps[str(target)] = (args[0], out)
            return out

    with torch.no_grad():
        _Tap(gm).run(*inputs)
        narrowed: dict[str, float] = {}
        for name, (x, y) in taps.items():
            mod = gm.get_submodule(name)
            if mod.qweight.abs().max() <= 63:
                continue
            off = float(((y.int_repr().float() - _exact_codes(mod, x)).abs() > 1).float().mean())
            if off > SATURATION:
                mod._set_int8_weight(mod.dequantized_weight(), mod.bias, bits=7)
                narrowed[name] = off
    if narrowed:
        src = {n: state.get(gm.get_submodule(n), "fused_from") or n for n in narrowed}
        current(gm).notes["narrowed_weights"] = {
            str(src[n]): f"{off:.1%} of outputs were off the exact integer result (the int8 kernel saturates int16 "
                         "pair sums): 7-bit weights" for n, off in narrowed.items()}
    return narrowed


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with torchshrink's own compressed modules kept as calls (leaves): an earlier stage's CSR
    SparseLinear branches on the batch size, and no compressed module is for static INT8 to look inside."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__.startswith("torchshrink.") or super().is_leaf_module(m, module_qualified_name)


def fx_trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with torch.fx, or the one UnsupportedLayerError static INT8 gives for a model that does not
    trace (Hugging Face transformers, data-dependent Python): the compress runner asks before any stage runs."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # fx raises many types for untraceable code
        raise UnsupportedLayerError(
            f"static INT8 needs a torch.fx-traceable model; tracing {type(model).__name__} failed: "
            f"{(str(e).splitlines() or [type(e).__name__])[0]}. Use int8-dynamic or weight-only for this model"
        ) from None


def apply_int8_static(model: nn.Module, config: Int8StaticConfig, *, select: Select | None = None,
                      data: Any = None, **_: Any) -> nn.Module:
    batches = calibration_batches(data, config.calib_batches)
    chosen = select_modules(model, select, ("Conv2d", "Linear"))
    targets: set[str] = set()
    bits: dict[str, int] = {}
    floats: dict[str, str] = {}
    for name, m in chosen:
        if type(m) is nn.Conv2d and m.padding_mode == "zeros":
            targets.add(name)
        elif type(m) is nn.Linear:
            targets.add(name)
        else:
            floats[name] = f"{type(m).__name__} has no static INT8 kernel here (Conv2d with zero padding and Linear only)"
            continue
        bits[name] = config_for(name, config, select).weight_bits
    gm = fx_trace(model)
    carry(model, gm)  # notes about this kind land in its report
    gm = fuse_graph(gm, targets)
    watch: dict[str, Observer] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith("_ts_fused_"):
            for a in [n, *[x for x in n.args if isinstance(x, fx.Node)]]:
                watch.setdefault(a.name, make_observer(config.observer))
    cal = _Calibrator(gm, watch)
    gm.eval()
    signature = inspect.signature(gm.forward)  # the traced forward's parameters, in placeholder order
    runs: list[tuple] = []  # each batch's inputs in placeholder order
    with torch.no_grad():
        for b in batches:
            try:
                bound = signature.bind(*b.inputs, **b.kwargs)  # keyword inputs go to their placeholders
                bound.apply_defaults()
                cal.run(*bound.args)
                runs.append(bound.args)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                shapes = [tuple(t.shape) for t in (*b.inputs, *b.kwargs.values()) if isinstance(t, torch.Tensor)]
                raise DataError(f"calibration batch of shapes {shapes} does not fit the model: "
                                f"{str(e).splitlines()[0]}") from None
    out = convert_graph(gm, watch, resolve_engine(config.engine), bits)
    narrow_saturating(out, runs[0])
    for name, reason in floats.items():
        note_float(out, name, reason)
    current(out).notes["backend"] = f"torch.ops.quantized conv2d/linear/add ({resolve_engine(config.engine)} engine)"
    return out.eval()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8StaticConfig(Config):
    """Static INT8: calibrated quint8 activations, int8 per-channel weights, BN folding and ReLU fusion,
    for torch.fx-traceable CNNs. ``weight_bits`` < 8 (also per layer via overrides) restricts the
    int8 weight grid (mixed precision on the same kernels)."""

    kind = "int8-static"
    family = "quantize"
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    calib_batches: int = 16
    weight_bits: int = 8
    engine: Engine = "auto"

    def validate(self) -> None:
        check_range("int8-static.calib_batches", self.calib_batches, 1, 100000)
        check_range("int8-static.weight_bits", self.weight_bits, 2, 8)


register(Int8StaticConfig, apply_int8_static)


__all__ = ["Int8StaticConfig", "apply_int8_static", "convert_graph", "fuse_graph"]
