"""torchshrink: make trained PyTorch models smaller and faster, with measured evidence."""

__version__ = "0.1.0"

import sys  # noqa: E402
import types  # noqa: E402

import torchshrink.techniques  # noqa: E402,F401  (registers every technique)
from torchshrink.core import (  # noqa: E402
    Config,
    ConfigError,
    Select,
    TorchshrinkError,
    config_from_dict,
    config_from_yaml,
    config_to_yaml,
    known_kinds,
)
from torchshrink.core import api as _api  # noqa: E402
from torchshrink.core.api import apply, binarize, factorize, finalize, prepare, quantize, run, step, trains  # noqa: E402
from torchshrink.core.report import Report, report  # noqa: E402
from torchshrink.core.train import Finetune  # noqa: E402
from torchshrink.export import load, save  # noqa: E402
from torchshrink.measure import compare, measure  # noqa: E402
from torchshrink.models import load_model  # noqa: E402


def _verb_package(name: str) -> types.ModuleType:
    """``torchshrink.prune`` and ``torchshrink.distill`` are both a package and a verb: the package
    module is made callable, so ``ts.prune(model, cfg)`` and ``ts.prune.UnstructuredConfig`` both work."""
    module = sys.modules[f"torchshrink.{name}"]
    verb = getattr(_api, name)

    class _VerbPackage(types.ModuleType):
        def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return verb(*args, **kwargs)

    _VerbPackage.__call__.__doc__ = verb.__doc__
    module.__class__ = _VerbPackage
    return module


prune = _verb_package("prune")
distill = _verb_package("distill")

__all__ = [
    "Config", "ConfigError", "Finetune", "Select", "TorchshrinkError", "__version__", "apply", "binarize",
    "compare", "config_from_dict", "config_from_yaml", "config_to_yaml", "distill", "factorize", "finalize",
    "known_kinds", "load", "load_model", "measure", "prepare", "prune", "quantize", "Report", "report", "run", "save", "step", "trains",
]
