import dataclasses

import pytest
import torch

from torchshrink.recipe import Finetune, recipe_from_yaml, run_stage
from torchshrink.recipe.task import generic_task
from torchshrink.search import space as space_mod
from torchshrink.search.space import FLOAT, assignment_to_recipe, available_options, build_space


def test_space_only_offers_registered_kinds(tiny, monkeypatch):
    labels = {o.label for o in available_options()}
    assert FLOAT in labels and "prune50" in labels
    monkeypatch.setattr(space_mod, "known_kinds", lambda: ["unstructured"])
    sp = build_space(tiny)
    assert sp.layers == ("conv", "fc1", "fc2")
    assert {o.kind for opts in sp.options.values() for o in opts} == {FLOAT, "unstructured"}


def test_assignment_becomes_an_ordinary_recipe_with_overrides(tiny):
    sp = build_space(tiny, allowed=["prune50", "prune90", "ternary"])
    assign = {"conv": "ternary", "fc1": "prune90", "fc2": "prune50"}
    rec = assignment_to_recipe(sp, assign, finetune=Finetune(epochs=1))
    again = recipe_from_yaml(rec.to_yaml())
    assert again.to_dict() == rec.to_dict()
    kinds = [s.config.kind for s in again.stages]
    assert kinds == ["twn", "unstructured"]  # binarize first, pruning last (see FAMILY_ORDER)
    prune = again.stages[1]
    assert set(prune.select.include) == {"fc1", "fc2"}
    base = prune.config.sparsity
    other = "fc2" if base == 0.9 else "fc1"
    assert prune.select.overrides == {other: {"sparsity": 0.5 if base == 0.9 else 0.9}}
    # the recipe really prunes each layer to its own sparsity
    task = generic_task(tiny)
    before = tiny.fc1.weight.detach().clone()
    model, _ = run_stage(tiny, dataclasses.replace(again.stages[1], finetune=None), task)
    for name, want in (("fc1", 0.9), ("fc2", 0.5)):
        w = dict(model.named_modules())[name].weight
        assert float((w == 0).float().mean()) == pytest.approx(want, abs=0.02)
    assert torch.equal(tiny.fc1.weight, before)  # input untouched
