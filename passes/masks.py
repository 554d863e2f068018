"""Mask analysis: classify what a site's mask is, and record how that was proved.

A classification must hold for every sequence length, not one example. What cannot be proved stays "arbitrary":
the site keeps the mask tensor, and with it exact semantics.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from planner.records import MaskSpec


def sdpa_mask(attn_mask: Optional[torch.fx.Node], is_causal: Any) -> MaskSpec:
    """The mask of a scaled_dot_product_attention call from its attn_mask and is_causal arguments."""
    if attn_mask is not None and is_causal:
        # SDPA itself rejects this combination; keep the call as it is.
        return MaskSpec(kind="arbitrary", tensor=attn_mask.name,
                        proof="attn_mask and is_causal=True together; kept as the model wrote it")
    if is_causal is True:
        return MaskSpec(kind="causal", proof="is_causal=True in the scaled_dot_product_attention call")
    if not isinstance(is_causal, bool):
        return MaskSpec(kind="arbitrary", tensor=None,
                        proof=f"is_causal is a graph value ({is_causal}), not a constant")
    if attn_mask is None:
        return MaskSpec(kind="none", proof="no attn_mask and is_causal=False in the scaled_dot_product_attention call")
    return MaskSpec(kind="arbitrary", tensor=attn_mask.name,
                    proof="the attn_mask tensor's structure was not proved; it is kept exactly")
