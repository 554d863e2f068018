"""Costs of the original, dense attention: the scores are materialized (eager code, or SDPA's math path)."""
from __future__ import annotations

from planner.costs import CostShape, Costs


def costs(shape: CostShape) -> Costs:
    """FLOPs: 2·L·S·D for Q·Kᵀ and 2·L·S·Dv for P·V per head (masks do not save work in dense code).
    Memory: the fp32 scores and the probabilities in the input dtype, B·H·L·S each, live at once."""
    pairs = shape.batch * shape.heads * shape.q_len * shape.kv_len
    flops = 2 * pairs * (shape.head_dim + shape.value_dim)
    score_bytes = pairs * (4 + shape.dtype_bytes)
    io_bytes = shape.dtype_bytes * shape.batch * (
        shape.heads * shape.q_len * (shape.head_dim + shape.value_dim)
        + shape.kv_heads * shape.kv_len * (shape.head_dim + shape.value_dim)
    )
    # Scores written and read back by softmax, probabilities written and read by the second matmul.
    return Costs(flops=flops, bytes=io_bytes + 2 * score_bytes, memory=score_bytes, launches=4)
