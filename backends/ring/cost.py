"""Costs of ring attention on `world_size` = P devices, per device: each holds L/P queries and, one step at a time,
every other device's L/P keys and values, which travel around the ring while the current block is computed.

Causal attention is zigzag-balanced (each device holds chunks r and 2P−1−r), so every device does 1/P of the visible
pairs. With a window, only the devices within the window are visited.
"""
from __future__ import annotations

import sympy

from backends.costs import CostShape, Costs, visible_pairs


def costs(shape: CostShape) -> Costs:
    """Per device: FLOPs 2·(D + Dv)·(visible pairs)/P; bytes: the local q, out, lse and every K/V shard once (it is
    read as it arrives); sent per step: one K/V shard of the kv heads, B·Hkv·(L/P)·(D + Dv) elements, for P − 1
    steps (fewer with a window). Memory: two K/V receive buffers (double buffering), the fp32 output accumulator and
    lse, and one block's partial output."""
    world = shape.world_size
    local = shape.q_len / world
    dtype_bytes = shape.dtype_bytes
    pairs = shape.batch * shape.heads * visible_pairs(shape.q_len, shape.kv_len, shape.causal, shape.window,
                                                      shape.sinks) / world
    flops = 2 * pairs * (shape.head_dim + shape.value_dim)
    shard = shape.batch * shape.kv_heads * local * (shape.head_dim + shape.value_dim) * dtype_bytes
    steps = sympy.Integer(world - 1)
    if shape.window is not None:
        steps = sympy.Min(steps, sympy.ceiling(shape.window / local) + 1)
    local_io = shape.batch * shape.heads * local * (shape.head_dim + shape.value_dim) * dtype_bytes
    lse = shape.batch * shape.heads * local * 4
    accumulators = shape.batch * shape.heads * local * (shape.value_dim * 4 + 4)
    return Costs(
        flops=flops,
        bytes=local_io + shard * (steps + 1) + lse,
        memory=2 * shard + 2 * accumulators,
        comm_bytes=shard,
        comm_steps=steps,
        work="ring",
        launches=6 * (steps + 1),
        saved=lse,
        memory_what="per device: two K/V shards of {batch}×" + str(shape.kv_heads)
                    + " kv heads and the fp32 output accumulators",
    )
