"""Costs of sliding-window attention: the exact tiled kernel with a band of `window` keys per query (the window is a
parameter of `attention_planner::flash_attention`), so compute and traffic grow as L·W, not L².

The costs are those of backends/flash/cost.py at the window (with sinks), charged to the "sliding_window" efficiency
key so that calibration can time the banded kernel on its own (its edge tiles cost more per useful pair).
"""
from __future__ import annotations

import dataclasses

from backends.flash import cost as flash_cost
from backends.costs import CostShape, Costs, work_for_head_dim
from passes.errors import InvalidArgumentError


def costs(shape: CostShape) -> Costs:
    """FLOPs: 2·(D + Dv) per visible pair: L·W − W(W−1)/2 pairs per head causally (L(2W−1) − W(W−1) without
    causality), plus the sinks. Bytes: q, k, v, out and the fp32 lse once. Memory: the lse (and a blockwise tile)."""
    if shape.window is None:
        raise InvalidArgumentError("sliding_window costs need shape.window (the band width in keys)")
    tiled = flash_cost.costs(shape)
    if shape.implementation in ("blockwise", "blockwise-sdpa"):
        return tiled
    return dataclasses.replace(tiled, work=work_for_head_dim("sliding_window", shape.head_dim))
