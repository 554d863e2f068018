"""The readable reference for decoding: a few new query tokens per batch row attend to a KV cache. It is the test
oracle of the decoding kernel (backends/decode/triton.py) and the op's PyTorch path off the GPU.

Layout: q (batch, q_heads, T, head_dim) with T small (1 for one decoding step); the caches k_cache
(batch, kv_heads, slots, head_dim) and v_cache (batch, kv_heads, slots, value_dim), value_dim may differ from
head_dim; kv_heads divides q_heads (grouped-query attention: query head h reads kv head h // (q_heads // kv_heads)).

Positions are absolute token positions of a row, counted from 0 at the row's first cache slot (left padding
included). `cache_len` (batch,) int64 holds how many positions each row has written, the new tokens included: the T
queries sit at positions cache_len - T + t and see the keys at positions <= their own (causal within the new tokens).
Left padding is a per-row `start` (batch,) int64, the position of the row's first real token: keys at positions
< start are never visible. A window W keeps keys with query - key < W; `sinks` n keeps positions < n visible too
(still causal); both count positions from slot 0, padding included, as the masks of transformers' models do.

Two cache forms (what a slot holds):
  linear   slot s holds position s; the cache is as long as the longest sequence (max_len slots).
  rolling  for a proved sliding window: sinks + R slots, R >= W + T - 1 (R = W for one token per step). Position p
           goes to slot p if p < sinks, else to sinks + (p - sinks) % R; a slot holds the latest position written to
           it, so the cache keeps the sinks and the last R positions, whatever the context length.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.flash.naive import expand_kv_heads


def slot_positions(cache_len: torch.Tensor, slots: int, *, sinks: int = 0, rolling: bool = False) -> torch.Tensor:
    """(batch, slots) int64: the absolute position that each slot holds once `cache_len` positions are written, or -1
    for a slot never written.

    linear: slot s holds s (if s < cache_len). rolling: slots < sinks hold their own position; ring slot
    s = sinks + r holds the latest position sinks + j with j % R == r and j < cache_len - sinks (R = slots - sinks).
    """
    slot = torch.arange(slots, device=cache_len.device)[None, :]
    end = cache_len.to(torch.int64)[:, None]
    if not rolling:
        return torch.where(slot < end, slot, -1)
    ring = slots - sinks
    r = slot - sinks
    written = end - sinks  # ring positions written so far (<= 0: none)
    latest = sinks + r + ring * torch.div(written - 1 - r, ring, rounding_mode="floor").clamp(min=0)
    ring_position = torch.where(r <= written - 1, latest, -1)
    sink_position = torch.where(slot < end, slot, -1)
    return torch.where(slot < sinks, sink_position, ring_position)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    sinks: int = 0,
    softcap: Optional[float] = None,
    sink_logits: Optional[torch.Tensor] = None,
    start: Optional[torch.Tensor] = None,
    rolling: bool = False,
    return_lse: bool = False,
):
    """Dense attention of the T new queries to every slot of the cache, masked by each slot's position; computed in
    float32 at least (float64 stays float64).

    Args:
        q: (batch, q_heads, T, head_dim), the queries at positions cache_len - T .. cache_len - 1.
        k_cache, v_cache: (batch, kv_heads, slots, head_dim / value_dim), in the linear or the rolling form.
        cache_len: (batch,) int64, positions written per row, the T new ones included.
        scale: multiplies q·k; default 1/sqrt(head_dim).
        window: keys with query - key < window stay visible (None: all earlier keys).
        sinks: positions < sinks stay visible whatever the window.
        softcap: tanh soft-capping (Gemma-2): the scaled scores s become softcap * tanh(s / softcap) before the masks.
        sink_logits: (q_heads,) one logit per query head in every row's softmax, with no value (gpt-oss).
        start: (batch,) int64, the first real position of each row (left padding); None: 0.
        rolling: the cache is the rolling buffer of sinks + R slots (see the module docstring).
        return_lse: also return the natural-log log-sum-exp (batch, q_heads, T), float32 (float64 for float64).

    A query with no visible key gives zeros (lse = -inf, or its sink logit).
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_heads, queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    keys = expand_kv_heads(k_cache, q_heads).to(compute_dtype)
    values = expand_kv_heads(v_cache, q_heads).to(compute_dtype)
    scores = (q.to(compute_dtype) @ keys.transpose(-1, -2)) * scale  # (batch, q_heads, T, slots)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)

    key_position = slot_positions(cache_len, k_cache.shape[2], sinks=sinks, rolling=rolling)[:, None, :]  # (B, 1, S)
    query_position = (cache_len.to(torch.int64)[:, None] - queries
                      + torch.arange(queries, device=q.device)[None, :])[:, :, None]  # (B, T, 1)
    visible = (key_position >= 0) & (key_position <= query_position)
    if start is not None:
        visible = visible & (key_position >= start.to(torch.int64)[:, None, None])
    if window is not None:
        in_window = query_position - key_position < window
        if sinks:
            in_window = in_window | (key_position < sinks)
        visible = visible & in_window
    scores = scores.masked_fill(~visible[:, None], float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    if sink_logits is not None:
        lse = torch.logaddexp(lse, sink_logits.to(device=q.device, dtype=compute_dtype)[None, :, None].expand_as(lse))
    # Rows with no visible key subtract 0 instead of -inf, so that exp(-inf) = 0 rather than NaN.
    probabilities = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = (probabilities @ values).to(q.dtype)
    return (out, lse) if return_lse else out
