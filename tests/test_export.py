import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchshrink as ts
from torchshrink.core.errors import ModelLoadError, OutputExistsError
from torchshrink.export.formats import decode_tensor, encode_tensor


def _dir_bytes(d):
    return sum(p.stat().st_size for p in os.scandir(d))


def test_round_trip_is_exact_for_a_cast_model(tmp_path, digits_cnn):
    small = ts.quantize(digits_cnn, ts.config_from_dict({"kind": "cast", "dtype": "float16"}))
    ts.save(small, tmp_path / "m")
    back = ts.load(tmp_path / "m")
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(back(x), small(x))
    assert back.features[0].inner.weight.dtype == torch.float16
    # half the bytes of the fp32 save (BatchNorm stays fp32)
    ts.save(digits_cnn, tmp_path / "fp32")
    assert _dir_bytes(tmp_path / "m") < 0.6 * _dir_bytes(tmp_path / "fp32")


def test_input_model_is_not_modified(digits_cnn):
    before = {k: v.clone() for k, v in digits_cnn.state_dict().items()}
    ts.quantize(digits_cnn, ts.config_from_dict({"kind": "cast", "dtype": "bfloat16"}))
    after = digits_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(digits_cnn.features[0]) is torch.nn.Conv2d


def test_sparse_tensors_are_stored_as_bitmask_and_file_follows_nonzeros(tmp_path, digits_mlp):
    dense = digits_mlp
    sparse = ts.load_model("zoo:digits-mlp")
    with torch.no_grad():
        for p in sparse.parameters():
            if p.dim() == 2:
                p[p.abs() < p.abs().flatten().kthvalue(int(0.9 * p.numel())).values] = 0
    ts.save(dense, tmp_path / "d")
    ts.save(sparse, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["tensors"]["net.1.weight"]["format"].startswith("bitmask")
    assert _dir_bytes(tmp_path / "s") < 0.2 * _dir_bytes(tmp_path / "d")
    back = ts.load(tmp_path / "s")
    for k, v in sparse.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.floats(0.0, 1.0), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_bitmask_round_trip_is_bit_exact(n, density, dtype):
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, 3, generator=g).to(dtype)
    t[torch.rand(n, 3, generator=g) > density] = 0
    t.view(-1)[0] = -0.0
    fmt, parts = encode_tensor(t, "bitmask")
    back = decode_tensor(fmt, parts, {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")})
    assert back.dtype == t.dtype and torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                  t.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_changed_shapes_removed_modules_and_tied_weights_round_trip(tmp_path):
    model = ts.load_model("tests.conftest:tiny_net")
    model.fc1 = torch.nn.Linear(128, 16)  # a "structurally pruned" layer
    model.fc2 = torch.nn.Linear(16, 10)
    model.extra = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False), torch.nn.Linear(10, 10, bias=False))
    model.extra[1].weight = model.extra[0].weight  # tied
    ts.save(model, tmp_path / "m")
    # a user's factory is code: the folder never names it for loading, the user gives the architecture
    with pytest.raises(ModelLoadError, match="not one torchshrink rebuilds from a file"):
        ts.load(tmp_path / "m")
    back = ts.load(tmp_path / "m", model=ts.load_model("tests.conftest:tiny_net"))
    assert torch.equal(ts.load_model(f"tests.conftest:tiny_net@{tmp_path / 'm'}").fc1.weight, back.fc1.weight)
    assert back.fc1.out_features == 16 and back.extra[1].weight is back.extra[0].weight
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(back(x), model(x))
    del model.extra[1]
    ts.save(model, tmp_path / "m2")
    assert len(ts.load(tmp_path / "m2", model=ts.load_model("tests.conftest:tiny_net")).extra) == 1


