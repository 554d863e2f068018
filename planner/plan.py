"""The planner: per site, the candidates that the policy and the site's semantics allow, their estimated time and
memory at max_len on the device, the choice (the fastest that fits), the lengths at which each candidate becomes the
cheapest (crossovers), and whether the whole plan (weights + activations + attention) fits the device.

Policies: "exact" (default: only rewrites that keep the function up to floating point), "approximate" (adds
approximations of the same function: HyperAttention, and a sliding window imposed where the site has none when
`window=W` is given), "any" (adds other architectures, linear attention and SSD, when `train=True`).

Approximate windows: `make_plan(..., window=W, sinks=S)` offers, at every causal or full site whose mask has no
window, sliding-window attention with W keys per query (plus the first S keys); it is exact (and allowed under policy
"exact") where W covers max_len, else approximate. Sites whose own mask is a window always get their own window.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import sympy
import torch

from backends.costs import (
    DTYPE_BYTES,
    SEQUENCE_LENGTH,
    Costs,
    CostShape,
    as_function,
    evaluate,
    plain_sympy,
    time_expression,
)
from backends.hardware import DeviceSpec
from backends.registry import EXACTNESS_ALLOWED, VARIANTS, Offer, PlanContext, keeps_mask_tensor, variants_for
from passes.errors import InvalidArgumentError
from passes.records import AttentionSite, Candidate, Plan, SiteDecision, check_policy
from planner.crossovers import cheapest_envelope, crossover_length, fastest_index  # noqa: F401  (re-exported)

CROSSOVER_RANGE = 8  # crossovers are searched for in [1, CROSSOVER_RANGE × max_len]
MAX_RING_DEVICES = 1024
ORIGINAL = "dense"


# ---------------------------------------------------------------------------------------------------------------
# Records of this module (subclasses of passes.records' classes: every consumer of those keeps working)


@dataclass(frozen=True)
class Estimate(Candidate):
    """A Candidate with the numbers behind its time at max_len: FLOPs, bytes, bytes sent per device, what bounds it
    ("compute", "memory", "interconnect" or "launches"), and the efficiency key used."""

    flops: Optional[float] = None
    bytes_moved: Optional[float] = None
    comm_bytes: Optional[float] = None
    bound: Optional[str] = None
    work: Optional[str] = None
    saved_bytes: Optional[float] = None
    fits_up_to: Optional[int] = None  # the longest sequence whose memory fits the attention budget


@dataclass(frozen=True)
class SitePlan(SiteDecision):
    """A SiteDecision with the cheapest candidate over lengths: envelope[i] = (from_length, "variant") means that
    variant is the cheapest (among the allowed candidates, by time) from from_length on, up to the next entry."""

    envelope: tuple = ()


@dataclass(frozen=True)
class MemoryFit:
    """Whether the whole plan fits one device (per device with world_size > 1), with the numbers, in bytes.

    weights: parameters and buffers. activations: the peak of live intermediate tensors at max_len from the graph's
    liveness (training: every intermediate, which autograd keeps), without the quadratic ones. masks: mask tensors
    of L×S elements the plan keeps. attention: the chosen candidates' extra memory (the largest one in inference;
    in training, what each site saves plus the largest transient). None where unknown (no graph given).
    ring_devices: the fewest devices a ring needs where one device is not enough (None: no ring helps or fits).
    """

    usable_bytes: float
    weights: Optional[float]
    activations: Optional[float]
    masks: float
    attention: float
    total: float
    fits: bool
    ring_devices: Optional[int]
    verdict: str
    method: str = ""


@dataclass(frozen=True)
class ModelPlan(Plan):
    """A Plan with the whole-model memory fit and the options it was made with."""

    memory: Optional[MemoryFit] = None
    train: bool = False
    window: Optional[int] = None
    sinks: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def format_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def label(candidate: Candidate) -> str:
    """'flash (triton)', 'dense (sdpa-flash)', 'sliding_window (triton, W=4096)'."""
    details = [candidate.implementation]
    window = candidate.parameter("window")
    if window is not None and candidate.variant == "sliding_window":
        details.append(f"W={window}")
    if candidate.parameter("sinks"):
        details.append(f"sinks={candidate.parameter('sinks')}")
    if candidate.variant == "ring" and (candidate.parameter("world_size") or 1) > 1:
        details.append(f"P={candidate.parameter('world_size')}")
    return f"{candidate.variant} ({', '.join(details)})"


# ---------------------------------------------------------------------------------------------------------------
# Costs of one candidate


def cost_shape(site: AttentionSite, max_len: int, variant: str = ORIGINAL, offer: Optional[Offer] = None,
               world_size: int = 1) -> CostShape:
    """The site's sizes with its sequence symbols written as SEQUENCE_LENGTH and other symbols at their hints, as
    `variant` run by `offer` sees them."""
    hints = dict(site.hints)
    sequence = {symbol: SEQUENCE_LENGTH for symbol in site.sequence_symbols}

    def length(size):
        return plain_sympy(size).subs(sequence) if isinstance(size, sympy.Expr) else size

    def other(size):
        if isinstance(size, sympy.Expr):
            try:
                value = plain_sympy(size).subs({symbol: hints.get(str(symbol), 1) for symbol in size.free_symbols})
                return max(1, int(value))
            except (ZeroDivisionError, TypeError):  # a size undefined at the hints (a division by a size of 0)
                return 1
        return size

    mask = site.mask
    offer = offer or Offer("", "exact")
    window = offer.parameter("window")
    if window is None and mask.kind == "sliding_window" and variant != ORIGINAL:
        window = mask.window  # the original has no window of its own: SDPA reads it from the mask tensor
    rule = VARIANTS.get(variant)
    if variant == ORIGINAL:
        mask_tensor = mask.tensor is not None
    elif rule is not None and rule.keeps_mask:
        mask_tensor = keeps_mask_tensor(site) and mask.tensor is not None
    else:
        mask_tensor = False
    return CostShape(
        batch=other(site.batch), heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim,
        value_dim=site.value_dim, q_len=length(site.q_len), kv_len=length(site.kv_len), dtype=site.dtype,
        causal=mask.is_causal, window=window, form=site.form,
        world_size=world_size if rule is not None and rule.sharded else 1,
        implementation=offer.implementation, mask_tensor=mask_tensor,
        mask_bytes=1 if site.form == "sdpa" else _dtype_bytes(site.dtype), sinks=int(offer.parameter("sinks", 0)),
        options=tuple((name, value) for name, value in offer.parameters if isinstance(value, (int, float))),
    )


def _mask_dropped_when_eager(site: AttentionSite) -> bool:
    """transformers builds a causal mask tensor only while traced: run eagerly without padding, its SDPA path passes
    is_causal=True and no tensor (the report's baseline is what the user's eager call runs)."""
    mask = site.mask
    return (site.form == "sdpa" and "transformers" in site.source.replace("\\", "/").split("/")
            and mask.kind in ("none", "causal") and mask.key_padding is None and mask.bias is None)


def _dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 4)


def _bound(costs: Costs, device: DeviceSpec, dtype: str, length: int) -> str:
    terms = {
        "compute": evaluate(costs.flops, length) / (device.peak_flops(dtype) * device.efficiency_of(costs.work)),
        "memory": evaluate(costs.bytes, length) / (device.memory_bandwidth * device.efficiency_of("memory")),
        "interconnect": evaluate(sympy.sympify(costs.comm_bytes) * sympy.sympify(costs.comm_steps), length)
        / (device.interconnect_bandwidth * device.efficiency_of("interconnect")),
        "launches": evaluate(costs.launches, length) * device.launch_overhead_s,
    }
    return max(terms, key=terms.get)


def _memory_text(costs: Costs, shape: CostShape, length: int) -> str:
    values = {"q_len": _int_at(shape.q_len, length), "kv_len": _int_at(shape.kv_len, length),
              "heads": shape.heads, "batch": shape.batch}
    try:
        return costs.memory_what.format(**values)
    except (KeyError, IndexError, ValueError):
        return costs.memory_what


def _int_at(size, length: int) -> int:
    return int(round(evaluate(size, length)))


def _estimate(variant, offer: Offer, site: AttentionSite, context: PlanContext, budget: "Budget") -> Estimate:
    """Cost one offer at max_len; infeasible where its memory exceeds the attention budget."""
    allowed = offer.exactness in EXACTNESS_ALLOWED[context.policy]
    base = dict(variant=variant.name, implementation=offer.implementation, exactness=offer.exactness,
                parameters=offer.parameters)
    if offer.not_applicable:
        return Estimate(time_s=None, memory_bytes=None, feasible=False,
                        reason=f"does not apply: {offer.not_applicable}", **base)
    device, max_len = context.device, context.max_len
    shape = cost_shape(site, max_len, variant.name, offer, context.world_size)
    costs = variant.costs(shape)
    time_expr = time_expression(costs, device, site.dtype)
    memory_expr = sympy.sympify(costs.memory)
    time_s, memory_bytes = evaluate(time_expr, max_len), evaluate(memory_expr, max_len)
    fits = memory_bytes <= budget.attention
    fits_up_to = _largest_fitting_length(memory_expr, budget.attention, max_len)
    numbers = dict(flops=evaluate(costs.flops, max_len), bytes_moved=evaluate(costs.bytes, max_len),
                   comm_bytes=evaluate(sympy.sympify(costs.comm_bytes) * sympy.sympify(costs.comm_steps), max_len),
                   bound=_bound(costs, device, site.dtype, max_len), work=costs.work,
                   saved_bytes=evaluate(costs.saved, max_len), fits_up_to=fits_up_to)
    if not allowed:
        reason = (f"{offer.exactness}: not under policy {context.policy!r} ({format_seconds(time_s)}, "
                  f"{format_bytes(memory_bytes)} extra at {max_len:,} tokens)")
        feasible = False
    elif context.world_size > 1 and not variant.sharded:
        reason = (f"world_size={context.world_size} shards the sequence, so every site runs ring attention (on one "
                  f"device: {format_seconds(time_s)}, {format_bytes(memory_bytes)} extra)")
        feasible = False
    elif fits:
        reason = f"{format_seconds(time_s)}, {format_bytes(memory_bytes)} extra memory at {max_len:,} tokens"
        feasible = True
    else:
        reason = (f"{_memory_text(costs, shape, max_len)} need {format_bytes(memory_bytes)} at {max_len:,} tokens; "
                  f"{budget.describe()}")
        feasible = False
    return Estimate(time_s=time_s, memory_bytes=memory_bytes, feasible=feasible, reason=reason,
                    time_expr=time_expr, memory_expr=memory_expr, **base, **numbers)


def _largest_fitting_length(memory_expr: sympy.Expr, budget: float, max_len: int) -> Optional[int]:
    """The longest sequence (up to 2^40) whose memory fits `budget` (memory grows with L); None if even 1 does not."""
    function = as_function(memory_expr)
    if function(1) > budget:
        return None
    high = 2**40
    if function(high) <= budget:
        return high
    low = 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if function(middle) <= budget else (low, middle)
    return low


# ---------------------------------------------------------------------------------------------------------------
# One site


@dataclass(frozen=True)
class Budget:
    """The memory one attention call may use: the device's usable memory less what the rest of the model holds."""

    attention: float
    device_name: str
    usable: float
    held: float = 0.0

    def describe(self) -> str:
        text = f"{self.device_name} has {format_bytes(self.usable)}"
        if self.held > 0:
            text += f", {format_bytes(max(self.attention, 0))} of it left beside the model's {format_bytes(self.held)}"
        return text


