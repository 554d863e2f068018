"""The public `sliding_window_attention`.

Sliding-window attention is the exact tiled op `attention_planner::flash_attention` with a window: the window is a
parameter of the one tiled kernel (backends/flash/triton.py), whose loop bounds skip the key blocks outside the band.
So there is no second custom op here: graphs rewritten to sliding-window attention call the flash op, which exports,
compiles and trains the same way.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from backends.flash.op import tiled_attention
from backends.flash.options import AttentionOptions
from passes.errors import BackendError


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *, causal: bool = True,
                             sinks: int = 0, options: Optional[AttentionOptions] = None, return_lse: bool = False,
                             impl: Optional[str] = None, **keywords):
    """Softmax attention restricted to a band of `window` keys around each query, tiled; compute grows as L * window.

    Args:
        q: (batch, q_heads, queries, head_dim). k, v: (batch, kv_heads, keys, head_dim); kv_heads divides q_heads.
        window: band width W >= 1. causal=True: query i sees key j iff i - W < j <= i (positions from 0, top-left
            aligned as SDPA's is_causal); causal=False: iff |i - j| < W.
        sinks: the first `sinks` keys stay visible to every query (still subject to causality).
        options: an AttentionOptions for the rest (scale, key_padding_mask, softcap, sink_logits), or those as
            keywords:
        scale: multiplies q·k; default 1/sqrt(head_dim).
        key_padding_mask: (batch, keys) bool, True where a key is real.
        return_lse: also return the natural-log log-sum-exp per query, float32 (batch, q_heads, queries).
        impl: "triton" (the fused kernel), "blockwise" (PyTorch online softmax), "reference" (dense), "auto" or
            None (Triton on CUDA, blockwise elsewhere; "auto" decides when the op runs).
        softcap: tanh soft-capping (Gemma-2): the scaled scores s become softcap * tanh(s / softcap) before the
            window.
        sink_logits: (q_heads,) float tensor, one learned logit per query head (gpt-oss) in every row's softmax,
            with no value (it only enlarges the denominator; differentiable). Not the same as `sinks`, which keeps
            the first keys visible.

    Rows with no visible key give zeros (lse = -inf, or the sink logit with sink_logits), not NaN.
    """
    try:
        window_size = operator.index(window)
    except TypeError:
        window_size = 0
    if isinstance(window, bool) or window_size < 1:
        raise BackendError(f"window must be a positive int (number of keys in the band); got {window!r}")
    options = AttentionOptions.of(options, causal=causal, window=window_size, sinks=sinks, **keywords)
    return tiled_attention(q, k, v, options, return_lse=return_lse, impl=impl)
