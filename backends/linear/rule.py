"""Linear attention as a variant: another architecture (retrain class), offered under policy "any" with train=True;
emitted with the elu+1 feature map, the starting point that training then adapts."""
from __future__ import annotations

import torch

from backends.linear import cost
from backends.variant import KernelProbe, Variant, backend_call, repeat_kv, retrain_offer


def _emit(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    from backends.linear.op import linear_attention

    groups = site.heads // site.kv_heads
    with graph.inserting_before(node):
        key = repeat_kv(graph, nodes[site.key], groups)
        value = repeat_kv(graph, nodes[site.value], groups)
        return graph.call_function(linear_attention, (nodes[site.query], key, value),
                                   {"feature_map": "elu+1", "causal": site.mask.is_causal})


LINEAR = Variant(
    "linear", "linear attention", cost, retrain_offer("linear attention", False), _emit,
    efficiency={"hopper": {"linear": 0.05}, "ampere": {"linear": 0.08}, "cpu": {"linear": 0.1}},
    probes=(KernelProbe("linear", cost, "triton", backend_call("backends.linear.op", "linear_attention")),),
)
