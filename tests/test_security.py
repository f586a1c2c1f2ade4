"""Tampered saved folders: every payload is refused in one line and its side effect never happens.

Each case writes a real save folder, changes one thing in it the way an attacker would, and loads
it through an entry point (``ts.load``, ``ts.load_model``, or the CLI's inspect / measure /
compress). A payload that ran would create the marker file ``PWNED`` (or import ``evil.py``, which
creates it); every case asserts a ModelLoadError (CLI: exit code 2 and one stderr line) and no marker.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import torchshrink as ts
from torchshrink.core.errors import ModelLoadError

PY = sys.executable


def _cmd(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def _evil_module(folder: Path, marker: Path) -> None:
    """A Python file beside the artifact: importing it (or calling its factory) makes the marker."""
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import torch\n"
        "def make():\n    return torch.nn.Linear(2, 2)\n"
        "class Net(torch.nn.Module):\n    pass\n"
    )


class UserNet(nn.Module):
    """A user's own class: only its author's code can build it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


def _seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _graph() -> torch.fx.GraphModule:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return torch.relu(self.fc(x)).sum(1, keepdim=True) + x.shape[0]

    return torch.fx.symbolic_trace(Net())


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write(folder: Path, manifest) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _node(m: dict, op: str) -> dict:
    return next(n for n in m["fx_graph"] if n["op"] == op)


# --------------------------------------------------------------------------- tamperings
# each: (folder, marker) -> None, applied to a saved folder of the model the case names

def t_node_name(d, mk):
    m = _manifest(d)
    _node(m, "call_module")["name"] = f"x = {_cmd(mk)}; y"
    _write(d, m)


def t_placeholder(d, mk):
    m = _manifest(d)
    _node(m, "placeholder")["target"] = f"x=({_cmd(mk)})"
    _write(d, m)


def t_method(d, mk):
    m = _manifest(d)
    n = _node(m, "call_method")
    n["target"] = f"sum(1) or {_cmd(mk)} or x.sum"
    _write(d, m)


def t_call_module(d, mk):
    m = _manifest(d)
    _node(m, "call_module")["target"] = f"fc(x) or {_cmd(mk)} or self.fc"
    _write(d, m)


def t_kwarg_key(d, mk):
    m = _manifest(d)
    _node(m, "call_method")["kwargs"] = {"dict": {f"keepdim=({_cmd(mk)}), dim": 1}}
    _write(d, m)


def t_get_attr(d, mk):
    m = _manifest(d)
    n = _node(m, "call_module")
    n.update(op="get_attr", target=f"fc.weight; {_cmd(mk)}", args={"tuple": []}, kwargs={"dict": {}})
    _write(d, m)


def _call(target: str, args: list) -> Callable:
    def tamper(d, mk):
        m = _manifest(d)
        n = _node(m, "call_method")
        n.update(op="call_function", target=target, args={"tuple": args}, kwargs={"dict": {}})
        _write(d, m)

    return tamper


def t_getattr_dunder(d, mk):
    m = _manifest(d)
    n = _node(m, "call_function")  # the relu
    n.update(target="builtins.getattr", args={"tuple": [{"node": "x"}, "__class__"]}, kwargs={"dict": {}})
    _write(d, m)


def t_method_apply(d, mk):
    m = _manifest(d)
    _node(m, "call_method")["target"] = "apply_"
    _write(d, m)


def t_dtype_arg(d, mk):
    m = _manifest(d)
    _node(m, "call_method")["kwargs"] = {"dict": {"dtype": {"dtype": "load"}}}
    _write(d, m)


def t_source_factory(d, mk):
    _evil_module(d, mk)
    m = _manifest(d)
    m.update(source="evil:make", hf_config=None)
    _write(d, m)


def t_source_abort(d, mk):
    m = _manifest(d)
    m.update(source="os:abort", hf_config=None)
    _write(d, m)


def t_class_import(d, mk):
    _evil_module(d, mk)
    m = _manifest(d)
    m.update(source=None, hf_config=None, **{"class": "evil.Net"})
    m["modules"][0]["type"] = "evil.Net"
    _write(d, m)


def t_module_type(d, mk):
    _evil_module(d, mk)
    m = _manifest(d)
    m["modules"][1].update(type="evil.Net", init={})
    _write(d, m)


def t_module_popen(d, mk):
    m = _manifest(d)
    m["modules"][1].update(type="subprocess.Popen", init={"args": ["touch", str(mk)]})
    _write(d, m)


