"""The planner: per site, the candidates that the policy and the site's semantics allow, their estimated time and
memory at max_len on the device, the choice (the fastest that fits), and the crossovers between candidates."""
from __future__ import annotations

from typing import Optional

import sympy

from backends.registry import variants_for
from planner.costs import SEQUENCE_LENGTH, CostShape, evaluate, time_expression
from planner.devices import DeviceSpec
from planner.errors import InvalidArgumentError
from planner.records import POLICIES, AttentionSite, Candidate, Crossover, Plan, SiteDecision


def cost_shape(site: AttentionSite, max_len: int) -> CostShape:
    """The site's sizes with its sequence symbols written as SEQUENCE_LENGTH and other symbols at their hints."""
    hints = dict(site.hints)
    sequence = {symbol: SEQUENCE_LENGTH for symbol in site.sequence_symbols}

    def length(size):
        return size.subs(sequence) if isinstance(size, sympy.Expr) else size

    def other(size):
        if isinstance(size, sympy.Expr):
            return int(size.subs({symbol: hints.get(str(symbol), 1) for symbol in size.free_symbols}))
        return size

    mask = site.mask
    return CostShape(
        batch=other(site.batch), heads=site.heads, kv_heads=site.kv_heads, head_dim=site.head_dim,
        value_dim=site.value_dim, q_len=length(site.q_len), kv_len=length(site.kv_len), dtype=site.dtype,
        causal=mask.is_causal, window=mask.window if mask.kind == "sliding_window" else None, form=site.form,
    )


def format_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _candidate(variant, site: AttentionSite, shape: CostShape, device: DeviceSpec, max_len: int) -> Candidate:
    implementation = variant.implementation(device, site)
    not_applicable = variant.applies(site)
    if not_applicable:
        return Candidate(variant.name, implementation, variant.exactness, None, None, False,
                         f"does not apply: {not_applicable}")
    costs = variant.costs(shape)
    time_expr = time_expression(costs, device, site.dtype)
    memory_expr = sympy.sympify(costs.memory)
    time_s, memory_bytes = evaluate(time_expr, max_len), evaluate(memory_expr, max_len)
    feasible = memory_bytes <= device.memory_bytes
    if feasible:
        reason = f"{format_seconds(time_s)}, {format_bytes(memory_bytes)} extra memory at {max_len} tokens"
    else:
        reason = (f"needs {format_bytes(memory_bytes)} at {max_len} tokens; {device.name} has "
                  f"{format_bytes(device.memory_bytes)}")
    return Candidate(variant.name, implementation, variant.exactness, time_s, memory_bytes, feasible, reason,
                     time_expr=time_expr, memory_expr=memory_expr)


def crossover_length(faster: Candidate, slower: Candidate, limit: int) -> Optional[int]:
    """The smallest sequence length from which `faster` is estimated faster than `slower`, up to `limit`, found by
    bisection on the difference of the two time expressions (None if the order never flips in [1, limit])."""
    difference = sympy.lambdify(SEQUENCE_LENGTH, faster.time_expr - slower.time_expr, modules="math")
    if difference(limit) >= 0:
        return None
    if difference(1) < 0:
        return 1
    low, high = 1, limit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if difference(middle) < 0 else (middle, high)
    return high


def _crossovers(candidates: list[Candidate], limit: int) -> tuple[Crossover, ...]:
    timed = [candidate for candidate in candidates if candidate.time_expr is not None]
    found = []
    for faster in timed:
        for slower in timed:
            if faster is slower:
                continue
            length = crossover_length(faster, slower, limit)
            if length is not None and length > 1:
                found.append(Crossover(faster.variant, slower.variant, length))
    return tuple(found)


def decide_site(site: AttentionSite, device: DeviceSpec, policy: str, max_len: int) -> SiteDecision:
    shape = cost_shape(site, max_len)
    candidates = [_candidate(variant, site, shape, device, max_len) for variant in variants_for(policy)]
    feasible = [candidate for candidate in candidates if candidate.feasible]
    crossovers = _crossovers(candidates, 4 * max_len)
    if not feasible:
        needs = "; ".join(f"{candidate.variant}: {candidate.reason}" for candidate in candidates)
        return SiteDecision(site, tuple(candidates), None, f"left as it is: no candidate fits ({needs})", crossovers)
    choice = min(feasible, key=lambda candidate: candidate.time_s)
    if choice.variant == "dense":
        reason = f"kept as it is: the original is the fastest that fits ({choice.reason})"
        others = [candidate for candidate in candidates if candidate is not choice and not candidate.feasible]
        if others and all(candidate.time_s is None for candidate in others):
            reason = f"kept as it is: {others[0].variant} {others[0].reason}"
    else:
        reason = f"{choice.variant} ({choice.implementation}): {choice.reason}"
        dense = next((candidate for candidate in candidates if candidate.variant == "dense"), None)
        if dense is not None and not dense.feasible:
            reason += f"; the original {dense.reason}"
        elif dense is not None and dense.time_s:
            reason += f"; the original: {dense.reason}"
    return SiteDecision(site, tuple(candidates), choice, reason, crossovers)


def make_plan(sites: list[AttentionSite], device: DeviceSpec, policy: str, max_len: int,
              world_size: int = 1) -> Plan:
    """Decide every site. policy: "exact" (default), "approximate" or "any"."""
    if policy not in POLICIES:
        raise InvalidArgumentError(f"policy={policy!r} is not a policy; accepted: {', '.join(POLICIES)}")
    decisions = tuple(decide_site(site, device, policy, max_len) for site in sites)
    notes = []
    fixed = [site.name for site in sites if not site.sequence_symbols]
    if fixed:
        notes.append(f"the sequence length is fixed by the model's code at {', '.join(fixed)}: costs there are at "
                     "the captured length, not max_len")
    return Plan(device=device, policy=policy, max_len=max_len, decisions=decisions, world_size=world_size,
                notes=tuple(notes))
