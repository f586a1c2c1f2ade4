"""The technique contract, checked for every registered kind (as peft tests every method with one
common tester). A kind registered without a case here fails ``test_every_kind_has_a_case``.

For each kind: ``apply`` leaves its input untouched and returns a finished model (nothing left to
finalize, no training parametrizations) that runs; a kind that trains refuses ``apply`` without
training data and names prepare/finalize; unknown arguments raise; non-default config values
round-trip through YAML; the saved file is no larger than the original's; and the saved model,
loaded in a fresh process, has the same tensors and outputs (to the rounding of its kernels).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchshrink as ts
from tests.conftest import conv_net, tiny_bert, tiny_net
from torchshrink.core import state
from torchshrink.core.config import get_config_class
from torchshrink.core.errors import ConfigError
from torchshrink.export.io import saved_bytes

CNN, BERT, CONV = "cnn", "bert", "conv"
_G = torch.Generator().manual_seed(3)
X = torch.randn(8, 3, 4, 4, generator=_G)
Y = torch.randint(0, 10, (8,), generator=_G)
CALIB = [X]
TRAIN = [(X, Y)] * 2

# kind -> (model, config fields): the smallest setting that exercises the kind on a tiny model
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "unstructured": (CNN, {"sparsity": 0.5}),
    "nm": (CNN, {}),
    "channel-prune": (CNN, {"amount": 0.5}),
    "head-prune": (BERT, {"amount": 0.5}),
    "ffn-prune": (BERT, {"amount": 0.5}),
    "layer-drop": (BERT, {"amount": 0.5}),
    "cast": (CNN, {}),
    "int8-dynamic": (CNN, {}),
    "int8-static": (CNN, {}),
    "weight-only": (CNN, {}),
    "qat": (CNN, {}),
    "kmeans": (CNN, {}),
    "svd": (CNN, {}),
    "tucker2": (CONV, {}),
    "cp": (CONV, {}),
    "separable": (CNN, {}),
    "lowrank-budget": (CNN, {}),
    "bwn": (CNN, {}),
    "twn": (CNN, {}),
    "ttq": (CNN, {}),
    "bnn": (CNN, {}),
    "xnor": (CNN, {}),
    "binaryconnect": (CNN, {}),
    "distill": (CNN, {"student": "width", "width": 0.5}),
}


def _model(which: str) -> tuple[nn.Module, list, tuple]:
    if which == BERT:
        m, data = tiny_bert()
        return m, data, data[0]
    return (conv_net() if which == CONV else tiny_net()), CALIB, (X,)


def _main(y: Any) -> torch.Tensor:
    y = getattr(y, "last_hidden_state", y)
    return (y[0] if isinstance(y, tuple) else y).float()


def _out(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return _main(model(*inputs))


def _apply(kind: str) -> tuple[nn.Module, nn.Module, tuple, Any]:
    which, fields = CASES[kind]
    model, calib, inputs = _model(which)
    cfg = get_config_class(kind)(**fields)
    train = {"train_data": TRAIN} if ts.trains(cfg) else {}
    out = ts.apply(model, cfg, data=calib, **train)
    return model, out, inputs, cfg


def test_every_kind_has_a_case():
    assert sorted(ts.known_kinds()) == sorted(CASES)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_apply_returns_a_finished_model_and_leaves_the_input(kind):
    which, _ = CASES[kind]
    reference, _, _ = _model(which)
    model, out, inputs, cfg = _apply(kind)
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{kind} changed the input's {k}"
    assert not state.get(out, "pending") and not out.training
    rep = ts.report(out)[-1]  # one report: what changed, what was skipped and why
    assert rep.kind == kind and rep.changed, f"{kind} reports no change"
    assert all(isinstance(v, str) and v for v in rep.skipped.values())
    assert not any(parametrize.is_parametrized(m) for m in out.modules()), f"{kind} left training parametrizations"
    tags = {k for m in (*out.modules(), *model.modules()) for k in vars(m) if "torchshrink" in k}
    assert tags <= {state.ATTR}, f"{kind} set attributes outside torchshrink's one state: {tags}"
    y = _out(out, inputs)
    assert torch.isfinite(y).all()
    assert saved_bytes(out) <= saved_bytes(model), f"{kind}: the file grew"
    again = ts.finalize(out)  # a finished model has nothing left to finalize
    assert torch.equal(_out(again, inputs), y)


@pytest.mark.parametrize("kind", sorted(k for k in CASES if ts.trains(get_config_class(k)(**CASES[k][1]))))
def test_a_training_kind_needs_training_data_or_prepare(kind):
    which, fields = CASES[kind]
    model, calib, _ = _model(which)
    with pytest.raises(ConfigError, match="trains: give apply.*ts.prepare"):
        ts.apply(model, get_config_class(kind)(**fields), data=calib)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_unknown_arguments_raise(kind):
    which, fields = CASES[kind]
    model, calib, _ = _model(which)
    with pytest.raises(ConfigError, match="unknown argument 'inplcae'.*did you mean 'inplace'"):
        ts.apply(model, get_config_class(kind)(**fields), data=calib, train_data=TRAIN, inplcae=True)
    with pytest.raises(ConfigError, match="unknown argument 'calibration_data'"):
        ts.prepare(model, get_config_class(kind)(**fields), data=calib, calibration_data=calib)


def _other_value(value: Any, hint: Any) -> list[Any]:
    if typing.get_origin(hint) is typing.Literal:
        return [v for v in typing.get_args(hint) if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, max(value - 1, 0)]
    if isinstance(value, float):
        return [value * 0.5, value * 1.5]
    return []


@pytest.mark.parametrize("kind", sorted(CASES))
def test_non_default_values_round_trip(kind):
    cls = get_config_class(kind)
    hints = typing.get_type_hints(cls)
    changed = 0
    for f in dataclasses.fields(cls):
        for v in _other_value(getattr(cls(), f.name), hints.get(f.name)):
            try:
                cfg = cls(**{f.name: v})
            except ConfigError:
                continue
            assert ts.config_from_yaml(ts.config_to_yaml(cfg)) == cfg, (kind, f.name, v)
            changed += 1
            break
    assert changed >= 1


_FRESH = """
import json, sys, torch, safetensors.torch
import torchshrink as ts
torch.set_num_threads(int(sys.argv[2]))  # as the test process: the same kernels, so the same float sums
cases = json.loads(sys.argv[1])
for kind, (spec, inputs_file, state_file) in cases.items():
    inputs = safetensors.torch.load_file(inputs_file)
    model = ts.load_model(spec)
    with torch.no_grad():
        y = model(*[inputs[f"x{i}"] for i in range(len(inputs) - 1)])
    y = getattr(y, "last_hidden_state", y)
    y = (y[0] if isinstance(y, tuple) else y).float()
    want = safetensors.torch.load_file(state_file)
    got = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    same_state = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # outputs: as close as two processes' kernel choices allow (oneDNN may pick another conv algorithm)
    print(kind, bool(same_state and torch.allclose(y, inputs["y"], rtol=1e-5, atol=1e-6)))
