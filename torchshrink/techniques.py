"""Importing this module registers every technique's configs and handlers.

Adding a technique = its own folder + one line here.
"""

import torchshrink.binary  # noqa: F401
import torchshrink.distill  # noqa: F401
import torchshrink.lowrank  # noqa: F401
import torchshrink.prune  # noqa: F401
import torchshrink.quant  # noqa: F401  (cast, int8 / int4, QAT, k-means weight sharing)
