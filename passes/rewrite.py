"""Rewrite: replace each site that the plan rewrites with the call its variant emits."""
from __future__ import annotations

import torch

from backends.registry import VARIANTS
from planner.records import Plan


def rewrite(graph_module: torch.fx.GraphModule, plan: Plan) -> list[str]:
    """Rewrite `graph_module` in place following `plan`; return the names of the rewritten sites."""
    nodes = {node.name: node for node in graph_module.graph.nodes}
    rewritten = []
    for decision in plan.decisions:
        if not decision.rewritten:
            continue
        site = decision.site
        node = nodes[site.node]
        replacement = VARIANTS[decision.choice.variant].emit(graph_module.graph, node, site, nodes)
        for key in ("val", "stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in node.meta:
                replacement.meta[key] = node.meta[key]
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
        rewritten.append(site.name)
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    return rewritten
