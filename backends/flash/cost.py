"""Costs of exact tiled attention: the scores live in on-chip tiles, only q, k, v, out and lse touch memory."""
from __future__ import annotations

from planner.costs import CostShape, Costs, visible_pairs


def costs(shape: CostShape) -> Costs:
    """FLOPs: 2·(D + Dv) per visible (query, key) pair and head: causal and window blocks are skipped.
    Memory: the output and the fp32 lse, linear in the sequence length."""
    pairs = shape.batch * shape.heads * visible_pairs(shape.q_len, shape.kv_len, shape.causal, shape.window)
    flops = 2 * pairs * (shape.head_dim + shape.value_dim)
    io_bytes = shape.dtype_bytes * shape.batch * (
        shape.heads * shape.q_len * (shape.head_dim + 2 * shape.value_dim)
        + shape.kv_heads * shape.kv_len * (shape.head_dim + shape.value_dim)
    )
    extra_memory = shape.batch * shape.heads * shape.q_len * (shape.value_dim * shape.dtype_bytes + 4)
    return Costs(flops=flops, bytes=io_bytes, memory=extra_memory, work="flash", launches=1)