def decide_site(site: AttentionSite, device: DeviceSpec, policy: str, max_len: int, *,
                context: Optional[PlanContext] = None, budget: Optional[Budget] = None) -> SitePlan:
    """Weigh every variant for one site and choose the fastest allowed candidate that fits."""
    context = context or PlanContext(device=device, policy=policy, max_len=max_len)
    budget = budget or Budget(device.usable_bytes, device.name, device.usable_bytes)
    candidates = [_estimate(variant, variant.offer(site, context), site, context, budget)
                  for variant in variants_for(policy)]
    allowed = [candidate for candidate in candidates
               if candidate.time_expr is not None and candidate.exactness in EXACTNESS_ALLOWED[policy]
               and (context.world_size == 1 or candidate.variant == "ring")]
    envelope, crossovers = cheapest_envelope(allowed, CROSSOVER_RANGE * max_len)
    feasible = [candidate for candidate in candidates if candidate.feasible]
    if not feasible:
        needs = "; ".join(f"{label(candidate)}: {candidate.reason}" for candidate in candidates
                          if candidate.time_expr is not None and candidate.exactness in EXACTNESS_ALLOWED[policy])
        return SitePlan(site, tuple(candidates), None, f"left as it is: no candidate fits ({needs})", crossovers,
                        envelope)
    choice = feasible[fastest_index([candidate.time_s for candidate in feasible])]
    reason = _choice_reason(choice, candidates, site)
    if site.unsupported and choice.variant == ORIGINAL:
        reason = f"kept: {site.unsupported}"
    return SitePlan(site, tuple(candidates), choice, reason, crossovers, envelope)


