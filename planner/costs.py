"""The cost model's common language: the shape a cost function sees, the costs it returns (sympy expressions in the
sequence length), and the roofline that turns them into time on a DeviceSpec.

Each variant writes its own costs in backends/<variant>/cost.py; this module holds only what they share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import sympy

from planner.devices import DeviceSpec

Number = Union[int, float, sympy.Expr]

SEQUENCE_LENGTH = sympy.Symbol("L", positive=True, integer=True)  # the one symbol every cost is written in

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class CostShape:
    """The sizes a cost function needs, with q_len and kv_len written in SEQUENCE_LENGTH."""

    batch: Number
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    q_len: Number
    kv_len: Number
    dtype: str = "bfloat16"
    causal: bool = False
    window: Optional[int] = None
    world_size: int = 1
    form: str = "sdpa"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class Costs:
    """FLOPs, bytes through device memory, peak extra memory (bytes) and bytes sent per device, as expressions.

    work: the efficiency key of the DeviceSpec that applies ("matmul", or a kernel's name after calibration).
    launches: kernel launches per call (each pays the device's launch overhead).
    """

    flops: Number
    bytes: Number
    memory: Number
    comm_bytes: Number = 0
    work: str = "matmul"
    launches: int = 1


def time_expression(costs: Costs, device: DeviceSpec, dtype: str) -> sympy.Expr:
    """Roofline: the larger of compute time and memory time at the achievable fractions of the peaks, plus launches."""
    compute = sympy.sympify(costs.flops) / (device.peak_flops(dtype) * device.efficiency_of(costs.work))
    memory = sympy.sympify(costs.bytes) / (device.memory_bandwidth * device.efficiency_of("memory"))
    return sympy.Max(compute, memory) + costs.launches * device.launch_overhead_s


def evaluate(expression: Number, sequence_length: int) -> float:
    """The value of a cost expression at a sequence length."""
    return float(sympy.sympify(expression).subs(SEQUENCE_LENGTH, sequence_length))


def visible_pairs(q_len: Number, kv_len: Number, causal: bool, window: Optional[int]) -> sympy.Expr:
    """How many (query, key) pairs a mask leaves visible, for q_len == kv_len (approximate otherwise)."""
    q_len, kv_len = sympy.sympify(q_len), sympy.sympify(kv_len)
    if window is not None:
        # Each query sees min(i + 1, window) keys causally, or up to 2*window - 1 without causality.
        per_query = window if causal else 2 * window - 1
        return sympy.Min(q_len * kv_len, q_len * per_query)
    if causal:
        return q_len * (kv_len + 1) / 2
    return q_len * kv_len
