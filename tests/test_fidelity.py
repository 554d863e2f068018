"""planner.fidelity on small random models: the window bound against a dense float64 oracle, the end-to-end metrics
against independent formulas, the arguments, and measure_plan's decisions (refuse, accept, NaN, unmeasured)."""
import dataclasses
import math

import pytest
import torch

import planner  # noqa: F401  (imports the package in order)
from backends import registry
from passes.capture import capture
from passes.match import find_sites
from planner.demo_model import DemoConfig, DemoLlama
from planner.devices import device_spec
from planner.errors import InvalidArgumentError
from planner.fidelity import (SampleRunner, EndToEnd, measure_plan, check_tolerance, make_candidate, percentile,
                              require_samples, sensitivity, unmeasured_reason, violations, window_bound_check)
from planner.plan import make_plan
from planner.records import AttentionSite, MaskSpec

TINY = DemoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def _site(causal: bool, heads: int, kv_heads: int, head_dim: int, scale=None) -> AttentionSite:
    mask = MaskSpec("causal", proof="test") if causal else MaskSpec()
    return AttentionSite(name="s", source="test", form="sdpa", node="n", query="q", key="k", value="v", batch=2,
                         heads=heads, kv_heads=kv_heads, q_len=1, kv_len=1, head_dim=head_dim, value_dim=head_dim,
                         scale=scale, mask=mask)


