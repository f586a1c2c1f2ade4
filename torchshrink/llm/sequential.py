"""Layer-by-layer weight quantization of a decoder LM with bounded memory: the calibration inputs of
the first decoder layer are captured once, then each layer in turn collects its Linears' Hessians
``X^T X`` from those inputs, is quantized, and is run again (quantized) to give the next layer its
inputs. Only one layer's activations for the calibration set are held at a time; the embedding and
the LM head stay in float (tied to the embedding in most small LMs)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from torchshrink.core.errors import ConfigError, DataError
from torchshrink.core.surgery import set_module
from torchshrink.llm.awq import awq_layer
from torchshrink.llm.models import decoder_layers
from torchshrink.llm.modules import PackedLinear
from torchshrink.llm.wquant import Grid, Quantized, gptq, layer_error, rtn

METHODS = ("rtn", "gptq", "awq", "awq+gptq")


class _Stop(Exception):
    pass


def capture_inputs(model: nn.Module, layer: nn.Module, samples: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The first decoder layer's hidden-state input for each calibration sample (rows of ``samples``),
    and the keyword arguments the model passes it (rotary embeddings, masks), taken from the first."""
    got: list[torch.Tensor] = []
    kw: dict[str, Any] = {}

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.pop("hidden_states")
        got.append(x.detach())
        if not kw:
            kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in samples:
                try:
                    model(input_ids=row[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    kw["use_cache"] = False
    return got, kw


def _run(layer: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


@dataclasses.dataclass
class LayerStep:
    """One decoder layer of a layer-by-layer pass: its qualified name, its Linears, and the calibration
    inputs it receives (the previous layers already changed) with the keyword arguments to run it."""

    name: str
    layer: nn.Module
    linears: dict[str, nn.Module]
    inputs: list[torch.Tensor]
    kwargs: dict[str, Any]

    def run(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _run(mod, x, self.kwargs)


def layer_steps(model: nn.Module, samples: torch.Tensor | None, what: str, *, data_aware: bool) -> Iterator[LayerStep]:
    """Walk the decoder layers in order with bounded memory (one layer's calibration activations at a
    time). The caller changes ``step.layer`` in place; the next step's inputs are then that layer's
    outputs on its own inputs. Without ``data_aware`` no inputs are captured. The model is in eval mode
    during the walk and its training flag is restored after."""
    prefix, layers = decoder_layers(model)
    if data_aware and (samples is None or samples.dim() != 2 or samples.shape[0] < 1):
        raise DataError(f"{what} needs calibration token rows [n_samples, seq_len]; give samples=")

    def walk() -> Iterator[LayerStep]:
        was = model.training
        model.eval()
        try:
            inps, kw = capture_inputs(model, layers[0], samples) if data_aware else ([], {})
            for li, layer in enumerate(layers):
                linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
                yield LayerStep(f"{prefix}.{li}", layer, linears, inps, kw)
                if inps:
                    with torch.no_grad():
                        inps = [_run(layer, x, kw) for x in inps]
        finally:
            model.train(was)

    return walk()


class LMQuantResult(NamedTuple):
    codes: dict[str, Quantized]
    layers: list[LayerReport]
    alphas: dict[str, dict[str, float]]


def hessians(layer: nn.Module, linears: dict[str, nn.Module], inps: list[torch.Tensor],
             kw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of each Linear's inputs over the calibration inputs of its layer."""
    hess = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
    count = dict.fromkeys(linears, 0)

    def make(n: str) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hess[n].addmm_(x.T, x)
            count[n] += x.shape[0]
        return hook

    hooks = [m.register_forward_pre_hook(make(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for x in inps:
                _run(layer, x, kw)
    finally:
        for h in hooks:
            h.remove()
    return {n: h / max(count[n], 1) for n, h in hess.items()}


@dataclasses.dataclass
class LayerReport:
    name: str
    grid: str
    error: float  # relative output error on the calibration inputs (tr dW H dW^T / tr W H W^T)


def quantize_lm(model: nn.Module, grid: Grid, *, method: str = "gptq", samples: torch.Tensor | None = None,
                damp: float = 0.01, act_order: bool = True, static_groups: bool = True, pack: bool = False,
                on_layer: Callable[[int, float], None] | None = None) -> LMQuantResult:
    """Quantize every Linear of every decoder layer in place (weights become their dequantized grid values)
    and return the codes by qualified name, one report line per Linear, and AWQ's alpha per scaled group.
    ``method``: rtn | gptq | awq (AWQ scales, then round to nearest) | awq+gptq. ``samples``: calibration
    token rows ``[n, seq]`` (every method but rtn needs them). ``pack``: replace each Linear by a
    :class:`~torchshrink.llm.modules.PackedLinear` holding its codes (what ``ts.save`` writes)."""
    if method not in METHODS:
        raise DataError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    _, layers = decoder_layers(model)
    widths = sorted({m.in_features for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)})
    if grid.group and widths and all(w % grid.group for w in widths):
        raise ConfigError(f"group={grid.group} divides no layer's input width ({', '.join(map(str, widths))}); "
                          "use a group that divides them (32, 64, 128) or 0 for one scale per output channel")
    steps = layer_steps(model, samples, method, data_aware=method != "rtn")
    codes: dict[str, Quantized] = {}
    reports: list[LayerReport] = []
    alphas: dict[str, dict[str, float]] = {}
    for li, step in enumerate(steps):
        t0 = time.perf_counter()
        if method.startswith("awq"):
            alphas[step.name] = awq_layer(step.layer, step.inputs, step.run, grid)
        hess = hessians(step.layer, step.linears, step.inputs, step.kwargs) if method.endswith("gptq") else {}
        for n, m in step.linears.items():
            w = m.weight.detach()
            if method.endswith("gptq"):
                q = gptq(w, hess[n], grid, damp=damp, act_order=act_order, static_groups=static_groups)
                err = layer_error(w, q, hess[n])
            else:
                q = rtn(w, grid)
                err = float((q.dequantized() - w.float()).pow(2).sum() / w.float().pow(2).sum().clamp_min(1e-30))
            with torch.no_grad():
                m.weight.copy_(q.dequantized().to(m.weight.dtype))
            full = f"{step.name}.{n}"
            codes[full] = q
            if pack and (q.grid.bits == 8 or m.in_features % 2 == 0):
                set_module(step.layer, n, PackedLinear.from_quantized(m, q))
            reports.append(LayerReport(full, q.grid.label, err))
        if on_layer is not None:
            on_layer(li, time.perf_counter() - t0)
    if pack:
        from torchshrink.export.hf_guard import guard_save_pretrained

        guard_save_pretrained(model)
    return LMQuantResult(codes, reports, alphas)
