"""Knowledge distillation: losses, the Distiller, self-distillation, student builders, the
``distill`` config kind and the ``recovery: distill`` method of recipe stages."""

from torchshrink.distill.config import DistillConfig
from torchshrink.distill.distiller import Distiller, FeaturePair, distill_recovery, tap
from torchshrink.distill.losses import (
    HintAdapter,
    attention_transfer,
    hidden_cosine,
    hint_loss,
    kd_loss,
    logit_mse,
    make_adapter,
    output_match,
)
from torchshrink.distill.self_distill import (
    EarlyExits,
    add_early_exits,
    born_again,
    deep_supervision_loss,
    exit_accuracies,
    train_deep_supervision,
)
from torchshrink.distill.students import as_student, drop_layers, find_layer_stack, shrink_width
from torchshrink.recipe.train import register_recovery

register_recovery("distill", distill_recovery)

__all__ = [
    "DistillConfig", "Distiller", "EarlyExits", "FeaturePair", "HintAdapter", "add_early_exits",
    "as_student", "attention_transfer", "born_again", "deep_supervision_loss", "distill_recovery",
    "drop_layers", "exit_accuracies", "find_layer_stack", "hidden_cosine", "hint_loss", "kd_loss",
    "logit_mse", "make_adapter", "output_match", "shrink_width", "tap", "train_deep_supervision",
]

