"""The one data contract: every form of batch a technique accepts becomes a :class:`Batch`, here.

``data=`` (calibration) and ``train_data=`` (training) take one batch (a tensor, a dict, a tuple) or
an iterable of batches (a list, a DataLoader). Each batch may be:

- a tensor: the model's one input;
- a mapping (a tokenizer's output): ``labels`` / ``label`` are the labels, the other tensors are the
  inputs -- ``input_ids`` and ``attention_mask`` positionally (in that order, as encoders take them),
  the rest (``token_type_ids``, ...) as keyword arguments;
- ``(inputs, labels)``: a tensor, or a tuple of tensors, then the labels (or ``None``);
- ``(input_ids, attention_mask)``: two integer tensors of one shape, the second all 0 / 1, are two
  inputs, not inputs and labels;
- ``((args...), {kwargs})``: positional and keyword inputs, no labels;
- a tuple of three or more tensors: all inputs;
- a :class:`Batch`.

Anything else is one :class:`DataError` line naming the accepted forms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import DataError

FORMS = ("a tensor, a tokenizer dict, (inputs, labels), (input_ids, attention_mask), ((args...), {kwargs}), "
         "a tuple of input tensors, or a torchshrink Batch")
_POSITIONAL = ("input_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class Batch:
    """Model inputs (positional and keyword) and optional labels of one batch."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, model: nn.Module) -> Any:
        """Run ``model`` on this batch's inputs."""
        return model(*self.inputs, **self.kwargs)

    @property
    def size(self) -> int:
        first = self.inputs[0] if self.inputs else next(iter(self.kwargs.values()), None)
        return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _tensors(x: Any) -> bool:
    return isinstance(x, tuple | list) and bool(x) and all(isinstance(t, torch.Tensor) for t in x)


def _from_mapping(m: Mapping[str, Any], labels: Any = None) -> Batch:
    rest = {k: v for k, v in m.items() if k not in ("labels", "label")}
    if labels is None:
        labels = m.get("labels", m.get("label"))
    inputs = tuple(rest.pop(k) for k in _POSITIONAL if k in rest)
    if not inputs and not rest:
        raise DataError(f"a batch dict holds no inputs (keys: {', '.join(map(str, m))}); use {FORMS}")
    return Batch(inputs, labels, rest)


def _token_pair(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``(input_ids, attention_mask)``: integer tensors of one shape, the second holding only 0 / 1
    (class labels are [batch] or float; token labels of a language model hold token ids)."""
    return (a.shape == b.shape and a.dim() >= 2 and not a.is_floating_point() and not b.is_floating_point()
            and bool(((b == 0) | (b == 1)).all()))


def as_batch(item: Any) -> Batch:
    """One batch in any accepted form (see the module docstring) as a :class:`Batch`."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch((item,))
    if isinstance(item, Mapping):
        return _from_mapping(item)
    if isinstance(item, tuple | list):
        if len(item) == 2:
            first, second = item
            if _tensors(first) and isinstance(second, Mapping):
                return Batch(tuple(first), None, dict(second))
            if isinstance(first, Mapping) and (second is None or isinstance(second, torch.Tensor)):
                return _from_mapping(first, second)
            if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
                return Batch((first, second)) if _token_pair(first, second) else Batch((first,), second)
            if _tensors(first) and (second is None or isinstance(second, torch.Tensor)):
                return Batch(tuple(first), second)
            if isinstance(first, torch.Tensor) and second is None:
                return Batch((first,))
        if _tensors(item):
            return Batch(tuple(item))
    raise DataError(f"unsupported batch of type {type(item).__name__}; use {FORMS}")


def as_batches(data: Any, *, limit: int | None = None) -> Iterator[Batch]:
    """The batches of ``data``: one batch (a tensor, dict, tuple or Batch) or an iterable of them."""
    if data is None:
        return
    single = isinstance(data, torch.Tensor | Mapping | Batch | tuple)  # a tuple is one batch; a list, batches
    items: Iterable[Any] = [data] if single else data
    if not isinstance(items, Iterable):
        raise DataError(f"data must be a batch or an iterable of batches, got {type(data).__name__}; batches are {FORMS}")
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield as_batch(item)


def calibration(data: Any, *, limit: int | None = None, what: str = "this technique") -> list[Batch]:
    """The calibration batches (at most ``limit``); none is one DataError line."""
    if data is None:
        raise DataError(f"{what} needs calibration data: data=[batches] ({FORMS})")
    out = list(as_batches(data, limit=limit))
    if not out:
        raise DataError(f"the calibration data for {what} is empty; give at least one batch")
    return out


def calibrate(model: nn.Module, data: Any, hooks: dict[str, Callable[..., None]] | None = None, *, pre: bool = False,
              limit: int | None = None, on_batch: Callable[[Batch], None] | None = None, inference: bool = True) -> int:
    """The one calibration pass: run ``model`` in eval and inference mode over ``data`` (inputs and
    keyword inputs of each :class:`Batch`) with forward hooks (``pre=True``: forward pre-hooks) on the
    named modules (``inference=False``: no_grad, for statistics used later outside inference mode); the
    training flag is restored and the hooks removed afterwards, whatever happens.
    ``on_batch(batch)`` runs before each batch. A batch the model cannot take is one DataError line.
    Returns the number of batches run."""
    mods = dict(model.named_modules())
    missing = [n for n in (hooks or {}) if n not in mods]
    if missing:
        raise DataError(f"calibration hooks name layers the model lacks: {', '.join(missing[:3])}")
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(mods[n], register)(fn) for n, fn in (hooks or {}).items()]
    was = model.training
    model.eval()
    n = 0
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            for batch in as_batches(data, limit=limit):
                if on_batch is not None:
                    on_batch(batch)
                try:
                    batch(model)
                except (RuntimeError, TypeError, ValueError, IndexError) as e:
                    shapes = [tuple(t.shape) for t in batch.inputs]
                    raise DataError(f"calibration batch of shapes {shapes} does not fit the model: "
                                    f"{(str(e).splitlines() or [''])[0][:160]}") from None
                n += 1
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return n
