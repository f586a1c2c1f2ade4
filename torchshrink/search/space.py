"""The search space: per-layer options (keep float, pruning ratio, rank, bit width incl. binary and
ternary) built from the techniques that are registered right now, and the translation of a
per-layer assignment into an ordinary recipe (one stage per technique, ``select.include`` for the
layers it touches and ``select.overrides`` for per-layer values)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from torchshrink.core.config import get_config_class, known_kinds
from torchshrink.core.errors import ConfigError, TorchshrinkError
from torchshrink.core.select import Select, select_modules
from torchshrink.recipe.recipe import Finetune, Recipe, Stage

FLOAT = "float"


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting for one layer: a technique ``kind`` with field values, for some layer types."""

    label: str
    kind: str  # "float" keeps the layer as it is
    fields: tuple[tuple[str, Any], ...] = ()
    types: tuple[str, ...] = ("Linear", "Conv2d")
    conv_kernel_min: int = 1  # e.g. Tucker-2 needs a spatial kernel > 1

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.fields)

    def fits(self, module: nn.Module) -> bool:
        if self.kind == FLOAT:
            return True
        if type(module).__name__ not in self.types:
            return False
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return False
            return max(module.kernel_size) >= self.conv_kernel_min
        return True


def _o(label: str, kind: str, types: tuple[str, ...] = ("Linear", "Conv2d"), k: int = 1, **fields: Any) -> Option:
    return Option(label, kind, tuple(sorted(fields.items())), types, k)


# Candidate settings, most gentle first within a family. A kind that is not registered (not yet
# built, or an optional dependency missing) is simply left out of the space.
CANDIDATES: tuple[Option, ...] = (
    _o(FLOAT, FLOAT),
    *(_o(f"prune{int(s * 100)}", "unstructured", sparsity=s) for s in (0.5, 0.7, 0.8, 0.9, 0.95)),
    _o("rank50", "svd", ("Linear",), ratio=0.5),
    _o("rank25", "svd", ("Linear",), ratio=0.25),
    _o("tucker50", "tucker2", ("Conv2d",), 2, ratio=0.5),
    _o("tucker25", "tucker2", ("Conv2d",), 2, ratio=0.25),
    _o("int8", "weight-only", ("Linear",), bits=8, group_size=0),
    _o("int4", "weight-only", ("Linear",), bits=4, group_size=32),
    _o("int8dyn", "int8-dynamic", ("Linear",)),
    _o("ternary", "twn", keep_first_last=False),
    _o("binary", "bwn", keep_first_last=False),
)
# Stage order: weights that fine-tuning must not touch afterwards come first (binary/ternary layers
# are trained with their STE in their own stage and packed), integer PTQ (no gradient) comes last.
FAMILY_ORDER = {"binarize": 0, "factorize": 1, "prune": 2, "quantize": 3}
TRAINABLE_FAMILIES = {"binarize", "factorize", "prune"}


def available_options(allowed: Iterable[str] | None = None) -> list[Option]:
    """Candidate options whose kind is registered (``allowed``: labels or kinds to keep)."""
    kinds = set(known_kinds())
    keep = set(allowed) if allowed is not None else None
    out = []
    for opt in CANDIDATES:
        if opt.kind != FLOAT and opt.kind not in kinds:
            continue
        if keep is not None and opt.label != FLOAT and opt.label not in keep and opt.kind not in keep:
            continue
        if opt.kind != FLOAT:
            try:
                get_config_class(opt.kind)(**opt.values)
            except (TorchshrinkError, TypeError):
                continue  # the technique changed its fields: leave the option out
        out.append(opt)
    return out


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Per layer (in model order), the options that fit it."""

    layers: tuple[str, ...]
    options: dict[str, tuple[Option, ...]]

    def by_label(self, layer: str, label: str) -> Option:
        for o in self.options[layer]:
            if o.label == label:
                return o
        allowed = ", ".join(o.label for o in self.options[layer])
        raise ConfigError(f"option {label!r} does not apply to layer {layer!r}; allowed: {allowed}")

    def labels(self, layer: str) -> list[str]:
        return [o.label for o in self.options[layer]]

    def without(self, labels: Iterable[str]) -> SearchSpace:
        """This space less the options ``labels`` (e.g. ones that failed to apply while profiling)."""
        gone = set(labels)
        return dataclasses.replace(self, options={k: tuple(o for o in v if o.label not in gone)
                                                  for k, v in self.options.items()})

    def size(self) -> int:
        n = 1
        for layer in self.layers:
            n *= len(self.options[layer])
        return n

    def uniform(self, label: str) -> dict[str, str]:
        """The same option on every layer it fits; float elsewhere."""
        return {layer: (label if label in self.labels(layer) else FLOAT) for layer in self.layers}


def build_space(model: nn.Module, *, select: Select | None = None, allowed: Iterable[str] | None = None,
                min_params: int = 0) -> SearchSpace:
    """Layers of ``model`` (Linear / Conv2d, or those ``select`` picks) with the options that fit.

    Layers with fewer than ``min_params`` weights are kept float (not searched)."""
    opts = available_options(allowed)
    layers, table = [], {}
    for name, module in select_modules(model, select, ("Linear", "Conv2d")):
        w = getattr(module, "weight", None)
        if w is None or w.numel() < min_params:
            continue
        fit = tuple(o for o in opts if o.fits(module))
        if len(fit) > 1:
            layers.append(name)
            table[name] = fit
    if not layers:
        raise ConfigError(f"nothing to search in {type(model).__name__}: no Linear/Conv2d layer with "
                          f">= {min_params} weights has a compression option (registered kinds: {', '.join(known_kinds())})")
    return SearchSpace(tuple(layers), table)


def _common(values: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The most frequent field values: the stage's base config; other layers get overrides."""
    counts = Counter(tuple(sorted(v.items())) for v in values)
    return dict(counts.most_common(1)[0][0])


def assignment_to_recipe(
    space: SearchSpace,
    assignment: Mapping[str, str],
    *,
    name: str = "searched",
    finetune: Finetune | None = None,
) -> Recipe:
    """An ordinary recipe for ``{layer: option label}``: one stage per technique.

    Layers that are not in ``assignment`` or are assigned ``float`` are kept float."""
    groups: dict[str, list[tuple[str, Option]]] = {}
    for layer in space.layers:
        label = assignment.get(layer, FLOAT)
        opt = space.by_label(layer, label)
        if opt.kind != FLOAT:
            groups.setdefault(opt.kind, []).append((layer, opt))
    stages = []
    order = sorted(groups, key=lambda k: (FAMILY_ORDER.get(get_config_class(k).family, 9), k))
    for kind in order:
        members = groups[kind]
        cls = get_config_class(kind)
        base = _common([o.values for _, o in members])
        overrides = {}
        for layer, o in members:
            diff = {k: v for k, v in o.values.items() if base.get(k) != v}
            if diff:
                overrides[layer] = diff
        select = Select(include=tuple(layer for layer, _ in members), overrides=overrides)
        ft = finetune if (finetune is not None and finetune.epochs > 0 and cls.family in TRAINABLE_FAMILIES) else None
        stages.append(Stage(cls(**base), select, ft, "finetune"))
    if not stages:
        raise ConfigError("the chosen point keeps every layer float: there is no recipe to write")
    return Recipe(name, tuple(stages))


def describe(assignment: Mapping[str, str]) -> str:
    """Compact text of an assignment, e.g. ``features.0=ternary classifier.1=prune90``."""
    return " ".join(f"{k}={v}" for k, v in assignment.items() if v != FLOAT) or "(all float)"
