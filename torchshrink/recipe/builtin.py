"""Built-in recipes, selectable by name (``--recipe deep-compression``). They are the YAML files in
``torchshrink/recipe/recipes/`` (also reachable as ``examples/recipes/``)."""

from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).parent / "recipes"


def _load() -> dict[str, str]:
    out = {p.stem: p.read_text() for p in sorted(RECIPE_DIR.glob("*.yaml"))}
    out["demo"] = out["prune-quantize"].replace("name: prune-quantize", "name: demo", 1)
    return out


BUILTIN: dict[str, str] = _load()
