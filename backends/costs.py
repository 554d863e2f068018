"""The cost model's common language: the shape a cost function sees, the costs it returns (sympy expressions in the
sequence length), and the roofline that turns them into time on a DeviceSpec.

Each variant writes its own costs in backends/<variant>/cost.py; this module holds only what they share.

Conventions every cost function follows:
  * sizes are in elements, results in FLOPs and bytes; `SEQUENCE_LENGTH` ("L") is the only symbol left in them;
  * FLOPs count the matrix products only (2 per multiply-add); softmax and elementwise work is charged as bytes;
  * `memory` is the peak extra memory of the attention call itself beyond its inputs and its output tensor, i.e.
    what would not exist if the call were free (scores, lse, working buffers); the output is an activation of the
    model and is counted there;
  * `saved` is what a training step keeps from this call for the backward pass, beyond the output;
  * `comm_bytes` is what one device sends per ring step; `comm_steps` how many steps there are.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import sympy


Number = Union[int, float, sympy.Expr]

SEQUENCE_LENGTH = sympy.Symbol("L", positive=True, integer=True)  # the one symbol every cost is written in

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class CostShape:
    """The sizes a cost function needs, with q_len and kv_len written in SEQUENCE_LENGTH.

    implementation: what runs the variant ("eager", "sdpa-flash", "triton", "blockwise", ...): costs differ by it.
    mask_tensor: a mask tensor of (batch, 1, q_len, kv_len) elements of `mask_bytes` bytes is read by the call.
    window / sinks: the sliding window (keys visible per query) and always-visible first keys, where there are.
    options: variant parameters (hyper's block and sample sizes, a chunk size, ...) as (name, value) pairs.
    """

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
    implementation: str = ""
    mask_tensor: bool = False
    mask_bytes: int = 1
    sinks: int = 0
    options: tuple = ()

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class Costs:
    """FLOPs, bytes through device memory, peak extra memory (bytes) and bytes sent per device, as expressions.

    work: the efficiency key of the DeviceSpec that applies ("matmul", or a kernel's name: "flash", "sdpa-cudnn").
    launches: kernel launches per call (each pays the device's launch overhead); may depend on L.
    memory_what: what the extra memory is, for reasons; "{q_len}", "{kv_len}", "{heads}", "{batch}" are filled in.
    """

    flops: Number
    bytes: Number
    memory: Number
    comm_bytes: Number = 0
    comm_steps: Number = 0
    work: str = "matmul"
    launches: Number = 1
    saved: Number = 0
    memory_what: str = "working memory"
    notes: tuple = field(default_factory=tuple)


SMALL_HEAD_DIM = 64


def work_for_head_dim(work: str, head_dim: int) -> str:
    """A kernel's efficiency key, qualified "@d64" for head dims up to 64: thinner tiles shift the balance between
    the tensor cores and the softmax, so kernels rank differently there (benchmarks/RESULTS.md, "Exact causal kernels
    by head dim"). DeviceSpec.efficiency_of falls back to the plain key where nothing was measured at D <= 64."""
    return f"{work}@d{SMALL_HEAD_DIM}" if int(head_dim) <= SMALL_HEAD_DIM else work


def time_expression(costs: Costs, device: Any, dtype: str) -> sympy.Expr:
    """Roofline: the largest of compute, memory and communication time at the achievable fractions of the peaks,
    plus the launches. Ring transfers overlap compute (double buffering), hence a max and not a sum."""
    compute = sympy.sympify(costs.flops) / (device.peak_flops(dtype) * device.efficiency_of(costs.work))
    memory = sympy.sympify(costs.bytes) / (device.memory_bandwidth * device.efficiency_of("memory"))
    terms = [compute, memory]
    communication = sympy.sympify(costs.comm_bytes) * sympy.sympify(costs.comm_steps)
    if communication != 0:
        terms.append(communication / (device.interconnect_bandwidth * device.efficiency_of("interconnect")))
    return sympy.Max(*terms) + sympy.sympify(costs.launches) * device.launch_overhead_s


def plain_sympy(expression: Any) -> Any:
    """A size from torch's symbolic shapes in plain sympy: torch's integer division functions (FloorDiv, CeilDiv,
    CleanDiv, ...) become floor and ceiling of a quotient, which sympy's solvers, lambdify and printers know."""
    if not isinstance(expression, sympy.Basic):
        return expression
    rules = {"FloorDiv": lambda a, b: sympy.floor(a / b), "CleanDiv": lambda a, b: a / b,
             "IntTrueDiv": lambda a, b: a / b, "CeilDiv": lambda a, b: sympy.ceiling(a / b),
             "Mod": lambda a, b: a - b * sympy.floor(a / b), "PythonMod": lambda a, b: a - b * sympy.floor(a / b)}
    return expression.replace(lambda node: type(node).__name__ in rules and len(node.args) == 2,
                              lambda node: rules[type(node).__name__](*node.args))


def evaluate(expression: Number, sequence_length: int) -> float:
    """The value of a cost expression at a sequence length."""
    return float(sympy.sympify(expression).subs(SEQUENCE_LENGTH, sequence_length))


def as_function(expression: Number) -> Callable[[float], float]:
    """A fast numeric function of the sequence length (for bisection and plots); cached per expression."""
    return _compiled(sympy.sympify(expression))


@functools.lru_cache(maxsize=1024)
def _compiled(expression: sympy.Expr) -> Callable[[float], float]:
    if SEQUENCE_LENGTH not in expression.free_symbols:
        constant = float(expression)
        return lambda _length: constant
    modules = [{"ceiling": math.ceil, "floor": math.floor}, "math"]
    function = sympy.lambdify(SEQUENCE_LENGTH, expression, modules=modules)

    def at(length: float) -> float:
        try:
            return float(function(length))
        except ZeroDivisionError:  # a size such as L // 64 is 0 below 64 tokens: no cost is defined there
            return math.inf

    return at


def visible_pairs(q_len: Number, kv_len: Number, causal: bool, window: Optional[int], sinks: int = 0) -> sympy.Expr:
    """How many (query, key) pairs a mask leaves visible, exactly for q_len == kv_len (the rows' counts summed).

    causal: query i sees keys 0..i: L(L+1)/2. Causal window W: min(i+1, W) keys: L·W − W(W−1)/2 once L ≥ W.
    Non-causal window (|i − j| < W): 2W − 1 keys away from the edges: L(2W−1) − W(W−1) once L ≥ W.
    Sinks add the first S keys to every row that would not see them: with m = L − W, key j < S is added to the
    max(0, m − j) rows past its window: m(m+1)/2 in all while m < S, then S·m − S(S−1)/2.
    """
    q_len, kv_len = sympy.sympify(q_len), sympy.sympify(kv_len)
    if window is not None:
        if causal:
            inside = q_len * window - sympy.Rational(window * (window - 1), 2)
            pairs = sympy.Piecewise((q_len * (kv_len + 1) / 2, q_len <= window), (inside, True))
        else:
            inside = q_len * (2 * window - 1) - window * (window - 1)
            pairs = sympy.Piecewise((q_len * kv_len, q_len <= window), (inside, True))
        if sinks:
            past = q_len - window
            pairs = pairs + sympy.Piecewise((0, past <= 0), (past * (past + 1) / 2, past < sinks),
                                            (sinks * past - sympy.Rational(sinks * (sinks - 1), 2), True))
        return pairs
    if causal:
        return q_len * (kv_len + 1) / 2
    return q_len * kv_len


def qkvo_bytes(shape: CostShape) -> sympy.Expr:
    """Bytes of reading q, k, v and writing the output once, in the input dtype."""
    return shape.dtype_bytes * shape.batch * (
        shape.heads * shape.q_len * (shape.head_dim + shape.value_dim)
        + shape.kv_heads * shape.kv_len * (shape.head_dim + shape.value_dim)
    )


def mask_read_bytes(shape: CostShape, per_head: bool) -> sympy.Expr:
    """Bytes of reading a (batch, 1, q_len, kv_len) mask tensor: once, or once per head for kernels whose grid
    iterates (batch, head, query block) and so reads the broadcast mask again for every head."""
    if not shape.mask_tensor:
        return sympy.Integer(0)
    reads = shape.heads if per_head else 1
    return shape.batch * reads * shape.q_len * shape.kv_len * shape.mask_bytes
