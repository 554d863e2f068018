"""The passes that every front door runs, in one place: find the attention sites of an ATen graph, plan each, rewrite.

`optimize()` (after torch.export) and the torch.compile backend (after re-tracing Dynamo's graph to ATen) both call
`run_passes` with one PlanOptions value, validated at the door.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch

from backends.devices import DeviceSpec, device_spec
from backends.registry import VARIANTS
from passes.errors import InvalidArgumentError
from passes.match import find_sites
from passes.records import POLICIES, Plan
from passes.rewrite import rewrite_sites
from planner.fidelity import measure_plan, require_samples
from planner.lengths import parse_length
from planner.plan import make_plan
from planner.report import Report

NO_ATTENTION_NOTE = "no softmax attention was found in the graph; the model is returned unchanged"


def example_tuple(example_inputs: Any) -> Optional[tuple]:
    """Example inputs as capture takes them: None, a tuple, a list, or one input."""
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


@dataclass(frozen=True)
class PlanOptions:
    """Everything a front door passes to the passes, validated once, at the door (PlanOptions.create).

    max_len: tokens to plan for. device: the DeviceSpec to plan for. policy: "exact", "approximate" or "any".
    train: plan for training. variant: force this variant wherever it applies. window, sinks: a sliding window to
    offer where sites have none. tolerance, calibration, output: how approximate choices are measured (calibration:
    the sample batches, optimize's `samples=`, not a device's timing; given in the graph's own calling convention
    by the time they reach the passes).
    """

    max_len: int
    device: DeviceSpec
    policy: str = "exact"
    train: bool = False
    variant: Optional[str] = None
    window: Optional[int] = None
    sinks: int = 0
    tolerance: Optional[Mapping[str, float]] = None
    calibration: Any = None
    output: Optional[Callable[[Any], torch.Tensor]] = None

    @classmethod
    def create(cls, max_len: Union[int, str], device: Union[str, torch.device, DeviceSpec], policy: str = "exact",
               **options: Any) -> "PlanOptions":
        """Parse and check every argument (raising InvalidArgumentError/UnknownDeviceError at once, before any slow
        capture)."""
        if policy not in POLICIES:
            raise InvalidArgumentError(f"policy={policy!r} is not a policy; accepted: {', '.join(POLICIES)}")
        require_samples(policy, options.get("tolerance"), options.get("calibration"))
        return cls(max_len=parse_length(max_len), device=device_spec(device), policy=policy, **options)


def run_passes(graph_module: torch.fx.GraphModule, options: PlanOptions, model_name: str = "GraphModule") -> Report:
    """Find every attention site in `graph_module` (an ATen graph whose nodes carry meta["val"]), plan each under
    `options`, and rewrite the graph in place. Returns the report; a graph with no attention is left untouched and
    its report says so.

    options.variant overrides the planner's choice wherever it applies (the cost model still runs, and the report
    keeps its estimates and says that the choice was forced). Under policy "approximate" or "any", every
    approximate choice is measured on options.calibration and kept only within options.tolerance
    (planner.fidelity.measure_plan).
    """
    sites = find_sites(graph_module)
    plan = make_plan(sites, options.device, options.policy, options.max_len, train=options.train,
                     window=options.window, sinks=options.sinks, graph_module=graph_module)
    if options.variant is not None:
        plan = force_variant(plan, options.variant)
    fidelity = None
    if options.policy != "exact" and sites:
        plan, fidelity = measure_plan(graph_module, plan, options.calibration, options.tolerance,
                                        output=options.output)
    report = Report(plan=plan, model=model_name, fidelity=fidelity)
    if not sites:
        report.notes.append(NO_ATTENTION_NOTE)
        return report
    rewrite(graph_module, plan)
    return report


def rewrite(graph_module: torch.fx.GraphModule, plan: Plan) -> list[str]:
    """Rewrite `graph_module` in place following `plan`, with the registered variants; return the rewritten sites."""
    return rewrite_sites(graph_module, plan, VARIANTS)


def plan_and_rewrite(
    graph_module: torch.fx.GraphModule,
    device: Union[str, torch.device, DeviceSpec],
    policy: str,
    max_len: Union[int, str],
    model_name: str = "GraphModule",
    **options: Any,
) -> Report:
    """run_passes with its options given as arguments (see PlanOptions for their meaning)."""
    return run_passes(graph_module, PlanOptions.create(max_len, device, policy, **options), model_name)


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
