"""The cost model's common language (backends/costs.py; re-exported here)."""
from backends.costs import (  # noqa: F401
    DTYPE_BYTES,
    SEQUENCE_LENGTH,
    SMALL_HEAD_DIM,
    CostShape,
    Costs,
    Number,
    as_function,
    evaluate,
    mask_read_bytes,
    plain_sympy,
    qkvo_bytes,
    time_expression,
    visible_pairs,
    work_for_head_dim,
)
