from torchshrink.export.formats import Format, register_format
from torchshrink.export.io import load, save, saved_bytes
from torchshrink.export.modules import register_module

__all__ = ["Format", "load", "register_format", "register_module", "save", "saved_bytes"]
