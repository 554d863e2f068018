"""Costs of attention as the model computes it, by implementation:

  "eager", "sdpa-math"   the scores are materialized: q·kᵀ, the mask, softmax (upcast to fp32), the cast back, ·v
  "sdpa-flash"           SDPA's FlashAttention-2 kernel (fused: scores stay on chip; causal blocks skipped)
  "sdpa-cudnn"           SDPA's cuDNN fused kernel (same arithmetic, faster on Hopper)
  "sdpa-efficient"       SDPA's memory-efficient kernel: fused, and the one SDPA takes for a mask tensor or fp32
  "sdpa-cpu-flash"       SDPA's fused CPU kernel (blocked online softmax)

The cost of a fused kernel does not depend on who chose it: the `sdpa_cudnn` rewrite uses this module too.
"""
from __future__ import annotations

from backends.costs import CostShape, Costs, mask_read_bytes, qkvo_bytes, visible_pairs, work_for_head_dim

MATERIALIZED = ("eager", "sdpa-math", "original")
FUSED = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-cpu-flash")


def costs(shape: CostShape) -> Costs:
    """Costs of the original attention computed by `shape.implementation` (see the module docstring)."""
    if shape.implementation in FUSED:
        return _fused_costs(shape)
    return _materialized_costs(shape)


def _materialized_costs(shape: CostShape) -> Costs:
    """FLOPs: 2·L·S·(D + Dv) per head: eager code computes every pair, masked or not.
    Bytes: q, k, v, out, plus per score element: the product written (d), read and rewritten by the scale/mask
    (2d, plus the mask), read by softmax (d) which writes fp32 (4), read by the cast (4) which writes d, read by the
    second product (d): 6d + 8 bytes, d the input dtype's size.
    Memory: softmax's fp32 output and its input scores are live together: L·S·(4 + d) per head.
    Saved for training: the fp32 probabilities (softmax backward) and their cast (the product's backward)."""
    dtype_bytes = shape.dtype_bytes
    pairs = shape.batch * shape.heads * shape.q_len * shape.kv_len
    flops = 2 * pairs * (shape.head_dim + shape.value_dim)
    score_traffic = pairs * (6 * dtype_bytes + 8)
    return Costs(
        flops=flops,
        bytes=qkvo_bytes(shape) + score_traffic + mask_read_bytes(shape, per_head=True),
        memory=pairs * (4 + dtype_bytes),
        work="matmul",
        launches=6,
        saved=pairs * (4 + dtype_bytes),
        memory_what="the {q_len}×{kv_len} scores of {batch}×{heads} heads (fp32 softmax and its input)",
    )


def _fused_costs(shape: CostShape) -> Costs:
    """FLOPs: 2·(D + Dv) per computed pair. Fused kernels skip the blocks that is_causal hides; a mask tensor is
    arbitrary to them, so every pair is computed and the mask is read once per head.
    Memory: the fp32 log-sum-exp per query and head (kept for the backward), nothing quadratic (grouped k/v heads
    go in as they are: enable_gqa)."""
    if shape.mask_tensor:
        pairs = shape.q_len * shape.kv_len
    else:
        pairs = visible_pairs(shape.q_len, shape.kv_len, shape.causal, shape.window, shape.sinks)
    flops = 2 * shape.batch * shape.heads * pairs * (shape.head_dim + shape.value_dim)
    lse = shape.batch * shape.heads * shape.q_len * 4
    return Costs(
        flops=flops,
        bytes=qkvo_bytes(shape) + lse + mask_read_bytes(shape, per_head=True),
        memory=lse,
        work=work_for_head_dim(shape.implementation, shape.head_dim),
        launches=1,
        saved=lse,
        memory_what="the fp32 log-sum-exp of {batch}×{heads} heads",
    )
