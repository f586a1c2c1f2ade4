"""Distillation losses as plain functions of tensors.

- :func:`kd_loss`: Hinton et al. (2015) combined loss
  ``(1 - alpha) * CE(y, p_s) + alpha * T^2 * KL(p_t(T) || p_s(T))``.
- :func:`logit_mse`: MSE between logits (Ba & Caruana, 2014).
- :func:`hint_loss` with :class:`HintAdapter`: FitNets (Romero et al., 2015), a learned adapter maps
  the student's feature to the teacher's width before an MSE.
- :func:`attention_transfer`: Zagoruyko & Komodakis (2017), L2 distance of normalized spatial
  attention maps ``sum_c |A_c|^p``.
- :func:`hidden_cosine`: ``1 - cos`` between hidden states (DistilBERT's cosine loss), optionally
  masked to real tokens.
- :func:`relation_kl`: MiniLMv2 (Wang et al., 2021) self-attention relations: the query (or key, value)
  vectors of a layer split into a fixed number of relation heads, ``softmax(x x^T / sqrt(d))`` over the
  tokens, KL(teacher || student) per real query token; the widths may differ (a head-pruned student).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.config import check_range
from torchshrink.core.errors import ConfigError, DataError


def check_kd_settings(temperature: float, alpha: float) -> None:
    """Raise :class:`ConfigError` for a temperature <= 0 or an alpha outside [0, 1]."""
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not math.isfinite(temperature):
        raise ConfigError(f"temperature={temperature!r} must be a finite number > 0")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ConfigError(f"alpha={alpha!r} must be a number in [0, 1]")
    check_range("temperature", temperature, 0, math.inf, lo_open=True)
    check_range("alpha", alpha, 0, 1)


def _check_same(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise DataError(
            f"student {what} {tuple(student.shape)} cannot be matched to the teacher's {tuple(teacher.shape)}; "
            "the shapes must be equal (for features of different widths use a hint with an adapter)"
        )


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t(T) || p_s(T))`` averaged over the batch (rows = samples, last dim = classes)."""
    _check_same(student_logits, teacher_logits, "logits")
    t = float(temperature)
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """``(1 - alpha) * CE(labels, student) + alpha * T^2 * KL(p_t(T) || p_s(T))``.

    Without labels only the soft term is used (as if ``alpha = 1``).
    """
    check_kd_settings(temperature, alpha)
    soft = soft_kl(student_logits, teacher_logits, temperature)
    if labels is None or alpha == 1.0:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels)
    return (1.0 - alpha) * hard + alpha * soft


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    _check_same(student_logits, teacher_logits, "logits")
    return F.mse_loss(student_logits.float(), teacher_logits.detach().float())


