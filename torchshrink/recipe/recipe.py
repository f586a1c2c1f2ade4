"""A recipe: a named list of stages, each a registered config plus optional selection,
fine-tune settings and a recovery method. Read from YAML with line numbers in errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from torchshrink.core.config import MAX_DEPTH, MAX_VALUES, Config, config_from_dict, too_big
from torchshrink.core.errors import ConfigError, TorchshrinkError
from torchshrink.core.select import Select
from torchshrink.core.train import Finetune

STAGE_KEYS = ("select", "finetune", "recovery")


@dataclasses.dataclass(frozen=True)
class Stage:
    config: Config
    select: Select | None = None
    finetune: Finetune | None = None
    recovery: str = "finetune"

    def to_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        if self.select is not None:
            d["select"] = self.select.to_dict()
        if self.finetune is not None:
            d["finetune"] = dataclasses.asdict(self.finetune)
            d["recovery"] = self.recovery
        return d


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    data: dict[str, Any] | None = None  # the `data:` block (see recipe/userdata.py); --data overrides it

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.data is not None:
            d["data"] = dict(self.data)
        d["stages"] = [s.to_dict() for s in self.stages]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class RecipeError(ConfigError):
    pass


def stage_from_dict(d: dict[str, Any]) -> Stage:
    if not isinstance(d, dict):
        raise ConfigError(f"a stage must be a mapping with a 'kind', got {type(d).__name__}")
    cfg = config_from_dict({k: v for k, v in d.items() if k not in STAGE_KEYS})
    select = Select.from_dict(d["select"]) if d.get("select") is not None else None
    ft = Finetune.from_dict(d["finetune"]) if d.get("finetune") is not None else None
    from torchshrink.core.train import known_recoveries

    recovery = d.get("recovery", "finetune")
    if recovery not in known_recoveries():
        raise ConfigError(f"recovery={recovery!r}; allowed: {', '.join(known_recoveries())}")
    return Stage(cfg, select, ft, recovery)


def _stage_lines(text: str) -> list[int]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    for key, value in node.value:
        if key.value == "stages" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def recipe_from_yaml(text: str, *, source: str = "recipe") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise RecipeError(f"{source} is nested too deeply to read; a recipe needs at most {MAX_DEPTH} levels") from None
    if too_big(data):
        raise RecipeError(f"{source} is nested more than {MAX_DEPTH} levels deep or holds more than {MAX_VALUES:,} values; "
                          "a recipe needs only a few levels")
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise RecipeError(f"{source} must hold a non-empty list `stages:` of stage mappings (each with a `kind`)")
    extra = [k for k in data if k not in ("name", "data", "stages")]
    if extra:
        raise RecipeError(f"{source}: unknown top-level key {extra[0]!r}; allowed: name, data, stages")
    block = None
    if data.get("data") is not None:
        from torchshrink.recipe.userdata import DataSpec

        try:
            block = dataclasses.asdict(DataSpec.from_dict(data["data"], where=f"{source} data"))
        except TorchshrinkError as e:
            raise RecipeError(str(e)) from None
    lines = _stage_lines(text)
    stages = []
    for i, sd in enumerate(data["stages"]):
        try:
            stages.append(stage_from_dict(sd))
        except TorchshrinkError as e:
            where = f"line {lines[i]}" if i < len(lines) else f"stage {i + 1}"
            raise RecipeError(f"{source} {where} (stage {i + 1}): {e}") from None
    return Recipe(str(data.get("name", Path(source).stem)), tuple(stages), block)


# (earlier family, later family) -> why that order is a mistake
_ORDER = {
    ("quantize", "prune"): "pruning after quantization zeroes already-rounded weights and cannot retrain integer "
                           "weights; prune first, then quantize (Deep Compression's order)",
    ("quantize", "factorize"): "factorizing an already-quantized layer loses the quantization; factorize first",
    ("binarize", "prune"): "binary weights are +-alpha, never zero: magnitude pruning after binarization "
                           "has nothing to rank; prune first",
    ("quantize", "binarize"): "binarization replaces the quantized weights; binarize first or drop the quantize stage",
}


def order_warnings(recipe: Recipe) -> list[str]:
    """Stage orders that defeat a later stage, each with the reason."""
    out = []
    stages = recipe.stages
    for i, a in enumerate(stages):
        for b in stages[i + 1:]:
            fa, fb = a.config.family, b.config.family
            if a.config.kind == "cast" or (fa, fb) not in _ORDER:
                continue
            out.append(f"stage '{a.config.kind}' runs before '{b.config.kind}': {_ORDER[(fa, fb)]}")
    return out


def load_recipe(spec: str) -> Recipe:
    """A recipe file path, or the name of a built-in recipe."""
    from torchshrink.recipe.builtin import BUILTIN

    if spec in BUILTIN:
        return recipe_from_yaml(BUILTIN[spec], source=f"built-in recipe {spec!r}")
    path = Path(spec)
    if not path.is_file():
        raise RecipeError(f"no recipe file {spec!r} and no built-in recipe of that name; built-in: {', '.join(sorted(BUILTIN))}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {path}: {e.strerror or e}") from None
    return recipe_from_yaml(text, source=str(path))
