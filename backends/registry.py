"""What the planner may ask of a variant: does it apply to a site under a policy, how exact is it, what does it cost,
what implements it on a device, and how is a call emitted into a graph.

The planner and the passes import this module, never a kernel's internals.
"""
from __future__ import annotations

import importlib
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from planner.records import AttentionSite

EXACTNESS_ALLOWED = {"exact": ("exact",), "approximate": ("exact", "approximate"), "any": ("exact", "approximate", "retrain")}

# Mask kinds the tiled kernel expresses without the mask tensor; "arbitrary" runs with the tensor (exactly).
TILED_MASKS = ("none", "causal", "sliding_window", "padding", "arbitrary")


@dataclass(frozen=True)
class Variant:
    """A way to compute attention, as the planner sees it."""

    name: str
    exactness: str
    cost_module: str
    applies: Callable[[AttentionSite], Optional[str]]
    implementation: Callable[[object, AttentionSite], str]  # (DeviceSpec, site) -> what runs it there
    emit: Optional[Callable[[torch.fx.Graph, torch.fx.Node, AttentionSite, dict], torch.fx.Node]] = None

    def costs(self, shape):
        return importlib.import_module(self.cost_module).costs(shape)


def _dense_applies(site: AttentionSite) -> Optional[str]:
    return None  # the original always applies: it is what the model does


def _flash_applies(site: AttentionSite) -> Optional[str]:
    if site.unsupported:
        return site.unsupported
    if site.dropout_p != 0.0:
        return f"dropout_p={site.dropout_p}: the tiled kernels have no dropout (exact only in eval)"
    if site.softcap is not None:
        return f"tanh soft-capping ({site.softcap}) is not in the tiled kernels yet"
    if site.sinks is not None:
        return "attention-sink logits are not in the tiled kernels yet"
    if site.mask.kind not in TILED_MASKS:
        return f"mask kind {site.mask.kind!r} is not expressed by the tiled kernels"
    if site.mask.bias is not None and site.mask.tensor is None:
        return "an additive bias without its tensor cannot be kept exactly"
    if site.mask.kind == "arbitrary" and site.mask.tensor is None:
        return f"the mask could not be proved and has no tensor to keep ({site.mask.proof})"
    if site.heads % site.kv_heads:
        return f"{site.heads} query heads are not a multiple of {site.kv_heads} kv heads"
    return None


def _flash_implementation(device, site: AttentionSite) -> str:
    # A mask tensor kept for exactness runs in the blockwise loop; structured masks run in the Triton kernel on GPUs.
    if getattr(device, "kind", "gpu") == "cpu" or site.mask.kind == "arbitrary" or site.mask.bias is not None:
        return "blockwise"
    return "triton"


def _emit_flash(graph: torch.fx.Graph, node: torch.fx.Node, site: AttentionSite, nodes: dict) -> torch.fx.Node:
    """Replace the site's output with attention_planner::flash_attention(q, k, v, padding, mask, ...)[0]."""
    importlib.import_module("backends.flash.op")  # registers the op
    mask = site.mask
    keep_tensor = mask.kind == "arbitrary" or mask.bias is not None
    causal = mask.kind in ("causal", "sliding_window")
    window = mask.window if mask.kind == "sliding_window" else -1
    arguments = (
        nodes[site.query], nodes[site.key], nodes[site.value],
        nodes[mask.key_padding] if mask.key_padding else None,
        nodes[mask.tensor] if keep_tensor and mask.tensor else None,
        causal, window if window is not None else -1, 0, float(site.effective_scale()), "auto",
    )
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.attention_planner.flash_attention.default, arguments)
        output = graph.call_function(operator.getitem, (call, 0))
    return output


VARIANTS: dict[str, Variant] = {
    "dense": Variant("dense", "exact", "backends.dense.cost", _dense_applies, lambda device, site: "original"),
    "flash": Variant("flash", "exact", "backends.flash.cost", _flash_applies, _flash_implementation, _emit_flash),
}


def register(variant: Variant) -> None:
    """Add or replace a variant (each variant's folder registers itself here when it lands)."""
    VARIANTS[variant.name] = variant


def variants_for(policy: str) -> list[Variant]:
    allowed = EXACTNESS_ALLOWED[policy]
    return [variant for variant in VARIANTS.values() if variant.exactness in allowed]
