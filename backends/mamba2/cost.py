"""Costs of Mamba-2's state-space duality (backends/mamba2) standing in for softmax attention (the retrain class):
C plays q, B plays k (state dim N = the site's head dim), x·dt plays v (head dim P = the site's value dim), a scalar
decay per head and position; chunks of 256 positions.
"""
from __future__ import annotations

import sympy

from backends.costs import CostShape, Costs

CHUNK_SIZE = 256  # Mamba-2's and backends.ssd's default


def costs(shape: CostShape) -> Costs:
    """Per head, chunk Q, state dim N, head dim P: intra-chunk C·Bᵀ and its product with x: 2·L·Q·(N + P);
    chunk states: 2·L·N·P; output from the entering state: 2·L·N·P.
    Bytes: x, dt, B, C (shared by the head groups: the site's kv heads), out, and the per-chunk states written and
    read. Memory: the per-chunk states (L/Q)·N·P per head and the fp32 chunk decays."""
    chunk = shape.option("chunk_size", CHUNK_SIZE)
    heads = shape.batch * shape.heads
    groups = shape.batch * shape.kv_heads
    length = shape.q_len
    state = shape.head_dim * shape.value_dim
    flops = heads * (2 * length * chunk * (shape.head_dim + shape.value_dim) + 4 * length * state)
    chunks = sympy.ceiling(length / chunk)
    states = heads * chunks * state * shape.dtype_bytes
    io = shape.dtype_bytes * (heads * length * (2 * shape.value_dim + 1) + groups * length * 2 * shape.head_dim)
    decays = heads * length * 4
    return Costs(
        flops=flops, bytes=io + 2 * states + decays, memory=states + decays, work="ssd", launches=4,
        saved=states + decays, memory_what="the per-chunk states of {batch}×{heads} heads",
    )