def _choice_reason(choice: Estimate, candidates: list[Estimate], site: Optional[AttentionSite] = None) -> str:
    by_variant = {candidate.variant: candidate for candidate in candidates}
    original, ours = by_variant.get(ORIGINAL), by_variant.get("flash")
    cudnn = by_variant.get("sdpa_cudnn")
    if site is not None and _mask_dropped_when_eager(site) and cudnn is not None and cudnn.time_s is not None:
        # The baseline is what the user's eager call runs: on Hopper, SDPA's cuDNN kernel with is_causal (measured:
        # identical logits to our sdpa_cudnn rewrite), not the traced graph's mask tensor.
        original = dataclasses.replace(cudnn, implementation="sdpa-cudnn, is_causal, as transformers runs it eagerly")
    if choice.variant == ORIGINAL:
        reason = f"kept: the original ({choice.implementation}) is the fastest that fits ({choice.reason})"
        if ours is not None and ours.time_s is not None:
            reason += f"; ours, {label(ours)}: {format_seconds(ours.time_s)}"
        return reason
    reason = f"{label(choice)}: {choice.reason}"
    if choice.variant == "sdpa_cudnn" and ours is not None and ours.time_s is not None:
        reason = (f"{label(choice)}: SDPA's cuDNN kernel is faster than ours ({label(ours)}: "
                  f"{format_seconds(ours.time_s)}) on the target: {choice.reason}")
    if original is not None and original.time_s is not None:
        if original.feasible:
            reason += f"; the original ({original.implementation}): {format_seconds(original.time_s)}"
        else:
            reason += f"; the original ({original.implementation}): {original.reason}"
    return reason