def _dense_window_oracle(q, k, v, causal, window, sinks, scale):
    """float64, independent of the tiled op: probabilities, the mass inside window+sinks, o and o_w."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    length = q.shape[2]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i) if causal else torch.ones(length, length, dtype=torch.bool)
    distance = (i - j) if causal else (i - j).abs()
    inside = allowed & ((distance < window) | (j < sinks))
    probabilities = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
    mass = (probabilities * inside).sum(-1)
    windowed = torch.softmax(scores.masked_fill(~inside, -math.inf), -1)
    return mass, probabilities @ v, windowed @ v, v.norm(dim=-1).amax(-1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,sinks", [(1, 0), (5, 0), (9, 3), (40, 2)])
def test_window_mass_and_bound_match_a_dense_oracle(causal, window, sinks):
    heads, kv_heads, length, dim = 4, 2, 37, 8
    q = torch.randn(2, heads, length, dim, dtype=torch.float64) * 1.5
    k = torch.randn(2, kv_heads, length, dim, dtype=torch.float64) * 1.5
    v = torch.randn(2, kv_heads, length, dim, dtype=torch.float64)
    site = _site(causal, heads, kv_heads, dim)
    check = window_bound_check(site, q, k, v, window, sinks)
    mass, original, windowed, value_norm = _dense_window_oracle(q, k, v, causal, window, sinks, dim ** -0.5)
    torch.testing.assert_close(check["mass"], mass, rtol=1e-9, atol=1e-12)
    error = (original - windowed).norm(dim=-1)
    torch.testing.assert_close(check["error"], error, rtol=1e-8, atol=1e-10)
    bound = 2 * (1 - mass) * value_norm[..., None]
    torch.testing.assert_close(check["bound"], bound, rtol=1e-8, atol=1e-10)
    # The bound itself, per query, on the oracle's numbers: ||o - o_w|| <= 2 (1 - m_w) max ||v||.
    assert bool((error <= bound + 1e-12).all())
    assert check["holds"]
    if window < length:
        assert float(mass.min()) < 1.0  # the window really drops mass at these sizes: the bound is exercised


def test_window_bound_is_tight_when_the_window_drops_one_far_key():
    """With one key outside the window holding a value opposite to the rest, the error approaches the bound."""
    length, dim = 6, 4
    q = torch.zeros(1, 1, length, dim, dtype=torch.float64)
    k = torch.zeros(1, 1, length, dim, dtype=torch.float64)
    q[..., -1, 0], k[..., 0, 0] = 3.0, 3.0  # the last query weighs key 0 heavily
    v = torch.ones(1, 1, length, dim, dtype=torch.float64)
    v[..., 0, :] = -1.0
    check = window_bound_check(_site(True, 1, 1, dim, scale=1.0), q, k, v, window=2, sinks=0)
    last_error, last_bound = float(check["error"][0, 0, -1]), float(check["bound"][0, 0, -1])
    assert last_error <= last_bound
    assert last_error > 0.9 * last_bound


def test_window_bound_flags_a_violation():
    """`holds` is computed, not assumed: a corrupted site output breaks it."""
    site = _site(True, 2, 2, 4)
    q, k, v = (torch.randn(1, 2, 11, 4, dtype=torch.float64) for _ in range(3))
    check = window_bound_check(site, q, k, v, window=3, sinks=0)
    assert check["holds"]
    assert not bool((check["error"] + 10.0 <= check["bound"]).all())


def test_tolerance_and_arguments_are_checked():
    assert check_tolerance({"kl_mean": 0.01, "top1": 0.99}) == {"kl_mean": 0.01, "top1": 0.99}
    for bad in (None, {}, {"kl": 0.1}, {"kl_mean": "small"}, {"top1": 1.5}, {"kl_mean": -1.0},
                {"site_rel_error": 0.1}, {"kl_mean": math.nan}):
        with pytest.raises(InvalidArgumentError):
            check_tolerance(bad)
    require_samples("exact", None, None)
    for policy in ("approximate", "any"):
        with pytest.raises(InvalidArgumentError, match="tolerance and samples"):
            require_samples(policy, None, None)
        with pytest.raises(InvalidArgumentError, match="samples"):
            require_samples(policy, {"kl_mean": 0.01}, None)
        require_samples(policy, {"kl_mean": 0.01}, [torch.zeros(1, 3, dtype=torch.long)])


def test_end_to_end_metrics_match_independent_formulas():
    reference = torch.randn(3, 17, 11)
    candidate = reference + 0.3 * torch.randn(3, 17, 11)
    runner = SampleRunner.__new__(SampleRunner)  # only the comparison: no graph needed
    runner.reference_outputs = [reference[:2], reference[2:]]
    runner.compare = ("logits", "embedding")
    runner.positions = 3 * 17
    result = runner.compare_outputs([candidate[:2], candidate[2:]])
    log_p, log_q = reference.double().log_softmax(-1), candidate.double().log_softmax(-1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).flatten()
    assert result.kl_mean == pytest.approx(float(kl.mean()), rel=1e-9)
    assert result.kl_p99 == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-9)
    assert result.kl_max == pytest.approx(float(kl.max()), rel=1e-9)
    assert result.top1 == pytest.approx(float((reference.argmax(-1) == candidate.argmax(-1)).double().mean()))
    cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1).flatten()
    assert result.cosine_mean == pytest.approx(float(cosine.mean()), rel=1e-9)
    assert result.cosine_min == pytest.approx(float(cosine.min()), rel=1e-9)
    broken = runner.compare_outputs([candidate[:2], torch.full_like(candidate[2:], math.nan)])
    assert not broken.finite and violations({"kl_mean": 10.0}, broken)
    values = torch.rand(1001)
    assert percentile(values, 0.99) == pytest.approx(float(torch.quantile(values.double(), 0.99)))


def test_verdicts_and_sensitivity():
    tolerance = {"kl_mean": 0.01, "top1": 0.99}
    good = EndToEnd(100, True, kl_mean=0.005, top1=0.995)
    bad = EndToEnd(100, True, kl_mean=0.02, top1=0.995)
    assert violations(tolerance, good) == []
    assert violations(tolerance, bad) == ["kl_mean 0.02 > 0.01"]
    assert sensitivity(tolerance, good) == pytest.approx(0.5)
    assert sensitivity(tolerance, bad) == pytest.approx(2.0)
    assert sensitivity(tolerance, EndToEnd(100, False, kl_mean=0.0, top1=1.0)) == math.inf
    window = make_candidate("sliding_window", window=64, sinks=4)
    assert "covers all 60 keys" in unmeasured_reason(window, 60)
    assert unmeasured_reason(window, 69) is None
    assert "min_seq_len=4096" in unmeasured_reason(make_candidate("hyper"), 300)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(7)
    model = DemoLlama(TINY).eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 61))
    captured = capture(model, (ids,))
    sites = find_sites(captured.graph_module)
    calibration = [torch.randint(0, TINY.vocab_size, (2, 61)), torch.randint(0, TINY.vocab_size, (1, 53))]
    return model, captured.graph_module, sites, calibration


def _window_plan(sites, window=8, sinks=2):
    plan = make_plan(sites, device_spec("h200"), "approximate", 32768, window=window, sinks=sinks)
    assert all(decision.choice.variant == "sliding_window" and decision.choice.exactness == "approximate"
               for decision in plan.decisions)
    return plan


def test_strict_tolerance_refuses_a_window_and_keeps_exact_attention(tiny_model):
    model, graph_module, sites, calibration = tiny_model
    plan = _window_plan(sites)
    new_plan, report = measure_plan(graph_module, plan, calibration, {"kl_mean": 1e-6, "top1": 0.9999})
    assert set(report.refused) == {site.name for site in sites}
    for decision in new_plan.decisions:
        assert decision.choice.exactness == "exact" and "kept exact" in decision.reason
    assert report.final.kl_mean < 1e-9 and report.final.top1 == 1.0  # the verified plan is the exact one
    windows = [trial for trial in report.trials if trial.candidate.variant == "sliding_window"]
    assert len(windows) == len(sites) and not any(trial.passed for trial in windows)
    for trial in windows:
        assert trial.site_error.bound_holds and 0 < trial.site_error.mass_kept_mean < 1
        assert trial.end_to_end.kl_mean > 1e-6
    assert "kept exact" in report.summary() and "mass kept" in report.summary()
    # The graph given is not modified by calibration.
    ids = calibration[0]
    torch.testing.assert_close(graph_module(ids), model(ids))


def test_loose_tolerance_accepts_greedily_and_verifies_the_combination(tiny_model):
    _, graph_module, sites, calibration = tiny_model
    plan = _window_plan(sites)
    tolerance = {"kl_mean": 10.0, "top1": 0.0}
    new_plan, report = measure_plan(graph_module, plan, calibration, tolerance)
    assert set(report.accepted) == {site.name for site in sites} and not report.refused
    assert [decision.choice.variant for decision in new_plan.decisions] == ["sliding_window"] * len(sites)
    # Least sensitive first, and the last step measured every accepted site together.
    alone = {trial.site: sensitivity(tolerance, trial.end_to_end) for trial in report.trials}
    assert [step.site for step in report.steps] == sorted(alone, key=alone.get)
    assert report.steps[-1].accepted_before == tuple(step.site for step in report.steps[:-1])
    assert report.final == report.steps[-1].end_to_end
    assert report.to_dict()["accepted"] and "greedy" in report.summary()


def test_a_combination_that_breaks_the_tolerance_is_refused(tiny_model):
    """Each site passes alone; the tolerance sits between the best single site and the two together."""
    _, graph_module, sites, calibration = tiny_model
    plan = _window_plan(sites, window=4, sinks=0)
    _, probe = measure_plan(graph_module, plan, calibration, {"kl_mean": 10.0})
    alone = sorted(trial.end_to_end.kl_mean for trial in probe.trials)
    both = probe.steps[-1].end_to_end.kl_mean
    assert both > alone[-1]  # errors compound here
    limit = (alone[-1] + both) / 2
    new_plan, report = measure_plan(graph_module, plan, calibration, {"kl_mean": limit})
    assert all(trial.passed for trial in report.trials)
    assert [step.passed for step in report.steps] == [True, False]
    refused = report.steps[-1].site
    assert "passed alone" in report.refused[refused]
    chosen = {decision.site.name: decision.choice for decision in new_plan.decisions}
    assert chosen[refused].exactness == "exact" and chosen[report.steps[0].site].variant == "sliding_window"
    assert report.final.kl_mean <= limit


def test_nan_and_unmeasurable_candidates_keep_exact_attention(tiny_model):
    _, graph_module, sites, calibration = tiny_model

    def emit_nan(graph, node, site, nodes, candidate=None):
        with graph.inserting_before(node):
            return graph.call_function(torch.ops.aten.mul.Tensor, (nodes[site.query], math.nan))

    plan = _window_plan(sites, window=200)  # covers the 61-token calibration: cannot be measured
    registry.register(registry.Variant("nan_test", "NaN", "backends.dense.cost", lambda site, context: None,
                                       emit_nan))
    try:
        nan = make_candidate("nan_test")
        first = plan.decisions[0]
        plan = dataclasses.replace(plan, decisions=(dataclasses.replace(first, choice=nan),) + plan.decisions[1:])
        new_plan, report = measure_plan(graph_module, plan, calibration, {"kl_mean": 100.0})
    finally:
        registry.VARIANTS.pop("nan_test", None)
    assert set(report.refused) == {site.name for site in sites}
    assert "NaN or Inf" in report.refused[sites[0].name]
    assert "unmeasured" in report.refused[sites[1].name]
    assert all(decision.choice.exactness == "exact" for decision in new_plan.decisions)


def test_exact_plan_is_verified_end_to_end(tiny_model):
    _, graph_module, sites, calibration = tiny_model
    plan = make_plan(sites, device_spec("h200"), "exact", 32768)
    new_plan, report = measure_plan(graph_module, plan, calibration, {"kl_mean": 1e-9, "top1": 1.0})
    assert new_plan.decisions == plan.decisions and not report.trials and not report.steps
    assert report.final.finite and report.final.kl_mean < 1e-9 and report.final.top1 == 1.0
    assert report.positions == 2 * 61 + 53


def _raises_at_run_time(query):
    raise RuntimeError("kernel cannot run here")


def test_a_candidate_that_raises_is_refused_not_fatal(tiny_model):
    _, graph_module, sites, calibration = tiny_model
    plan = _window_plan(sites)

    def emit_raising(graph, node, site, nodes, candidate=None):
        with graph.inserting_before(node):
            return graph.call_function(_raises_at_run_time, (nodes[site.query],))

    registry.register(registry.Variant("raise_test", "raises", "backends.dense.cost", lambda site, context: None,
                                       emit_raising))
    try:
        raising = make_candidate("raise_test")
        plan = dataclasses.replace(plan, decisions=tuple(dataclasses.replace(d, choice=raising)
                                                         for d in plan.decisions))
        new_plan, report = measure_plan(graph_module, plan, calibration[:1], {"kl_mean": 100.0})
    finally:
        registry.VARIANTS.pop("raise_test", None)
    # Each site: the raising choice is refused with its error, then the next approximate candidate (the window the
    # planner also offered) is measured and, within this loose tolerance, taken.
    raised = [trial for trial in report.trials if trial.candidate.variant == "raise_test"]
    assert len(raised) == len(sites)
    assert all(not trial.passed and "raised RuntimeError: kernel cannot run here" in trial.reason for trial in raised)
    assert [decision.choice.variant for decision in new_plan.decisions] == ["sliding_window"] * len(sites)
