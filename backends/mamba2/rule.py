"""Mamba-2 SSD as a variant: another architecture (retrain class) for causal sites, offered under policy "any" with
train=True; emitted in attention's roles (C = q, B = k, x = v) with a slow constant decay to train from."""
from __future__ import annotations

import torch

from backends.mamba2 import cost
from backends.variant import Variant, retrain_offer

SSD_INITIAL_DECAY = -1.0 / 4096  # A: a slow decay (half-life ~2.8k positions) to start training from


def ssd_from_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SSD in attention's roles (C = q, B = k, x = v), dt = 1 and a constant slow decay per head: the starting
    point of a retrained state-space layer, not an approximation of the softmax."""
    from backends.mamba2.op import ssd

    batch, heads, length, _ = query.shape
    groups = heads // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dt = torch.ones(batch, heads, length, dtype=value.dtype, device=value.device)
    decay = torch.full((heads,), SSD_INITIAL_DECAY, dtype=torch.float32, device=value.device)
    return ssd(value, dt, decay, key, query)


def _emit(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    with graph.inserting_before(node):
        return graph.call_function(ssd_from_attention, (nodes[site.query], nodes[site.key], nodes[site.value]))


SSD = Variant(
    "ssd", "SSD (Mamba-2)", cost, retrain_offer("SSD", True), _emit,
    efficiency={"hopper": {"ssd": 0.05}, "ampere": {"ssd": 0.08}, "cpu": {"ssd": 0.1}},
)
