"""The passes that every front door runs, in one place: find the attention sites of an ATen graph, plan each, rewrite.

`optimize()` (after torch.export) and the torch.compile backend (after re-tracing Dynamo's graph to ATen) both call
`plan_and_rewrite`: two front doors, one house.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import torch

from passes.match import find_sites
from passes.rewrite import rewrite
from planner.devices import DeviceSpec, device_spec
from planner.errors import InvalidArgumentError
from planner.lengths import parse_length
from planner.plan import make_plan
from planner.records import Plan
from planner.report import Report

NO_ATTENTION_NOTE = "no softmax attention was found in the graph; the model is returned unchanged"


def plan_and_rewrite(
    graph_module: torch.fx.GraphModule,
    device: Union[str, torch.device, DeviceSpec],
    policy: str,
    max_len: Union[int, str],
    model_name: str = "GraphModule",
    *,
    train: bool = False,
    variant: Optional[str] = None,
    window: Optional[int] = None,
    sinks: int = 0,
    tolerance: Optional[Mapping[str, float]] = None,
    calibration: Any = None,
    output: Optional[Callable[[Any], torch.Tensor]] = None,
) -> Report:
    """Find every attention site in `graph_module` (an ATen graph whose nodes carry meta["val"]), plan each for
    `max_len` tokens on `device` under `policy`, and rewrite the graph in place. Returns the report; a graph with no
    attention is left untouched and its report says so.

    variant: overrides the planner's choice with this variant wherever it applies (the cost model still runs, and
    the report keeps its estimates and says that the choice was forced).
    window, sinks: a sliding window to offer where sites have none (approximate unless it covers max_len).
    tolerance, calibration, output: under policy "approximate" or "any", every approximate choice is measured on the
    calibration batches and kept only within the tolerance (planner.fidelity.calibrate_plan).
    """
    from planner.fidelity import calibrate_plan, require_calibration

    tokens = parse_length(max_len)
    spec = device_spec(device)
    require_calibration(policy, tolerance, calibration)
    sites = find_sites(graph_module)
    plan = make_plan(sites, spec, policy, tokens, train=train, window=window, sinks=sinks,
                     graph_module=graph_module)
    if variant is not None:
        plan = force_variant(plan, variant)
    fidelity = None
    if policy != "exact" and sites:
        plan, fidelity = calibrate_plan(graph_module, plan, calibration, tolerance, output=output)
    report = Report(plan=plan, model=model_name, fidelity=fidelity)
    if not sites:
        report.notes.append(NO_ATTENTION_NOTE)
        return report
    rewrite(graph_module, plan)
    return report


def force_variant(plan: Plan, variant: str) -> Plan:
    """The plan with `variant` chosen at every site where it applies under the plan's policy; other sites are left
    as they are, with the reason."""
    known = {candidate.variant for decision in plan.decisions for candidate in decision.candidates}
    if plan.decisions and variant not in known:
        raise InvalidArgumentError(f"variant={variant!r} is not a candidate under policy={plan.policy!r}; "
                                   f"candidates: {', '.join(sorted(known))}")
    decisions = []
    for decision in plan.decisions:
        forced = next((candidate for candidate in decision.candidates
                       if candidate.variant == variant and candidate.time_expr is not None), None)
        if forced is None:
            why = next((candidate.reason for candidate in decision.candidates if candidate.variant == variant), "")
            decision = dataclasses.replace(decision, choice=None,
                                           reason=f"left as it is: variant={variant!r} does not apply ({why})")
        else:
            decision = dataclasses.replace(decision, choice=forced,
                                           reason=f"forced by variant={variant!r}: {forced.reason}")
        decisions.append(decision)
    return dataclasses.replace(plan, decisions=tuple(decisions))
