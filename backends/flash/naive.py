"""The readable reference for softmax attention: dense scores, one mask, one softmax. It is the test oracle of every
exact variant, and of the approximate ones' error measurements.

Layout (batch, heads, sequence, head_dim). K and V may have fewer heads than Q (grouped-query attention): query head
h reads kv head h // (q_heads // kv_heads).

Two score modifiers of real models: tanh soft-capping (Gemma-2: s = cap * tanh(s / cap), before any mask) and
attention-sink logits (gpt-oss: one learned logit per query head that joins every row's softmax without a value, so
it only enlarges the denominator).
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.flash.options import AttentionOptions


def visible_keys(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    *,
    causal: bool,
    window: Optional[int],
    sinks: int,
) -> torch.Tensor:
    """Boolean (queries, keys) matrix: True where query i may attend to key j.

    causal: j <= i (top-left aligned, as SDPA's is_causal). window W: with causal, i - W < j; without, |i - j| < W.
    sinks n: keys j < n stay visible whatever the window (still subject to causality).
    """
    i = query_positions[:, None]
    j = key_positions[None, :]
    visible = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=query_positions.device)
    if window is not None:
        in_window = (i - j < window) if causal else ((i - j).abs() < window)
        if sinks:
            in_window = in_window | (j < sinks)
        visible = visible & in_window
    if causal:
        visible = visible & (j <= i)
    return visible


def expand_kv_heads(tensor: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Repeat kv heads so that each query head has its own (the reference may materialize; kernels must not)."""
    kv_heads = tensor.shape[1]
    if kv_heads == q_heads:
        return tensor
    return tensor.repeat_interleave(q_heads // kv_heads, dim=1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Optional[AttentionOptions] = None,
                        *, return_lse: bool = False, **keywords):
    """Dense softmax attention, computed in float32 at least (float64 stays float64). `options`: an
    AttentionOptions, or its fields as keywords (which replace those of `options`).

    softcap c: the scaled scores become c * tanh(s / c) before the masks. sink_logits: (q_heads,) one extra logit per
    query head in every row's softmax, with no value: it adds exp(sink) to the denominator (and to the lse). A row
    with no visible key gives zeros; its lse is the sink logit (-inf without sinks).

    key_padding_mask: (batch, keys) bool, True where a key is real. attn_mask: broadcastable to
    (batch, q_heads, queries, keys), bool (True = may attend) or additive float. Rows with no visible key give zeros
    and lse = -inf. Returns out (q.dtype), and with return_lse the natural-log log-sum-exp (batch, q_heads, queries)
    in float32 (float64 for float64 inputs).
    """
    options = AttentionOptions.of(options, **keywords)
    causal, window, sinks, softcap = options.causal, options.window, options.sinks, options.softcap
    key_padding_mask, attn_mask, sink_logits = options.key_padding_mask, options.attn_mask, options.sink_logits
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_heads, q_len, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_len = k.shape[2]
    scale = head_dim**-0.5 if options.scale is None else options.scale
    keys = expand_kv_heads(k, q_heads).to(compute_dtype)
    values = expand_kv_heads(v, q_heads).to(compute_dtype)
    scores = (q.to(compute_dtype) @ keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)

    visible = visible_keys(
        torch.arange(q_len, device=q.device),
        torch.arange(kv_len, device=q.device),
        causal=causal,
        window=window,
        sinks=sinks,
    )[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(compute_dtype)
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    if sink_logits is not None:
        sink = sink_logits.to(device=q.device, dtype=compute_dtype)[None, :, None].expand_as(lse)
        lse = torch.logaddexp(lse, sink)
    # exp(-inf - -inf) is NaN: rows with no visible key subtract 0 instead, which gives exp(-inf) = 0.
    probabilities = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = (probabilities @ values).to(q.dtype)
    if return_lse:
        return out, lse
    return out
