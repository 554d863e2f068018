"""The readable reference for sliding-window attention: dense attention with a band mask (the test oracle).

With causal=True query i sees key j iff i - window < j <= i; with causal=False iff |i - j| < window. `sinks=n` keeps
keys j < n visible too (the streaming-LLM "attention sink"), still subject to causality.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.flash.naive import attention_reference


def sliding_window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    sink_logits: Optional[torch.Tensor] = None,
):
    """Dense sliding-window attention; layout (batch, heads, sequence, head_dim), GQA as in flash's reference.
    softcap and sink_logits (tanh soft-capping, per-head sink logits) as in flash's reference."""
    return attention_reference(q, k, v, causal=causal, window=window, sinks=sinks, scale=scale,
                               key_padding_mask=key_padding_mask, return_lse=return_lse, softcap=softcap,
                               sink_logits=sink_logits)
