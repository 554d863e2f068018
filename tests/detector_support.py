"""Shared helpers of the detector and corpus tests (no tests here): capture, find, rewrite every site with an exact
tiled variant, and compare with the original model."""
from __future__ import annotations

from typing import Any, Optional

import pytest
import torch

import planner  # noqa: F401  (imports the package so that passes.* import cleanly)
import passes.match as match_module
from backends.registry import VARIANTS, PlanContext
from passes.capture import capture
from passes.match import find_sites
from planner.pipeline import rewrite
from planner.devices import device_spec
from planner.records import AttentionSite, Candidate, Plan, SiteDecision

EXACT_VARIANTS = ("flash", "sliding_window")
FLASH_TARGET = "attention_planner.flash_attention.default"


@pytest.fixture(autouse=True)
def strict_matchers(monkeypatch):
    """In tests a matcher error fails the test instead of silently leaving the node alone."""
    monkeypatch.setattr(match_module, "STRICT", True)


def detect(model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None):
    """(captured graph module, sites)."""
    captured = capture(model, args, kwargs or {})
    return captured.graph_module, find_sites(captured.graph_module)


def exact_plan(sites: list[AttentionSite]) -> Plan:
    """Every site that an exact tiled variant takes is rewritten with it; the others are left as they are."""
    context = PlanContext(device=device_spec("cpu"), max_len=4096)
    decisions = []
    for site in sites:
        choice, reasons = None, []
        for name in EXACT_VARIANTS:
            offer = VARIANTS[name].offer(site, context)
            if offer.not_applicable is None and offer.exactness == "exact":
                choice = Candidate(name, offer.implementation, "exact", 0.0, 0.0, True, "test",
                                   parameters=offer.parameters)
                break
            reasons.append(f"{name}: {offer.not_applicable}")
        decisions.append(SiteDecision(site, (), choice, "; ".join(reasons) or "rewritten"))
    return Plan(device=context.device, policy="exact", max_len=4096, decisions=tuple(decisions))


def rewrite_exactly(model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None):
    """(rewritten graph module, sites, plan)."""
    graph_module, sites = detect(model, args, kwargs)
    plan = exact_plan(sites)
    rewrite(graph_module, plan)
    return graph_module, sites, plan


def flash_calls(graph_module: torch.fx.GraphModule) -> int:
    return sum(1 for node in graph_module.graph.nodes if str(node.target) == FLASH_TARGET)


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    if isinstance(output, dict):
        return first_tensor(next(iter(output.values())))
    raise TypeError(f"no tensor in {type(output).__name__}")


def assert_same(model: torch.nn.Module, graph_module: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None,
                rows: Optional[torch.Tensor] = None) -> None:
    """The rewritten module computes what the model computes (float32, rtol 1e-4); `rows` (batch, seq) bool selects
    the positions to compare (padded queries attend to nothing meaningful)."""
    with torch.no_grad():
        expected = first_tensor(model(*args, **(kwargs or {})))
        actual = first_tensor(graph_module(*args, **(kwargs or {})))
    assert actual.shape == expected.shape
    if rows is not None:
        expected, actual = expected[rows], actual[rows]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
