import json

import pytest
import torch

from torchshrink.core.errors import ConfigError, OutputExistsError, UnsupportedLayerError
from torchshrink.recipe import Finetune, compress, finetune, load_recipe, recipe_from_yaml
from torchshrink.recipe.task import generic_task

GOOD = """\
name: two-stage
stages:
  - kind: cast
    dtype: float16
    select: {types: [Linear]}
  - kind: cast
    dtype: bfloat16
    select: {include: ["conv"]}
"""


def test_recipe_parses_and_round_trips():
    r = recipe_from_yaml(GOOD)
    assert r.name == "two-stage" and len(r.stages) == 2
    assert r.stages[0].select.types == ("Linear",)
    again = recipe_from_yaml(r.to_yaml())
    assert again == r


def test_recipe_errors_name_the_line_and_allowed_values():
    bad_kind = GOOD.replace("kind: cast\n    dtype: bfloat16", "kind: kast\n    dtype: bfloat16")
    with pytest.raises(ConfigError, match=r"line 6 \(stage 2\): unknown kind 'kast' \(did you mean 'cast'\?\); known kinds:"):
        recipe_from_yaml(bad_kind)
    bad_field = GOOD.replace("dtype: float16", "dtpe: float16")
    with pytest.raises(ConfigError, match=r"line 3 \(stage 1\): unknown field 'dtpe'.*allowed fields: dtype"):
        recipe_from_yaml(bad_field)
    with pytest.raises(ConfigError, match="unknown finetune field 'epoch'"):
        recipe_from_yaml("stages:\n  - kind: cast\n    finetune: {epoch: 2}\n")
    with pytest.raises(ConfigError, match="non-empty list `stages:`"):
        recipe_from_yaml("name: x\n")
    with pytest.raises(ConfigError, match="no recipe file 'nope.yaml'.*built-in: .*demo"):
        load_recipe("nope.yaml")


def test_finetune_loop_lowers_the_loss(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    steps = []
    hist = finetune(tiny, data, Finetune(epochs=15, lr=1e-2), on_step=lambda m, s, t: steps.append((s, t)))
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert steps[0] == (0, 60) and steps[-1] == (60, 60)
    assert not tiny.training


def test_finetune_bf16_autocast_runs_bf16_matmuls_and_keeps_float32_weights(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    seen = []
    hook = next(m for m in tiny.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    hist = finetune(tiny, data, Finetune(epochs=15, lr=1e-2, autocast="bf16"))
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # the forward ran in bfloat16 ...
    assert all(p.dtype == torch.float32 for p in tiny.parameters())  # ... the weights stayed float32
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    with pytest.raises(ConfigError, match="finetune.autocast='fp8'; allowed: 'none', 'bf16'"):
        Finetune(autocast="fp8")


def test_runner_writes_outputs_and_refuses_existing(tmp_path, tiny):
    recipe = recipe_from_yaml(GOOD)
    task = generic_task(tiny)
    res = compress(tiny, recipe, tmp_path / "run", task=task)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == [".torchshrink-run", "model", "recipe.yaml", "report.html", "report.json", "report.md", "run.json",
                     "stages", "tensorboard"]
    assert sorted(p.name for p in (tmp_path / "run" / "stages").iterdir()) == ["01-cast", "02-cast"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["stages"]) == 2 and report["summary"]["file_bytes"]["ratio"] < 0.8
    assert report["final"]["quality"]["agreement_mean"] > 0.99  # no data: agreement on random inputs
    assert "64 random inputs" in report["provenance"]["quality"] and "not accuracy" in report["provenance"]["quality"]
    assert "| file_bytes |" in (tmp_path / "run" / "report.md").read_text()
    assert res.final.latency is not None and res.original.latency is not None
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "per-stage metrics are logged to TensorBoard when it is installed"
    with pytest.raises(OutputExistsError, match="pass --force"):
        compress(tiny, recipe, tmp_path / "run", task=task)
    compress(tiny, recipe, tmp_path / "run", task=task, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp folders left behind


def test_every_builtin_recipe_parses():
    from torchshrink.recipe.builtin import BUILTIN

    assert {"deep-compression", "prune-quantize", "distill-quantize", "prune-distill-quantize",
            "lowrank-quantize", "binary", "demo"} <= set(BUILTIN)
    for name in BUILTIN:
        r = load_recipe(name)
        assert r.stages, name


def test_stage_order_is_checked_with_a_reason():
    from torchshrink.recipe.recipe import order_warnings

    bad = recipe_from_yaml("stages:\n  - kind: kmeans\n  - kind: unstructured\n    sparsity: 0.5\n")
    (w,) = order_warnings(bad)
    assert "'kmeans' runs before 'unstructured'" in w and "prune first" in w
    assert order_warnings(load_recipe("deep-compression")) == []


def test_no_data_task_keeps_every_input_of_a_two_input_model():
    """Calibration batches are the model's inputs: two tensors never read as (inputs, labels)."""
    from torchshrink.core.data import as_batch

    class TwoIn(torch.nn.Module):
        def forward(self, ids, mask):
            return (ids * mask).float()

    ids = torch.tensor([[3, 7, 9, 9], [11, 3, 7, 3]])
    mask = torch.ones_like(ids)
    task = generic_task(TwoIn(), (ids, mask))
    for b in task.calibration:
        b = as_batch(b)
        assert len(b.inputs) == 2 and b.labels is None
        assert set(b.inputs[0].unique().tolist()) <= {3, 7, 9, 11} and b.inputs[1].eq(1).all()
    assert len({tuple(as_batch(b).inputs[0][0].tolist()) for b in task.calibration}) > 1  # not one row repeated
    assert task.evaluate(TwoIn(), TwoIn())["agreement_min"] == pytest.approx(1.0)


def test_no_data_task_judges_on_the_inputs_given_not_the_declared_ones():
    """deploy(resnet, (x96,)) timed 96x96 but judged on the 224x224 the model declares: every ONNX candidate
    (exported at 96x96) then failed its quality check."""
    from torchshrink.core import state
    from torchshrink.core.data import as_batch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    state.put(net, input={"shape": [1, 3, 16, 16], "dtype": "float32"})
    given = generic_task(net, (torch.randn(1, 3, 6, 6),))
    assert {tuple(as_batch(b).inputs[0].shape[1:]) for b in given.calibration} == {(3, 6, 6)}
    declared = generic_task(net)
    assert {tuple(as_batch(b).inputs[0].shape[1:]) for b in declared.calibration} == {(3, 16, 16)}


def test_a_static_int8_stage_on_a_model_fx_cannot_trace_is_refused_before_any_stage_runs(tmp_path):
    """prune-distill-quantize on a Hugging Face encoder trained its pruning stage, then failed at int8-static."""
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.mean() > 0 else -self.fc(x)  # data-dependent Python: fx cannot trace it

    recipe = recipe_from_yaml("stages:\n  - kind: cast\n    dtype: bfloat16\n  - kind: int8-static\n")
    with pytest.raises(UnsupportedLayerError, match=r"stage 2 \(int8-static\): static INT8 needs a torch.fx-traceable"):
        compress(Branchy().eval(), recipe, tmp_path / "run", task=generic_task(Branchy(), (torch.randn(2, 4),)))
    assert not list(tmp_path.iterdir())
