"""The catalogue of tampered save folders used by test_security.py: each case is a tampering of a
real saved folder (a payload in one field of the manifest or graph, a bomb, an absurd declaration)
and the one-line refusal it must get. A payload that ran would create the marker file ``PWNED`` (or
import ``evil.py``, which creates it)."""

from __future__ import annotations

import json
import lzma
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import torchshrink as ts
from torchshrink.core import state

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


def graph_model() -> torch.fx.GraphModule:
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
    m.update(source=str(evil_pt2(d / "other.pt2", mk)), hf_config=None)
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


def _bitmask_shape(shape: list[int]) -> Callable:
    """A dense tensor re-declared as a bitmask of ``shape`` (far more than the file holds)."""
    def tamper(d, mk):
        m = _manifest(d)
        key = next(k for k, v in m["tensors"].items() if v["format"] == "dense")
        m["tensors"][key].update(format="bitmask", shape=shape)
        _write(d, m)

    return tamper


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


def evil_pt2(path: Path, marker: Path) -> Path:
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
    "shape-2**50": (SEQ, _bitmask_shape([1 << 25, 1 << 25]), "declares more than"),
    "shape-2**36-bitmask": (SEQ, _bitmask_shape([1 << 18, 1 << 18]), "the file \\[262144, 262144\\]"),
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


def saved_folder(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / "artifact"
    model = {SEQ: _seq, GRAPH: graph_model, HF: _tiny_bert, USER: UserNet}[kind]()
    state.put(model, input={"shape": [2, 8], "dtype": "float32"} if kind != HF else
              {"kind": "tokens", "shape": [2, 8], "vocab": 50})
    ts.save(model, d)
    return d
