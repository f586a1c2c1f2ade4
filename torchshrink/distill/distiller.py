"""The Distiller: a frozen teacher, a student, feature taps by module name, an optional teacher
output cache, and training through the shared fine-tune loop."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchshrink.core.config import check_choice, check_range
from torchshrink.core.data import Batch, as_batches
from torchshrink.core.errors import ConfigError, DataError, LayerNotFoundError
from torchshrink.core.surgery import get_module
from torchshrink.core.train import Finetune
from torchshrink.distill import losses as L
from torchshrink.measure.quality import main_output

log = logging.getLogger(__name__)

OutputLoss = Literal["kd", "mse", "cosine", "none"]
FeatureLoss = Literal["hint", "attention", "cosine", "relation"]
OUTPUT_LOSSES = ("kd", "mse", "cosine", "none")
FEATURE_LOSSES = ("hint", "attention", "cosine", "relation")


@dataclasses.dataclass(frozen=True)
class FeaturePair:
    """Match the output of student module ``student`` to teacher module ``teacher``."""

    student: str
    teacher: str
    loss: FeatureLoss = "hint"
    weight: float = 1.0

    def __post_init__(self) -> None:
        check_choice("feature loss", self.loss, FEATURE_LOSSES)
        check_range("feature weight", self.weight, 0, 1e6)

    @classmethod
    def parse(cls, spec: str | FeaturePair | Sequence[Any], loss: FeatureLoss = "hint", weight: float = 1.0) -> FeaturePair:
        """``"student.layer=teacher.layer"``, a ``(student, teacher[, loss[, weight]])`` tuple, or a pair."""
        if isinstance(spec, FeaturePair):
            return spec
        if isinstance(spec, str):
            s, sep, t = spec.partition("=")
            if not sep or not s.strip() or not t.strip():
                raise ConfigError(f"feature pair {spec!r} must read 'student_module=teacher_module'")
            return cls(s.strip(), t.strip(), loss, weight)
        items = list(spec)
        if not 2 <= len(items) <= 4:
            raise ConfigError(f"feature pair {spec!r} must be (student, teacher[, loss[, weight]])")
        return cls(*items) if len(items) > 2 else cls(items[0], items[1], loss, weight)


def _tensor_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return main_output(out)


@contextlib.contextmanager
def tap(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the outputs of the named modules during forwards inside the block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(names):
        mod = get_module(model, name)

        def hook(_m: nn.Module, _i: Any, out: Any, _name: str = name) -> None:
            store[_name] = _tensor_of(out)

        handles.append(mod.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _check_tap(model: nn.Module, name: str, role: str) -> None:
    try:
        get_module(model, name)
    except LayerNotFoundError as e:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
        raise LayerNotFoundError(f"feature tap on the {role}: {e}; {role} modules: {shown}") from None


def _row_keys(b: Batch) -> list[bytes]:
    """One key per sample over every input tensor, positional and keyword (an attention mask changes
    the teacher's output as much as the token ids do)."""
    tensors = [*b.inputs, *(b.kwargs[k] for k in sorted(b.kwargs))]
    rows = [t.detach().cpu().contiguous().reshape(t.shape[0], -1) for t in tensors if isinstance(t, torch.Tensor)]
    keys = []
    for i in range(rows[0].shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for r in rows:
            h.update(str(r.dtype).encode())
            h.update(r[i].numpy().tobytes())
        keys.append(h.digest())
    return keys


def _batch(b: Batch | Sequence[torch.Tensor] | torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
    """A Batch, or the model's positional inputs (a tensor or a tuple of tensors) with ``labels``."""
    if isinstance(b, Batch):
        return b
    return Batch(tuple(b) if isinstance(b, tuple | list) else (b,), labels)


class Distiller:
    """Distill ``teacher`` into ``student``.

    The teacher runs in eval mode without gradients and is never modified. The loss is
    ``output_weight * output_loss + sum(pair.weight * feature_loss(pair))`` where the output loss is
    the combined KD loss (``kd``), logit MSE (``mse``), ``1 - cos`` + MSE for embeddings
    (``cosine``) or nothing (``none``). With ``cache=True`` the teacher's outputs are kept per
    sample (keyed by a hash of the inputs), so a fixed data set costs one teacher pass in total.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float = 0.7,
        output_loss: OutputLoss = "kd",
        output_weight: float = 1.0,
        features: Iterable[str | FeaturePair | Sequence[Any]] = (),
        cache: bool = False,
        cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise ConfigError("Distiller needs a teacher and a student that are torch.nn.Modules")
        if teacher is student:
            raise ConfigError("the student must be a different module object from the teacher (copy it first)")
        L.check_kd_settings(temperature, alpha)
        check_choice("output_loss", output_loss, OUTPUT_LOSSES)
        check_range("output_weight", output_weight, 0, 1e6)
        self.teacher, self.student = teacher, student
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.output_loss, self.output_weight = output_loss, float(output_weight)
        self.pairs = [FeaturePair.parse(f) for f in features]
        for p in self.pairs:  # unknown module names fail here, before any training
            _check_tap(student, p.student, "student")
            _check_tap(teacher, p.teacher, "teacher")
        if output_loss == "none" and not self.pairs:
            raise ConfigError("output_loss='none' needs at least one feature pair, or nothing is distilled")
        self.adapters = nn.ModuleDict()
        self.cache = cache
        self.cache_dtype = cache_dtype
        self._cache: dict[bytes, tuple[torch.Tensor, ...]] = {}
        self._checked = False

    # ------------------------------------------------------------------ teacher side
    @torch.no_grad()
    def _run_teacher(self, b: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        was = self.teacher.training
        self.teacher.eval()
        try:
            with tap(self.teacher, [p.teacher for p in self.pairs]) as feats:
                out = main_output(b(self.teacher))
            return out.detach(), [feats[p.teacher].detach() for p in self.pairs]
        finally:
            self.teacher.train(was)

    def teacher_outputs(self, b: Batch | Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's main output and tapped features for a batch (from the cache if enabled)."""
        b = _batch(b)
        if not self.cache:
            return self._run_teacher(b)
        keys = _row_keys(b)
        if all(k in self._cache for k in keys):
            rows = [self._cache[k] for k in keys]
            with torch.autocast("cpu", enabled=False):  # autocast refuses to stack the float16 cache
                stacked = [torch.stack([r[j] for r in rows]).float() for j in range(len(rows[0]))]
            return stacked[0], stacked[1:]
        out, feats = self._run_teacher(b)
        per = [out, *feats]
        if all(t.shape[0] == len(keys) for t in per):
            for i, k in enumerate(keys):
                self._cache[k] = tuple(t[i].to(self.cache_dtype).clone() for t in per)
        return out, feats

    @property
    def cached_samples(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------ checks
    def check(self, b: Batch | Sequence[torch.Tensor]) -> None:
        """Run teacher and student once on batch ``b`` (or positional inputs): output shapes must match
        (unless the output loss is ``none``) and each feature pair must be matchable; builds hint adapters."""
        b = _batch(b)
        t_out, t_feats = self._run_teacher(b)
        was = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), tap(self.student, [p.student for p in self.pairs]) as sf:
                s_out = main_output(b(self.student))
        finally:
            self.student.train(was)
        if self.output_loss != "none" and s_out.shape != t_out.shape:
            raise DataError(
                f"student output {tuple(s_out.shape)} cannot be matched to the teacher output {tuple(t_out.shape)}; "
                "they must have the same shape (same number of classes / embedding width), or use "
                "output_loss='none' with feature pairs"
            )
        for i, p in enumerate(self.pairs):
            s, t = sf[p.student], t_feats[i]
            if p.loss == "relation":
                with torch.no_grad():
                    self._feature_loss(p, s, t, None, b)  # raises DataError on shapes it cannot relate
                continue
            if p.loss == "attention":
                if s.dim() != 4 or t.dim() != 4:
                    raise DataError(
                        f"attention transfer {p.student}={p.teacher} needs [B, C, H, W] maps; got "
                        f"{tuple(s.shape)} and {tuple(t.shape)}"
                    )
                continue
            key = str(i)
            if key not in self.adapters:
                adapter = L.make_adapter(s.shape, t.shape)
                if adapter is not None:
                    self.adapters[key] = adapter.to(s.device)
            ad = self.adapters[key] if key in self.adapters else None
            with torch.no_grad():
                self._feature_loss(p, s, t, ad, b)  # raises DataError on shapes it cannot match
        self._checked = True

    def _feature_loss(
        self, p: FeaturePair, s: torch.Tensor, t: torch.Tensor, adapter: nn.Module | None,
        b: Batch,
    ) -> torch.Tensor:
        if p.loss == "attention":
            return L.attention_transfer(s, t)
        if p.loss == "hint":
            return L.hint_loss(s, t, adapter)
        mask = b.kwargs.get("attention_mask")  # compare real tokens only
        if mask is None and len(b.inputs) > 1:
            mask = b.inputs[1]  # (input_ids, attention_mask)
        if not (isinstance(mask, torch.Tensor) and s.dim() == 3 and tuple(mask.shape) == tuple(s.shape[:2])):
            mask = None
        if p.loss == "relation":
            return L.relation_kl(s, t, mask)
        return L.hidden_cosine(s, t, mask, adapter)

    # ------------------------------------------------------------------ the loss
    def loss(self, student: nn.Module, b: Batch | Sequence[torch.Tensor], labels: torch.Tensor | None = None
             ) -> torch.Tensor:
        """``loss(student, batch)``, the signature of the shared fine-tune loop (or ``loss(student, inputs,
        labels)`` with the positional inputs)."""
        b = _batch(b, labels)
        if not self._checked:
            self.check(b)
        labels = b.labels
        t_out, t_feats = self.teacher_outputs(b)
        with tap(student, [p.student for p in self.pairs]) as sf:
            s_out = main_output(b(student))
        total = s_out.new_zeros((), dtype=torch.float32)
        if self.output_loss == "kd":
            total = total + self.output_weight * L.kd_loss(s_out, t_out, labels, temperature=self.temperature, alpha=self.alpha)
        elif self.output_loss == "mse":
            total = total + self.output_weight * L.logit_mse(s_out, t_out)
        elif self.output_loss == "cosine":
            total = total + self.output_weight * L.output_match(s_out, t_out)
        for i, p in enumerate(self.pairs):
            ad = self.adapters[str(i)] if str(i) in self.adapters else None
            total = total + p.weight * self._feature_loss(p, sf[p.student], t_feats[i], ad, b)
        return total

    # ------------------------------------------------------------------ training
    def fit(
        self,
        data: Iterable[Any],
        settings: Finetune | None = None,
        *,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        on_step: Callable[[nn.Module, int, int], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train the student in place with the shared fine-tune loop; returns the per-epoch history."""
        from torchshrink.core.train import finetune

        settings = settings or Finetune(temperature=self.temperature, alpha=self.alpha)
        batches = data if hasattr(data, "__len__") else list(data)
        first = next(as_batches(batches, limit=1), None)
        if first is None:
            raise DataError("distillation was given no data")
        self.check(first)  # every shape error surfaces before the first optimizer step
        return finetune(self.student, batches, settings, loss_fn=self.loss, on_step=on_step,
                        evaluate=evaluate, extra_params=list(self.adapters.parameters()))


def distill_recovery(teacher: nn.Module | None, settings: Finetune) -> Callable[..., torch.Tensor]:
    """Recovery factory for ``recovery: distill``: the pre-stage model teaches the compressed one.

    With labels: the combined KD loss with ``settings.temperature`` / ``settings.alpha``. Without
    labels (e.g. sentence encoders): ``1 - cos`` + MSE between outputs.
    """
    if teacher is None:
        raise ConfigError("recovery: distill needs a teacher (the model before the stage)")
    L.check_kd_settings(settings.temperature, settings.alpha)
    kd = Distiller(teacher, _Placeholder(), temperature=settings.temperature, alpha=settings.alpha, output_loss="kd")
    emb = Distiller(teacher, _Placeholder(), output_loss="cosine")

    def loss(student: nn.Module, b: Batch) -> torch.Tensor:
        d = kd if b.labels is not None else emb
        d.student = student
        d._checked = True  # the stage keeps output shapes; a mismatch still raises in the loss
        return d.loss(student, b)

    return loss


class _Placeholder(nn.Module):
    def forward(self, *args: Any) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("placeholder student")
