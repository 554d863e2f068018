"""The passes that every front door runs, in one place: find the attention sites of an ATen graph, plan each, rewrite.

Every front door validates its arguments once, into one PlanOptions value (PlanOptions.create), and hands that value
down; nothing below the door parses a length or resolves a device again.

    optimize() (after torch.export), the torch.compile backend (after re-tracing Dynamo's graph to ATen):
        run_passes      = plan_sites -> measure_plan (approximate policies) -> plan_report -> rewrite
    optimize(world_size=P) (planner/distributed.py):
        plan_sites -> every site ring attention -> the partition pass
    the CLI's presets and 'package.module:function' models (planner/presets.py):
        plan_sites (sites of representative layers, replicated) -> plan_report
    find_attention, the partition, linearize (which distils the sites instead of planning them):
        capture_sites (torch.export, then the sites of the graph)
    a model that is not planned (capture failed, the compile backend fell back): unchanged_report
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch

from backends.devices import DeviceSpec, device_spec
from backends.registry import VARIANTS
from backends.ring.layout import LAYOUTS
from passes.capture import Capture, capture
from passes.errors import InvalidArgumentError
from passes.match import find_sites
from passes.records import AttentionSite, Plan, check_policy
from passes.rewrite import rewrite_sites
from planner.fidelity import measure_plan, require_samples
from planner.lengths import parse_length
from planner.plan import check_plan_sizes, plan_checked
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
    by the time they reach the passes). world_size: devices the sequence is sharded over (ring attention is a
    candidate when > 1; optimize shards the inputs). layout: how a sharded sequence is split ("zigzag" or
    "contiguous").
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
    world_size: int = 1
    layout: str = "zigzag"

    @classmethod
    def create(cls, max_len: Union[int, str], device: Union[str, torch.device, DeviceSpec], policy: str = "exact",
               *, rewrites: bool = True, names: Optional[Mapping[str, str]] = None, **options: Any) -> "PlanOptions":
        """Parse and check every argument (raising InvalidArgumentError/UnknownDeviceError at once, before any slow
        capture). max_len, and a window given as a string, may be "32k", "128k", "1M".

        rewrites: the door rewrites the model, so a policy that admits approximations needs tolerance and samples
        (nothing approximate is used unmeasured); a door that only plans (the CLI) shows approximate choices as
        estimates and needs neither. names: what the door calls max_len and window in its messages (the CLI:
        {"max_len": "--max-len", "window": "--window"})."""
        names = names or {}
        check_policy(policy)
        if rewrites:
            require_samples(policy, options.get("tolerance"), options.get("calibration"))
        layout = options.get("layout", "zigzag")
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"layout={layout!r} is not a ring layout; accepted: {', '.join(LAYOUTS)}")
        tokens = parse_length(max_len, name=names.get("max_len", "max_len"))
        if isinstance(options.get("window"), str):
            options["window"] = parse_length(options["window"], name=names.get("window", "window"))
        check_plan_sizes(tokens, options.get("world_size", 1), options.get("window"), options.get("sinks", 0))
        return cls(max_len=tokens, device=device_spec(device), policy=policy, **options)


def capture_sites(model: Any, example_inputs: Any = None,
                  example_kwargs: Optional[dict] = None) -> tuple[Capture, list[AttentionSite]]:
    """Capture `model` (an nn.Module, a GraphModule or an ExportedProgram) with torch.export and find the attention
    sites of its graph. example_inputs: a tuple, a list or one input (see example_tuple)."""
    captured = capture(model, example_tuple(example_inputs), example_kwargs)
    return captured, find_sites(captured.graph_module)


def run_passes(graph_module: torch.fx.GraphModule, options: PlanOptions, model_name: str = "GraphModule") -> Report:
    """Find every attention site in `graph_module` (an ATen graph whose nodes carry meta["val"]), plan each under
    `options`, and rewrite the graph in place. Returns the report; a graph with no attention is left untouched and
    its report says so.

    options.variant overrides the planner's choice wherever it applies (the cost model still runs, and the report
    keeps its estimates and says that the choice was forced). Under policy "approximate" or "any", every
    approximate choice is measured on options.calibration and kept only within options.tolerance
    (planner.fidelity.measure_plan).
    """
    sites, plan = plan_sites(graph_module, options)
    fidelity = None
    if options.policy != "exact" and sites:
        plan, fidelity = measure_plan(graph_module, plan, options.calibration, options.tolerance,
                                        output=options.output)
    report = plan_report(plan, model_name, fidelity=fidelity)
    if sites:
        rewrite(graph_module, plan)
    return report


def plan_sites(graph_module: Optional[torch.fx.GraphModule], options: PlanOptions,
               sites: Optional[list[AttentionSite]] = None, **extra: Any) -> tuple[list[AttentionSite], Plan]:
    """The attention sites of `graph_module` (or `sites`, when the caller has them: the presets replicate their
    representative layers' sites) and their plan under `options`, with options.variant forced where it applies.

    extra: what only some doors know, passed on to planner.plan.plan_checked (weights_bytes, layer_repeat,
    progress). The options were checked at the door (PlanOptions.create), so nothing is checked again here.
    """
    if sites is None:
        sites = find_sites(graph_module)
    plan = plan_checked(sites, options.device, options.policy, options.max_len, options.world_size,
                        train=options.train, window=options.window, sinks=options.sinks, graph_module=graph_module,
                        **extra)
    if options.variant is not None:
        plan = force_variant(plan, options.variant)
    return sites, plan


def plan_report(plan: Plan, model_name: str, *, fidelity: Any = None, no_attention: str = NO_ATTENTION_NOTE) -> Report:
    """The report of `plan`; a plan without sites says so with `no_attention`."""
    report = Report(plan=plan, model=model_name, fidelity=fidelity)
    if not plan.decisions:
        report.notes.append(no_attention)
    return report


def unchanged_report(options: PlanOptions, model_name: str, note: Optional[str] = None) -> Report:
    """The report of a model or graph that was not planned (nothing captured, or the planning failed): no sites, the
    options it would have been planned under, and `note` saying why."""
    report = Report(plan=Plan(device=options.device, policy=options.policy, max_len=options.max_len, decisions=()),
                    model=model_name)
    if note is not None:
        report.notes.append(note)
    return report


def rewrite(graph_module: torch.fx.GraphModule, plan: Plan) -> list[str]:
    """Rewrite `graph_module` in place following `plan`, with the registered variants; return the rewritten sites."""
    return rewrite_sites(graph_module, plan, VARIANTS)


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
