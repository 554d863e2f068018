"""The readable reference for HyperAttention: the estimator written as one dense weighted softmax, in float64.

HyperAttention (Han et al., 2023) replaces softmax(q K^T) V by a weighted softmax over a few keys per query:

    out_i = sum_j W_ij exp(s_ij) v_j / sum_j W_ij exp(s_ij),     s_ij = q_i . k_j / sqrt(d)

Non-causal: sort queries and keys by sortLSH (lsh.py) and cut both sorted orders into the same number of blocks.
W_ij = 1 when key j is in query i's block (exact attention on the diagonal blocks of the sorted score matrix);
W_ij = n/m when j is one of m uniformly sampled keys outside that block (an unbiased estimate of the rest of the
row); 0 otherwise. Causal, by recursive halving: exact causal attention on leaves of at most `min_seq_len`
positions; at each level, the second half of every segment attends to its first half by the non-causal estimator.

backends/hyper/blockwise.py computes the same estimator with gathers and tiled attention merged by log-sum-exp; this
file forms W densely (quadratic memory: tests only) from the same random choices, so the two must agree to rounding.
The sequence is padded at the end to leaf * 2^levels positions as the fast path does; padded keys get W = 0.
"""
from __future__ import annotations

import math

import torch

from backends.hyper.lsh import gray_rank_table, lsh_sort_order, projection_directions, sample_positions


def block_counts(queries: int, keys: int, block_size: int):
    """(blocks, queries per block, keys per block): both sorted orders cut into the same number of blocks."""
    blocks = math.ceil(max(queries, keys) / block_size)
    return blocks, math.ceil(queries / blocks), math.ceil(keys / blocks)


def causal_levels(seq_len: int, min_seq_len: int):
    """(levels, leaf length): the fewest halvings that bring leaves to at most min_seq_len positions."""
    levels = 0
    while math.ceil(seq_len / 2 ** levels) > min_seq_len:
        levels += 1
    return levels, math.ceil(seq_len / 2 ** levels)


def non_causal_weights(q, k, key_valid, *, block_size, sample_size, num_projections, seed):
    """Dense W (batch, heads, queries, keys) of the non-causal estimator. key_valid: (..., keys) bool or None."""
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    blocks, query_block, key_block = block_counts(queries, keys, block_size)
    directions = projection_directions(seed, head_dim, num_projections, q.device, q.dtype)
    table = gray_rank_table(num_projections, q.device)
    query_rank = torch.argsort(lsh_sort_order(q, directions, table), dim=-1)  # sorted position of each query
    key_order = lsh_sort_order(k, directions, table)
    key_rank = torch.argsort(key_order, dim=-1)
    query_blocks = query_rank // query_block
    key_blocks = key_rank // key_block
    same_block = query_blocks[..., :, None] == key_blocks[..., None, :]
    weights = same_block.to(torch.float64)

    sampled = sample_positions(seed, keys, sample_size, q.device)  # positions in the sorted key order
    sampled_keys = key_order[..., sampled]  # (batch, heads, m): original key indices, all distinct
    outside = query_blocks[..., :, None] != key_blocks.gather(-1, sampled_keys)[..., None, :]
    sample_weight = keys / sampled.numel()
    weights.scatter_add_(-1, sampled_keys[..., None, :].expand(batch, heads, queries, sampled.numel()),
                         sample_weight * outside.to(torch.float64))
    if key_valid is not None:
        weights = weights * key_valid[..., None, :].to(torch.float64)
    return weights


def causal_weights(q, k, *, block_size, sample_size, num_projections, min_seq_len, seed):
    """Dense W of the causal estimator on the padded sequence (batch, heads, padded, padded)."""
    batch, heads, seq_len, head_dim = q.shape
    levels, leaf = causal_levels(seq_len, min_seq_len)
    padded = leaf * 2 ** levels
    pad = (0, 0, 0, padded - seq_len)
    q = torch.nn.functional.pad(q, pad)
    k = torch.nn.functional.pad(k, pad)
    valid = torch.arange(padded, device=q.device) < seq_len
    weights = torch.zeros(batch, heads, padded, padded, dtype=torch.float64, device=q.device)
    for start in range(0, padded, leaf):
        weights[..., start:start + leaf, start:start + leaf] = torch.ones(leaf, leaf, dtype=torch.float64).tril()
    for level in range(levels):
        segment = padded // 2 ** level
        half = segment // 2
        for start in range(0, padded, segment):
            rows = slice(start + half, start + segment)
            columns = slice(start, start + half)
            weights[..., rows, columns] = non_causal_weights(
                q[..., rows, :], k[..., columns, :], valid[columns], block_size=block_size, sample_size=sample_size,
                num_projections=num_projections, seed=seed + level + 1)
    return weights * valid.to(torch.float64)


def hyper_attention_naive(q, k, v, *, causal=False, block_size=256, sample_size=256, num_projections=7,
                          min_seq_len=4096, seed=0, return_lse=False):
    """HyperAttention by its dense weight matrix, float64. Same arguments and results as `backends.hyper_attention`.

    Exact softmax attention when the keys are at most min_seq_len. Returns out in q's dtype (and with return_lse
    the natural-log log of sum_j W_ij exp(s_ij), float64).
    """
    seq_len, keys = q.shape[2], k.shape[2]
    q64, k64 = q.double(), k.double()
    v64 = v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    k64 = k64.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    options = dict(block_size=block_size, sample_size=sample_size, num_projections=num_projections, seed=seed)
    if keys <= min_seq_len:
        weights = torch.ones(seq_len, keys, dtype=torch.float64, device=q.device)
        weights = weights.tril() if causal else weights
    elif causal:
        weights = causal_weights(q64, k64, min_seq_len=min_seq_len, **options)[..., :seq_len, :keys]
    else:
        weights = non_causal_weights(q64, k64, None, **options)
    scores = (q64 @ k64.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(weights == 0, float("-inf")) + torch.log(weights)
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.softmax(scores, dim=-1) @ v64).to(q.dtype)
    return (out, lse) if return_lse else out
