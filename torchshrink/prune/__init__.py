"""Pruning: unstructured (layer-wise / global, one-shot / iterative / AGP), N:M, sparse kernels."""

from torchshrink.prune.hold import make_permanent
from torchshrink.prune.nm import NMConfig
from torchshrink.prune.sparse import SparseLinear, use_sparse_kernels
from torchshrink.prune.storage import encode as _bitmask_zlib  # noqa: F401  (registers the format)
from torchshrink.prune.unstructured import UnstructuredConfig

__all__ = ["NMConfig", "SparseLinear", "UnstructuredConfig", "make_permanent", "use_sparse_kernels"]
import torchshrink.prune.structured  # noqa: F401
