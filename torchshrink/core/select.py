"""Layer selection shared by every technique: by module type, by qualified-name pattern
(glob, or a regular expression prefixed with ``re:``), exclusions, and per-layer overrides."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import inspect
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.errors import ConfigError, LayerNotFoundError
from torchshrink.core.surgery import FAST_PATH_CHILDREN, get_module, parent_of

_WILDCARDS = set("*?[")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Select:
    """Which layers a stage touches.

    - ``types``: module class names (``"Linear"``, ``"Conv2d"``) or dotted paths; empty = the
      technique's default types.
    - ``include``: name patterns; empty = every module of the selected types.
    - ``exclude``: name patterns removed afterwards.
    - ``overrides``: ``{pattern: {field: value}}`` per-layer config changes (e.g. a sparsity).

    A pattern without wildcards must name an existing module exactly, so a typo is an error
    rather than a silent no-op.
    """

    types: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("types", "include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"select.{name} must be a list of strings, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        if not isinstance(self.overrides, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in self.overrides.items()
        ):
            raise ConfigError("select.overrides must map a layer pattern to a mapping of fields")
        for pat in (*self.include, *self.exclude, *self.overrides):
            _compile(pat)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Select:
        if data is None:
            return cls()
        if isinstance(data, Select):
            return data
        allowed = {f.name for f in dataclasses.fields(cls)}
        bad = [k for k in data if k not in allowed]
        if bad:
            raise ConfigError(f"unknown select field {bad[0]!r}; allowed: {', '.join(sorted(allowed))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "types": list(self.types),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {k: dict(v) for k, v in self.overrides.items()},
        }


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"invalid regular expression {pattern!r}: {e}") from None
    return re.compile(fnmatch.translate(pattern))


def name_matches(name: str, pattern: str) -> bool:
    rx = _compile(pattern)
    return bool(rx.fullmatch(name)) if not pattern.startswith("re:") else bool(rx.search(name))


def _is_exact(pattern: str) -> bool:
    return not pattern.startswith("re:") and not (_WILDCARDS & set(pattern))


def _type_matches(module: nn.Module, types: Iterable[str | type]) -> bool:
    for t in types:
        if isinstance(t, type):
            if isinstance(module, t):
                return True
            continue
        for klass in type(module).__mro__:
            if t in (klass.__name__, f"{klass.__module__}.{klass.__qualname__}"):
                return True
    return False


def check_names(model: nn.Module, select: Select | None) -> None:
    """Every pattern without wildcards must name an existing module (a typo is an error)."""
    if select is None:
        return
    names = {n for n, _ in model.named_modules() if n}
    for pat in (*select.include, *select.exclude, *select.overrides):
        if _is_exact(pat) and pat not in names:
            close = difflib.get_close_matches(pat, sorted(names), n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise LayerNotFoundError(
                f"no layer named {pat!r} in {type(model).__name__}{hint} "
                "(use `torchshrink inspect` to list layer names; globs like 'layer1.*' and 're:' patterns work)"
            )


def select_modules(
    model: nn.Module,
    select: Select | None,
    default_types: Iterable[str | type] = ("Linear", "Conv2d"),
    *,
    allow_empty: bool = False,
    replaces: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Return ``[(qualified_name, module)]`` chosen by ``select``, in model order.

    ``replaces``: the technique swaps each chosen module for another class. A module whose parent's ``forward``
    reads its ``.weight`` / ``.bias`` itself (torchvision's Swin hands ``self.qkv.weight`` to a function, T5's
    feed-forward checks ``self.wo.weight.dtype``) is then left out and reported as skipped: swapped, it would
    either crash the model or be bypassed by it."""
    select = select or Select()
    types = select.types or tuple(default_types)
    check_names(model, select)
    chosen = []
    for name, module in model.named_modules():
        if not name or not _type_matches(module, types):
            continue
        if select.include and not any(name_matches(name, p) for p in select.include):
            continue
        if any(name_matches(name, p) for p in select.exclude):
            continue
        if replaces and (why := _read_by_parent(model, name)):
            from torchshrink.core.report import current

            current(model).skipped[name] = why
            continue
        chosen.append((name, module))
    if not chosen and not allow_empty:
        tnames = ", ".join(t if isinstance(t, str) else t.__name__ for t in types)
        raise LayerNotFoundError(
            f"the selection matched no layer of {type(model).__name__} (types: {tnames}; "
            f"include: {list(select.include) or 'all'}; exclude: {list(select.exclude) or 'none'})"
        )
    return chosen


