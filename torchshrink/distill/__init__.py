"""Knowledge distillation: losses, the Distiller, self-distillation, student builders, the
``distill`` config kind and the ``recovery: distill`` method of recipe stages."""

from torchshrink.core.train import register_recovery
from torchshrink.distill.config import DistillConfig
from torchshrink.distill.corpus import check_disjoint, distill_corpus, docstring_sentences
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
from torchshrink.distill.sentence import distill_sentence_encoder, freeze_word_embeddings, length_batches
from torchshrink.distill.students import as_student, drop_layers, find_layer_stack, shrink_width

register_recovery("distill", distill_recovery)

__all__ = [
    "DistillConfig", "Distiller", "EarlyExits", "FeaturePair", "HintAdapter", "add_early_exits",
    "as_student", "attention_transfer", "born_again", "check_disjoint", "deep_supervision_loss",
    "distill_corpus", "distill_recovery", "distill_sentence_encoder", "docstring_sentences", "drop_layers",
    "exit_accuracies", "find_layer_stack", "freeze_word_embeddings", "hidden_cosine", "hint_loss",
    "kd_loss", "length_batches", "logit_mse", "make_adapter", "output_match", "shrink_width", "tap",
    "train_deep_supervision",
]
