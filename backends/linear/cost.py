"""Costs of chunked linear attention (backends/linear/chunk.py) standing in for softmax attention (the retrain
class): q and k through a feature map, a key_dim × value_dim state per head carried from chunk to chunk.
"""
from __future__ import annotations

import sympy

from backends.costs import CostShape, Costs

CHUNK_SIZE = 64  # backends/linear/op.py's chunk


def costs(shape: CostShape) -> Costs:
    """Per head, with chunk C, key dim D, value dim Dv, causal:
      intra-chunk scores and their product with v: 2·L·C·D + 2·L·C·Dv (the full C×C tile, masked);
      the chunk states Kᵀ·V: 2·L·D·Dv; the queries against the entering state: 2·L·D·Dv.
    Without causality: Kᵀ·V once and Q·S: 4·L·D·Dv.
    Bytes: q, k, v, out once, and the per-chunk states (input dtype) written by one kernel and read by the next.
    Memory: the per-chunk states, (L/C)·D·Dv per head, and the fp32 final state. GQA sites are charged per query
    head (the rewrite repeats k and v to the query heads)."""
    chunk = shape.option("chunk_size", CHUNK_SIZE)
    heads = shape.batch * shape.heads
    length = shape.q_len
    state = shape.head_dim * shape.value_dim
    if shape.causal:
        flops = heads * (2 * length * chunk * (shape.head_dim + shape.value_dim) + 4 * length * state)
        chunks = sympy.ceiling(length / chunk)
    else:
        flops = heads * 4 * length * state
        chunks = sympy.Integer(1)
    states = heads * chunks * state * shape.dtype_bytes
    io = shape.dtype_bytes * heads * length * (2 * shape.head_dim + 2 * shape.value_dim)
    final = heads * state * 4
    return Costs(
        flops=flops, bytes=io + 2 * states + final, memory=states + final, work="linear", launches=3,
        saved=states, memory_what="the per-chunk states of {batch}×{heads} heads",
    )
