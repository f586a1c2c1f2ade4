import dataclasses

import pytest

import torchshrink as ts
from torchshrink.core.config import config_from_json, config_to_json, get_config_class
from torchshrink.core.errors import ConfigError, UnknownKindError


def test_every_registered_config_round_trips_yaml_and_json():
    kinds = ts.known_kinds()
    assert "cast" in kinds
    checked = 0
    for kind in kinds:
        cls = get_config_class(kind)
        required = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if required:  # needs arguments: its technique's tests round-trip it
            continue
        cfg = cls()
        checked += 1
        assert ts.config_from_yaml(ts.config_to_yaml(cfg)) == cfg
        assert config_from_json(config_to_json(cfg)) == cfg
    assert checked >= 1


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(UnknownKindError) as e:
        ts.config_from_dict({"kind": "magic-shrink"})
    msg = str(e.value)
    assert "magic-shrink" in msg and "known kinds" in msg and "cast" in msg


def test_unknown_field_names_allowed_fields():
    with pytest.raises(ConfigError, match="unknown field 'dtyp'.*did you mean 'dtype'"):
        ts.config_from_dict({"kind": "cast", "dtyp": "float16"})


def test_literal_field_is_validated():
    with pytest.raises(ConfigError, match="float8.*allowed: 'float16', 'bfloat16'"):
        ts.config_from_dict({"kind": "cast", "dtype": "float8"})


def test_config_is_frozen():
    cfg = ts.config_from_dict({"kind": "cast"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dtype = "float16"


def test_yaml_does_not_construct_arbitrary_objects():
    with pytest.raises(ConfigError, match="not a valid torchshrink config YAML: could not determine a constructor"):
        ts.config_from_yaml("!!python/object/apply:os.system ['echo hi']")


def test_a_yaml_alias_bomb_is_refused_at_once_and_errors_quote_values_briefly():
    """Nine levels of ten aliases each are 10^9 values: quoting that value in an error took 88 s. The config is
    refused by its size before any field is read, and every error quotes a value cut to a line."""
    import time

    levels = ['- &a ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        levels.append(f"- &{cur} [" + ",".join([f"*{prev}"] * 10) + "]")
    text = "kind: unstructured\nsparsity:\n" + "\n".join("  " + s for s in levels) + "\n"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="holds more than 100,000 values"):
        ts.config_from_yaml(text)
    assert time.perf_counter() - start < 5
    with pytest.raises(ConfigError) as e:
        ts.config_from_yaml("kind: unstructured\nsparsity: [" + ",".join(["0.5"] * 5000) + "]\n")
    assert "unstructured.sparsity=" in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(UnknownKindError) as e:
        ts.config_from_yaml("kind: " + "k" * 100_000 + "\n")
    assert len(str(e.value)) < 1000
