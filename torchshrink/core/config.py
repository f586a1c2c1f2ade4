"""Config base class, the kind -> (config class, handler) registry, and the YAML/JSON round trip.

A config is a frozen, keyword-only dataclass with a class-level ``kind``. Only registered config
classes can be built from YAML/JSON (an allow-list: no arbitrary object construction). The technique
packages register their kinds when ``torchshrink`` is imported (``torchshrink/techniques.py``), which
importing any of its modules does first; core itself imports no technique.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import reprlib
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from torchshrink.core.errors import ConfigError, UnknownKindError

C = TypeVar("C", bound="Config")

MAX_DEPTH = 50  # a config / recipe is a few levels deep; thousands of levels would overflow Python's stack
MAX_VALUES = 100_000  # YAML aliases can repeat a subtree exponentially often
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 6, 80, 80


def short(value: Any) -> str:
    """repr() cut to a line: an error message quoting a value read from a file must not print all of it (a
    YAML alias bomb's repr took 88 s)."""
    return _SHORT.repr(value)


def too_big(data: Any) -> bool:
    """Nested deeper than MAX_DEPTH (an alias cycle is infinitely deep) or more than MAX_VALUES values,
    found without recursion."""
    todo, seen = [(data, 1)], 0
    while todo:
        item, depth = todo.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_VALUES:
            return True
        if isinstance(item, dict):
            todo += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list | tuple):
            todo += [(v, depth + 1) for v in item]
    return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every technique config.

    Subclasses are decorated with ``@dataclasses.dataclass(frozen=True, kw_only=True)`` and
    :func:`register`; they set ``kind`` (unique name) and ``family`` (``prune``, ``quantize``,
    ``factorize``, ``binarize`` or ``distill``; casting is a ``quantize`` kind) and implement :meth:`validate`.
    """

    kind: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field and what is allowed."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Config):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _coerce_fields(cfg: Config) -> None:
    """YAML gives lists and ints where the dataclass wants tuples and floats: coerce, and check
    Literal fields, so every config validates the same way whether built in Python or from a file."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        new = _coerce(value, hints.get(f.name, Any), f"{cfg.kind}.{f.name}")
        if new is not value:
            object.__setattr__(cfg, f.name, new)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {short(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={short(value)} is not allowed; allowed: {', '.join(map(repr, args))}")
        return value
    if origin is tuple and isinstance(value, list | tuple):
        inner = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            raise ConfigError(f"{where}={short(value)} is not a number") from None
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}={short(value)} must be of type {hint.__name__}")
    return value


# --------------------------------------------------------------------------- registry

Handler = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    config_cls: type[Config]
    handler: Handler
    # Multi-step techniques (gradual pruning, QAT): called each fine-tune step as
    # on_step(model, config, step, total_steps), and once after fine-tuning as
    # finalize(model, config) -> model (e.g. fake-quant -> integer modules, masks -> weights).
    on_step: Callable[..., None] | None = None
    finalize: Callable[..., Any] | None = None
    # whether the kind needs training between prepare and finalize (QAT, binary training, gradual
    # pruning): a bool, or a function of the config
    trains: bool | Callable[[Any], bool] = False


_REGISTRY: dict[str, Entry] = {}


def register(
    config_cls: type[C], handler: Handler, *, on_step: Callable[..., None] | None = None,
    finalize: Callable[..., Any] | None = None, trains: bool | Callable[[Any], bool] = False,
) -> type[C]:
    """Bind a config class's ``kind`` to its handler (the one registration spelling, written after
    both are defined): ``register(SVDConfig, apply_svd)``.

    The handler is called as ``handler(model, config, select=..., data=...)`` and returns the
    compressed model (for multi-step methods: the prepared model; see :class:`Entry`).
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, Config)) or not callable(handler):
        raise TypeError("register(ConfigClass, handler, ...): a Config subclass, then its handler")
    if not config_cls.kind:
        raise TypeError(f"{config_cls.__name__} needs a class-level `kind`")
    if config_cls.kind in _REGISTRY and _REGISTRY[config_cls.kind].config_cls is not config_cls:
        raise TypeError(f"config kind {config_cls.kind!r} is registered twice")
    _REGISTRY[config_cls.kind] = Entry(config_cls, handler, on_step, finalize, trains)
    return config_cls


def known_kinds(family: str | None = None) -> list[str]:
    return sorted(k for k, e in _REGISTRY.items() if family is None or e.config_cls.family == family)


def _unknown(kind: Any) -> UnknownKindError:
    known = known_kinds()
    close = difflib.get_close_matches(str(kind), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UnknownKindError(f"unknown kind {short(kind)}{hint}; known kinds: {', '.join(known)}")


def get_config_class(kind: str) -> type[Config]:
    if kind not in _REGISTRY:
        raise _unknown(kind)
    return _REGISTRY[kind].config_cls


def get_entry(config: Config) -> Entry:
    entry = _REGISTRY.get(config.kind)
    if entry is None:
        raise _unknown(config.kind)
    return entry


def get_handler(config: Config) -> Handler:
    return get_entry(config).handler


# --------------------------------------------------------------------------- round trip


def config_from_dict(data: dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping with a 'kind', got {type(data).__name__}")
    if too_big(data):
        raise ConfigError(f"a config is nested more than {MAX_DEPTH} levels deep or holds more than {MAX_VALUES:,} "
                          "values; a technique's fields are a few numbers and names")
    if "kind" not in data:
        raise ConfigError(f"config {short(data)} has no 'kind'; known kinds: {', '.join(known_kinds())}")
    cls = get_config_class(data["kind"])
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    extra = [k for k in data if k != "kind" and k not in fields]
    if extra:
        close = difflib.get_close_matches(extra[0], sorted(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown field {short(extra[0])} for kind {cls.kind!r}{hint}; allowed fields: "
            f"{', '.join(sorted(fields)) or '(none)'}"
        )
    try:
        return cls(**{k: v for k, v in data.items() if k != "kind"})
    except TypeError as e:  # missing required field
        raise ConfigError(f"kind {cls.kind!r}: {e}") from None


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_from_yaml(text: str) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:  # includes tags that would construct Python objects
        raise ConfigError(f"not a valid torchshrink config YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"a config is nested too deeply to read; at most {MAX_DEPTH} levels") from None
    return config_from_dict(data)


def config_to_json(config: Config) -> str:
    return json.dumps(config.to_dict())


def config_from_json(text: str) -> Config:
    return config_from_dict(json.loads(text))


# --------------------------------------------------------------------------- validation helpers


def check_range(
    where: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{where}={short(value)} is outside the allowed range {interval}")


def check_choice(where: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{where}={short(value)} is not allowed; allowed: {', '.join(map(repr, allowed))}")
