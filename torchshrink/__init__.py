"""torchshrink: make trained PyTorch models smaller and faster, with measured evidence."""

__version__ = "0.1.0"

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
from torchshrink.core.api import apply, binarize, distill, factorize, prune, quantize  # noqa: E402
from torchshrink.export import load, save  # noqa: E402
from torchshrink.measure import compare, measure  # noqa: E402
from torchshrink.models import load_model  # noqa: E402

__all__ = [
    "Config", "ConfigError", "Select", "TorchshrinkError", "__version__", "apply", "binarize",
    "compare", "config_from_dict", "config_from_yaml", "config_to_yaml", "distill", "factorize",
    "known_kinds", "load", "load_model", "measure", "prune", "quantize", "save",
]
