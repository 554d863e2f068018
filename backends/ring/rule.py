"""Ring attention as a variant: where it applies (a sequence sharded over world_size > 1 devices) and how it is
emitted: one call of attention_planner::ring_attention per site."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch

from backends.ring import cost
from backends.ring.comm import group_name_of
from backends.variant import (Offer, PlanContext, Variant, keeps_mask_tensor, on_gpu, score_modifier_obstacle,
                              tiled_obstacle)
from passes.records import AttentionSite


def _offer(site: AttentionSite, context: PlanContext) -> Offer:
    reason = tiled_obstacle(site) or score_modifier_obstacle(site, "ring attention")
    if reason is None and context.world_size < 2:
        reason = "runs over world_size > 1 devices (optimize(..., world_size=P), --world-size P); planned for one device"
    if reason is None and (keeps_mask_tensor(site) or site.mask.key_padding or site.q_len != site.kv_len):
        reason = f"ring attention takes self-attention with a structured mask; the site has {site.mask.describe()}"
    parameters = (("world_size", context.world_size), ("layout", "zigzag"))
    return Offer("triton" if on_gpu(context.device) else "blockwise", "exact", parameters, reason)


def emit_ring(graph: torch.fx.Graph, node: torch.fx.Node, site: AttentionSite, nodes: dict, candidate: Any = None,
              *, group_name: Optional[str] = None, layout: str = "zigzag") -> torch.fx.Node:
    """attention_planner::ring_attention(q, k, v, group, causal, window, layout, scale, "auto")[0], before `node`.
    group_name: the registered name of the process group (None: the default group, which torch.distributed must
    have initialized when the call is emitted); the partition (backends/ring/partition.py) names its own."""
    import backends.ring.op  # noqa: F401  registers attention_planner::ring_attention

    mask = site.mask
    window = int(mask.window) if mask.kind == "sliding_window" else -1
    group = group_name if group_name is not None else group_name_of(None)
    arguments = (nodes[site.query], nodes[site.key], nodes[site.value], group, mask.is_causal, window, layout,
                 float(site.effective_scale()), "auto")
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.attention_planner.ring_attention.default, arguments)
        return graph.call_function(operator.getitem, (call, 0))


RING = Variant(
    "ring", "ring", cost, _offer, emit_ring,
    efficiency={"hopper": {"ring": 0.45}, "ampere": {"ring": 0.45}, "cpu": {"ring": 0.25}},
    sharded=True,
)
