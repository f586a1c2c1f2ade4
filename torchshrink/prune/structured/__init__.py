"""Structured pruning with a traced dependency graph: channels/filters (``channel-prune``),
attention heads (``head-prune``), FFN neurons (``ffn-prune``) and whole layers (``layer-drop``)."""

from torchshrink.prune.structured.channel import ChannelPruneConfig, Plan, make_plan, prune_channels
from torchshrink.prune.structured.groups import Group, build_groups, prune_groups
from torchshrink.prune.structured.trace import Graph, trace
from torchshrink.prune.structured.transformer import from_pretrained
from torchshrink.prune.structured.units import (
    FfnPruneConfig,
    HeadPruneConfig,
    LayerDropConfig,
    ffn_prune,
    head_prune,
    layer_drop,
)

__all__ = [
    "ChannelPruneConfig", "FfnPruneConfig", "Graph", "HeadPruneConfig", "LayerDropConfig", "ffn_prune",
    "from_pretrained", "head_prune", "layer_drop", "Group", "Plan", "build_groups", "make_plan", "prune_channels",
    "prune_groups", "trace",
]
