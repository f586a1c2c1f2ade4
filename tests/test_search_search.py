import pytest
import torch

from torchshrink.recipe import Finetune, compress, recipe_from_yaml
from torchshrink.recipe.task import digits_task
from torchshrink.search import InfeasibleBudgetError, build_space, profile_layers, search
from torchshrink.search.budget import parse_budget
from torchshrink.search.greedy import greedy

ALLOWED = ["prune50", "prune90", "ternary", "int8"]


@pytest.fixture(scope="module")
def setup(digits_cnn):
    torch.set_num_threads(1)
    task = digits_task()
    space = build_space(digits_cnn, allowed=ALLOWED)

    def q(m):
        return 100.0 * task.evaluate(m, digits_cnn)["val_accuracy"]

    prof = profile_layers(digits_cnn, space, task.inputs, data=task.calibration, quality=q, runs=5, warmup=2)
    return task, space, prof


def test_profile_is_measured_cached_and_predicts_size(digits_cnn, setup):
    task, space, prof = setup
    assert set(prof.latency_ms) == set(space.layers)
    assert all(v > 0 for lat in prof.latency_ms.values() for v in lat.values())
    # pruning 90% of a layer makes its bytes smaller than 50%, which is smaller than float
    b = prof.bytes["features.7"]
    assert b["prune90"] < b["prune50"] < b["float"]
    assert prof.predict_bytes({layer: "float" for layer in space.layers}) == prof.model_bytes
    again = profile_layers(digits_cnn, space, task.inputs, data=task.calibration,
                           quality=lambda m: 0.0, runs=5, warmup=2)  # read from the cache
    assert again.latency_ms == prof.latency_ms and again.quality == prof.quality
    assert "| features.0 |" in prof.sensitivity_markdown()


def test_greedy_meets_the_predicted_size(setup):
    _, space, prof = setup
    assign = greedy(space, prof, parse_budget("--max-size 0.3x"))
    assert prof.predict_bytes(assign) <= 0.3 * prof.model_bytes


def test_search_resumes_without_repeating_trials_and_writes_a_rerunnable_recipe(digits_cnn, setup, tmp_path):
    task, _, prof = setup
    url = f"sqlite:///{tmp_path / 'search.db'}"
    kw = dict(task=task, allowed=ALLOWED, profile=prof, storage=url, study_name="t", method="tpe")
    first = search(digits_cnn, "--max-size 0.5x --max-accuracy-drop 5", n_trials=2, **kw)
    assert len(first.points) == 2 and first.points[0].source == "greedy"
    second = search(digits_cnn, "--max-size 0.5x --max-accuracy-drop 5", n_trials=3, **kw)
    assert len(second.points) == 3
    assert [p.to_dict() for p in second.points[:2]] == [p.to_dict() for p in first.points]  # not re-run
    assert second.feasible, second.message
    # the chosen point is an ordinary recipe; `compress` reruns it to the same file size
    rec = recipe_from_yaml(second.recipe.to_yaml())
    out = compress(digits_cnn, rec, task=task)
    assert out.final.file_bytes == second.chosen.size_bytes


def test_infeasible_budget_names_the_constraint_and_the_closest_point(digits_cnn, setup):
    task, _, prof = setup
    with pytest.raises(InfeasibleBudgetError) as e:
        search(digits_cnn, "--max-size 1KB", task=task, allowed=ALLOWED, profile=prof, method="greedy")
    msg = str(e.value)
    assert "size <= 1,000 B cannot be met" in msg and "Closest point:" in msg


def test_greedy_search_with_finetune_meets_a_loose_budget(digits_cnn, setup):
    task, _, prof = setup
    res = search(digits_cnn, "--max-size 0.5x --max-accuracy-drop 3", task=task, allowed=ALLOWED, profile=prof,
                 method="greedy", finetune=Finetune(epochs=1))
    assert res.feasible and res.chosen.size_ratio <= 0.5
    assert res.recipe.stages[-1].finetune is not None or res.recipe.stages[-1].config.family == "quantize"


def test_an_option_that_fails_to_apply_is_left_out_with_its_reason(digits_cnn, setup, monkeypatch):
    import torchshrink.search.profile as P

    task, space, _ = setup
    real = P._apply_everywhere

    def flaky(model, space_, label, data):
        if label == "ternary":
            raise RuntimeError("rank larger than in_channels*k*k\nsecond line")
        return real(model, space_, label, data)

    monkeypatch.setattr(P, "_apply_everywhere", flaky)
    prof = profile_layers(digits_cnn, space, task.inputs, data=task.calibration, runs=2, warmup=1, cache=False)
    assert prof.skipped == {"ternary": "RuntimeError: rank larger than in_channels*k*k"}
    assert all("ternary" not in lat for lat in prof.latency_ms.values())
    left = space.without(prof.skipped)
    assert all("ternary" not in left.labels(layer) for layer in left.layers)
    assert any("int8" in left.labels(layer) for layer in left.layers)
