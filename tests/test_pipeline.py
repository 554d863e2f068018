"""planner/pipeline.py: every front door validates its arguments once, into one PlanOptions value, and the passes
below it never parse a length or resolve a device again."""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import planner
from backends import devices
from planner import lengths
from planner.demo_model import DemoConfig, DemoLlama
from planner.errors import InvalidArgumentError
from planner.pipeline import PlanOptions, plan_report, plan_sites, unchanged_report


@pytest.fixture
def calls(monkeypatch):
    """How often parse_length and device_spec are called, under whatever name a module imported them."""
    counted: Counter = Counter()
    for original in (lengths.parse_length, devices.device_spec):
        def counting(*args, _original=original, **kwargs):
            counted[_original.__name__] += 1
            return _original(*args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, original.__name__, None) is original:
                monkeypatch.setattr(module, original.__name__, counting)
    return counted


def demo_model():
    torch.manual_seed(1)
    return DemoLlama(DemoConfig(num_layers=2, attention="sdpa")).eval()


def test_optimize_parses_max_len_and_resolves_the_device_once(calls):
    optimized = planner.optimize(demo_model(), max_len="32k", device="h200")
    assert optimized.report.plan.max_len == 32 * 1024
    assert calls == Counter(parse_length=1, device_spec=1)


def test_the_cli_validates_once(calls, capsys):
    from planner.cli import main

    assert main(["plan", "test_cli:tiny_model", "--max-len", "64k", "--window", "4k", "--device", "h100",
                 "--quiet"]) == 0
    assert "max_len=64k" in capsys.readouterr().out
    assert calls == Counter(parse_length=2, device_spec=1)  # --max-len and --window, once each


def test_the_compile_backend_validates_when_it_is_made(calls):
    backend = planner.backend(max_len="4k", device="h200")
    assert calls == Counter(parse_length=1, device_spec=1)

    class Attention(torch.nn.Module):
        def forward(self, query):
            return torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True)

    compiled = torch.compile(Attention(), backend=backend)
    compiled(torch.randn(1, 2, 16, 8))
    assert calls == Counter(parse_length=1, device_spec=1)  # no graph parses or resolves anything again
    assert backend.report.plan.max_len == 4096


def test_arguments_are_refused_at_the_door_before_any_capture():
    class Uncapturable(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("captured before the arguments were checked")

    for arguments, message in ((dict(window=0), "window=0"), (dict(sinks=-1), "sinks=-1"),
                               (dict(layout="striped"), "zigzag, contiguous"), (dict(policy="fast"), "accepted")):
        with pytest.raises(InvalidArgumentError, match=message):
            planner.optimize(Uncapturable(), "4k", device="cpu", example_inputs=(torch.zeros(1),), **arguments)


def test_one_planning_step_and_its_reports():
    from passes.capture import capture

    options = PlanOptions.create("8k", "h200", window="1k", rewrites=False, policy="approximate")
    assert (options.max_len, options.window, options.device.name) == (8192, 1024, planner.device_spec("h200").name)
    captured = capture(demo_model(), (torch.randint(0, 256, (1, 67)),))
    sites, plan = plan_sites(captured.graph_module, options)
    assert len(sites) == len(plan.decisions) == 2 and plan.max_len == 8192
    assert plan_report(plan, "demo").notes == []
    empty = plan_report(plan_sites(None, options, [])[1], "demo", no_attention="nothing here")
    assert empty.notes == ["nothing here"]
    unchanged = unchanged_report(options, "demo", "not captured")
    assert (unchanged.plan.max_len, unchanged.plan.decisions, unchanged.notes) == (8192, (), ["not captured"])
