"""Our exact tiled kernel (Triton on GPUs, the blockwise loop elsewhere): where it applies and how it is emitted.

The sliding-window variant emits the same op with a window (emit_tiled)."""
from __future__ import annotations

import operator
from typing import Optional

import torch

from backends.flash import cost
from backends.variant import (KernelProbe, Offer, PlanContext, Variant, backend_call, keeps_mask_tensor, on_gpu,
                              tiled_obstacle)
from passes.errors import BackendError
from passes.records import AttentionSite


def tiled_implementation(device, site: AttentionSite) -> str:
    """What runs a tiled rewrite of the site on `device`."""
    if not on_gpu(device):
        # SDPA's fused CPU kernel runs the unmasked tiles unless a mask tensor, padding or soft-capping is in them.
        plain = keeps_mask_tensor(site) or site.mask.key_padding is not None or site.softcap is not None
        return "blockwise" if plain else "blockwise-sdpa"
    # A mask tensor kept for exactness runs in the blockwise loop; structured masks run in the Triton kernel.
    return "blockwise" if keeps_mask_tensor(site) else "triton"


def _flash_offer(site: AttentionSite, context: PlanContext) -> Offer:
    implementation = tiled_implementation(context.device, site)
    obstacle = tiled_obstacle(site)
    if obstacle is None and site.mask.kind == "sliding_window" and (site.mask.window or 0) < context.max_len:
        obstacle = "the mask is a sliding window: the sliding_window variant runs it"
    if obstacle:
        return Offer(implementation, "exact", not_applicable=obstacle)
    return Offer(implementation, "exact")


def emit_sink_logits(graph: torch.fx.Graph, site: AttentionSite, nodes: dict) -> Optional[torch.fx.Node]:
    """The site's sink logits as a (heads,) node, or None. The detector records the tensor behind the model's
    reshape/expand (gpt-oss: the (heads,) parameter); one logit shared by every head is expanded."""
    if site.sinks is None:
        return None
    sinks = nodes[site.sinks]
    value = sinks.meta.get("val")
    count = value.numel() if isinstance(value, torch.Tensor) else None
    if count == site.heads:
        return graph.call_function(torch.ops.aten.reshape.default, (sinks, [site.heads]))
    if count == 1:
        flat = graph.call_function(torch.ops.aten.reshape.default, (sinks, [1]))
        return graph.call_function(torch.ops.aten.expand.default, (flat, [site.heads]))
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else "unknown"
    raise BackendError(f"{site.name}: the attention-sink logits {site.sinks} have shape {shape}; the tiled kernels "
                       f"take one logit per query head ({site.heads}) or one for all")


def emit_tiled(graph: torch.fx.Graph, node: torch.fx.Node, site: AttentionSite, nodes: dict,
               window: Optional[int], sinks: int, causal: bool) -> torch.fx.Node:
    """attention_planner::flash_attention(q, k, v, padding, mask, causal, window, sinks, scale, "auto", softcap,
    sink_logits)[0]."""
    import backends.flash.op  # noqa: F401  registers the op

    mask = site.mask
    keep_tensor = keeps_mask_tensor(site)
    with graph.inserting_before(node):
        arguments = (
            nodes[site.query], nodes[site.key], nodes[site.value],
            nodes[mask.key_padding] if mask.key_padding else None,
            nodes[mask.tensor] if keep_tensor and mask.tensor else None,
            causal, window if window is not None else -1, sinks, float(site.effective_scale()), "auto",
        )
        if site.softcap is not None or site.sinks is not None:  # else the call stays as before these arguments
            arguments += (None if site.softcap is None else float(site.softcap), emit_sink_logits(graph, site, nodes))
        call = graph.call_function(torch.ops.attention_planner.flash_attention.default, arguments)
        output = graph.call_function(operator.getitem, (call, 0))
    return output


def _emit_flash(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    mask = site.mask
    window = mask.window if mask.kind == "sliding_window" else None
    return emit_tiled(graph, node, site, nodes, window, 0, mask.is_causal)


FLASH = Variant(
    "flash", "exact tiled", cost, _flash_offer, _emit_flash,
    efficiency={"hopper": {"flash": 0.5, "blockwise": 0.05, "blockwise-sdpa": 0.05},
                "ampere": {"flash": 0.5, "blockwise": 0.05, "blockwise-sdpa": 0.05},
                "cpu": {"flash": 0.3, "blockwise": 0.25, "blockwise-sdpa": 0.3}},
    probes=(KernelProbe("flash", cost, "triton", backend_call("backends.flash.op", "flash_attention", causal=True)),
            KernelProbe("blockwise-sdpa", cost, "blockwise-sdpa",
                        backend_call("backends.flash.op", "flash_attention", causal=True, impl="blockwise"),
                        gpu_only=False)),
    keeps_mask=True,
)