def _site_signature(site: AttentionSite) -> tuple:
    """What a decision depends on: every field but names (identical layers share one decision)."""
    mask = site.mask
    return (site.form, site.batch, site.heads, site.kv_heads, site.q_len, site.kv_len, site.head_dim, site.value_dim,
            site.scale, site.dropout_p, site.softcap, site.sinks is not None, site.dtype, site.hints,
            site.unsupported, mask.kind, mask.window, mask.chunk, mask.key_padding is not None,
            mask.bias is not None, mask.tensor is not None)


# ---------------------------------------------------------------------------------------------------------------
# The whole model


def check_plan_sizes(max_len: int, world_size: int = 1, window: Optional[int] = None, sinks: int = 0) -> None:
    """Raise InvalidArgumentError unless max_len and world_size are positive ints, window a positive int or None and
    sinks a non-negative int. (make_plan checks them; a front door checks them once, in PlanOptions.create, and
    the pipeline then plans with plan_checked.)"""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise InvalidArgumentError(f"max_len={max_len!r} must be a positive int (planner.parse_length parses '128k')")
    if not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgumentError(f"world_size={world_size!r} must be a positive int")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise InvalidArgumentError(f"window={window!r} must be a positive number of keys, or None")
    if not isinstance(sinks, int) or sinks < 0:
        raise InvalidArgumentError(f"sinks={sinks!r} must be a non-negative int")


