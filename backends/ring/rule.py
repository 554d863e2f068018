"""How ring attention is emitted into a graph: one call of attention_planner::ring_attention per site."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch

import backends.ring.op  # noqa: F401  registers attention_planner::ring_attention
from backends.ring.comm import group_name_of
from passes.records import AttentionSite


def emit_ring(graph: torch.fx.Graph, node: torch.fx.Node, site: AttentionSite, nodes: dict, candidate: Any = None,
              *, group_name: Optional[str] = None, layout: str = "zigzag") -> torch.fx.Node:
    """attention_planner::ring_attention(q, k, v, group, causal, window, layout, scale, "auto")[0], before `node`.
    group_name: the registered name of the process group (None: the default group, which torch.distributed must
    have initialized when the call is emitted); the partition (backends/ring/partition.py) names its own."""
    mask = site.mask
    window = int(mask.window) if mask.kind == "sliding_window" else -1
    group = group_name if group_name is not None else group_name_of(None)
    arguments = (nodes[site.query], nodes[site.key], nodes[site.value], group, mask.is_causal, window, layout,
                 float(site.effective_scale()), "auto")
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.attention_planner.ring_attention.default, arguments)
        return graph.call_function(operator.getitem, (call, 0))