def is_plain(m: nn.Module, *classes: type[nn.Module]) -> bool:
    """``m`` is one of ``classes`` (nn.Linear, nn.Conv2d) or a subclass measured to compute the same: libraries wrap
    nn.Linear with the same math (timm's ``Linear`` casts for AMP; its ``Conv2dSame`` pads differently and fails the
    check). Compressed replacements reproduce the plain layer's math, so a subclass that computes anything else
    (another padding, an extra scale) is left alone."""
    if type(m) in classes:
        return True
    base = next((c for c in classes if isinstance(m, c)), None)
    if base is None or not isinstance(getattr(m, "weight", None), torch.Tensor) or m.weight.device.type == "meta":
        return False
    if type(m).forward is base.forward:
        return True
    return _computes_like(m, base)


def _computes_like(m: nn.Module, base: type[nn.Module]) -> bool:
    g = torch.Generator().manual_seed(0)
    w = m.weight
    try:
        with torch.no_grad():
            if base is nn.Linear:
                x = torch.randn(3, w.shape[1], generator=g).to(w.dtype)
                ref = F.linear(x, w, m.bias)
            elif base is nn.Conv2d and m.padding_mode == "zeros":
                k = max(d * (s - 1) + 1 for d, s in zip(m.dilation, m.kernel_size, strict=True))
                x = torch.randn(1, m.in_channels, k + 5, k + 6, generator=g).to(w.dtype)
                ref = F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
            else:
                return False
            out = m(x)
    except Exception:  # noqa: BLE001 - a layer that cannot run the probe is not taken for a plain one
        return False
    return isinstance(out, torch.Tensor) and out.shape == ref.shape and bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5))


_PARAM_READ = r"self\.{}\.(weight|bias)\b"


@functools.cache
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # defined where no source is kept (a REPL, a compiled extension)
        return ""


def _read_by_parent(model: nn.Module, name: str) -> str | None:
    """Why ``name`` cannot be swapped for another module, when the forward of its parent -- or of any module above
    it, through the attribute path (Hugging Face's ViTModel reads ``self.embeddings.patch_embeddings.projection
    .weight.dtype``) -- reads its parameters."""
    parts = name.split(".")
    parent, child = parent_of(model, name)
    if isinstance(parent, nn.TransformerEncoderLayer) and child in FAST_PATH_CHILDREN:
        return None  # read only on its fused fast path, which set_module switches off for a swapped child
    for k in range(len(parts) - 1, -1, -1):  # the parent first, then up to the root
        rel = parts[k:]
        if not all(p.isidentifier() for p in rel):
            break  # an indexed child (layers.0) is not read as an attribute path from above
        owner = get_module(model, ".".join(parts[:k]))
        if isinstance(owner, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            continue
        path = ".".join(rel)
        found = re.search(_PARAM_READ.format(re.escape(path)), _forward_source(type(owner)))
        if found is not None:
            return (f"{type(owner).__name__}.forward reads self.{path}.{found.group(1)} itself: a swapped-in module "
                    "would break or be bypassed by it, so it stays as it is")
    return None


def overrides_for(name: str, select: Select | None) -> dict[str, Any]:
    """Merged per-layer field overrides for ``name`` (later patterns win)."""
    out: dict[str, Any] = {}
    if select:
        for pat, fields in select.overrides.items():
            if name_matches(name, pat):
                out.update(fields)
    return out


def config_for(name: str, config: Any, select: Select | None) -> Any:
    """The config for one layer: ``config`` with that layer's overrides applied (and validated)."""
    changes = overrides_for(name, select)
    if not changes:
        return config
    allowed = {f.name for f in dataclasses.fields(config)}
    bad = [k for k in changes if k not in allowed]
    if bad:
        raise ConfigError(
            f"override for layer {name!r} sets unknown field {bad[0]!r} of kind {config.kind!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return dataclasses.replace(config, **changes)
