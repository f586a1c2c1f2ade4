"""torchshrink: make trained PyTorch models smaller and faster, with measured evidence."""

__version__ = "0.1.0"


import torchshrink.techniques  # noqa: E402,F401  (registers every technique)
from torchshrink.binary import (  # noqa: E402
    BinaryConnectConfig,
    BNNConfig,
    BWNConfig,
    TTQConfig,
    TWNConfig,
    XNORConfig,
)
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

# the verbs are plain functions; configs are importable from here (ts.UnstructuredConfig) or their package
from torchshrink.core.api import (  # noqa: E402
    apply,
    binarize,
    factorize,
    finalize,
    prepare,
    quantize,
    run,
    step,
    trains,
)
from torchshrink.core.report import Report, report  # noqa: E402
from torchshrink.core.train import Finetune  # noqa: E402
from torchshrink.distill.config import DistillConfig  # noqa: E402
from torchshrink.export import load, save  # noqa: E402
from torchshrink.lowrank import BudgetConfig, CPConfig, SeparableConfig, SVDConfig, Tucker2Config  # noqa: E402
from torchshrink.measure import compare, measure  # noqa: E402
from torchshrink.models import load_model  # noqa: E402
from torchshrink.prune.nm import NMConfig  # noqa: E402
from torchshrink.prune.structured.channel import ChannelPruneConfig  # noqa: E402
from torchshrink.prune.structured.units import FfnPruneConfig, HeadPruneConfig, LayerDropConfig  # noqa: E402
from torchshrink.prune.unstructured import UnstructuredConfig  # noqa: E402
from torchshrink.quant import (  # noqa: E402
    CastConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    QATConfig,
    WeightOnlyConfig,
)
from torchshrink.quant.kmeans import KMeansConfig  # noqa: E402

__all__ = [
    "BNNConfig", "BWNConfig", "BinaryConnectConfig", "BudgetConfig", "CPConfig", "CastConfig", "ChannelPruneConfig",
    "Config", "ConfigError", "DistillConfig", "FfnPruneConfig", "Finetune", "HeadPruneConfig", "Int8DynamicConfig",
    "Int8StaticConfig", "KMeansConfig", "LayerDropConfig", "NMConfig", "QATConfig", "Report", "SVDConfig", "Select",
    "SeparableConfig", "TTQConfig", "TWNConfig", "TorchshrinkError", "Tucker2Config", "UnstructuredConfig",
    "WeightOnlyConfig", "XNORConfig", "__version__", "apply", "binarize", "compare", "config_from_dict",
    "config_from_yaml", "config_to_yaml", "distill", "factorize", "finalize", "known_kinds", "load", "load_model",
    "measure", "prepare", "prune", "quantize", "report", "run", "save", "step", "trains",
]
# The verbs shadow the package names torchshrink.prune / torchshrink.distill (both packages are imported
# above, so no later import rebinds them); configs come from here or `from torchshrink.prune import ...`.
prune = _api.prune
distill = _api.distill

# every technique config, one name each (<Kind>Config)
CONFIGS = tuple(n for n in __all__ if n.endswith("Config") and n != "Config")