def make_plan(sites: list[AttentionSite], device: DeviceSpec, policy: str, max_len: int,
              world_size: int = 1, *, train: bool = False, window: Optional[int] = None, sinks: int = 0,
              graph_module: Optional[torch.fx.GraphModule] = None, weights_bytes: Optional[float] = None,
              layer_repeat: float = 1.0, progress: Optional[Callable[[str], None]] = None) -> ModelPlan:
    """Decide every site, and check that the whole plan fits the device.

    Args:
        sites: from passes.match.find_sites. device: a DeviceSpec. max_len: tokens.
        policy: "exact" (default), "approximate" or "any".
        world_size: devices the sequence is sharded over (ring attention is a candidate when > 1).
        train: the model will be trained: lets the retrain variants (linear, ssd) in under policy "any", and makes
            the memory fit count what autograd keeps.
        window, sinks: a sliding window (keys per query) and sink tokens to offer at sites without a window
            (exact where window >= max_len, else approximate); see the module docstring.
        graph_module: the captured graph, for the weights and the activations at max_len. Without it the memory fit
            counts attention only, and says so.
        weights_bytes: the weights, when the graph holds fewer layers than the model (the CLI's presets).
        layer_repeat: training only: how many times the graph's layers repeat in the model (activations scale).
        progress: called with a short message before long steps.
    """
    check_policy(policy)
    check_plan_sizes(max_len, world_size, window, sinks)
    return plan_checked(sites, device, policy, max_len, world_size, train=train, window=window, sinks=sinks,
                        graph_module=graph_module, weights_bytes=weights_bytes, layer_repeat=layer_repeat,
                        progress=progress)


def plan_checked(sites: list[AttentionSite], device: DeviceSpec, policy: str, max_len: int,
                 world_size: int = 1, *, train: bool = False, window: Optional[int] = None, sinks: int = 0,
                 graph_module: Optional[torch.fx.GraphModule] = None, weights_bytes: Optional[float] = None,
                 layer_repeat: float = 1.0, progress: Optional[Callable[[str], None]] = None) -> ModelPlan:
    """make_plan for arguments already checked (check_policy, check_plan_sizes), as a front door's PlanOptions are."""
    context = PlanContext(device=device, policy=policy, max_len=max_len, world_size=world_size, train=train,
                          window=window, sinks=sinks)
    model = model_memory(graph_module, sites, max_len, train=train, weights_bytes=weights_bytes,
                         layer_repeat=layer_repeat, world_size=world_size)
    held = model.held_without_masks()
    attention_budget = device.usable_bytes - held if held < device.usable_bytes else device.usable_bytes
    budget = Budget(attention_budget, device.name, device.usable_bytes, held if held < device.usable_bytes else 0.0)

    decisions, cache = [], {}
    for index, site in enumerate(sites):
        signature = _site_signature(site)
        if signature not in cache:
            if progress is not None:
                progress(f"planning {site.name} ({index + 1} of {len(sites)} sites)")
            cache[signature] = decide_site(site, device, policy, max_len, context=context, budget=budget)
        decisions.append(dataclasses.replace(cache[signature], site=site))
    decisions = tuple(decisions)

    notes = []
    fixed = [site.name for site in sites if not site.sequence_symbols]
    if fixed:
        notes.append(f"the sequence length is fixed by the model's code at {', '.join(fixed)}: costs there are at "
                     "the captured length, not max_len")
    if policy == "any" and not train:
        notes.append("policy 'any' offers the retrain variants (linear, ssd) only with train=True")
    memory = fit_memory(model, decisions, device, context)
    return ModelPlan(device=device, policy=policy, max_len=max_len, decisions=decisions, world_size=world_size,
                     notes=tuple(notes), memory=memory, train=train, window=window, sinks=sinks)


