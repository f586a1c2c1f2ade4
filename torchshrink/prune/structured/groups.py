"""Groups of coupled channels from a traced :class:`Graph`, and the surgery that removes channels
from every tensor of a group at once (new dense tensors, module attributes updated)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import nn

from torchshrink.prune.structured.trace import Graph, Layout


@dataclasses.dataclass
class Member:
    name: str  # parameter / buffer qualified name
    dim: int
    layout: Layout
    producer: bool


@dataclasses.dataclass
class Group:
    """One set of coupled channels: removing channel ``c`` removes it from every member."""

    root: int
    size: int
    members: list[Member]
    mixing: bool  # a LayerNorm / GroupNorm(1) normalises over these channels

    @property
    def producers(self) -> list[str]:
        return sorted({m.name.rpartition(".")[0] for m in self.members if m.producer})

    @property
    def modules(self) -> list[str]:
        return sorted({m.name.rpartition(".")[0] for m in self.members})

    def indices(self, g: Graph, member: Member, channels: torch.Tensor) -> torch.Tensor:
        """Indices along ``member.dim`` that ``channels`` of this group occupy."""
        pos, out = 0, []
        for s, k in member.layout:
            n = g.space(s).size
            if g.find(s) == self.root:
                base = pos + channels.long() * k
                out.append((base[:, None] + torch.arange(k)[None, :]).reshape(-1))
            pos += n * k
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def build_groups(g: Graph) -> tuple[list[Group], list[tuple[list[str], str]]]:
    """Prunable groups, and the would-be groups left unpruned with the reason."""
    by_root: dict[int, list[Member]] = defaultdict(list)
    for key, lay in g.param_layouts.items():
        att = g.attachments[key]
        for r in sorted({g.find(s) for s, _ in lay}):
            by_root[r].append(Member(att.name, att.dim, lay, att.producer))
    groups, skipped = [], []
    for r, members in by_root.items():
        sp = g.spaces[r]
        if not any(m.producer for m in members):
            continue
        if sp.blocked or sp.size < 2:
            prods = sorted({m.name.rpartition(".")[0] for m in members if m.producer})
            skipped.append((prods, sp.reason or "single channel"))
            continue
        groups.append(Group(r, sp.size, members, sp.mixing))
    return groups, skipped


def _owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Every (module, attribute) holding each tensor, keyed by the tensor's first name."""
    first: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=True):
        first.setdefault(id(p), n)
    for n, b in model.named_buffers(remove_duplicate=True):
        first.setdefault(id(b), n)
    out: dict[str, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
    for _, m in model.named_modules(remove_duplicate=False):
        for pn, p in m._parameters.items():
            if p is not None and id(p) in first:
                out[first[id(p)]].append((m, pn, True))
        for bn, b in m._buffers.items():
            if b is not None and id(b) in first:
                out[first[id(b)]].append((m, bn, False))
    return out


def _kept_per_dim(g: Graph, groups: list[Group], keep: dict[int, torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
    """Indices kept along every (tensor, dim) that a pruned group touches (other groups' channels kept)."""
    touched = {gr.root for gr in groups if gr.root in keep}
    out: dict[tuple[str, int], torch.Tensor] = {}
    for (name, dim), lay in g.param_layouts.items():
        if not {g.find(s) for s, _ in lay} & touched:
            continue
        pos, parts = 0, []
        for s, k in lay:
            n, r = g.space(s).size, g.find(s)
            if r in touched:
                ch = keep[r].long()
                parts.append(pos + (ch[:, None] * k + torch.arange(k)[None, :]).reshape(-1))
            else:
                parts.append(torch.arange(pos, pos + n * k))
            pos += n * k
        out[(name, dim)] = torch.cat(parts)
    return out


@torch.no_grad()
def mask_groups(model: nn.Module, g: Graph, groups: list[Group], keep: dict[int, torch.Tensor]) -> None:
    """Zero (in place) the channels that :func:`prune_groups` would remove, in every tensor of their
    groups: the *masked original*. For groups no norm mixes, it computes what the pruned model does."""
    state = dict(model.named_parameters(remove_duplicate=True))
    state.update(dict(model.named_buffers(remove_duplicate=True)))
    for (name, dim), idx in _kept_per_dim(g, groups, keep).items():
        t = state[name]
        drop = torch.ones(t.shape[dim], dtype=torch.bool)
        drop[idx] = False
        t.index_fill_(dim, drop.nonzero().flatten().to(t.device), 0)


def prune_groups(model: nn.Module, g: Graph, groups: list[Group], keep: dict[int, torch.Tensor]) -> list[str]:
    """Keep only ``keep[root]`` channels of each group; returns the names of changed modules."""
    state = dict(model.named_parameters(remove_duplicate=True))
    state.update(dict(model.named_buffers(remove_duplicate=True)))
    owners = _owners(model)
    changed: dict[int, nn.Module] = {}
    new_by_name: dict[str, torch.Tensor] = {}
    for (name, dim), idx in _kept_per_dim(g, groups, keep).items():
        t = new_by_name.get(name, state[name])
        new_by_name[name] = torch.index_select(t.detach(), dim, idx.to(t.device)).clone()
    for name, data in new_by_name.items():
        old = state[name]
        for m, attr, is_param in owners[name]:
            if is_param:
                new = nn.Parameter(data, requires_grad=old.requires_grad)
                m._parameters[attr] = new
            else:
                m._buffers[attr] = data
            changed[id(m)] = m
        # tied owners must share one Parameter object, as before
        params = [m._parameters[a] for m, a, p in owners[name] if p]
        for m, attr, is_param in owners[name]:
            if is_param and params:
                m._parameters[attr] = params[0]
    names = {id(m): n for n, m in model.named_modules()}
    for m in changed.values():
        fix_attributes(m)
    return sorted(names.get(id(m), "?") for m in changed.values())


def fix_attributes(m: nn.Module) -> None:
    """Make a module's size attributes agree with its (pruned) tensors."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.modules.conv._ConvNd) and w is not None:
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        m.out_channels = w.shape[0]
        if depthwise:
            m.groups = w.shape[0]
        m.in_channels = w.shape[1] * m.groups
    elif isinstance(m, nn.Linear) and w is not None:
        m.out_features, m.in_features = w.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.LayerNorm) and w is not None:
        m.normalized_shape = (w.shape[0],)
    elif isinstance(m, nn.GroupNorm) and w is not None:
        if m.num_groups == m.num_channels:
            m.num_groups = w.shape[0]
        m.num_channels = w.shape[0]
    elif isinstance(m, nn.Embedding) and w is not None:
        m.num_embeddings, m.embedding_dim = w.shape
    elif type(m).__name__ == "Conv1D" and w is not None:  # Hugging Face GPT-2 style (in, out) weight
        m.nx, m.nf = w.shape
