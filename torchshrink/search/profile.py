"""Per-layer profile of every option, measured on this machine: latency of the compressed layer on
the activation it really sees, bytes it adds to the saved file, and (optionally) the model's quality
with only that layer changed (the sensitivity table).

Each option is applied once to all layers it fits (the technique's own handler, one deep copy),
then each layer's modules are timed interleaved against each other. The model-level latency
prediction is ``residual + sum(layer latency of the chosen option)``, where the residual is the
float model's latency minus the sum of its float layers (activations, pooling, call overhead).
Profiles are cached per machine, model, input and option set in ``<cache>/search/``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchshrink.core.api import run
from torchshrink.core.config import get_config_class
from torchshrink.core.files import write_atomic
from torchshrink.core.select import Select
from torchshrink.core.surgery import get_module, set_module
from torchshrink.export.io import saved_bytes
from torchshrink.measure.latency import threads as pin_threads
from torchshrink.measure.latency import time_interleaved
from torchshrink.measure.machine import machine_info
from torchshrink.search.space import FLOAT, SearchSpace

log = logging.getLogger(__name__)
QualityFn = Callable[[nn.Module], float]
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class LayerProfile:
    """Measured per-layer costs; ``latency_ms[layer][label]``, ``bytes[layer][label]``,
    ``quality[layer][label]`` (percent, model quality with only that layer changed)."""

    layers: list[str]
    latency_ms: dict[str, dict[str, float]]
    bytes: dict[str, dict[str, int]]
    quality: dict[str, dict[str, float]]
    model_ms: float  # whole float model, median
    model_bytes: int
    base_quality: float | None
    threads: int
    machine: dict[str, Any]
    key: str = ""
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # option label -> why it failed to apply

    @property
    def residual_ms(self) -> float:
        return self.model_ms - sum(self.latency_ms[layer][FLOAT] for layer in self.layers)

    def predict_ms(self, assignment: Mapping[str, str]) -> float:
        return self.residual_ms + sum(self.latency_ms[layer][assignment.get(layer, FLOAT)] for layer in self.layers)

    def predict_latency_ratio(self, assignment: Mapping[str, str]) -> float:
        return self.predict_ms(assignment) / self.model_ms

    def predict_bytes(self, assignment: Mapping[str, str]) -> int:
        return self.model_bytes + sum(
            self.bytes[layer][assignment.get(layer, FLOAT)] - self.bytes[layer][FLOAT] for layer in self.layers
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerProfile:
        return cls(**d)

    def sensitivity_markdown(self) -> str:
        """Quality drop (pp) per layer and option; a blank cell: the option does not fit."""
        labels = sorted({lab for layer in self.layers for lab in self.quality.get(layer, {})} - {FLOAT},
                        key=lambda s: (s.rstrip("0123456789"), s))
        if not labels or self.base_quality is None:
            return "(no sensitivity measured)"
        head = "| layer | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels)
        rows = []
        for layer in self.layers:
            q = self.quality.get(layer, {})
            cells = [f"{self.base_quality - q[lab]:+.2f}" if lab in q else "" for lab in labels]
            rows.append(f"| {layer} | " + " | ".join(cells) + " |")
        return head + "\n" + "\n".join(rows)


def cache_dir() -> Path:
    from torchshrink.core.cache import cache_dir as base

    return base() / "search"


def model_fingerprint(model: nn.Module) -> str:
    """Architecture plus a checksum of the weights (sensitivity depends on them)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.is_floating_point() and t.numel():
            h.update(f"{float(t.double().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def profile_key(model: nn.Module, space: SearchSpace, inputs: Sequence[torch.Tensor], n_threads: int,
                with_quality: bool, extra: str = "") -> str:
    info = machine_info()
    parts = [info["cpu"], info["cpu_id"], ",".join(info["simd"]), info["torch"], str(n_threads), model_fingerprint(model),
             ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in inputs), str(with_quality), extra,
             json.dumps({k: [o.label for o in v] for k, v in space.options.items()}, sort_keys=True)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _capture_inputs(model: nn.Module, layers: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, tuple]:
    seen: dict[str, tuple] = {}
    hooks = []
    for layer in layers:
        def hook(mod: nn.Module, args: tuple, layer: str = layer) -> None:
            seen.setdefault(layer, tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
        hooks.append(get_module(model, layer).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _apply_everywhere(model: nn.Module, space: SearchSpace, label: str, data: Any) -> dict[str, nn.Module]:
    """Apply option ``label`` to every layer it fits, in one call of the technique; return the layers."""
    layers = [layer for layer in space.layers if label in space.labels(layer)]
    opt = space.by_label(layers[0], label)
    cfg = get_config_class(opt.kind)(**opt.values)
    out, _ = run(model, cfg, select=Select(include=tuple(layers)), data=data)  # finalized, untrained
    return {layer: get_module(out, layer) for layer in layers}


def profile_layers(
    model: nn.Module,
    space: SearchSpace,
    inputs: Sequence[torch.Tensor],
    *,
    data: Any = None,
    quality: QualityFn | None = None,
    n_threads: int = 1,
    runs: int = 30,
    warmup: int = 5,
    cache: bool = True,
    cache_extra: str = "",
    progress: Progress | None = None,
) -> LayerProfile:
    """Measure every (layer, option) of ``space`` on this machine; cached (see module doc).

    ``quality(model) -> percent`` adds the sensitivity table (model quality with one layer changed).
    """
    model = model.eval()
    key = profile_key(model, space, inputs, n_threads, quality is not None, cache_extra)
    path = cache_dir() / f"profile-{key}.json"
    if cache and path.is_file():
        try:
            prof = LayerProfile.from_dict(json.loads(path.read_text()))
            log.info("layer profile read from cache %s", path)
            return prof
        except (json.JSONDecodeError, TypeError):
            log.warning("ignoring unreadable profile cache %s", path)
    labels = sorted({o.label for layer in space.layers for o in space.options[layer]} - {FLOAT})
    steps = len(labels) + len(space.layers) + 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"profile: {what}", done, steps)

    modules: dict[str, dict[str, nn.Module]] = {layer: {FLOAT: get_module(model, layer)} for layer in space.layers}
    skipped: dict[str, str] = {}
    for label in labels:
        try:
            applied = _apply_everywhere(model, space, label, data)
        except Exception as e:  # an option that does not apply to this model is left out, not fatal
            skipped[label] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            log.warning("search option %s left out: %s", label, skipped[label])
            applied = {}
        for layer, mod in applied.items():
            modules[layer][label] = mod
        tick(label)
    captured = _capture_inputs(model, space.layers, inputs)
    with pin_threads(n_threads):
        model_ms = time_interleaved({"model": model}, inputs, n_threads=n_threads, warmup=warmup, runs=runs)["model"].p50_ms
        lat: dict[str, dict[str, float]] = {}
        for layer in space.layers:
            args = captured[layer]
            calls = {lab: (lambda m=m, args=args: m(*args)) for lab, m in modules[layer].items()}
            t = time_interleaved(calls, n_threads=n_threads, warmup=warmup, runs=runs)
            lat[layer] = {lab: t[lab].p50_ms for lab in calls}
            tick(layer)
    size = {layer: {lab: saved_bytes(m) for lab, m in mods.items()} for layer, mods in modules.items()}
    qual: dict[str, dict[str, float]] = {}
    base_q = None
    if quality is not None:
        work = copy.deepcopy(model)
        base_q = float(quality(work))
        for layer in space.layers:
            qual[layer] = {FLOAT: base_q}
            for lab, m in modules[layer].items():
                if lab == FLOAT:
                    continue
                old = set_module(work, layer, m)
                try:
                    qual[layer][lab] = float(quality(work))
                finally:
                    set_module(work, layer, old)
    tick("whole model")
    prof = LayerProfile(list(space.layers), lat, size, qual, model_ms, saved_bytes(model), base_q,
                        n_threads, machine_info(), key, skipped)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(prof.to_dict(), indent=1))
    return prof


def plot_sensitivity(profile: LayerProfile, path: str | Path) -> Path | None:
    """Quality drop vs option per layer as a PNG (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no sensitivity plot")
        return None
    if profile.base_quality is None:
        return None
    labels = sorted({lab for q in profile.quality.values() for lab in q} - {FLOAT})
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.7), 4))
    for layer in profile.layers:
        q = profile.quality[layer]
        xs = [i for i, lab in enumerate(labels) if lab in q]
        ax.plot(xs, [profile.base_quality - q[labels[i]] for i in xs], marker="o", label=layer)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_ylabel("quality drop (pp), no fine-tuning")
    ax.set_title("per-layer sensitivity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
