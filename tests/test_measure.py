import pytest
import torch

import torchshrink as ts
from torchshrink.core.errors import InputShapeError
from torchshrink.measure import (
    accuracy,
    compare,
    compare_markdown,
    compare_table,
    count_macs,
    count_nonzero,
    count_params,
    fidelity,
    time_interleaved,
)


def test_resnet18_params_and_macs():
    model = ts.load_model("torchvision:resnet18")
    assert count_params(model) == 11_689_512
    macs = count_macs(model, (torch.randn(1, 3, 224, 224),))
    assert abs(macs / 1.82e9 - 1) < 0.01


def test_macs_of_a_linear_layer_and_per_module():
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    x = torch.randn(3, 10)
    assert count_macs(net, (x,)) == 3 * (10 * 20 + 20 * 5)
    per = count_macs(net, (x,), per_module=True)
    assert per["0"] == 600 and per["2"] == 300


def test_module_with_its_own_mac_count_replaces_the_counter():
    class Packed(torch.nn.Module):
        def forward(self, x):
            return x * 2  # stands for an integer GEMM the counter cannot see

        def macs(self, args, out):
            return 1234

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), Packed())
    assert count_macs(net, (torch.randn(1, 4),)) == 16 + 1234


def test_nonzero_count(tiny):
    before = count_nonzero(tiny)
    assert before == count_params(tiny) - 8  # BatchNorm's bias starts at zero
    with torch.no_grad():
        tiny.fc1.weight.zero_()
    assert count_nonzero(tiny) == before - tiny.fc1.weight.numel()


def test_latency_harness_two_copies_give_ratio_near_one():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512)).eval()
    import copy

    b = copy.deepcopy(a)
    t = time_interleaved({"a": a, "b": b}, (torch.randn(64, 512),), n_threads=1, warmup=20, runs=200)
    ratio = t["b"].p50_ms / t["a"].p50_ms
    assert 0.95 <= ratio <= 1.05, ratio
    assert t["a"].runs == 200 and t["a"].threads == 1 and t["a"].p90_ms >= t["a"].p50_ms