def test_save_refuses_existing_dir_and_leaves_no_partial_output(tmp_path, tiny):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        ts.save(tiny, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_errors_are_clear(tmp_path, tiny):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ts.load(tmp_path / "nope")
    ts.save(tiny, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        ts.load(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ts.load(tmp_path / "m")


def test_user_class_without_source_needs_the_skeleton(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = torch.nn.Linear(4, width)

        def forward(self, x):
            return self.fc(x)

    net = Net(3)
    ts.save(net, tmp_path / "m")
    with pytest.raises(ModelLoadError, match="not one torchshrink rebuilds from a file"):
        ts.load(tmp_path / "m")
    back = ts.load(tmp_path / "m", model=Net(3))
    assert torch.equal(back.fc.weight, net.fc.weight)


def test_fx_graph_models_round_trip_and_unknown_calls_are_refused(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.act = torch.nn.LeakyReLU(0.2)

        def forward(self, x):
            y = self.act(self.conv(x))
            return torch.flatten(self.pool(y), 1) + y.mean((2, 3))[:, :4] * 2

    gm = torch.fx.symbolic_trace(Net())
    ts.save(gm, tmp_path / "g")
    back = ts.load(tmp_path / "g")
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(back, torch.fx.GraphModule) and torch.equal(back(x), gm(x))
    assert back.act.negative_slope == 0.2
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    manifest["fx_graph"][2]["op"] = "call_function"
    manifest["fx_graph"][2]["target"] = "os.system"
    (tmp_path / "g" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="'os.system', which is not on torchshrink's allow-list"):
        ts.load(tmp_path / "g")


def test_all_zero_tensor_round_trips(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    with torch.no_grad():
        net[0].weight.zero_()
    ts.save(net, tmp_path / "z")
    back = ts.load(tmp_path / "z", model=torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)))
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_half_exact_format_is_used_only_when_lossless():
    exact = torch.tensor([0.5, -1.25, 3.0, 0.0] * 20)
    fmt, parts = encode_tensor(exact, "half-exact")
    assert fmt == "half-exact" and parts["values"].dtype == torch.float16
    assert torch.equal(decode_tensor(fmt, parts, {"shape": [80], "dtype": "float32"}), exact)
    lossy = exact + 1e-4
    fmt, parts = encode_tensor(lossy, "half-exact")  # falls back to an automatic, exact format
    assert fmt == "dense" and torch.equal(parts[""], lossy)


def test_what_the_saver_writes_the_loader_accepts_all_zero_and_dashed_names(tmp_path):
    """An all-zero 1000x768 head (torchvision ViT's init) compresses past the loader's bomb limit: the saver
    must pick a format the loader accepts. Module names with '-' (torchvision RegNet's "block1-0") load."""
    net = torch.nn.Sequential()
    net.add_module("block1-0", torch.nn.Linear(8, 768))
    net.add_module("head", torch.nn.Linear(768, 1000))
    with torch.no_grad():
        net.head.weight.zero_()
    x = torch.randn(2, 8)
    ts.save(net, tmp_path / "m")
    back = ts.load(tmp_path / "m", model=_dashed())
    assert torch.equal(back(x), net(x))


def _dashed():
    net = torch.nn.Sequential()
    net.add_module("block1-0", torch.nn.Linear(8, 768))
    net.add_module("head", torch.nn.Linear(768, 1000))
    return net


@pytest.mark.parametrize("name", ["mnasnet0_5", "regnet_x_400mf"])
def test_a_torchvision_instance_saves_with_its_builder_and_reloads(name, tmp_path):
    """Given as an instance (not a spec), a torchvision model's builder is found from its module tree;
    MNASNet's state-dict version and RegNet's meta-device build (tensor ops in its width rule) both load."""
    tv = pytest.importorskip("torchvision")
    m = tv.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    ts.save(m, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "manifest.json").read_text()).get("source") == f"torchvision:{name}"
    assert torch.equal(ts.load(tmp_path / "m")(x), m(x))


def test_an_fx_graph_calling_a_dashed_module_round_trips(tmp_path):
    """Static INT8 of torchvision's RegNet is an fx graph with call_module targets like "trunk.block1-0.f"."""
    net = _dashed().eval()
    gm = torch.fx.symbolic_trace(net)
    assert any(n.op == "call_module" and n.target == "block1-0" for n in gm.graph.nodes)
    ts.save(gm, tmp_path / "g")
    x = torch.randn(2, 8)
    assert torch.equal(ts.load(tmp_path / "g")(x), gm(x))


def test_a_torchvision_instance_keeps_its_builder_through_svd(tmp_path):
    """SVD puts Sequentials where the classifier's Linears were; the builder is named before, so the folder loads."""
    tv = pytest.importorskip("torchvision")
    m = tv.models.mobilenet_v3_small(weights=None).eval()
    q = ts.apply(m, ts.SVDConfig(ratio=0.5)).eval()
    ts.save(q, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "manifest.json").read_text()).get("source") == "torchvision:mobilenet_v3_small"
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(ts.load(tmp_path / "m")(x), q(x))


class _LayerNorm2d(torch.nn.LayerNorm):
    """As torchvision's ConvNeXt: a LayerNorm subclass fx traces into, so its weight becomes a get_attr."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = _LayerNorm2d(8)
        self.layer_scale = torch.nn.Parameter(torch.full((8, 1, 1), 0.5))

    def forward(self, x):
        return self.norm(self.conv(x)) * self.layer_scale


def test_an_fx_graph_reading_weights_of_plain_holders_round_trips(tmp_path):
    """fx keeps a traced-into module's weights on bare nn.Module holders (static INT8 of ConvNeXt): the loader
    refused the graph ('get_attr target ... names nothing in the saved module tree')."""
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Scaled().eval())
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"norm.weight", "layer_scale"} <= targets and type(gm.norm) is torch.nn.Module
    ts.save(gm, tmp_path / "g")
    back = ts.load(tmp_path / "g")
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(back(x), gm(x))
    ts.save(back, tmp_path / "again")
    assert (tmp_path / "g" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


class _AttnNet(torch.nn.Module):
    """A user's model with layers torchshrink does not build from arguments (MultiheadAttention) next to ones it does
    (ConvTranspose1d, GRU), traced into a static-INT8 graph where they stay as they are."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.up = torch.nn.ConvTranspose1d(16, 4, 4, stride=2, padding=1)
        self.rnn = torch.nn.GRU(4, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.proj(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        h = self.up(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.rnn(h)[0][:, -1])


def test_a_graph_model_keeps_a_users_own_layers_through_save_and_load(tmp_path):
    """int8-static rewrites the model into an fx graph; layers of types torchshrink cannot build from arguments
    (MultiheadAttention) are taken from the model given to load, by name; ConvTranspose / GRU / Conv3d /
    EmbeddingBag ... are rebuilt from the file. Without the model, one line says what to pass."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    q = ts.quantize(_AttnNet().eval(), ts.Int8StaticConfig(), data=[x])
    ts.save(q, tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"cannot rebuild layer 'attn' of type .*MultiheadAttention from the file.*"
                                             r"torchshrink.load\(dir, model=MyModel\(...\)\)"):
        ts.load(tmp_path / "m")
    back = ts.load(tmp_path / "m", model=_AttnNet())
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert type(back.get_submodule("up")) is torch.nn.ConvTranspose1d and back.get_submodule("attn") is not None
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    init = {r["name"]: r["init"] for r in man["modules"]}
    assert init["up"]["output_padding"] == [0] and init["rnn"]["hidden_size"] == 6 and init["attn"] is None


def test_an_fx_graph_calling_torch_assert_round_trips(tmp_path):
    """timm's models check input sizes with torch._assert, which fx keeps as a call: on the saved-graph allowlist
    (it raises AssertionError, nothing else), so their static-INT8 graphs save and load."""

    class Checked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            torch._assert(x.shape[-1] == 8, "expected 8 features")
            return self.fc(x)

    q = ts.quantize(Checked().eval(), ts.Int8StaticConfig(), data=[torch.randn(4, 8)])
    assert any(n.op == "call_function" and n.target is torch._assert for n in q.graph.nodes)
    ts.save(q, tmp_path / "m")
    x = torch.randn(2, 8)
    assert torch.equal(ts.load(tmp_path / "m")(x), q(x))


def test_a_graph_keeps_the_non_persistent_buffers_and_partial_modules_it_reads(tmp_path):
    """fx copies a non-persistent buffer the graph reads onto a plain holder (timm's LeViT: attention_bias_idxs),
    which no constructor rebuilds: it is saved. A module the graph only reads a tensor of after static INT8 fused
    the module itself (timm's EdgeNeXt: token_projection.weight, for a dtype) is saved as loading rebuilds it,
    not whole (its bias had nowhere to go)."""

    class Gather(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("order", torch.tensor([3, 1, 2, 0, 7, 5, 6, 4]), persistent=False)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 1)
            self.mix = Gather()
            self.register_buffer("flip", torch.tensor([1, 0]), persistent=False)
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x):
            h = self.proj(x).to(self.proj.weight.dtype).mean((2, 3))
            return self.fc(h[:, self.mix.order])[:, self.flip]

    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    q = ts.quantize(Net().eval(), ts.Int8StaticConfig(), data=[x])
    assert {n.target for n in q.graph.nodes if n.op == "get_attr"} >= {"mix.order", "flip", "proj.weight"}
    ts.save(q, tmp_path / "m")
    back = ts.load(tmp_path / "m")
    assert torch.equal(back(x), q(x))
    assert isinstance(q.get_submodule("proj"), torch.nn.Conv2d)  # the user's quantized model is left as it was