"""


def test_saved_models_reload_identically_in_a_fresh_process(tmp_path):
    import safetensors.torch

    cases = {}
    for kind in sorted(CASES):
        _, out, inputs, _ = _apply(kind)
        d = tmp_path / kind
        ts.save(out, d)
        tensors = {f"x{i}": t for i, t in enumerate(inputs)}
        tensors["y"] = _out(out, inputs)
        safetensors.torch.save_file(tensors, str(tmp_path / f"{kind}.safetensors"))
        state = {k: v.detach().clone().contiguous() for k, v in out.state_dict().items() if isinstance(v, torch.Tensor)}
        safetensors.torch.save_file(state, str(tmp_path / f"{kind}.state.safetensors"))  # clones: unshared storages
        factory = {CNN: "tiny_net", CONV: "conv_net"}.get(CASES[kind][0])
        spec = f"tests.conftest:{factory}@{d}" if factory and not isinstance(out, torch.fx.GraphModule) else str(d)
        cases[kind] = (spec, str(tmp_path / f"{kind}.safetensors"), str(tmp_path / f"{kind}.state.safetensors"))
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(cases), str(torch.get_num_threads())], capture_output=True, text=True, cwd=root,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = dict(line.split() for line in r.stdout.splitlines())
    assert results == {k: "True" for k in CASES}, results


@pytest.mark.parametrize("kind", sorted(CASES))
def test_onnx_export_matches_in_onnxruntime_and_torch_export_works_or_refuses(kind, tmp_path):
    from torchshrink.core.errors import UnsupportedLayerError
    from torchshrink.export.onnx import export_onnx, export_program, onnx_parity

    _, out, inputs, _ = _apply(kind)
    path = export_onnx(out, inputs, tmp_path / "m.onnx")  # every kind's output exports
    which = CASES[kind][0]
    held_out = _model(which)[1][1] if which == BERT else (torch.randn(5, 3, 4, 4, generator=_G),)
    par = onnx_parity(out, path, held_out)
    assert par["cosine"] >= 0.999, (kind, par)
    try:
        program = export_program(out, inputs)
        assert torch.allclose(_out(program.module(), inputs), _out(out, inputs), rtol=1e-4, atol=1e-5)
    except UnsupportedLayerError as e:
        assert "\n" not in str(e)


def test_finalize_with_other_settings_of_the_same_kind():
    from torchshrink.binary import BWNConfig

    prepared = ts.prepare(tiny_net(), BWNConfig(keep_first_last=False))
    small = ts.finalize(prepared)
    wide = ts.finalize(prepared, BWNConfig(keep_first_last=False, param_dtype="float32"))
    assert saved_bytes(small) < saved_bytes(wide)
    with pytest.raises(ConfigError, match="prepared with 'bwn'"):
        ts.finalize(prepared, ts.config_from_dict({"kind": "cast"}))


def test_every_config_is_importable_from_torchshrink_under_one_name():
    for kind in ts.known_kinds():
        cls = get_config_class(kind)
        assert getattr(ts, cls.__name__) is cls and cls.__name__ in ts.CONFIGS, kind
        assert cls.__name__.endswith("Config")
    assert len(ts.CONFIGS) == len(ts.known_kinds())
