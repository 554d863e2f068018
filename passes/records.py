"""The records that flow through the pipeline: sites found in a graph, their masks, the candidates the planner
weighs, and the plan. Plain frozen dataclasses: the passes fill them, the planner decides on them, the report reads
them. Sizes are ints or sympy expressions in the graph's symbols (the sequence length stays a symbol).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import sympy

from passes.errors import InvalidArgumentError

Size = Union[int, sympy.Expr]

MASK_KINDS = ("none", "causal", "sliding_window", "chunked", "padding", "bias", "arbitrary")
EXACTNESS = ("exact", "approximate", "retrain")
POLICIES = ("exact", "approximate", "any")


def check_policy(policy: str) -> None:
    """Raise InvalidArgumentError unless `policy` is one of POLICIES."""
    if policy not in POLICIES:
        raise InvalidArgumentError(f"policy={policy!r} is not a policy; accepted: {', '.join(POLICIES)}")


@dataclass(frozen=True)
class MaskSpec:
    """What a site's mask is, and how we know.

    kind: the positional structure: "none", "causal" (top-left aligned, as SDPA's is_causal), "sliding_window"
        (causal, query i sees key j iff i - window < j <= i), "chunked" (blocks of `chunk` positions), or, when no
        positional structure is present, "padding" (only a key-padding mask) or "bias" (only an additive bias);
        "arbitrary" when nothing could be proved: the mask tensor is then kept as it is.
    key_padding: name of the graph node that carries a (batch, keys) padding mask combined with the structure.
    bias: name of the graph node of an additive bias combined with the structure (ALiBi, relative positions).
    tensor: name of the graph node of the mask tensor as the model passes it (kept when kind is "arbitrary").
    proof: one sentence saying how the kind was established. Only a proved kind lets a rewrite drop the tensor.
    """

    kind: str = "none"
    window: Optional[int] = None
    chunk: Optional[int] = None
    key_padding: Optional[str] = None
    bias: Optional[str] = None
    tensor: Optional[str] = None
    proof: str = "no mask is applied"

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind {self.kind!r} is not one of {MASK_KINDS}")

    def describe(self) -> str:
        """Short text for tables: "causal", "sliding_window(4096)+padding", ..."""
        text = self.kind
        if self.kind == "sliding_window":
            text = f"sliding_window({self.window})"
        elif self.kind == "chunked":
            text = f"chunked({self.chunk})"
        if self.key_padding and self.kind != "padding":
            text += "+padding"
        if self.bias and self.kind != "bias":
            text += "+bias"
        return text

    @property
    def is_causal(self) -> bool:
        return self.kind in ("causal", "sliding_window")


@dataclass(frozen=True)
class AttentionSite:
    """One softmax attention found in a graph.

    name: module path ("layers.3.self_attn"); source: "file.py:line" of the user code that computes it;
    form: how the model writes it ("sdpa", "manual", "mha", "einsum", "baddbmm", ...).
    node: the graph node whose output is the attention output (what a rewrite replaces);
    query/key/value: graph nodes of q, k, v in layout (batch, heads, sequence, head_dim), with k and v taken before
    any repeat of kv heads. Sizes are ints or sympy expressions; `hints` holds their values at capture.
    """

    name: str
    source: str
    form: str
    node: str
    query: str
    key: str
    value: str
    batch: Size
    heads: int
    kv_heads: int
    q_len: Size
    kv_len: Size
    head_dim: int
    value_dim: int
    scale: Optional[float]
    mask: MaskSpec = field(default_factory=MaskSpec)
    layout: str = "batch, heads, sequence, head_dim"
    dropout_p: float = 0.0
    softcap: Optional[float] = None
    sinks: Optional[str] = None
    dtype: str = "float32"
    hints: tuple[tuple[str, int], ...] = ()
    notes: tuple[str, ...] = ()
    unsupported: Optional[str] = None  # why no rewrite can take this site (the planner then leaves it exact)
    # How to feed the site to a (batch, heads, sequence, head_dim) op and return its output in the node's layout
    # (a passes.detect_adapters.SiteAdapter). With an adapter, query/key/value name the roots the adapter starts from
    # (a projection's output, not necessarily in that layout); None: query/key/value are in that layout already.
    adapter: Optional[Any] = field(default=None, compare=False, repr=False)

    @property
    def sequence_symbols(self) -> frozenset:
        """The symbols of the sequence length(s): those in q_len and kv_len."""
        symbols = set()
        for size in (self.q_len, self.kv_len):
            if isinstance(size, sympy.Expr):
                symbols |= size.free_symbols
        return frozenset(symbols)

    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim**-0.5


@dataclass(frozen=True)
class Candidate:
    """One way to run a site, weighed by the planner.

    variant: "dense" (the original), "flash", "sliding_window", "ring", "linear", "ssd", "hyper".
    implementation: what runs it on the target ("triton", "blockwise", "sdpa-cudnn", "original", ...).
    exactness: "exact", "approximate" or "retrain".
    time_s / memory_bytes: estimates at max_len; *_expr: the same as sympy expressions in the sequence length.
    feasible: whether it fits the device; reason: why (not), in numbers.
    """

    variant: str
    implementation: str
    exactness: str
    time_s: Optional[float]
    memory_bytes: Optional[float]
    feasible: bool
    reason: str
    time_expr: Optional[sympy.Expr] = None
    memory_expr: Optional[sympy.Expr] = None
    parameters: tuple[tuple[str, Any], ...] = ()

    def parameter(self, name: str, default: Any = None) -> Any:
        return dict(self.parameters).get(name, default)


@dataclass(frozen=True)
class Crossover:
    """The sequence length from which `faster` beats `slower` by estimate on the plan's device."""

    faster: str
    slower: str
    sequence_length: Optional[int]


@dataclass(frozen=True)
class SiteDecision:
    """The planner's decision for one site: the candidates it weighed, the one it chose (None: left as it is), why."""

    site: AttentionSite
    candidates: tuple[Candidate, ...]
    choice: Optional[Candidate]
    reason: str
    crossovers: tuple[Crossover, ...] = ()

    @property
    def rewritten(self) -> bool:
        return self.choice is not None and self.choice.variant != "dense"


@dataclass(frozen=True)
class Plan:
    """Everything decided for one model: the device, the policy, max_len and per site the decision."""

    device: Any  # backends.hardware.DeviceSpec
    policy: str
    max_len: int
    decisions: tuple[SiteDecision, ...]
    world_size: int = 1
    notes: tuple[str, ...] = ()