def output_match(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """For outputs that are not class logits (embeddings): ``1 - cos`` per sample plus MSE."""
    _check_same(student_out, teacher_out, "output")
    s = student_out.float().reshape(student_out.shape[0], -1)
    t = teacher_out.detach().float().reshape(teacher_out.shape[0], -1)
    return (1 - F.cosine_similarity(s, t, dim=1)).mean() + F.mse_loss(s, t)


class HintAdapter(nn.Module):
    """Maps a student feature to the teacher's width: a 1x1 convolution for ``[B, C, H, W]`` maps,
    a linear layer on the last dimension otherwise (``[B, ..., C]``)."""

    def __init__(self, student_channels: int, teacher_channels: int, conv: bool) -> None:
        super().__init__()
        self.conv = conv
        self.proj: nn.Module = (
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
            if conv
            else nn.Linear(student_channels, teacher_channels, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size) -> HintAdapter | None:
    """An adapter when channel widths differ, None when the shapes already match.

    Raises :class:`DataError` when no channel mapping can match the shapes.
    """
    if tuple(student_shape) == tuple(teacher_shape):
        return None
    conv = len(student_shape) == 4
    if len(student_shape) != len(teacher_shape) or len(student_shape) < 2:
        raise DataError(
            f"student feature {tuple(student_shape)} and teacher feature {tuple(teacher_shape)} have different "
            "ranks; a hint needs features of the same rank that differ at most in channel width"
        )
    ch = 1 if conv else -1
    other_s = [d for i, d in enumerate(student_shape) if i != ch % len(student_shape)]
    other_t = [d for i, d in enumerate(teacher_shape) if i != ch % len(teacher_shape)]
    if other_s != other_t and not conv:
        raise DataError(
            f"student feature {tuple(student_shape)} and teacher feature {tuple(teacher_shape)} differ outside "
            "the channel (last) dimension; only the width may differ"
        )
    if conv and other_s[0] != other_t[0]:
        raise DataError(f"student and teacher features differ in batch size: {tuple(student_shape)} vs {tuple(teacher_shape)}")
    return HintAdapter(int(student_shape[ch]), int(teacher_shape[ch]), conv)


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, adapter: nn.Module | None = None) -> torch.Tensor:
    """FitNets hint: MSE between the (adapted) student feature and the teacher feature. Spatial
    sizes that differ are matched by adaptive average pooling of the larger map."""
    s = adapter(student_feat) if adapter is not None else student_feat
    t = teacher_feat.detach()
    if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    _check_same(s, t, "feature (after the adapter)")
    return F.mse_loss(s.float(), t.float())


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``[B, C, H, W]`` -> L2-normalized ``[B, H*W]`` map of ``mean_c |A_c|^p``."""
    if feat.dim() != 4:
        raise DataError(f"attention transfer needs [B, C, H, W] feature maps, got shape {tuple(feat.shape)}")
    return F.normalize(feat.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: channel counts may differ; spatial sizes are matched by pooling."""
    s, t = student_feat, teacher_feat.detach()
    if s.dim() == 4 and t.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    a, b = attention_map(s, p), attention_map(t, p)
    if a.shape != b.shape:
        raise DataError(f"attention maps {tuple(a.shape)} and {tuple(b.shape)} cannot be matched (batch sizes differ)")
    return (a - b).pow(2).sum(1).mean()


RELATION_HEADS = 16


def relation_kl(student_x: torch.Tensor, teacher_x: torch.Tensor, mask: torch.Tensor | None = None,
                heads: int = RELATION_HEADS) -> torch.Tensor:
    """KL(teacher || student) of scaled dot-product relations among the tokens of ``[B, T, C]`` projections
    (C may differ between the two; each must divide into ``heads``), averaged over real query tokens
    (``mask`` ``[B, T]``) with padded keys left out."""
    t = teacher_x.detach()
    if student_x.dim() != 3 or t.dim() != 3 or student_x.shape[:2] != t.shape[:2]:
        raise DataError(f"relations need [B, T, C] projections with the same B and T; got "
                        f"{tuple(student_x.shape)} and {tuple(t.shape)}")
    for name, x in (("student", student_x), ("teacher", t)):
        if x.shape[-1] % heads:
            raise DataError(f"the {name}'s width {x.shape[-1]} does not split into {heads} relation heads")

    def log_rel(x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = x.float().reshape(b, n, heads, c // heads).transpose(1, 2)
        sc = h @ h.transpose(-1, -2) / math.sqrt(c // heads)
        if mask is not None:
            sc = sc.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        return F.log_softmax(sc, -1)

    ls, lt = log_rel(student_x), log_rel(t)
    kl = (lt.exp() * (lt - ls)).nan_to_num(0.0).sum(-1)  # [B, heads, T]; masked keys contribute 0
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)[:, None, :]
    return (kl * m).sum() / (m.sum() * heads).clamp_min(1.0)


def hidden_cosine(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    adapter: nn.Module | None = None,
) -> torch.Tensor:
    """Mean ``1 - cos`` between hidden states along the last dimension, over positions where
    ``mask`` (``[B, T]``, e.g. the attention mask) is non-zero."""
    s = adapter(student_hidden) if adapter is not None else student_hidden
    t = teacher_hidden.detach()
    _check_same(s, t, "hidden state")
    cos = F.cosine_similarity(s.float(), t.float(), dim=-1)
    if mask is None:
        return (1 - cos).mean()
    m = mask.to(cos.dtype).reshape(cos.shape)
    return ((1 - cos) * m).sum() / m.sum().clamp_min(1.0)
