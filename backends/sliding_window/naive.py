"""The readable reference for sliding-window attention: dense attention with a band mask (the test oracle).

With causal=True query i sees key j iff i - window < j <= i; with causal=False iff |i - j| < window. `sinks=n` keeps
keys j < n visible too (the streaming-LLM "attention sink"), still subject to causality.
"""
from __future__ import annotations

import torch

from backends.flash.naive import attention_reference
from backends.flash.options import AttentionOptions


def sliding_window_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *, causal: bool = True,
                             sinks: int = 0, return_lse: bool = False, **keywords):
    """Dense sliding-window attention; layout (batch, heads, sequence, head_dim), GQA as in flash's reference. The
    other keywords (scale, key_padding_mask, softcap, sink_logits) as in flash's reference."""
    return attention_reference(q, k, v, AttentionOptions(causal=causal, window=window, sinks=sinks, **keywords),
                               return_lse=return_lse)
