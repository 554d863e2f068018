"""Readable references for ring attention.

`ring_attention_reference` is the test oracle: dense attention on the whole, unsharded sequence (the flash
variant's reference, float64 in the tests). `simulate_ring` runs the ring's algorithm in one process with no
communication: every rank's shard, every step's blocks from the schedule, dense block math, the log-sum-exp merge;
it shows the algorithm in a few lines and lets the tests check the schedule on many shapes without processes.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.flash.naive import attention_reference, visible_keys
from backends.ring.layout import global_positions, shard, unshard
from backends.ring.schedule import ring_schedule


def ring_attention_reference(q, k, v, *, causal: bool = False, window: Optional[int] = None,
                             scale: Optional[float] = None) -> torch.Tensor:
    """Attention over the whole sequence (batch, heads, sequence, head_dim), as ring_attention must compute it."""
    return attention_reference(q, k, v, causal=causal, window=window, scale=scale)


def _dense_block(q, k, v, query_positions, key_positions, causal, window, scale):
    """(out, lse) of one block with the mask built from global positions (empty rows: out 0, lse −inf)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = visible_keys(query_positions, key_positions, causal=causal, window=window, sinks=0)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probabilities = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return probabilities @ v, lse


def simulate_ring(q, k, v, world_size: int, *, causal: bool = False, window: Optional[int] = None,
                  layout: str = "zigzag", scale: Optional[float] = None) -> torch.Tensor:
    """Ring attention on the whole sequence, ranks and steps simulated in one process (same result as the ring)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_shards = [shard(q, 2, rank, world_size, layout) for rank in range(world_size)]
    kv_shards = [(shard(k, 2, rank, world_size, layout), shard(v, 2, rank, world_size, layout))
                 for rank in range(world_size)]
    local_len = q_shards[0].shape[2]
    positions = [global_positions(local_len, rank, world_size, layout) for rank in range(world_size)]
    outputs = []
    for rank in range(world_size):
        out = torch.zeros_like(q_shards[rank])
        lse = torch.full(q_shards[rank].shape[:3], float("-inf"), dtype=q.dtype)
        for step in ring_schedule(rank, world_size, local_len, causal=causal, window=window, layout=layout):
            visiting_k, visiting_v = kv_shards[step.source_rank]
            for block in step.blocks:
                rows, keys = slice(block.q_start, block.q_end), slice(block.k_start, block.k_end)
                block_out, block_lse = _dense_block(
                    q_shards[rank][:, :, rows], visiting_k[:, :, keys], visiting_v[:, :, keys],
                    positions[rank][rows], positions[step.source_rank][keys], causal, window, scale)
                # Log-sum-exp merge; the first block a row sees is taken as it is.
                new_lse = torch.logaddexp(lse[:, :, rows], block_lse)
                old_weight = torch.exp(lse[:, :, rows] - torch.where(torch.isinf(new_lse), 0.0, new_lse))
                new_weight = torch.exp(block_lse - torch.where(torch.isinf(new_lse), 0.0, new_lse))
                out[:, :, rows] = old_weight[..., None] * out[:, :, rows] + new_weight[..., None] * block_out
                lse[:, :, rows] = new_lse
        outputs.append(out)
    return unshard(outputs, 2, layout)
