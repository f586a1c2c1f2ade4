"""Pruning: unstructured (layer-wise / global, one-shot / iterative / AGP), N:M, structured."""

import torchshrink.prune.structured  # noqa: F401
