"""Costs of one decoding step of one attention site (`attention_planner::decode_attention`), as plain functions.

A step with a few queries per row is bound by reading the KV cache: its time is the bytes of K and V read over the
memory bandwidth (the queries, the output and the split-K partials are a few kilobytes beside it). Grouped-query heads
are packed in the kernel, so the bytes count kv_heads, not q_heads.

Which slots a step reads (per row and kv head), for a row of `cache_len` positions:
  linear cache, no window       cache_len
  linear cache, window W        min(cache_len, W + T - 1 + sinks)
  rolling buffer                min(cache_len, sinks + R), R = W + T - 1: constant once the buffer is full
A cache's memory is its slots times the bytes per slot: max_len slots for the linear form, sinks + R for the rolling
buffer, whatever the context length.
"""
from __future__ import annotations

from typing import Optional


def cache_slots_per_row(max_len: int, *, window: Optional[int] = None, sinks: int = 0, rolling: bool = False,
                        queries: int = 1) -> int:
    """Slots a cache holds per row and kv head: max_len (linear), sinks + window + queries - 1 (rolling)."""
    if rolling:
        if window is None:
            raise ValueError("a rolling buffer needs a window")
        return sinks + window + queries - 1
    return max_len


def slots_read_per_step(cache_len: int, *, window: Optional[int] = None, sinks: int = 0, rolling: bool = False,
                        queries: int = 1) -> int:
    """Slots the kernel reads per row and kv head in one step at `cache_len` positions (the table above)."""
    if rolling:
        return min(cache_len, cache_slots_per_row(cache_len, window=window, sinks=sinks, rolling=True,
                                                  queries=queries))
    if window is None:
        return cache_len
    return min(cache_len, window + queries - 1 + sinks)


def kv_bytes_read_per_step(cache_len: int, kv_heads: int, head_dim: int, dtype_bytes: int, *,
                           value_dim: Optional[int] = None, batch: int = 1, window: Optional[int] = None,
                           sinks: int = 0, rolling: bool = False, queries: int = 1) -> int:
    """Bytes of K and V one step reads: batch * kv_heads * slots read * (head_dim + value_dim) * dtype_bytes."""
    value_dim = head_dim if value_dim is None else value_dim
    slots = slots_read_per_step(cache_len, window=window, sinks=sinks, rolling=rolling, queries=queries)
    return batch * kv_heads * slots * (head_dim + value_dim) * dtype_bytes


def time_per_token(cache_len: int, kv_heads: int, head_dim: int, dtype_bytes: int, bandwidth: float, *,
                   value_dim: Optional[int] = None, batch: int = 1, window: Optional[int] = None, sinks: int = 0,
                   rolling: bool = False, queries: int = 1) -> float:
    """Seconds per decoding step of this site at the cache-read roofline: K/V bytes read / bandwidth (bytes/s).
    With queries = T > 1 tokens per step, divide by T for the time per token."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive bytes per second; got {bandwidth!r}")
    return kv_bytes_read_per_step(cache_len, kv_heads, head_dim, dtype_bytes, value_dim=value_dim, batch=batch,
                                  window=window, sinks=sinks, rolling=rolling, queries=queries) / bandwidth


def cache_bytes(max_len: int, kv_heads: int, head_dim: int, dtype_bytes: int, *, value_dim: Optional[int] = None,
                batch: int = 1, window: Optional[int] = None, sinks: int = 0, rolling: bool = False,
                queries: int = 1) -> int:
    """Bytes of this site's K and V caches allocated for `max_len` positions (the rolling buffer's are independent
    of max_len)."""
    value_dim = head_dim if value_dim is None else value_dim
    slots = cache_slots_per_row(max_len, window=window, sinks=sinks, rolling=rolling, queries=queries)
    return batch * kv_heads * slots * (head_dim + value_dim) * dtype_bytes
