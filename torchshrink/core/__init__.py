from torchshrink.core.config import (
    Config,
    config_from_dict,
    config_from_json,
    config_from_yaml,
    config_to_json,
    config_to_yaml,
    get_config_class,
    known_kinds,
    register,
)
from torchshrink.core.errors import (
    ConfigError,
    DataError,
    InputShapeError,
    LayerNotFoundError,
    ModelLoadError,
    OutputExistsError,
    OutputWriteError,
    TorchshrinkError,
    UnknownKindError,
    UnsupportedLayerError,
)
from torchshrink.core.select import Select, select_modules
from torchshrink.core.surgery import get_module, set_module

__all__ = [
    "Config", "ConfigError", "DataError", "InputShapeError", "LayerNotFoundError", "ModelLoadError",
    "OutputExistsError", "OutputWriteError", "Select", "TorchshrinkError", "UnknownKindError", "UnsupportedLayerError",
    "config_from_dict", "config_from_json", "config_from_yaml", "config_to_json", "config_to_yaml",
    "get_config_class", "get_module", "known_kinds", "register", "select_modules", "set_module",
]
