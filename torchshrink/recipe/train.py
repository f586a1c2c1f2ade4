"""Kept for imports: the shared loop and the recovery registry live in :mod:`torchshrink.core.train`."""

from torchshrink.core.train import (
    LossFn,
    TrainingError,
    finetune,
    known_recoveries,
    make_optimizer,
    recovery_loss,
    register_recovery,
)

__all__ = ["LossFn", "TrainingError", "finetune", "known_recoveries", "make_optimizer", "recovery_loss",
           "register_recovery"]