# ---------------------------------------------------------------------------------------------------------------
# Memory of the whole model


@dataclass(frozen=True)
class ModelMemory:
    """What the model holds besides attention, at max_len (bytes; None where unknown)."""

    weights: Optional[float]
    activations: Optional[float]
    masks: dict  # mask tensor node name -> bytes at max_len (quadratic tensors that a kept mask keeps alive)
    method: str

    def held_without_masks(self) -> float:
        return (self.weights or 0.0) + (self.activations or 0.0)


_VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "expand", "expand_as", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "slice", "select", "alias", "as_strided", "detach", "unflatten", "flatten", "view_as", "split", "chunk",
    "unbind", "narrow", "split_with_sizes", "lift_fresh_copy", "_reshape_alias", "diagonal", "movedim",
}


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        name = getattr(packet, "__name__", name)
    return name.split(".")[0]


def model_memory(graph_module: Optional[torch.fx.GraphModule], sites: list[AttentionSite], max_len: int, *,
                 train: bool = False, weights_bytes: Optional[float] = None, layer_repeat: float = 1.0,
                 world_size: int = 1) -> ModelMemory:
    """Weights and activations of the graph at max_len (see MemoryFit). Quadratic (L×S) tensors are left out of the
    activations: they are attention scores (counted in the candidates' memory) or masks (returned in `masks`, by
    the name of the tensor each site passes, and counted where the plan keeps the mask)."""
    if graph_module is None:
        return ModelMemory(weights_bytes, None, {}, "no graph given: activations not counted")
    weights = weights_bytes if weights_bytes is not None else _weights_bytes(graph_module)
    sequence_symbols = set()
    for site in sites:
        sequence_symbols |= {str(symbol) for symbol in site.sequence_symbols}
    if not sequence_symbols:
        sequence_symbols = _input_sequence_symbols(graph_module)
    if not sequence_symbols:
        return ModelMemory(weights, None, {}, "no symbolic sequence length: activations not counted")

    nodes = list(graph_module.graph.nodes)
    owner, size, quadratic = {}, {}, {}
    for node in nodes:
        value = node.meta.get("val")
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            owner[node] = node
            size[node] = 0.0
            quadratic[node] = False
            continue
        first_input = next((argument for argument in node.args if isinstance(argument, torch.fx.Node)), None)
        if node.op == "call_function" and _op_name(node) in _VIEW_OPS and first_input is not None:
            owner[node] = owner.get(first_input, first_input)
            size[node] = 0.0
            quadratic[node] = quadratic.get(owner[node], False)
            continue
        owner[node] = node
        bytes_at_max, degree = _tensor_bytes(value, sequence_symbols, max_len)
        size[node] = bytes_at_max
        quadratic[node] = degree >= 2
    last_use = {}  # storage owner -> index of the last node that reads it or one of its views
    for index, node in enumerate(nodes):
        for argument in node.all_input_nodes:
            last_use[owner.get(argument, argument)] = index

    live, peak, total = 0.0, 0.0, 0.0
    releases: dict[int, list] = {}
    for index, node in enumerate(nodes):
        if owner.get(node) is node and size[node] and not quadratic[node]:
            live += size[node]
            total += size[node]
            releases.setdefault(last_use.get(node, index), []).append(size[node])
        peak = max(peak, live)
        for released in releases.pop(index, ()):
            live -= released
    activations = (total * layer_repeat) if train else peak
    activations /= world_size
    masks = {}
    by_name = {node.name: node for node in nodes}
    for site in sites:
        name = site.mask.tensor
        if name and name in by_name:
            base = owner.get(by_name[name], by_name[name])
            if quadratic.get(base):
                masks[name] = size[base]
    method = ("activations: every intermediate tensor at max_len (autograd keeps them)" if train
              else "activations: peak of live intermediate tensors at max_len (graph liveness)")
    if layer_repeat != 1.0 and train:
        method += f", scaled by {layer_repeat:g} for the layers not captured"
    return ModelMemory(weights, activations, masks, method)


