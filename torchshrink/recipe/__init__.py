from torchshrink.recipe.recipe import Finetune, Recipe, Stage, load_recipe, recipe_from_yaml
from torchshrink.recipe.runner import RunResult, compress, run_stage
from torchshrink.recipe.task import Task, task_for
from torchshrink.recipe.train import finetune, register_recovery

__all__ = [
    "Finetune", "Recipe", "RunResult", "Stage", "Task", "compress", "finetune", "load_recipe",
    "recipe_from_yaml", "register_recovery", "run_stage", "task_for",
]
