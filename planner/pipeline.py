"""The passes that every front door runs, in one place: find the attention sites of an ATen graph, plan each, rewrite.

`optimize()` (after torch.export) and the torch.compile backend (after re-tracing Dynamo's graph to ATen) both call
`plan_and_rewrite`: two front doors, one house.
"""
from __future__ import annotations

from typing import Union

import torch

from passes.match import find_sites
from passes.rewrite import rewrite
from planner.devices import DeviceSpec, device_spec
from planner.lengths import parse_length
from planner.plan import make_plan
from planner.report import Report

NO_ATTENTION_NOTE = "no softmax attention was found in the graph; the model is returned unchanged"


def plan_and_rewrite(
    graph_module: torch.fx.GraphModule,
    device: Union[str, torch.device, DeviceSpec],
    policy: str,
    max_len: Union[int, str],
    model_name: str = "GraphModule",
) -> Report:
    """Find every attention site in `graph_module` (an ATen graph whose nodes carry meta["val"]), plan each for
    `max_len` tokens on `device` under `policy`, and rewrite the graph in place. Returns the report; a graph with no
    attention is left untouched and its report says so."""
    tokens = parse_length(max_len)
    spec = device_spec(device)
    sites = find_sites(graph_module)
    plan = make_plan(sites, spec, policy, tokens)
    report = Report(plan=plan, model=model_name)
    if not sites:
        report.notes.append(NO_ATTENTION_NOTE)
        return report
    rewrite(graph_module, plan)
    return report