def t_torch_prefix_walk(d, mk):
    m = _manifest(d)
    m["modules"][1].update(type="torch.nn.modules.module.os.system", init={"command": f"touch {mk}"})
    _write(d, m)


def t_source_pt2(d, mk):
    m = _manifest(d)
    m.update(source=str(_evil_pt2(d / "other.pt2", mk)), hf_config=None)
    _write(d, m)


def t_source_folder(d, mk):
    m = _manifest(d)
    m.update(source=str(d), hf_config=None)  # a folder naming itself: must not recurse or load anything
    _write(d, m)


def t_hf_auto_map(d, mk):
    _evil_module(d, mk)
    m = _manifest(d)
    m["hf_config"]["auto_map"] = {"AutoModel": "evil.Net", "AutoConfig": "evil.Net"}
    _write(d, m)


def t_attr_forward(d, mk):
    m = _manifest(d)
    m["modules"][1]["attrs"] = {"forward": _cmd(mk)}
    _write(d, m)


def t_module_name_dunder(d, mk):
    m = _manifest(d)
    m["modules"][1]["name"] = "__class__"
    _write(d, m)


def t_json_list(d, mk):
    _write(d, [1, 2, 3])


def t_modules_string(d, mk):
    m = _manifest(d)
    m["modules"] = "everything"
    _write(d, m)


def t_unknown_format(d, mk):
    m = _manifest(d)
    next(iter(m["tensors"].values()))["format"] = "pickle"
    _write(d, m)


def t_alias_missing(d, mk):
    m = _manifest(d)
    key = next(iter(m["tensors"]))
    m["tensors"][key] = {"format": "alias", "of": "no.such.tensor"}
    _write(d, m)


