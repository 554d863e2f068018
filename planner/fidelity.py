"""Fidelity: measure what an approximate rewrite does to a model, bound it, and never let one through unmeasured.

A rewrite is exact (the function is kept up to floating point), approximate (same weights, the function
approximated: a window imposed on full attention, with or without sink tokens; HyperAttention) or retrain (another
architecture: linear attention, SSD; see planner/linearization.py). This module decides which approximate choices of a
plan may stay, from measurements on sample batches that the user gives:

per site (the site switched alone, so its inputs are the original's):
    max abs error, relative Frobenius error ||o - o'||_F / ||o||_F, mean cosine similarity of the output vectors;
    for windows, the attention mass kept m_w = sum over the window (and sinks) of the softmax probabilities, and the
    bound ||o_i - o_w,i|| <= 2 (1 - m_w,i) max_j ||v_j|| per query, checked on the data;
end to end (the model's output against the original's):
    logits: mean and 99th percentile of KL(original || candidate) per position, top-1 agreement;
    embeddings (encoders): mean and smallest cosine similarity per output vector.

`measure_plan` measures every approximate choice alone, switches sites greedily (least sensitive first), verifies
every combination end to end (errors compound), and gives a site whose candidate breaks the tolerance, yields NaN or
Inf, or cannot be exercised at the sample length, exact attention instead; the FidelityReport has the numbers.
The tolerance is explicit: there is no default that lets an approximation through unmeasured.

Measurements rewrite a copy of the captured graph (copy.deepcopy, then the registry's emit with the candidate), and
record tensors with identity "tap" modules inserted after the nodes of interest.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree

from backends.registry import VARIANTS
from backends.sliding_window.rule import window_bound_check  # noqa: F401  (re-exported)
from passes.errors import InvalidArgumentError
from passes.records import AttentionSite, Candidate, Plan, SiteDecision
from passes.rewrite import prepare_inputs, rewrite_sites
from planner.fidelity_records import (  # noqa: F401  (the records and verdicts, re-exported)
    DISTRIBUTION_KEYS, EMBEDDING_KEYS, SITE_KEYS, TOLERANCE_KEYS, EndToEnd, FidelityReport, SiteError, Step, Trial,
    candidate_label, describe_end_to_end, describe_site_error, format_tolerance, sensitivity, violations)

MEASURED_CLASSES = ("approximate",)  # what measure_plan measures; "retrain" sites are planner.linearize's


Batch = Union[torch.Tensor, tuple, list, dict]
OutputFunction = Callable[[Any], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def check_tolerance(tolerance: Optional[Mapping[str, float]]) -> dict[str, float]:
    """The tolerance as a dict of floats; raise InvalidArgumentError naming what is wrong and what is accepted."""
    accepted = "; ".join(f"{name} ({direction} {meaning})" for name, (direction, meaning) in TOLERANCE_KEYS.items())
    if not isinstance(tolerance, Mapping) or not tolerance:
        raise InvalidArgumentError(
            f"tolerance must be a non-empty dict such as {{'kl_mean': 0.01, 'top1': 0.99}} (logits) or "
            f"{{'cosine_mean': 0.99}} (embeddings); got {tolerance!r}. Accepted keys: {accepted}")
    checked = {}
    for name, value in tolerance.items():
        if name not in TOLERANCE_KEYS:
            raise InvalidArgumentError(f"tolerance key {name!r} is not known; accepted keys: {accepted}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgumentError(f"tolerance[{name!r}] must be a finite number; got {value!r}")
        if name in ("top1", "cosine_mean", "cosine_min", "site_cosine") and not -1.0 <= value <= 1.0:
            raise InvalidArgumentError(f"tolerance[{name!r}] is a similarity in [-1, 1] (top1 in [0, 1]); got {value}")
        if TOLERANCE_KEYS[name][0] == "max" and value < 0:
            raise InvalidArgumentError(f"tolerance[{name!r}] is an upper bound on an error, >= 0; got {value}")
        checked[name] = float(value)
    if not any(name in checked for name in DISTRIBUTION_KEYS + EMBEDDING_KEYS):
        raise InvalidArgumentError(
            "the tolerance must bound the model's output end to end (errors compound across sites): give at least "
            f"one of {', '.join(DISTRIBUTION_KEYS + EMBEDDING_KEYS)}; got only {', '.join(checked)}")
    return checked


def require_samples(policy: str, tolerance: Optional[Mapping[str, float]], samples: Any) -> None:
    """What optimize() calls first: a policy that admits approximations needs an explicit tolerance and samples
    batches, so that no approximation goes through unmeasured. Raises InvalidArgumentError otherwise."""
    if policy == "exact":
        return
    missing = [name for name, value in (("tolerance", tolerance), ("samples", samples)) if value is None]
    if missing:
        raise InvalidArgumentError(
            f"policy={policy!r} admits approximate rewrites, which are measured before they are used: pass "
            f"{' and '.join(missing)} (e.g. tolerance={{'kl_mean': 0.01, 'top1': 0.99}}, samples=[input_ids, "
            "...] at the deployment length), or use policy='exact'")
    check_tolerance(tolerance)


def as_batches(samples: Any) -> list[tuple[tuple, dict]]:
    """Calibration batches as (args, kwargs): each batch is a tensor (one input), a tuple/list (positional inputs)
    or a dict (keyword inputs)."""
    if isinstance(samples, (torch.Tensor, dict)):
        samples = [samples]
    try:
        batches = list(samples)
    except TypeError:
        raise InvalidArgumentError(f"samples must be an iterable of batches (tensors, tuples or dicts); got "
                                   f"{type(samples).__name__}") from None
    if not batches:
        raise InvalidArgumentError("samples holds no batch; give at least one (tensor, tuple or dict)")
    converted = []
    for index, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            converted.append(((batch,), {}))
        elif isinstance(batch, (tuple, list)):
            converted.append((tuple(batch), {}))
        elif isinstance(batch, dict):
            converted.append(((), dict(batch)))
        else:
            raise InvalidArgumentError(f"sample batch {index} is a {type(batch).__name__}; accepted: a tensor, "
                                       "a tuple/list of positional inputs, or a dict of keyword inputs")
    return converted


def first_tensor(output: Any) -> torch.Tensor:
    """The default end-to-end output: the first tensor in the model's output (logits, last_hidden_state)."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise InvalidArgumentError(f"the model's output ({type(output).__name__}) holds no tensor; pass output=callable")


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def make_candidate(variant: str, exactness: str = "approximate", implementation: str = "auto",
                   **parameters: Any) -> Candidate:
    """A Candidate built by hand, to measure a variant with chosen parameters (e.g. make_candidate(
    "sliding_window", window=64, sinks=4), make_candidate("hyper", block_size=16, min_seq_len=32))."""
    rule = VARIANTS.get(variant)
    for name, value in rule.fidelity.defaults if rule is not None else ():
        parameters.setdefault(name, value)
    return Candidate(variant=variant, implementation=implementation, exactness=exactness, time_s=None,
                     memory_bytes=None, feasible=True, reason="built by hand for a measurement",
                     parameters=tuple(parameters.items()))


