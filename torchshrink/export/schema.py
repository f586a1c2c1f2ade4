"""The manifest's schema: the type of every field, checked before anything in it is used.

A saved folder may come from a stranger; whatever is wrong with it (a JSON list instead of an
object, a string where a list belongs, an unknown format, an alias to nothing, an absurd shape)
becomes one :class:`ModelLoadError` line naming the field, never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from torchshrink.core.errors import ModelLoadError

# the largest tensor a saved file may declare (elements) and the most dimensions
MAX_NUMEL = 1 << 40
MAX_DIMS = 16
# an example input recorded in the manifest is allocated on load: keep it modest
MAX_INPUT_NUMEL = 1 << 26
DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")
_SIMPLE = (bool, int, float, str, type(None))
_TOP = {"fx_graph", "format", "format_version", "torchshrink_version", "torch_version", "source", "class", "input",
        "hf_config", "modules", "tensors", "recipe"}
_STUB = {"format", "format_version", "container"}
_RECORD = {"name", "type", "init", "attrs", "formats", "lowrank", "fused_from"}


def read_json(path: Any, max_bytes: int, what: str) -> Any:
    """A JSON file from a folder someone may have handed over: at most ``max_bytes``, valid UTF-8
    JSON, not nested beyond the parser's limit; else one ModelLoadError line."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelLoadError(f"{path} is {size:,} bytes; {what} may have at most {max_bytes:,}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelLoadError(f"{path} is nested too deeply to be {what}") from None


def _fail(where: str, msg: str) -> ModelLoadError:
    return ModelLoadError(f"{where}: {msg}")


def _type(v: Any, types: type | tuple[type, ...], where: str, field: str) -> Any:
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        names = " or ".join(t.__name__ if t is not type(None) else "null" for t in (types if isinstance(types, tuple) else (types,)))
        raise _fail(where, f"field {field!r} must be {names}, got {type(v).__name__}")
    return v


def check_shape(shape: Any, where: str, max_numel: int = MAX_NUMEL) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise _fail(where, f"a shape must be a list of at most {MAX_DIMS} sizes")
    n = 1
    for s in shape:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise _fail(where, f"shape {str(shape)[:80]} holds {str(s)[:20]!r}; sizes are non-negative integers")
        n *= s
        if n > max_numel:
            raise _fail(where, f"shape {str(shape)[:80]} declares more than {max_numel:,} elements")
    return tuple(shape)


def check_input(inp: Any, where: str) -> dict[str, Any] | None:
    if inp is None:
        return None
    _type(inp, dict, where, "input")
    extra = set(inp) - {"kind", "shape", "dtype", "vocab"}
    if extra:
        raise _fail(where, f"unknown input field {sorted(extra)[0][:40]!r}")
    shape = check_shape(inp.get("shape"), f"{where} input", MAX_INPUT_NUMEL)
    if not shape or min(shape) < 1:
        raise _fail(where, "the input shape needs at least one dimension, each at least 1")
    if inp.get("kind") not in (None, "tokens"):
        raise _fail(where, f"input kind {str(inp['kind'])[:40]!r}; allowed: tokens")
    if inp.get("dtype", "float32") not in _INPUT_DTYPES:
        raise _fail(where, f"input dtype {str(inp.get('dtype'))[:40]!r}; allowed: {', '.join(_INPUT_DTYPES)}")
    vocab = inp.get("vocab", 30000)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= 1 << 24:
        raise _fail(where, "input vocab must be an integer in [1, 16777216]")
    return inp


def _record(rec: Any, where: str) -> None:
    _type(rec, dict, where, "modules[]")
    extra = set(rec) - _RECORD
    if extra:
        raise _fail(where, f"unknown module-record field {sorted(extra)[0][:40]!r}")
    name = _type(rec.get("name"), str, where, "modules[].name")
    _type(rec.get("type"), str, where, f"modules[{name[:60]!r}].type")
    _type(rec.get("init"), (dict, type(None)), where, f"modules[{name[:60]!r}].init")
    for k, v in _type(rec.get("attrs", {}), dict, where, f"modules[{name[:60]!r}].attrs").items():
        ok = isinstance(v, _SIMPLE) or (isinstance(v, list) and all(isinstance(x, _SIMPLE) for x in v))
        if not ok:
            raise _fail(where, f"attribute {k[:40]!r} of {name[:60]!r} must be a number, string or flat list")
    for k, v in _type(rec.get("formats", {}), dict, where, f"modules[{name[:60]!r}].formats").items():
        _type(v, str, where, f"modules[{name[:60]!r}].formats[{k[:40]!r}]")
    if len(_type(rec.get("lowrank", ""), str, where, f"modules[{name[:60]!r}].lowrank")) > 40:
        raise _fail(where, f"modules[{name[:60]!r}].lowrank is longer than 40 characters")
    if len(_type(rec.get("fused_from", ""), str, where, f"modules[{name[:60]!r}].fused_from")) > 1000:
        raise _fail(where, f"modules[{name[:60]!r}].fused_from is longer than 1000 characters")


def _tensors(tensors: Any, where: str) -> None:
    from torchshrink.export.formats import known_format

    _type(tensors, dict, where, "tensors")
    for key, info in tensors.items():
        _type(info, dict, where, f"tensors[{key[:60]!r}]")
        fmt = info.get("format")
        if fmt == "alias":
            of = info.get("of")
            if set(info) != {"format", "of"} or not isinstance(of, str) or of not in tensors \
                    or tensors[of].get("format") == "alias":
                raise _fail(where, f"tensor {key[:60]!r} is an alias of {str(of)[:60]!r}, which is no saved tensor")
            continue
        if not isinstance(fmt, str) or not known_format(fmt):
            raise _fail(where, f"tensor {key[:60]!r} has unknown storage format {str(fmt)[:40]!r}")
        if set(info) != {"format", "shape", "dtype"}:
            raise _fail(where, f"tensor {key[:60]!r} must have exactly format, shape, dtype")
        if info["dtype"] not in DTYPES:
            raise _fail(where, f"tensor {key[:60]!r} has unknown dtype {str(info['dtype'])[:40]!r}")
        check_shape(info["shape"], f"{where} tensor {key[:60]!r}")


def check_manifest(m: Any, where: str) -> dict[str, Any]:
    """Validate a full manifest (or a container stub); return it unchanged."""
    if not isinstance(m, dict):
        raise _fail(where, f"a manifest must be a JSON object, got {type(m).__name__}")
    if m.get("format") != "torchshrink":
        raise _fail(where, "not a torchshrink manifest (format must be 'torchshrink')")
    version = m.get("format_version")
    if version not in (1, 2) or isinstance(version, bool):
        raise _fail(where, f"format_version {str(version)[:20]!r}; this torchshrink reads 1 and 2")
    if "container" in m:
        extra = set(m) - _STUB
        if extra:
            raise _fail(where, f"unknown field {sorted(extra)[0][:40]!r} in a container stub")
        _type(m["container"], str, where, "container")
        return m
    extra = set(m) - _TOP
    if extra:
        raise _fail(where, f"unknown manifest field {sorted(extra)[0][:40]!r}")
    for field in ("source", "class", "torchshrink_version", "torch_version"):
        _type(m.get(field), (str, type(None)), where, field)
    _type(m.get("fx_graph"), (list, type(None)), where, "fx_graph")
    _type(m.get("hf_config"), (dict, type(None)), where, "hf_config")
    check_input(m.get("input"), where)
    for rec in _type(m.get("modules"), list, where, "modules"):
        _record(rec, where)
    _tensors(m.get("tensors"), where)
    return m