def t_nested(d, mk):
    (d / "manifest.json").write_text('{"format": "torchshrink", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


def t_huge_manifest(d, mk):
    with open(d / "manifest.json", "ab") as f:
        f.truncate(80 << 20)  # sparse: 80 MB on paper, nothing on disk


def t_shape_2_50(d, mk):
    m = _manifest(d)
    key = next(k for k, v in m["tensors"].items() if v["format"] == "dense")
    m["tensors"][key].update(format="bitmask", shape=[1 << 25, 1 << 25])
    _write(d, m)


def t_shape_2_36(d, mk):
    m = _manifest(d)
    key = next(k for k, v in m["tensors"].items() if v["format"] == "dense")
    m["tensors"][key].update(format="bitmask", shape=[1 << 18, 1 << 18])
    _write(d, m)


def t_init_huge(d, mk):
    m = _manifest(d)
    m["modules"][1]["init"] = {"in_features": 1 << 20, "out_features": 1 << 20, "bias": True}
    m["modules"][1]["type"] = "torch.nn.modules.linear.Bilinear"  # a different type: rebuilt from init
    m["modules"][1]["init"]["in1_features"] = m["modules"][1]["init"].pop("in_features")
    m["modules"][1]["init"]["in2_features"] = 1 << 10
    _write(d, m)


def t_hf_huge(d, mk):
    m = _manifest(d)
    m["hf_config"].update(hidden_size=1 << 16, intermediate_size=1 << 20, vocab_size=1 << 22)
    _write(d, m)


def t_hf_layers(d, mk):
    m = _manifest(d)
    m["hf_config"]["num_hidden_layers"] = 10**9
    _write(d, m)


def t_input_huge(d, mk):
    m = _manifest(d)
    m["input"] = {"shape": [1 << 20, 1 << 20], "dtype": "float32"}
    _write(d, m)


def t_input_dtype(d, mk):
    m = _manifest(d)
    m["input"] = {"shape": [1, 8], "dtype": "load"}
    _write(d, m)


def t_mask_size(d, mk):
    m = _manifest(d)
    key = next(k for k, v in m["tensors"].items() if v["format"] == "dense" and len(v["shape"]) == 2)
    m["tensors"][key]["shape"] = [m["tensors"][key]["shape"][0] * 1000, m["tensors"][key]["shape"][1]]
    _write(d, m)


def _container(d: Path, head: dict, body: bytes) -> None:
    fast = [{"id": lzma.FILTER_LZMA2, "preset": 0}]
    h = lzma.compress(json.dumps(head).encode(), format=lzma.FORMAT_RAW, filters=fast)
    b = lzma.compress(body, format=lzma.FORMAT_RAW, filters=fast)
    (d / "model.tsz").write_bytes(b"TSZ1" + struct.pack("<I", len(h)) + h + b)
    _write(d, {"format": "torchshrink", "format_version": 2, "container": "model.tsz"})


def t_container_bomb(d, mk):
    m = _manifest(d)
    _container(d, {**m, "parts": [["x", "uint8", [16]]]}, bytes(256 << 20))  # 256 MiB of zeros, a few kB packed


def t_container_trailing(d, mk):
    m = _manifest(d)
    from torchshrink.export.container import lzma_pack

    _container(d, {**m, "parts": [["x", "uint8", [4]]]}, b"abcd")
    with open(d / "model.tsz", "ab") as f:
        f.write(lzma_pack(b"more", 0))


def t_container_declared(d, mk):
    m = _manifest(d)
    _container(d, {**m, "parts": [["x", "float32", [1 << 30, 1 << 20]]]}, b"abcd")


def t_container_shape(d, mk):
    m = _manifest(d)
    _container(d, {**m, "parts": [["x", "uint8", [-4]]]}, b"abcd")


def _evil_pt2(path: Path, marker: Path) -> Path:
    """A torch.export archive whose pickle runs a shell command when unpickled."""
    m = nn.Linear(2, 2)
    torch.export.save(torch.export.export(m, (torch.randn(1, 2),)), str(path))
    payload = (b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in items:
            z.writestr(info, payload if info.filename.endswith(".pkl") else data)
    return path


SEQ, GRAPH, HF, USER = "seq", "graph", "hf", "user"
CASES = {
    # 1. strings pasted into generated source
    "graph-node-name": (GRAPH, t_node_name, "node name"),
    "graph-placeholder": (GRAPH, t_placeholder, "placeholder"),
    "graph-method-target": (GRAPH, t_method, "not a listed tensor method"),
    "graph-call-module-target": (GRAPH, t_call_module, "not a dotted path"),
    "graph-kwarg-key": (GRAPH, t_kwarg_key, "keyword argument"),
    "graph-get-attr-target": (GRAPH, t_get_attr, "not a dotted path"),
    # 2. call targets reached by attribute walks
    "graph-torch-os-system": (GRAPH, _call("torch.os.system", ["touch PWNED"]), "allow-list"),
    "graph-torch-hub-load": (GRAPH, _call("torch.hub.load", ["evil", "x"]), "allow-list"),
    "graph-cpp-extension": (GRAPH, _call("torch.utils.cpp_extension.load_inline", ["x", ""]), "allow-list"),
    "graph-methodcaller": (GRAPH, _call("operator.methodcaller", ["system", "touch PWNED"]), "allow-list"),
    "graph-builtins-eval": (GRAPH, _call("builtins.eval", ["1"]), "allow-list"),
    "graph-pickle-loads": (GRAPH, _call("torch.serialization.pickle.loads", [""]), "allow-list"),
    "graph-ops-load-library": (GRAPH, _call("torch.ops.load_library", ["/tmp/x.so"]), "allow-list"),
    "graph-torch-load": (GRAPH, _call("torch.load", ["/tmp/x"]), "allow-list"),
    "graph-from-file": (GRAPH, _call("torch.from_file", ["/etc/passwd"]), "allow-list"),
    "graph-getattr-dunder": (GRAPH, t_getattr_dunder, "getattr may read only"),
    "graph-method-apply": (GRAPH, t_method_apply, "not a listed tensor method"),
    "graph-dtype-arg": (GRAPH, t_dtype_arg, "unknown graph argument"),
    # 3. types, classes and sources that import or call
    "source-factory-beside-artifact": (USER, t_source_factory, "not one torchshrink rebuilds"),
    "source-os-abort": (USER, t_source_abort, "not one torchshrink rebuilds"),
    "class-import": (USER, t_class_import, "not one torchshrink rebuilds"),
    "module-type-import": (SEQ, t_module_type, "cannot rebuild a module of type evil.Net"),
    "module-type-popen": (SEQ, t_module_popen, "cannot rebuild a module of type subprocess.Popen"),
    "module-type-torch-prefix": (SEQ, t_torch_prefix_walk, "cannot rebuild a module of type"),
    "source-pt2": (USER, t_source_pt2, "not one torchshrink rebuilds"),
    "source-folder": (USER, t_source_folder, "not one torchshrink rebuilds"),
    "hf-auto-map": (HF, t_hf_auto_map, None),  # auto_map is dropped: loads, imports nothing
    "attr-forward": (SEQ, t_attr_forward, "not a plain setting"),
    "module-name-dunder": (SEQ, t_module_name_dunder, "not a dotted path of identifiers"),
    # schema
    "manifest-json-list": (SEQ, t_json_list, "must be a JSON object"),
    "manifest-modules-string": (SEQ, t_modules_string, "field 'modules' must be list"),
    "manifest-unknown-format": (SEQ, t_unknown_format, "unknown storage format 'pickle'"),
    "manifest-alias-missing": (SEQ, t_alias_missing, "which is no saved tensor"),
    "manifest-nested": (SEQ, t_nested, "nested too deeply"),
    "manifest-huge": (SEQ, t_huge_manifest, "a manifest may have at most"),
    "input-huge": (SEQ, t_input_huge, "declares more than"),
    "input-dtype": (SEQ, t_input_dtype, "input dtype 'load'"),
    # 5. bombs and absurd declarations
    "shape-2**50": (SEQ, t_shape_2_50, "declares more than"),
    "shape-2**36-bitmask": (SEQ, t_shape_2_36, "the file \\[262144, 262144\\]"),
    "init-huge": (SEQ, t_init_huge, "needs tensor|the file"),
    "hf-config-huge": (HF, t_hf_huge, "far more than|refused"),
    "hf-config-billion-layers": (HF, t_hf_layers, "num_hidden_layers=1,000,000,000; refused"),
    "dense-shape-mismatch": (SEQ, t_mask_size, "the file \\[16000, 8\\]"),
    "container-bomb": (SEQ, t_container_bomb, "more than the 16 bytes declared"),
    "container-trailing-data": (SEQ, t_container_trailing, "trailing data"),
    "container-declared-huge": (SEQ, t_container_declared, "declares more than|refused"),
    "container-negative-shape": (SEQ, t_container_shape, "non-negative"),
}


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return BertModel(cfg).eval()


def _saved(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / "artifact"
    model = {SEQ: _seq, GRAPH: _graph, HF: _tiny_bert, USER: UserNet}[kind]()
    model._torchshrink_input = {"shape": [2, 8], "dtype": "float32"} if kind != HF else \
        {"kind": "tokens", "shape": [2, 8], "vocab": 50}
    ts.save(model, d)
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_folder_is_refused_by_load(tmp_path, monkeypatch, case):
    kind, tamper, msg = CASES[case]
    if kind == HF:
        pytest.importorskip("transformers")
    d = _saved(tmp_path, kind)
    marker = tmp_path / "PWNED"
    tamper(d, marker)
    monkeypatch.chdir(d)  # evil.py beside the artifact is importable from here
    monkeypatch.syspath_prepend(str(d))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        if msg is None:
            ts.load(d)
        else:
            with pytest.raises(ModelLoadError, match=msg) as err:
                ts.load(d)
            assert "\n" not in str(err.value)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert not marker.exists(), f"{case}: the payload ran"
    assert "evil" not in sys.modules
    assert peak < 64 << 20, f"{case}: loading allocated {peak:,} bytes before refusing"
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("fmt", ["bitmask", "bitmask-zlib", "csr", "relidx", "entropy", "half-exact"])
def test_decoders_check_declared_sizes_before_allocating(fmt):
    import torchshrink.techniques  # noqa: F401  (registers every format)
    from torchshrink.export.formats import decode_tensor, encode_tensor

    t = torch.zeros(64, 64, dtype=torch.uint8 if fmt in ("relidx", "entropy") else torch.float32)
    t[::3, ::5] = 1
    name, parts = encode_tensor(t, fmt)
    dtype = str(t.dtype).removeprefix("torch.")
    assert torch.equal(decode_tensor(name, parts, {"shape": [64, 64], "dtype": dtype}), t)
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match="refused|corrupt"):
            decode_tensor(name, parts, {"shape": [1 << 18, 1 << 18], "dtype": dtype})
        with pytest.raises(ModelLoadError, match="corrupt|declares"):
            decode_tensor(name, parts, {"shape": [32, 64], "dtype": dtype})
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("case", ["graph-node-name", "graph-torch-os-system", "source-factory-beside-artifact",
                                  "module-type-popen", "container-bomb", "manifest-json-list"])
def test_load_model_refuses_the_same_folders(tmp_path, monkeypatch, case):
    kind, tamper, msg = CASES[case]
    d = _saved(tmp_path, kind)
    marker = tmp_path / "PWNED"
    tamper(d, marker)
    monkeypatch.chdir(d)
    monkeypatch.syspath_prepend(str(d))
    with pytest.raises(ModelLoadError, match=msg):
        ts.load_model(str(d))
    assert not marker.exists() and "evil" not in sys.modules


def test_torch_export_archive_needs_trust_code(tmp_path):
    marker = tmp_path / "PWNED"
    pt2 = _evil_pt2(tmp_path / "m.pt2", marker)
    with pytest.raises(ModelLoadError, match=r"--trust-code"):
        ts.load_model(str(pt2))
    assert not marker.exists()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([PY, "-m", "torchshrink", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("command,case", [
    ("inspect", "source-os-abort"),
    ("measure", "source-factory-beside-artifact"),
    ("compress", "graph-torch-os-system"),
    ("inspect", "module-type-popen"),
    ("measure", "graph-node-name"),
    ("compress", "container-bomb"),
    ("inspect", "pt2"),
])
def test_cli_refuses_tampered_models_in_one_line(tmp_path, command, case):
    marker = tmp_path / "PWNED"
    if case == "pt2":
        target = str(_evil_pt2(tmp_path / "m.pt2", marker))
    else:
        kind, tamper, _ = CASES[case]
        d = _saved(tmp_path, kind)
        tamper(d, marker)
        target = str(d)
    args = [command, "--model", target]
    if command == "compress":
        args += ["--recipe", "fp16", "--out", str(tmp_path / "out")]
    r = _cli(args, tmp_path / "artifact" if case != "pt2" else tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_legit_graph_model_still_round_trips(tmp_path):
    gm = _graph()
    ts.save(gm, tmp_path / "g")
    x = torch.randn(3, 8)
    assert torch.equal(ts.load(tmp_path / "g")(x), gm(x))


def test_a_graph_calling_an_unlisted_function_is_refused_at_save(tmp_path):
    class Net(nn.Module):
        def forward(self, x):
            return torch.load.__call__ if False else print_tensor(x)

    gm = torch.fx.symbolic_trace(Net())
    with pytest.raises(TypeError, match="only listed tensor functions are saved"):
        ts.save(gm, tmp_path / "g")
    assert not (tmp_path / "g").exists()


@torch.fx.wrap
def print_tensor(x):
    return x


def test_a_saved_zoo_model_loads_from_its_own_files_without_training(tmp_path, monkeypatch):
    from torchshrink.zoo.digits import DigitsMLP

    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("TORCHSHRINK_CACHE", str(cache))
    net = DigitsMLP().eval()
    net._torchshrink_source = "zoo:digits-mlp"
    ts.save(net, tmp_path / "m")
    t0 = time.perf_counter()
    back = ts.load(tmp_path / "m")
    assert time.perf_counter() - t0 < 5 and not cache.exists()  # no teacher was trained for the skeleton
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(back(x), net(x))


def test_a_reloaded_graph_model_saves_to_the_same_bytes(tmp_path):
    from torchshrink.quant import Int8StaticConfig
    from torchshrink.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    q = ts.quantize(DigitsCNN().eval(), Int8StaticConfig(), data=[torch.rand(4, 1, 8, 8)])
    ts.save(q, tmp_path / "a")
    ts.save(ts.load(tmp_path / "a"), tmp_path / "b")
    for name in ("manifest.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_report_json_is_data(tmp_path):
    """`torchshrink report` on a tampered report.json: markup is escaped; a wrong layout is one line, no rewrite."""
    from torchshrink.measure.machine import machine_info
    from torchshrink.recipe.report import regenerate

    d = tmp_path / "run"
    d.mkdir()
    meas = {"file_bytes": 10, "latency": None, "quality": {"acc": 1.0}, "params": 1, "nonzero_params": 1, "macs": 1}
    evil = "<script>alert(1)</script>"
    report = {"recipe": {"name": evil}, "model": evil, "machine": {**machine_info(), "cpu": evil}, "timing": evil, "primary": "acc",
              "original": meas, "final": meas, "summary": {}, "warnings": [evil],
              "stages": [{"name": evil, "kind": evil, "seconds": 1.0, "measurement": meas, "vs_previous": {}}],
              "layers": [{"layer": evil, "type": evil, "params": 1, "density": 1.0, "bits": 4}]}
    (d / "report.json").write_text(json.dumps(report))
    html = regenerate(d).read_text()
    assert "<script>" not in html and html.count("&lt;script&gt;") >= 5
    (d / "report.md").write_text("mine")
    (d / "report.json").write_text(json.dumps({"stages": "x"}))
    with pytest.raises(ModelLoadError, match="layout torchshrink writes") as err:
        regenerate(d)
    assert "\n" not in str(err.value) and (d / "report.md").read_text() == "mine"
    (d / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match="nested too deeply|layout"):
        regenerate(d)


def test_cli_report_refuses_a_tampered_report_in_one_line(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"stages": [{"name": 1}]}))
    r = _cli(["report", str(tmp_path)], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "layout torchshrink writes" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "report.html").exists()
