"""The KV caches that decoding reads: allocation and the in-place append, in the two forms of backends/decode/naive.py
(linear: slot = position; rolling: sinks + R slots, position p in slot p if p < sinks, else sinks + (p - sinks) % R).

The append has static shapes and derives no Python number from tensor data (positions stay tensors, the write is one
`scatter_` per cache), so that a decoding step that calls it can be captured in a CUDA graph or compiled with
mode="reduce-overhead".
"""
from __future__ import annotations

from typing import Optional

import torch

from passes.errors import BackendError


def cache_slots(max_len: int, *, window: Optional[int] = None, sinks: int = 0, rolling: bool = False,
                queries_per_step: int = 1) -> int:
    """How many slots a cache needs: max_len for the linear form; sinks + window + queries_per_step - 1 for the
    rolling form (independent of max_len: the T queries of one step need the W - 1 positions before the first)."""
    if not rolling:
        return int(max_len)
    if window is None or window < 1:
        raise BackendError(f"a rolling cache needs a window >= 1 (the proved sliding window); got {window!r}")
    return int(sinks) + int(window) + int(queries_per_step) - 1


def append_to_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    offset: torch.Tensor,
    *,
    sinks: int = 0,
    rolling: bool = False,
) -> None:
    """Write T new keys and values into the caches, in place.

    Args:
        k_cache, v_cache: (batch, kv_heads, slots, head_dim / value_dim).
        k_new, v_new: (batch, kv_heads, T, head_dim / value_dim), the tokens at positions offset .. offset + T - 1.
        offset: (batch,) int64, each row's cache length before this append (the caller then adds T to it).
        sinks, rolling: the cache form; the rolling ring is R = slots - sinks.

    T may exceed R (a long prompt written into a rolling buffer): of the new ring positions that share a slot only
    the latest lands there. A linear cache must have room: positions >= slots are an indexing error, not dropped.
    """
    if k_new.shape[:3] != v_new.shape[:3] or k_new.shape[:2] != k_cache.shape[:2]:
        raise BackendError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} must be (batch, kv_heads, T, "
                           f"dim) with the caches' batch and kv_heads {tuple(k_cache.shape[:2])}")
    if k_new.shape[-1] != k_cache.shape[-1] or v_new.shape[-1] != v_cache.shape[-1]:
        raise BackendError(f"head dims: k_new {k_new.shape[-1]} vs k_cache {k_cache.shape[-1]}, v_new "
                           f"{v_new.shape[-1]} vs v_cache {v_cache.shape[-1]}; they must agree")
    batch, kv_heads, count = k_new.shape[:3]
    slots = k_cache.shape[2]
    if offset.shape != (batch,) or offset.dtype not in (torch.int64, torch.int32):
        raise BackendError(f"offset must be an int64 tensor of shape (batch,) = ({batch},); got {offset.dtype} "
                           f"{tuple(offset.shape)}")
    position = offset.to(torch.int64)[:, None] + torch.arange(count, device=offset.device)[None, :]  # (B, T)
    source = torch.arange(count, device=offset.device)[None, :].expand(batch, count)
    if rolling:
        ring = slots - sinks
        if ring < 1:
            raise BackendError(f"a rolling cache of {slots} slots with {sinks} sinks has no ring slot; it needs "
                               "sinks + window slots")
        slot = torch.where(position < sinks, position, sinks + torch.remainder(position - sinks, ring))
        # Two new ring positions that share a slot differ by a multiple of R: both write the values of the latest
        # token t + R * ((T - 1 - t) // R), so duplicate indices of the scatter write equal values (deterministic).
        latest = source + ring * torch.div(count - 1 - source, ring, rounding_mode="floor")
        source = torch.where(position < sinks, source, latest)
    else:
        slot = position
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        width = new.shape[-1]
        gathered = new.gather(2, source[:, None, :, None].expand(batch, kv_heads, count, width).to(new.device))
        cache.scatter_(2, slot[:, None, :, None].expand(batch, kv_heads, count, width).to(cache.device),
                       gathered.to(cache.dtype))


def new_cache(
    batch: int,
    kv_heads: int,
    max_len: int,
    head_dim: int,
    value_dim: Optional[int] = None,
    *,
    window: Optional[int] = None,
    sinks: int = 0,
    rolling: bool = False,
    queries_per_step: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty caches and their lengths: (k_cache (batch, kv_heads, slots, head_dim), v_cache (..., value_dim),
    cache_len (batch,) int64 zeros), slots from `cache_slots`. Allocated once: every step reuses them in place."""
    slots = cache_slots(max_len, window=window, sinks=sinks, rolling=rolling, queries_per_step=queries_per_step)
    value_dim = head_dim if value_dim is None else value_dim
    k_cache = torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros(batch, kv_heads, slots, value_dim, dtype=dtype, device=device)
    return k_cache, v_cache, torch.zeros(batch, dtype=torch.int64, device=device)
