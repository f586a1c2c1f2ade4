"""Binary and ternary networks: STE quantizers, training layers, 1-/2-bit packing, and an
XNOR-popcount kernel for fully binary Linear / Conv2d on the CPU."""

from torchshrink.binary.configs import (
    BinarizeConfig,
    BinaryConnectConfig,
    BNNConfig,
    BWNConfig,
    TTQConfig,
    TWNConfig,
    XNORConfig,
)
from torchshrink.binary.fold import fold_into_neighbours
from torchshrink.binary.handler import convert, store_kept_layers
from torchshrink.binary.layers import BinaryConv2d, BinaryLinear
from torchshrink.binary.modules import (
    PackedBinaryConv2d,
    PackedBinaryLinear,
    PackedTernaryConv2d,
    PackedTernaryLinear,
    to_packed,
)
from torchshrink.binary.packing import pack_binary, pack_ternary, unpack_binary, unpack_ternary

__all__ = [
    "BNNConfig", "BWNConfig", "BinarizeConfig", "BinaryConnectConfig", "BinaryConv2d", "BinaryLinear",
    "PackedBinaryConv2d", "PackedBinaryLinear", "PackedTernaryConv2d", "PackedTernaryLinear", "TTQConfig",
    "TWNConfig", "XNORConfig", "convert", "fold_into_neighbours", "pack_binary", "pack_ternary", "store_kept_layers",
    "to_packed", "unpack_binary", "unpack_ternary",
]
