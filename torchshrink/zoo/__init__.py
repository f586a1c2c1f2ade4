"""Embedded defaults: digits data and teachers, the packaged MiniLM encoder, real English text."""

from __future__ import annotations

from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ModelLoadError
from torchshrink.zoo.digits import DigitsCNN, DigitsMLP, digits_loaders, digits_splits, digits_teacher
from torchshrink.zoo.text import english_sentences, sentence_split

ZOO_MODELS = ("digits-cnn", "digits-mlp", "minilm", "smollm2")


def load_zoo_model(name: str) -> nn.Module:
    if name in ("digits-cnn", "digits-mlp"):
        model = digits_teacher(name)
        state.put(model, source=f"zoo:{name}", input={"shape": [1, 1, 8, 8], "dtype": "float32"})
        return model
    if name == "minilm":
        from torchshrink.zoo.minilm import load_minilm

        return load_minilm()
    if name == "smollm2":
        from torchshrink.llm.models import load_causal_lm

        return load_causal_lm("zoo:smollm2")[0]
    raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join('zoo:' + n for n in ZOO_MODELS)}")


__all__ = [
    "DigitsCNN", "DigitsMLP", "ZOO_MODELS", "digits_loaders", "digits_splits", "digits_teacher",
    "english_sentences", "load_zoo_model", "sentence_split",
]