class _Tap(torch.nn.Module):
    """Identity that records its input (detached) under `key` in `store`."""

    def __init__(self, store: dict, key: tuple):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, tensor):
        if isinstance(tensor, torch.Tensor):
            self.store.setdefault(self.key, []).append(tensor.detach())
        return tensor


def _insert_tap(graph_module: torch.fx.GraphModule, node: torch.fx.Node, store: dict, key: tuple) -> None:
    name = f"_fidelity_tap_{len([n for n, _ in graph_module.named_children() if n.startswith('_fidelity_tap_')])}"
    graph_module.add_submodule(name, _Tap(store, key))
    with graph_module.graph.inserting_after(node):
        tap = graph_module.graph.call_module(name, (node,))
    tap.meta.update({key: value for key, value in node.meta.items() if key == "val"})
    node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)


def copy_graph_module(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of a graph module that shares its parameters and buffers (a rewrite changes the graph and adds
    modules; it never writes weights), so that measuring many candidates does not copy the weights each time."""
    memo = {id(tensor): tensor for tensor in graph_module.parameters()}
    memo.update({id(tensor): tensor for tensor in graph_module.buffers()})
    return copy.deepcopy(graph_module, memo)


def rewrite_copy(graph_module: torch.fx.GraphModule, switches: Mapping[str, Candidate],
                 sites: Sequence[AttentionSite], tap_outputs: Iterable[str] = ()) -> tuple[torch.fx.GraphModule, dict]:
    """A deep copy of `graph_module` with each site named in `switches` rewritten to its candidate by
    passes.rewrite.rewrite_sites (the candidate's parameters, e.g. an imposed window, reach the variant's emit), and with
    the output of each site in `tap_outputs` recorded. Returns the copy and the store its taps fill:
    {(site name, "output"): [tensor per call]}."""
    module = copy_graph_module(graph_module)
    store: dict = {}
    nodes = {node.name: node for node in module.graph.nodes}
    by_name = {site.name: site for site in sites}
    for name in tap_outputs:
        # The tap takes the site node's place for its users; the rewrite then feeds it the replacement's output.
        _insert_tap(module, nodes[by_name[name].node], store, (name, "output"))
    decisions = []
    for site in sites:
        candidate = switches.get(site.name)
        if candidate is not None and candidate.variant != "dense":
            decisions.append(SiteDecision(site, (candidate,), candidate, "fidelity measurement"))
    if decisions:
        rewrite_sites(module, Plan(device=None, policy="any", max_len=0, decisions=tuple(decisions)), VARIANTS)
    else:
        module.recompile()
    return module, store


def _tap_prepared_inputs(module: torch.fx.GraphModule, site: AttentionSite, store: dict) -> None:
    """Record q, k, v (batch, heads, sequence, head_dim), the key padding mask and the kept mask tensor of a site,
    as a rewrite would hand them to a variant (the detector's adapters emitted before the site node)."""
    nodes = {node.name: node for node in module.graph.nodes}
    with module.graph.inserting_before(nodes[site.node]):
        prepared, extra = prepare_inputs(module.graph, site, nodes)
    nodes.update({name: node for name, node in extra.items() if isinstance(node, torch.fx.Node)})
    for role, name in (("query", prepared.query), ("key", prepared.key), ("value", prepared.value),
                       ("key_padding", prepared.mask.key_padding), ("mask", prepared.mask.tensor)):
        if name is not None and name in nodes:
            _insert_tap(module, nodes[name], store, (site.name, role))


def _vector_cosines(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each vector along the last dim (float64); pairs of zero vectors count as 1."""
    reference, candidate = reference.double(), candidate.double()
    dot = (reference * candidate).sum(-1)
    norms = reference.norm(dim=-1) * candidate.norm(dim=-1)
    both_zero = (reference.norm(dim=-1) == 0) & (candidate.norm(dim=-1) == 0)
    cosine = dot / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(both_zero, torch.ones_like(cosine), cosine).flatten()


def site_error(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> SiteError:
    """Errors of a site's output over the sample batches (lists of (batch, heads, L, D) tensors)."""
    finite = all(bool(torch.isfinite(tensor).all()) for tensor in candidate)
    if not finite:
        return SiteError(math.inf, math.inf, -1.0, False)
    difference_sq = sum(float(((c.double() - r.double()) ** 2).sum()) for r, c in zip(reference, candidate))
    reference_sq = sum(float((r.double() ** 2).sum()) for r in reference)
    max_abs = max(float((c.double() - r.double()).abs().max()) if r.numel() else 0.0
                  for r, c in zip(reference, candidate))
    cosines = torch.cat([_vector_cosines(r, c) for r, c in zip(reference, candidate)])
    relative = math.sqrt(difference_sq / reference_sq) if reference_sq > 0 else math.sqrt(difference_sq)
    return SiteError(max_abs, relative, float(cosines.mean()), True)


class SampleRunner:
    """Runs a captured graph and its rewritten copies on sample batches and compares them with the original.

    The original's outputs (end to end, and at every site) are computed once, at construction."""

    def __init__(self, graph_module: torch.fx.GraphModule, sites: Sequence[AttentionSite], samples: Any,
                 *, output: Optional[OutputFunction] = None, compare: Sequence[str] = ("logits",),
                 tap_inputs: bool = True):
        unknown = set(compare) - {"logits", "embedding"}
        if unknown or not compare:
            raise InvalidArgumentError(f"compare={compare!r}: accepted: 'logits' and/or 'embedding'")
        self.graph_module = graph_module
        self.sites = [site for site in sites]
        self.by_name = {site.name: site for site in self.sites}
        self.batches = as_batches(samples)
        self.output = output or first_tensor
        self.compare = tuple(compare)
        self.reference_outputs, self.reference_sites, self.reference_inputs = self._run_reference(tap_inputs)
        self.lengths = {name: max(int(tensor.shape[2]) for tensor in tensors)
                        for (name, role), tensors in self.reference_inputs.items() if role == "key"}
        for name, tensors in self.reference_sites.items():
            self.lengths.setdefault(name, max(int(tensor.shape[2]) for tensor in tensors))
        self.positions = sum(self._positions(tensor) for tensor in self.reference_outputs)

    def _positions(self, tensor: torch.Tensor) -> int:
        return tensor.numel() // tensor.shape[-1] if tensor.dim() else 1

    def _run(self, module: torch.fx.GraphModule) -> list[torch.Tensor]:
        outputs = []
        with torch.no_grad():
            for args, kwargs in self.batches:
                result = self.output(module(*args, **kwargs))
                if not isinstance(result, torch.Tensor):
                    raise InvalidArgumentError(f"output(...) must return a tensor; got {type(result).__name__}")
                outputs.append(result.detach())
        return outputs

    def _run_reference(self, tap_inputs: bool):
        module, store = rewrite_copy(self.graph_module, {}, self.sites, tap_outputs=self.by_name)
        if tap_inputs:
            for site in self.sites:
                _tap_prepared_inputs(module, site, store)
            module.recompile()
        reference = self._run(module)
        site_outputs = {name: tensors for (name, role), tensors in store.items() if role == "output"}
        inputs = {key: tensors for key, tensors in store.items() if key[1] != "output"}
        return reference, site_outputs, inputs

    def run(self, switches: Mapping[str, Candidate], tap_sites: Iterable[str] = ()) -> tuple[EndToEnd, dict]:
        """Rewrite a copy with `switches` (site name -> candidate), run it, and compare with the original: the
        end-to-end result and, for each site in `tap_sites`, its output tensors (one per batch)."""
        tap_sites = tuple(tap_sites)
        module, store = rewrite_copy(self.graph_module, switches, self.sites, tap_outputs=tap_sites)
        candidate_outputs = self._run(module)
        site_outputs = {name: store.get((name, "output"), []) for name in tap_sites}
        return self.compare_outputs(candidate_outputs), site_outputs

    def compare_outputs(self, candidate_outputs: Sequence[torch.Tensor]) -> EndToEnd:
        """End-to-end metrics of candidate outputs against the original's (same batches, same order)."""
        finite = all(bool(torch.isfinite(tensor).all()) for tensor in candidate_outputs)
        values: dict[str, float] = {}
        if not finite:
            worst = {"kl_mean": math.inf, "kl_p99": math.inf, "kl_max": math.inf, "top1": 0.0}
            if "logits" in self.compare:
                values.update(worst)
            if "embedding" in self.compare:
                values.update(cosine_mean=-1.0, cosine_min=-1.0)
            return EndToEnd(self.positions, False, **values)
        if "logits" in self.compare:
            divergences, agreements = [], []
            for reference, candidate in zip(self.reference_outputs, candidate_outputs):
                log_p = torch.log_softmax(reference.double(), dim=-1)
                log_q = torch.log_softmax(candidate.double(), dim=-1)
                kl = (log_p.exp() * (log_p - log_q)).nan_to_num(nan=0.0).sum(-1).clamp_min(0.0)
                divergences.append(kl.flatten())
                agreements.append((reference.argmax(-1) == candidate.argmax(-1)).flatten())
            kl = torch.cat(divergences)
            values.update(kl_mean=float(kl.mean()), kl_p99=percentile(kl, 0.99), kl_max=float(kl.max()),
                          top1=float(torch.cat(agreements).double().mean()))
        if "embedding" in self.compare:
            cosines = torch.cat([_vector_cosines(reference, candidate)
                                 for reference, candidate in zip(self.reference_outputs, candidate_outputs)])
            values.update(cosine_mean=float(cosines.mean()), cosine_min=float(cosines.min()))
        return EndToEnd(self.positions, True, **values)

    def measure(self, site_name: str, candidate: Candidate) -> tuple[EndToEnd, SiteError]:
        """Switch one site alone to `candidate`: the end-to-end result and the site's own error (with the window
        mass and bound for a sliding window)."""
        end_to_end, tapped = self.run({site_name: candidate}, tap_sites=(site_name,))
        error = site_error(self.reference_sites[site_name], tapped[site_name])
        bound = VARIANTS[candidate.variant].fidelity.bound if candidate.variant in VARIANTS else None
        if bound is not None and error.finite and (site_name, "query") in self.reference_inputs:
            error = dataclasses.replace(error, **bound(self.by_name[site_name], self.recorded(site_name), candidate))
        return end_to_end, error

    def recorded(self, site_name: str) -> list[dict]:
        """The site's recorded inputs, one {role: tensor} per sample batch."""
        roles = [role for name, role in self.reference_inputs if name == site_name]
        batches = len(self.reference_inputs[(site_name, "query")])
        return [{role: self.reference_inputs[(site_name, role)][index] for role in roles} for index in range(batches)]


def percentile(values: torch.Tensor, fraction: float) -> float:
    """The `fraction` quantile (linear interpolation), for any number of values (torch.quantile caps the size)."""
    ordered = torch.sort(values.double().flatten()).values
    if ordered.numel() == 1:
        return float(ordered[0])
    position = fraction * (ordered.numel() - 1)
    low = int(math.floor(position))
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def unmeasured_reason(candidate: Candidate, sample_length: Optional[int]) -> Optional[str]:
    """Why the sample batches cannot exercise `candidate` (it computes exact attention at their length), or
    None. Such a candidate is refused: passing it would let an approximation through unmeasured."""
    if sample_length is None:
        return None
    variant = VARIANTS.get(candidate.variant)
    if variant is not None and variant.fidelity.unmeasured is not None:
        return variant.fidelity.unmeasured(candidate, sample_length)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Calibrating a plan


def _exact_fallback(decision: SiteDecision) -> Optional[Candidate]:
    """The fastest feasible exact candidate of a decision (None: the site is left as the model wrote it)."""
    exact = [candidate for candidate in decision.candidates
             if candidate.exactness == "exact" and candidate.feasible and candidate.time_s is not None]
    return min(exact, key=lambda candidate: candidate.time_s) if exact else None


def _approximate_options(decision: SiteDecision) -> list[Candidate]:
    """The approximate candidates worth measuring at a site whose plan chose an approximation: the choice, then the
    other feasible approximate candidates faster than the best exact one, fastest first."""
    choice = decision.choice
    if choice is None or choice.exactness not in MEASURED_CLASSES:
        return []
    fallback = _exact_fallback(decision)
    others = [candidate for candidate in decision.candidates
              if candidate is not choice and candidate.exactness in MEASURED_CLASSES and candidate.feasible
              and candidate.time_s is not None
              and (fallback is None or fallback.time_s is None or candidate.time_s < fallback.time_s)]
    return [choice] + sorted(others, key=lambda candidate: candidate.time_s)


def _decide(decision: SiteDecision, choice: Optional[Candidate], reason: str) -> SiteDecision:
    return dataclasses.replace(decision, choice=choice, reason=reason)


def measure_plan(graph_module: torch.fx.GraphModule, plan: Plan, samples: Any,
                   tolerance: Mapping[str, float], *, output: Optional[OutputFunction] = None,
                   compare: Optional[Sequence[str]] = None) -> tuple[Plan, FidelityReport]:
    """Measure every approximate choice of `plan` on `samples`, keep those within `tolerance`, verify the
    combination end to end; every other approximate site gets its fastest exact candidate.

    Args:
        graph_module: the captured graph the plan was made for (not modified: measurements rewrite copies).
        plan: from planner.plan.make_plan (policy "approximate" or "any").
        samples: batches of model inputs (tensor, tuple or dict each), at the deployment length or the longest
            that fits: a window or HyperAttention that is exact at the sample length is refused as unmeasured.
        tolerance: e.g. {"kl_mean": 0.01, "kl_p99": 0.1, "top1": 0.99} (logits) or {"cosine_mean": 0.99}
            (embeddings); see TOLERANCE_KEYS. Required: nothing approximate passes unmeasured.
        output: maps the model's output to the tensor to compare (default: its first tensor).
        compare: "logits" and/or "embedding"; default from the tolerance's keys.

    Returns the plan with each approximate choice either kept (its reason gives the measurements) or replaced by
    the site's fastest exact candidate (its reason says what broke), and the FidelityReport.
    """
    tolerance = check_tolerance(tolerance)
    if compare is None:
        compare = [kind for kind, keys in (("logits", DISTRIBUTION_KEYS), ("embedding", EMBEDDING_KEYS))
                   if any(name in tolerance for name in keys)]
    sites = [decision.site for decision in plan.decisions]
    runner = SampleRunner(graph_module, sites, samples, output=output, compare=compare)
    report = FidelityReport(tolerance=tolerance, batches=len(runner.batches), positions=runner.positions,
                            calibration_lengths=dict(runner.lengths), plan_max_len=getattr(plan, "max_len", None))
    decisions = {decision.site.name: decision for decision in plan.decisions}
    exact_switches = {}
    for name, decision in decisions.items():
        if decision.choice is not None and decision.choice.exactness == "exact":
            exact_switches[name] = decision.choice
        elif decision.choice is not None and decision.choice.exactness not in MEASURED_CLASSES:
            report.notes.append(f"{name}: {candidate_label(decision.choice)} is {decision.choice.exactness}-class: "
                                "not measured here (planner.linearize distils it)")

    proposals, final_decisions = [], dict(decisions)
    for name, decision in decisions.items():
        options = _approximate_options(decision)
        if not options:
            continue
        chosen = _first_passing(runner, report, name, options, tolerance)
        if chosen is None:
            fallback = _exact_fallback(decision)
            failures = "; ".join(f"{trial.label}: {trial.reason}" for trial in report.trials if trial.site == name)
            report.refused[name] = f"{candidate_label(fallback)} instead: {failures}"
            final_decisions[name] = _decide(decision, fallback, f"kept exact ({candidate_label(fallback)}): "
                                                                f"samples refused {failures}")
            if fallback is not None and fallback.variant != "dense":
                exact_switches[name] = fallback
        else:
            proposals.append((chosen, name))

    accepted: dict[str, Candidate] = {}
    final: Optional[EndToEnd] = None
    for trial, name in sorted(proposals, key=lambda item: sensitivity(tolerance, item[0].end_to_end)):
        switches = {**exact_switches, **accepted, name: trial.candidate}
        try:
            end_to_end, _ = runner.run(switches)
            broken = violations(tolerance, end_to_end)
        except Exception as failure:  # e.g. an exact rewrite that cannot run together with this one
            end_to_end = EndToEnd(runner.positions, False)
            broken = [f"the combination raised {type(failure).__name__}: {str(failure).strip()[:200]}"]
        passed = not broken
        reason = describe_end_to_end(end_to_end) + ("" if passed else ": " + "; ".join(broken))
        report.steps.append(Step(name, trial.candidate, tuple(accepted), end_to_end, passed, reason))
        decision = decisions[name]
        if passed:
            accepted[name] = trial.candidate
            final = end_to_end
            report.accepted[name] = f"{trial.label}: alone {trial.reason}"
            final_decisions[name] = _decide(decision, trial.candidate,
                                            f"{decision.reason}; measured: {trial.reason}")
        else:
            fallback = _exact_fallback(decision)
            report.refused[name] = (f"{candidate_label(fallback)} instead: {trial.label} passed alone but with "
                                    f"{len(accepted)} other approximate site(s) {reason}")
            final_decisions[name] = _decide(decision, fallback, f"kept exact ({candidate_label(fallback)}): "
                                                                f"{trial.label} combined: {reason}")
            if fallback is not None and fallback.variant != "dense":
                exact_switches[name] = fallback
    if final is None:  # no approximation accepted: verify the exact plan as it will run
        final, _ = runner.run(exact_switches)
        if violations(tolerance, final):
            report.notes.append("the exact rewrites alone differ from the original beyond the tolerance (floating "
                                "point): " + "; ".join(violations(tolerance, final)))
    report.final = final
    lengths = set(runner.lengths.values())
    if report.plan_max_len is not None and lengths and max(lengths) < report.plan_max_len:
        report.notes.append(f"measured at up to {max(lengths)} tokens; the plan is for {report.plan_max_len}: "
                            "errors of windows and HyperAttention grow with the length")
    new_plan = dataclasses.replace(plan, decisions=tuple(final_decisions[decision.site.name]
                                                         for decision in plan.decisions),
                                   notes=tuple(plan.notes) + (f"fidelity: {len(accepted)} approximate site(s) "
                                                              f"accepted, {len(report.refused)} kept exact under "
                                                              f"{format_tolerance(tolerance)}",))
    return new_plan, report


def _first_passing(runner: SampleRunner, report: FidelityReport, name: str, options: Sequence[Candidate],
                   tolerance: Mapping[str, float]) -> Optional[Trial]:
    """Measure the options at one site alone, in order; record each trial; return the first that passes."""
    for candidate in options:
        reason = unmeasured_reason(candidate, runner.lengths.get(name))
        if reason is not None:
            report.trials.append(Trial(name, candidate, None, None, False, f"unmeasured: {reason}"))
            continue
        try:
            end_to_end, error = runner.measure(name, candidate)
        except Exception as failure:  # a candidate that cannot run here is refused with the reason, not fatal
            report.trials.append(Trial(name, candidate, None, None, False,
                                       f"raised {type(failure).__name__}: {str(failure).strip()[:200]}"))
            continue
        broken = violations(tolerance, end_to_end, error)
        text = f"{describe_end_to_end(end_to_end)}; {describe_site_error(error)}"
        trial = Trial(name, candidate, error, end_to_end, not broken, text + ("" if not broken else ": " +
                                                                             "; ".join(broken)))
        report.trials.append(trial)
        if not broken:
            return trial
    return None


def measure_variants(graph_module: torch.fx.GraphModule, sites: Sequence[AttentionSite], samples: Any,
                     candidates: Mapping[str, Candidate], *, output: Optional[OutputFunction] = None,
                     compare: Sequence[str] = ("logits",), site_errors: bool = True) -> dict[str, dict]:
    """Measure each labelled candidate applied at every site at once (a uniform rewrite of the model), end to end,
    and, with site_errors, at each site alone. Returns {label: {"end_to_end": EndToEnd, "sites": {name: SiteError}}}.
    For tables (e.g. an encoder's embedding cosine under windows of several widths)."""
    runner = SampleRunner(graph_module, sites, samples, output=output, compare=compare,
                            tap_inputs=site_errors)
    results = {}
    for label, candidate in candidates.items():
        end_to_end, _ = runner.run({site.name: candidate for site in sites})
        per_site = {}
        if site_errors:
            for site in sites:
                per_site[site.name] = runner.measure(site.name, candidate)[1]
        results[label] = {"end_to_end": end_to_end, "sites": per_site}
    return results
