"""Budgets: the constraints a search must meet, parsed from a string such as
``"--max-size 2MB --max-latency-ratio 0.5 --max-accuracy-drop 1.0"``.

Size is the bytes of the file torchshrink writes (absolute, ``2MB``, or relative to the original,
``0.25x``); latency is a ratio to the original's median latency on this machine; the accuracy drop
is in percentage points of the task's primary metric (accuracy, or cosine x 100 for encoders).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Any

from torchshrink.core.errors import ConfigError

EXAMPLE = '"--max-size 2MB --max-latency-ratio 0.5 --max-accuracy-drop 1.0" (or --max-size 0.25x)'
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_KEYS = ("max-size", "max-latency-ratio", "max-accuracy-drop", "max-macs-ratio")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Upper bounds; ``None`` means unconstrained."""

    max_size_bytes: int | None = None
    max_size_ratio: float | None = None
    max_latency_ratio: float | None = None
    max_accuracy_drop: float | None = None  # percentage points
    max_macs_ratio: float | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in dataclasses.astuple(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def size_limit(self, original_bytes: int) -> float | None:
        """The tighter of the absolute and relative size bounds, in bytes."""
        limits = [float(v) for v in (self.max_size_bytes,) if v is not None]
        if self.max_size_ratio is not None:
            limits.append(self.max_size_ratio * original_bytes)
        return min(limits) if limits else None

    def violations(self, point: dict[str, float], original_bytes: int) -> dict[str, float]:
        """Relative violation of each constraint by ``point`` (keys size_bytes, latency_ratio,
        accuracy_drop, macs_ratio); 0 means met. Used for feasibility and for the closest point."""
        out: dict[str, float] = {}
        size = self.size_limit(original_bytes)
        if size is not None:
            out["size"] = max(0.0, point["size_bytes"] / size - 1.0)
        if self.max_latency_ratio is not None and point.get("latency_ratio") is not None:
            out["latency"] = max(0.0, point["latency_ratio"] / self.max_latency_ratio - 1.0)
        if self.max_macs_ratio is not None and point.get("macs_ratio") is not None:
            out["macs"] = max(0.0, point["macs_ratio"] / self.max_macs_ratio - 1.0)
        if self.max_accuracy_drop is not None:
            # in percentage points, scaled so that 1 pp over counts like 10 % over a size bound
            out["accuracy"] = max(0.0, point["accuracy_drop"] - self.max_accuracy_drop) / 10.0
        return out

    def describe(self, original_bytes: int | None = None) -> str:
        parts = []
        if self.max_size_bytes is not None:
            parts.append(f"size <= {self.max_size_bytes:,} B")
        if self.max_size_ratio is not None:
            extra = f" ({self.max_size_ratio * original_bytes:,.0f} B)" if original_bytes else ""
            parts.append(f"size <= {self.max_size_ratio:g}x{extra}")
        if self.max_latency_ratio is not None:
            parts.append(f"latency <= {self.max_latency_ratio:g}x")
        if self.max_macs_ratio is not None:
            parts.append(f"MACs <= {self.max_macs_ratio:g}x")
        if self.max_accuracy_drop is not None:
            parts.append(f"quality drop <= {self.max_accuracy_drop:g} pp")
        return ", ".join(parts) or "no constraint"


def _size(value: str) -> tuple[int | None, float | None]:
    v = value.strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)x", v)
    if m:
        ratio = float(m.group(1))
        if not 0 < ratio <= 1:
            raise ConfigError(f"budget --max-size {value!r}: a relative size must be in (0, 1]x; example: {EXAMPLE}")
        return None, ratio
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kmg]i?b|b)?", v)
    if not m:
        raise ConfigError(f"budget --max-size {value!r} is not a size; use bytes like 2MB, 500KB, 1.5MiB or a ratio "
                          f"like 0.25x; example: {EXAMPLE}")
    n = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if n < 1:
        raise ConfigError(f"budget --max-size {value!r} must be positive; example: {EXAMPLE}")
    return int(n), None


def _positive(key: str, value: str, *, allow_zero: bool = False) -> float:
    try:
        x = float(value.rstrip("x%"))
    except ValueError:
        raise ConfigError(f"budget --{key} {value!r} is not a number; example: {EXAMPLE}") from None
    if x < 0 or (x == 0 and not allow_zero):
        raise ConfigError(f"budget --{key} {value!r} must be {'>= 0' if allow_zero else '> 0'}; example: {EXAMPLE}")
    return x


def parse_budget(text: str | Budget | None) -> Budget:
    """Parse ``"--max-size 2MB --max-latency-ratio 0.5 --max-accuracy-drop 1.0"``.

    ``key=value`` and ``key value`` both work, with or without leading dashes; keys are
    max-size (bytes with a unit, or ``0.25x`` of the original), max-latency-ratio,
    max-accuracy-drop (percentage points) and max-macs-ratio.
    """
    if isinstance(text, Budget):
        return text
    if text is None or not str(text).strip():
        raise ConfigError(f"empty budget; example: {EXAMPLE}")
    try:
        tokens = shlex.split(str(text).replace(",", " "))
    except ValueError as e:
        raise ConfigError(f"budget {text!r} does not parse ({e}); example: {EXAMPLE}") from None
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i].lstrip("-").replace("_", "-").lower()
        if "=" in tok:
            key, value = tok.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"budget {text!r}: {tokens[i]!r} needs a value; example: {EXAMPLE}")
            key, value = tok, tokens[i + 1]
            i += 2
        if key not in _KEYS:
            raise ConfigError(f"budget {text!r}: unknown constraint {key!r}; allowed: "
                              f"{', '.join('--' + k for k in _KEYS)}; example: {EXAMPLE}")
        pairs.append((key, value))
    fields: dict[str, Any] = {}
    for key, value in pairs:
        if key == "max-size":
            fields["max_size_bytes"], fields["max_size_ratio"] = _size(value)
        elif key == "max-accuracy-drop":
            fields["max_accuracy_drop"] = _positive(key, value, allow_zero=True)
        else:
            fields[key.replace("-", "_")] = _positive(key, value)
    return Budget(**fields)
