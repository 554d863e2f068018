"""HyperAttention as a variant: approximate, at sites of proved none/causal structure; emitted as a call of
backends.hyper.op.hyper_attention with q scaled for its default 1/sqrt(D)."""
from __future__ import annotations

from typing import Optional

import torch

from backends.hyper import cost
from backends.variant import (Fidelity, KernelProbe, Offer, PlanContext, Variant, backend_call, on_gpu, repeat_kv,
                              scaled_query, score_modifier_obstacle, structure_only, tiled_obstacle)
from passes.records import AttentionSite

HYPER_DEFAULTS = (("block_size", 256), ("sample_size", 256), ("num_projections", 7), ("min_seq_len", 4096))


def _offer(site: AttentionSite, context: PlanContext) -> Offer:
    reason = tiled_obstacle(site) or score_modifier_obstacle(site, "HyperAttention") or structure_only(site)
    implementation = "triton" if on_gpu(context.device) else "reference"
    return Offer(implementation, "approximate", HYPER_DEFAULTS, reason)


def _emit(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    from backends.hyper.op import hyper_attention

    parameters = dict(candidate.parameters) if candidate is not None else dict(HYPER_DEFAULTS)
    groups = site.heads // site.kv_heads
    with graph.inserting_before(node):
        query = scaled_query(graph, site, nodes[site.query])
        key = repeat_kv(graph, nodes[site.key], groups)
        value = repeat_kv(graph, nodes[site.value], groups)
        keywords = {name: parameters[name] for name, _ in HYPER_DEFAULTS if name in parameters}
        return graph.call_function(hyper_attention, (query, key, value), {"causal": site.mask.is_causal, **keywords})


def _unmeasured(candidate, sample_length: int) -> Optional[str]:
    minimum = candidate.parameter("min_seq_len")
    if minimum is not None and sample_length <= int(minimum):
        return (f"HyperAttention is exact up to min_seq_len={minimum} keys and the sample batches have "
                f"{sample_length}; measure at the deployment length")
    return None


HYPER = Variant(
    "hyper", "HyperAttention", cost, _offer, _emit,
    efficiency={"hopper": {"hyper": 0.15}, "ampere": {"hyper": 0.15}, "cpu": {"hyper": 0.1}},
    probes=(KernelProbe("hyper", cost, "triton", backend_call("backends.hyper.op", "hyper_attention", causal=True)),),
    fidelity=Fidelity(shown=tuple(name for name, _ in HYPER_DEFAULTS), defaults=HYPER_DEFAULTS,
                      unmeasured=_unmeasured),
)
