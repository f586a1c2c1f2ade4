"""Sentence-encoder distillation (a layer-dropped MiniLM student learning its teacher's embeddings).

The loss is ``output_weight * (1 - cos + MSE)`` on the sentence embeddings plus
``hidden_weight * (1 - cos)`` between each student block's output and the output of the teacher
block it was initialized from (real tokens only). Batches hold sentences of similar token length
(little padding, so more sentences per CPU second); the batch order is shuffled per seed. The
word-embedding table can stay frozen: its dense gradient and optimizer step cost more than a
small student's blocks and it holds 11.7M of MiniLM's 22.7M parameters.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import DataError
from torchshrink.core.train import Finetune
from torchshrink.distill.corpus import check_disjoint
from torchshrink.distill.distiller import Distiller

log = logging.getLogger(__name__)


def length_batches(
    sentences: Sequence[str], tokenizer: Any, *, batch_size: int = 32, max_length: int = 128, seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``{"input_ids", "attention_mask"}`` batches of sentences of similar token length, in a
    seeded random batch order."""
    if not sentences:
        raise DataError("no sentences to batch")
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [sentences[j] for j in order[i:i + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    random.Random(seed).shuffle(out)
    return out


def layer_pairs(student: nn.Module) -> list[tuple[str, str]]:
    """(student block, teacher block) names for a student built by :func:`drop_layers`."""
    info = state.get(student, "student")
    if not info or info.get("kind") != "layers":
        raise DataError("layer pairs need a student built by drop_layers() (it records the kept layers)")
    path = info["path"]
    return [(f"{path}.{i}", f"{path}.{k}") for i, k in enumerate(info["kept"])]


def freeze_word_embeddings(model: nn.Module) -> int:
    """Stop training every ``nn.Embedding`` with more than 1000 rows (token tables); returns the
    number of frozen parameters."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings > 1000:
            m.weight.requires_grad_(False)
            n += m.weight.numel()
    return n


def distill_sentence_encoder(
    teacher: nn.Module,
    student: nn.Module,
    train_sentences: Sequence[str],
    tokenizer: Any,
    *,
    heldout: Sequence[str] = (),
    epochs: int = 1,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    batch_size: int = 32,
    output_weight: float = 2.0,
    hidden_weight: float = 0.5,
    freeze_embeddings: bool = True,
    cache_teacher: bool | None = None,
    seed: int = 0,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    relations: Sequence[tuple[str, str]] = (),
    relation_weight: float = 1.0,
    autocast: str = "none",
) -> list[dict[str, float]]:
    """Train ``student`` (in place) to reproduce ``teacher``'s sentence embeddings.

    ``heldout``: evaluation sentences; training refuses to start if any training sentence overlaps
    one of them (:func:`torchshrink.distill.corpus.check_disjoint`). The teacher's outputs are
    cached when ``epochs > 1`` (``cache_teacher=None``), as float16. ``pairs``: (student block, teacher block)
    names for the hidden-state term; default those of a :func:`drop_layers` student (a width-pruned student of
    the same depth pairs each block with itself). ``relations``: (student module, teacher module) pairs of
    query / key / value projections whose self-attention relations the student learns (MiniLMv2;
    :func:`torchshrink.distill.losses.relation_kl`), each weighted ``relation_weight``. ``autocast="bf16"``:
    forward passes in bfloat16 (:class:`~torchshrink.core.train.Finetune`).
    """
    if heldout:
        check_disjoint(train_sentences, heldout)
    if freeze_embeddings:
        log.info("froze %d word-embedding parameters", freeze_word_embeddings(student))
    named = layer_pairs(student) if pairs is None and hidden_weight > 0 else (pairs or [])
    feats = [(s, t, "cosine", hidden_weight) for s, t in named] if hidden_weight > 0 else []
    feats += [(s, t, "relation", relation_weight) for s, t in relations]
    cache = epochs > 1 if cache_teacher is None else cache_teacher
    d = Distiller(teacher, student, output_loss="cosine", output_weight=output_weight, features=feats,
                  cache=cache, cache_dtype=torch.float16)
    batches = length_batches(train_sentences, tokenizer, batch_size=batch_size, seed=seed)
    settings = Finetune(epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed, autocast=autocast)  # type: ignore[arg-type]
    return d.fit(batches, settings, evaluate=evaluate)


def sentences_per_second(teacher: nn.Module, student: nn.Module, sentences: Sequence[str], tokenizer: Any,
                         pairs: Sequence[tuple[str, str]] | None = None) -> float:
    """Training throughput (teacher forward + student step, as :func:`distill_sentence_encoder` trains) on a copy
    of ``student``, measured on 4 batches of 32 sentences after one warm-up batch: sizes a training set to a
    time budget. ``pairs`` as for :func:`distill_sentence_encoder`."""
    import copy
    import time

    s = copy.deepcopy(student)
    freeze_word_embeddings(s)
    named = layer_pairs(s) if pairs is None else pairs
    d = Distiller(teacher, s, output_loss="cosine", features=[(a, b, "cosine", 0.5) for a, b in named])
    opt = torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-5)
    t0 = 0.0
    for i, b in enumerate(length_batches(sentences[-160:], tokenizer, batch_size=32, seed=1)):
        if i == 1:
            t0 = time.perf_counter()
        loss = d.loss(s, (b["input_ids"], b["attention_mask"]), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 128 / (time.perf_counter() - t0)