def _input_sequence_symbols(graph_module: torch.fx.GraphModule) -> set:
    """Without attention sites: the symbols of the first input's dims after the batch (token ids (B, L))."""
    for node in graph_module.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim() >= 2:
            return {str(symbol) for dimension in value.shape[1:] if isinstance(dimension, torch.SymInt)
                    for symbol in dimension.node.expr.free_symbols}
    return set()


def _weights_bytes(graph_module: torch.nn.Module) -> float:
    seen, total = set(), 0
    for tensor in list(graph_module.parameters()) + list(graph_module.buffers()):
        key = id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return float(total)


def _tensor_bytes(value: torch.Tensor, sequence_symbols: set, max_len: int) -> tuple[float, int]:
    """Bytes of a fake tensor at max_len, and its degree in the sequence length."""
    numel = sympy.Integer(1)
    for dimension in value.shape:
        numel = numel * _dimension_expr(dimension, sequence_symbols)
    numel = sympy.sympify(numel)
    return float(numel.subs(SEQUENCE_LENGTH, max_len)) * value.element_size(), _growth_degree(numel)


def _growth_degree(numel: sympy.Expr) -> int:
    """How a size grows with the sequence length (0 constant, 1 linear, 2 quadratic), read off two large lengths:
    sizes such as L // 5 (a strided front end, patches) are not polynomials, but grow as L does."""
    if SEQUENCE_LENGTH not in numel.free_symbols:
        return 0
    small, large = (float(numel.subs(SEQUENCE_LENGTH, length)) for length in (2 ** 20, 2 ** 22))
    if small <= 0 or large <= 0:
        return 0
    return max(0, round(math.log(large / small, 4)))


def _dimension_expr(dimension, sequence_symbols: set):
    if not isinstance(dimension, torch.SymInt):
        return int(dimension)
    expression = dimension.node.expr
    if expression.is_number:
        return int(expression)
    replacements = {}
    shape_env = dimension.node.shape_env
    var_to_val = getattr(shape_env, "backed_var_to_val", None) or getattr(shape_env, "var_to_val", {})
    for symbol in expression.free_symbols:
        if str(symbol) in sequence_symbols:
            replacements[symbol] = SEQUENCE_LENGTH
        else:
            replacements[symbol] = int(var_to_val.get(symbol, 1))
    return plain_sympy(expression.xreplace(replacements))


