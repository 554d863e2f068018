"""Costs of HyperAttention (backends/hyper): sortLSH of queries and keys, exact attention inside the diagonal blocks
of the sorted order plus attention to uniformly sampled keys; causal by recursive halving; exact below min_seq_len.

Defaults are backends.hyper_attention's: block_size 256, sample_size 256, num_projections 7, min_seq_len 4096.
"""
from __future__ import annotations

import sympy

from backends.costs import CostShape, Costs, qkvo_bytes

DEFAULTS = {"block_size": 256, "sample_size": 256, "num_projections": 7, "min_seq_len": 4096}


def levels(length: sympy.Expr, min_seq_len: int) -> sympy.Expr:
    """Recursion depth of the causal halving: log2(L / min_seq_len) where L > min_seq_len, else 0 (continuous)."""
    return sympy.Max(0, sympy.log(length / min_seq_len, 2))


def costs(shape: CostShape) -> Costs:
    """Computed (query, key) pairs per head, with b the block size and m the sample size:
      not causal: every query attends its sorted block and the samples, L·(b + m) pairs, once L > min_seq_len;
        exact attention (L² pairs) below;
      causal: each of the log2(L/n0) halving levels has L/2 queries attending off-diagonal keys through the
        non-causal scheme: (L/2)·(b + m) per level; the 2^levels diagonal leaves of n0 = min(L, min_seq_len)
        positions are exact causal: L·n0/2 pairs.
    FLOPs: 2·(D + Dv) per pair, plus the LSH projections 2·L·D·r for queries and keys per level.
    Bytes: q, k, v, out, plus the sorted copies of q, k, v read and written once per level.
    Memory: the sorted copies of q, k, v, the int64 sort indices of queries and keys, and the fp32 lse."""
    options = {**DEFAULTS, **dict(shape.options)}
    block, sample = options["block_size"], options["sample_size"]
    projections, min_seq_len = options["num_projections"], options["min_seq_len"]
    length = shape.q_len
    heads = shape.batch * shape.heads
    leaf = sympy.Min(length, min_seq_len)
    if shape.causal:
        depth = levels(length, min_seq_len)
        pairs = depth * length / 2 * (block + sample) + length * leaf / 2
        hashing_rounds = depth
    else:
        exact = length <= min_seq_len
        pairs = sympy.Piecewise((length * shape.kv_len, exact), (length * (block + sample), True))
        hashing_rounds = sympy.Piecewise((0, exact), (1, True))
    head_width = 2 * shape.head_dim + shape.value_dim
    flops = heads * (2 * pairs * (shape.head_dim + shape.value_dim)
                     + hashing_rounds * 2 * 2 * length * shape.head_dim * projections)
    sorted_copies = heads * length * head_width * shape.dtype_bytes
    indices = heads * length * 2 * 8
    lse = heads * length * 4
    return Costs(
        flops=flops,
        bytes=qkvo_bytes(shape) + 2 * hashing_rounds * sorted_copies + lse,
        memory=sorted_copies + indices + lse,
        work="hyper",
        launches=8 * (hashing_rounds + 1),
        saved=lse + indices,
        memory_what="sorted copies of q, k, v and their sort indices for {batch}×{heads} heads",
    )
