"""Error types. Every error a user can cause is a TorchshrinkError whose message names
what was wrong and what is allowed, so the CLI can print it on one line."""

from __future__ import annotations


class TorchshrinkError(Exception):
    """Base class of all user-facing torchshrink errors."""


class ConfigError(TorchshrinkError, ValueError):
    """A configuration value is invalid (wrong type, out of range, unknown field or kind)."""


class UnknownKindError(ConfigError, KeyError):
    """A config or stage names a `kind` that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(TorchshrinkError, KeyError):
    """A layer name or pattern matched no module of the model."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedLayerError(TorchshrinkError, TypeError):
    """A technique was asked to transform a layer type it cannot handle."""


class ModelLoadError(TorchshrinkError):
    """A model spec or a saved file could not be turned into a model."""


class InputShapeError(TorchshrinkError, ValueError):
    """The example input does not fit the model."""


class OutputExistsError(TorchshrinkError, FileExistsError):
    """An output path already exists and --force was not given."""


class DataError(TorchshrinkError, ValueError):
    """Calibration / training data is missing or does not fit the model."""


class OutputWriteError(TorchshrinkError, OSError):
    """The output could not be written (read-only location, disk full, ...); no partial output is left."""
