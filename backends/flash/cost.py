"""Costs of exact tiled attention (`attention_planner::flash_attention`): the scores live in tiles, only q, k, v, the
output and the lse touch memory.

Implementations: "triton" (the fused kernel; tiles in registers and shared memory); "blockwise" (the PyTorch loop of
backends/flash/blockwise.py with plain-PyTorch tiles, as it runs with a mask tensor, key padding, or off the CPU: one
query block × key block tile of fp32 scores exists at a time, in memory); "blockwise-sdpa" (the same loop on the CPU
without a mask: each tile runs through PyTorch's fused CPU flash kernel, so no score tile is materialized).
"""
from __future__ import annotations

import sympy

from backends.costs import CostShape, Costs, mask_read_bytes, qkvo_bytes, visible_pairs, work_for_head_dim

# backends/flash/blockwise.py's tile: QUERY_BLOCK × KEY_BLOCK scores (kept here so the cost model imports no kernel).
BLOCKWISE_QUERY_BLOCK = 512
BLOCKWISE_KEY_BLOCK = 512
# Score-sized fp32 temporaries alive together in one plain-PyTorch tile (the product, the masked copy, the exp), and
# output-sized fp32 temporaries alive together in a fused tile and its lse merge: measured with torch.profiler memory
# events (tests/test_costs.py::test_blockwise_memory_matches_measurement).
BLOCKWISE_SCORE_TILES = 3
FUSED_OUTPUT_TILES = 4


def costs(shape: CostShape) -> Costs:
    """FLOPs: 2·(D + Dv) per computed (query, key) pair and head: blocks that causality or the window hide are
    skipped, so a causal call does about half the work of a full one (with a kept mask tensor, the pairs that the
    structure hides are skipped still, the tensor's own zeros are not).
    Bytes: q, k, v, out once, the fp32 lse, and a kept mask tensor once.
    Memory: the fp32 lse, plus for "blockwise" one tile's fp32 working set (constant in L)."""
    pairs = shape.batch * shape.heads * visible_pairs(shape.q_len, shape.kv_len, shape.causal, shape.window,
                                                      shape.sinks)
    flops = 2 * pairs * (shape.head_dim + shape.value_dim)
    lse = shape.batch * shape.heads * shape.q_len * 4
    io_bytes = qkvo_bytes(shape) + lse + mask_read_bytes(shape, per_head=False)
    if shape.implementation in ("blockwise", "blockwise-sdpa"):
        return Costs(
            flops=flops, bytes=io_bytes, memory=lse + blockwise_tile_bytes(shape), work="blockwise",
            launches=blockwise_launches(shape), saved=lse,
            memory_what="the fp32 lse of {batch}×{heads} heads and one fp32 tile of scores",
        )
    return Costs(flops=flops, bytes=io_bytes, memory=lse, work=work_for_head_dim("flash", shape.head_dim), launches=1,
                 saved=lse,
                 memory_what="the fp32 log-sum-exp of {batch}×{heads} heads")


def blockwise_tile_bytes(shape: CostShape) -> sympy.Expr:
    """One blockwise step's fp32 working set. Plain-PyTorch tiles: the score temporaries, the query tile and its
    partial output, the key/value tile (repeated to every query head under grouped-query attention). Fused CPU tiles:
    the partial outputs being merged, k, v converted to fp32 where the inputs are not fp32 already, and one key
    tile repeated to the query heads under grouped-query attention."""
    query_block = sympy.Min(shape.q_len, BLOCKWISE_QUERY_BLOCK)
    key_block = sympy.Min(shape.kv_len, BLOCKWISE_KEY_BLOCK)
    heads = shape.batch * shape.heads
    if shape.implementation == "blockwise-sdpa":
        outputs = FUSED_OUTPUT_TILES * heads * query_block * shape.value_dim * 4
        converted = 0 if shape.dtype_bytes == 4 else (
            shape.batch * shape.kv_heads * shape.kv_len * (shape.head_dim + shape.value_dim) * 4)
        # Causal diagonal tiles repeat grouped k/v heads to the query heads (full tiles fold queries instead).
        grouped = shape.kv_heads != shape.heads and shape.causal
        repeated = heads * key_block * (shape.head_dim + shape.value_dim) * 4 if grouped else 0
        return outputs + converted + repeated
    scores = BLOCKWISE_SCORE_TILES * heads * query_block * key_block * 4
    query_side = heads * query_block * (shape.head_dim + shape.value_dim + 2) * 4
    key_side = heads * key_block * (shape.head_dim + shape.value_dim) * 4
    return scores + query_side + key_side


def blockwise_launches(shape: CostShape) -> sympy.Expr:
    """About a dozen PyTorch ops per visible tile, each one launch."""
    tiles = visible_pairs(shape.q_len, shape.kv_len, shape.causal, shape.window, shape.sinks) / (
        BLOCKWISE_QUERY_BLOCK * BLOCKWISE_KEY_BLOCK)
    return 12 * sympy.Max(1, tiles) + 4 * sympy.ceiling(shape.q_len / BLOCKWISE_QUERY_BLOCK)