def test_bursts_time_every_call_after_the_first_of_each_turn():
    seen: list[str] = []
    t = time_interleaved({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")}, warmup=0, runs=4, burst=3)
    assert seen == ["a"] * 3 + ["b"] * 6 + ["a"] * 6 + ["b"] * 6 + ["a"] * 3  # A B, B A, ... in turns of 3
    assert t["a"].runs == t["b"].runs == 8  # 4 turns x 2 timed calls
    with pytest.raises(ValueError, match="burst=0; allowed: 1 or more"):
        time_interleaved({"a": lambda: None}, burst=0)


def test_measure_and_compare(tiny):
    x = torch.randn(2, 3, 4, 4)
    m1 = ts.measure(tiny, x, runs=5, warmup=1)
    assert m1.params == count_params(tiny) and m1.file_bytes > 4 * m1.params and m1.macs > 0
    small = ts.quantize(tiny, ts.config_from_dict({"kind": "cast", "dtype": "float16"}))
    m2 = ts.measure(small, x, runs=5, warmup=1)
    rows = compare(m1, m2)
    assert rows["params"]["ratio"] == 1.0
    assert 0.45 < rows["file_bytes"]["ratio"] < 0.75  # the manifest is a fixed cost on a tiny net
    assert "file_bytes" in compare_markdown(rows)
    assert compare_table(rows).row_count == len(rows)


def test_wrong_input_shape_is_one_clear_error(tiny):
    with pytest.raises(InputShapeError, match=r"TinyNet cannot run on input \(2, 5, 4, 4\):float32"):
        ts.measure(tiny, torch.randn(2, 5, 4, 4))


def test_accuracy_and_fidelity(tiny):
    x = torch.randn(8, 3, 4, 4)
    y = tiny(x).argmax(-1)
    assert accuracy(tiny, [(x, y)]) == 1.0
    assert accuracy(tiny, [(x, (y + 1) % 10)]) == 0.0
    f = fidelity(tiny, tiny, (x,))
    assert f["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and f["max_abs_diff"] == 0.0
    k = fidelity(tiny, tiny, [(x,)], metric="kl")
    assert k["kl_mean"] == pytest.approx(0.0, abs=1e-6)


def test_nonzeros_of_an_integer_model_follow_its_weights(digits_cnn):
    from torchshrink.recipe.task import digits_task

    q = ts.quantize(digits_cnn, ts.config_from_dict({"kind": "int8-static"}), data=digits_task().calibration)
    nnz, params = count_nonzero(q), count_params(q)
    assert 0.9 * params < nnz <= params  # integer weights count, not 0 (they are buffers)


ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\n\n" \
       "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 99\nmodel\t\t: 9\n"


def test_cpu_id_tells_apart_cpus_that_share_a_model_name():
    from torchshrink.measure.machine import machine_info, machine_markdown, parse_cpu_id, same_machine

    assert parse_cpu_id(ZEN4) == "AuthenticAMD family 25 model 17 stepping 1"  # the first CPU's block only
    assert parse_cpu_id("model name : something\n") == ""
    here = machine_info()
    zen4 = {**here, "cpu": "AMD EPYC", "cpu_id": parse_cpu_id(ZEN4)}
    zen5 = {**zen4, "cpu_id": "AuthenticAMD family 26 model 2 stepping 1"}
    assert same_machine(zen4, dict(zen4)) and not same_machine(zen4, zen5)
    assert not same_machine({k: v for k, v in zen4.items() if k != "cpu_id"}, zen4)  # unknown CPU: never the same
    assert not same_machine(zen4, {**zen4, "simd": zen4["simd"] + ["amx_int8"]})
    assert "(AuthenticAMD family 25 model 17 stepping 1)" in machine_markdown(zen4)


def test_write_results_keeps_the_machine_it_is_given(tmp_path):
    import json

    from torchshrink.measure.bench import write_results
    from torchshrink.measure.machine import machine_info

    other = {**machine_info(), "cpu": "Other CPU", "cpu_id": "GenuineIntel family 6 model 143 stepping 8"}
    write_results("x", [], {"t": "| a |"}, {"part": 1}, tmp_path, other)
    assert json.loads((tmp_path / "x.json").read_text())["machine"]["cpu"] == "Other CPU"
    assert "Machine: Other CPU (GenuineIntel family 6 model 143" in (tmp_path / "x.md").read_text()


def test_search_profile_key_changes_with_the_cpu(monkeypatch):
    from torchshrink.search import profile as P
    from torchshrink.search.space import SearchSpace

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    space = SearchSpace(layers=(), options={})
    x = [torch.randn(1, 4)]
    a = P.profile_key(net, space, x, 1, False)
    info = P.machine_info()
    monkeypatch.setattr(P, "machine_info", lambda: {**info, "cpu_id": info["cpu_id"] + " (another stepping)"})
    assert P.profile_key(net, space, x, 1, False) != a


def test_cosine_holds_at_any_output_scale():
    from torchshrink.measure.quality import cosine_rows, fidelity, main_output

    a = torch.randn(4, 10) * 1e-14  # a random-init EfficientNet's logits are this small
    assert torch.allclose(cosine_rows(a, a), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(cosine_rows(a, 3e20 * a), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(cosine_rows(a, -a), -torch.ones(4, dtype=torch.float64))
    z = torch.zeros(2, 5)
    assert cosine_rows(z, z).tolist() == [1.0, 1.0] and cosine_rows(z, torch.ones(2, 5)).tolist() == [0.0, 0.0]
    net = torch.nn.Linear(3, 3)
    tiny = lambda x: {"y": net(x) * 1e-15, "aux": x}  # noqa: E731  (a plain dict output: its first value)
    assert main_output(tiny(torch.ones(1, 3))).shape == (1, 3)
    assert fidelity(tiny, tiny, [torch.randn(6, 3)])["cosine_min"] == pytest.approx(1.0)
