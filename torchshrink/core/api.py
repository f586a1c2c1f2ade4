"""The public verbs: ``apply`` and its family-checked aliases ``prune``, ``quantize``, ..."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from torchshrink.core.config import Config, get_handler, known_kinds
from torchshrink.core.errors import ConfigError
from torchshrink.core.select import Select


def apply(
    model: nn.Module,
    config: Config,
    *,
    select: Select | dict[str, Any] | None = None,
    data: Any = None,
    inplace: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Compress ``model`` as ``config`` says and return the result.

    The input model is left untouched unless ``inplace=True``; if the technique fails half-way,
    the caller's model is as it was.
    """
    if not isinstance(config, Config):
        raise ConfigError(f"expected a torchshrink config, got {type(config).__name__}; known kinds: {', '.join(known_kinds())}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    handler = get_handler(config)
    sel = Select.from_dict(select) if isinstance(select, dict) else select
    work = model if inplace else copy.deepcopy(model)
    out = handler(work, config, select=sel, data=data, **kwargs)
    history = list(getattr(model, "_torchshrink_history", []))
    history.append(config.to_dict())
    out._torchshrink_history = history
    for attr in ("_torchshrink_source", "_torchshrink_input"):
        if hasattr(model, attr) and not hasattr(out, attr):
            setattr(out, attr, getattr(model, attr))
    return out


def _verb(family: str, doc: str) -> Any:
    def verb(model: nn.Module, config: Config, **kwargs: Any) -> nn.Module:
        if getattr(config, "family", None) != family:
            raise ConfigError(
                f"{family}() got a config of kind {getattr(config, 'kind', '?')!r}; "
                f"{family} kinds: {', '.join(known_kinds(family)) or '(none registered)'}"
            )
        return apply(model, config, **kwargs)

    verb.__name__ = family
    verb.__doc__ = doc
    return verb


prune = _verb("prune", "Prune ``model`` with a pruning config (see ``known_kinds('prune')``).")
quantize = _verb("quantize", "Quantize or cast ``model`` with a quantization config.")
factorize = _verb("factorize", "Factorize layers of ``model`` with a low-rank config.")
binarize = _verb("binarize", "Binarize / ternarize layers of ``model``.")
distill = _verb("distill", "Distill into ``model`` (the student) with a distillation config.")