def fit_memory(model: ModelMemory, decisions: Iterable[SiteDecision], device: DeviceSpec,
               context: PlanContext) -> MemoryFit:
    """Whether weights + activations + kept masks + attention fit the device; where not, the ring that would."""
    decisions = list(decisions)
    # A site left as it is keeps the original's memory.
    chosen = [decision.choice if decision.choice is not None else _original(decision) for decision in decisions]
    chosen = [choice for choice in chosen if choice is not None]
    transient = max((choice.memory_bytes or 0.0 for choice in chosen), default=0.0)
    saved = sum(getattr(choice, "saved_bytes", 0.0) or 0.0 for choice in chosen) if context.train else 0.0
    attention = transient + saved
    kept = {}
    for decision in decisions:
        name = decision.site.mask.tensor
        if name in model.masks and (decision.choice is None or decision.choice.variant == ORIGINAL
                                    or keeps_mask_tensor(decision.site)):
            kept[name] = model.masks[name]
    masks = float(sum(kept.values()))
    weights, activations = model.weights, model.activations
    total = (weights or 0.0) + (activations or 0.0) + masks + attention
    usable = device.usable_bytes
    stuck = [decision.site.name for decision in decisions if decision.choice is None]
    fits = total <= usable and not stuck
    parts = []
    if weights is not None:
        parts.append(f"weights {format_bytes(weights)}")
    if activations is not None:
        parts.append(f"activations {format_bytes(activations)}")
    if masks:
        parts.append(f"mask tensors {format_bytes(masks)}")
    parts.append(f"attention {format_bytes(attention)}")
    where = "per device" if context.world_size > 1 else "on one device"
    sum_text = " + ".join(parts) + f" = {format_bytes(total)}"
    unknown = "" if activations is not None else f" ({model.method})"
    if fits:
        verdict = (f"fits {where}: {sum_text} of {format_bytes(usable)} usable on {device.name} at "
                   f"{context.max_len:,} tokens{unknown}")
        return MemoryFit(usable, weights, activations, masks, attention, total, True, None, verdict, model.method)
    ring = None
    if stuck and total <= usable:
        verdict = (f"does not fit {where}: no candidate fits at {len(stuck)} site(s) ({stuck[0]}"
                   f"{', ...' if len(stuck) > 1 else ''}) beside {sum_text}; {device.name} has "
                   f"{format_bytes(usable)} usable")
    elif weights is not None and weights >= usable:
        verdict = (f"no plan fits: the weights alone need {format_bytes(weights)}; {device.name} has "
                   f"{format_bytes(usable)} usable. Ring attention shards the sequence, not the weights: shard the "
                   "weights (tensor or pipeline parallelism), quantize them, or use a device with more memory")
    elif masks:
        verdict = (f"does not fit {where}: {sum_text} > {format_bytes(usable)} usable on {device.name} at "
                   f"{context.max_len:,} tokens; the kept {format_bytes(masks)} of L×S mask tensors rule out a ring "
                   "(it needs a proved, structured mask)")
    else:
        ring = _ring_devices_needed(model, decisions, device, context)
        if ring is None:
            verdict = (f"no plan fits: {sum_text} > {format_bytes(usable)} usable on {device.name} at "
                       f"{context.max_len:,} tokens, and no ring of up to {MAX_RING_DEVICES} devices fits either")
        else:
            verdict = (f"does not fit {where}: {sum_text} > {format_bytes(usable)} usable on {device.name} at "
                       f"{context.max_len:,} tokens; a ring of {ring} devices fits "
                       f"(optimize(..., world_size={ring}); --world-size {ring} on the command line)")
    return MemoryFit(usable, weights, activations, masks, attention, total, False, ring, verdict + unknown,
                     model.method)


def _original(decision: SiteDecision) -> Optional[Candidate]:
    return next((candidate for candidate in decision.candidates if candidate.variant == ORIGINAL), None)


def _ring_devices_needed(model: ModelMemory, decisions: list[SiteDecision], device: DeviceSpec,
                         context: PlanContext) -> Optional[int]:
    """The fewest devices P (≥ 2) on which weights + activations/P + each site's ring memory fit, or None."""
    ring = VARIANTS["ring"]
    sites = {}
    for decision in decisions:
        sites.setdefault(_site_signature(decision.site), decision.site)
    weights = model.weights or 0.0
    activations = (model.activations or 0.0) * context.world_size
    for world_size in range(2, MAX_RING_DEVICES + 1):
        ring_context = dataclasses.replace(context, world_size=world_size)
        largest = 0.0
        for site in sites.values():
            offer = ring.offer(site, ring_context)
            if offer.not_applicable:
                return None
            shape = cost_shape(site, context.max_len, "ring", offer, world_size)
            largest = max(largest, evaluate(ring.costs(shape).memory, context.max_len))
        if weights + activations / world_size + largest <= device.usable_bytes:
            return world_size
    return None


def time_at(candidate: Candidate, lengths: Iterable[int]) -> list[float]:
    """Estimated seconds of a candidate at each length (for plots)."""
    function = as_function(candidate.time_expr)
    return [function(length) for length in lengths]


def memory_at(candidate: Candidate, lengths: Iterable[int]) -> list[float]:
    function = as_function(candidate.memory_expr)
    return [function(length) for length in lengths]

