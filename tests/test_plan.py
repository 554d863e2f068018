"""The planner's choices: policies, exactness of windows, implementations as candidates, the choice flipping where the
crossover says, infeasible candidates and plans with the right numbers, the whole-plan memory fit and the ring."""
from __future__ import annotations

import dataclasses
import time

import pytest
import sympy
import torch

import planner  # noqa: F401
from planner import crossovers
from planner.costs import SEQUENCE_LENGTH, evaluate
from planner.devices import BUILTIN_DEVICES, device_spec
from planner.errors import InvalidArgumentError
from planner.plan import crossover_length, decide_site, format_bytes, make_plan
from planner.records import AttentionSite, MaskSpec

S = sympy.Symbol("s0", positive=True, integer=True)
H200 = BUILTIN_DEVICES["h200"]


def site(name="layers.0.attn", *, form="sdpa", heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", mask=None,
         batch=1, softcap=None):
    return AttentionSite(name=name, source="model.py:10", form=form, node="sdpa", query="q", key="k", value="v",
                         batch=batch, heads=heads, kv_heads=kv_heads, q_len=S, kv_len=S, head_dim=head_dim,
                         value_dim=head_dim, scale=None, mask=mask or MaskSpec("causal", proof="is_causal=True"),
                         dtype=dtype, hints=(("s0", 67),), softcap=softcap)


def chosen(decision) -> str:
    return None if decision.choice is None else decision.choice.variant


def candidate(decision, variant):
    return next(candidate for candidate in decision.candidates if candidate.variant == variant)


def test_exact_policy_on_h200_picks_cudnn_over_sdpa_flash_and_says_why():
    decision = decide_site(site(), device_spec("h200"), "exact", 131072)
    assert chosen(decision) == "sdpa_cudnn"
    assert decision.rewritten
    assert "SDPA's cuDNN kernel is faster than ours" in decision.reason
    assert candidate(decision, "dense").implementation == "sdpa-flash"  # what SDPA runs by default on Hopper
    assert all(candidate.exactness == "exact" for candidate in decision.candidates if candidate.feasible)


def test_cudnn_is_not_offered_off_hopper_and_ours_wins_there():
    decision = decide_site(site(), device_spec("a100-80gb"), "exact", 32768)
    assert "Hopper" in candidate(decision, "sdpa_cudnn").reason
    assert chosen(decision) in ("dense", "flash")
    original = candidate(decision, "dense")
    assert original.implementation == "sdpa-flash" and original.feasible


def test_original_is_kept_when_it_is_the_fastest():
    spec = dataclasses.replace(H200, efficiency={**H200.efficiency, "sdpa-flash": 0.9})
    decision = decide_site(site(), spec, "exact", 65536)
    assert chosen(decision) == "dense" and not decision.rewritten
    assert decision.reason.startswith("kept: the original (sdpa-flash)")


def test_infeasible_dense_reports_the_numbers():
    eager = site(form="manual", heads=32, kv_heads=32)
    decision = decide_site(eager, device_spec("h200"), "exact", 131072)
    dense = candidate(decision, "dense")
    assert dense.implementation == "eager" and not dense.feasible
    needed = 32 * 131072 * 131072 * (4 + 2)  # fp32 softmax beside its bf16 input, per head
    assert dense.memory_bytes == needed
    assert f"131072×131072 scores of 1×32 heads" in dense.reason
    assert format_bytes(needed) == "3.0 TiB" and "need 3.0 TiB at 131,072 tokens" in dense.reason
    assert format_bytes(H200.usable_bytes) in dense.reason
    assert chosen(decision) in ("flash", "sdpa_cudnn")
    assert "the original (eager)" in decision.reason and "3.0 TiB" in decision.reason


def test_nothing_fits_leaves_the_site_and_lists_every_candidate():
    tiny = dataclasses.replace(H200, memory_bytes=2**20, reserved_bytes=0.0, name="tiny")
    decision = decide_site(site(), tiny, "exact", 131072)
    assert decision.choice is None and not decision.rewritten
    assert decision.reason.startswith("left as it is: no candidate fits")
    flash = candidate(decision, "flash")
    lse = 32 * 131072 * 4
    assert flash.memory_bytes == lse and format_bytes(lse) in flash.reason and "tiny has 1.0 MiB" in flash.reason


def test_sliding_window_mask_is_exact_and_chosen_under_exact_policy():
    window = MaskSpec("sliding_window", window=4096, tensor="mask", proof="proved")
    decision = decide_site(site(mask=window), device_spec("h200"), "exact", 131072)
    assert chosen(decision) == "sliding_window"
    assert decision.choice.exactness == "exact" and decision.choice.parameter("window") == 4096
    assert "sliding_window variant runs it" in candidate(decision, "flash").reason
    # The original (SDPA with the window as a mask tensor) computes every pair: far slower at 128k.
    assert candidate(decision, "dense").time_s > 10 * decision.choice.time_s


def test_imposed_window_is_approximate_unless_it_covers_max_len():
    causal = site()
    approximate = make_plan([causal], device_spec("h200"), "approximate", 131072, window=4096)
    assert chosen(approximate.decisions[0]) == "sliding_window"
    assert approximate.decisions[0].choice.exactness == "approximate"
    exact = make_plan([causal], device_spec("h200"), "exact", 131072, window=4096)
    offer = candidate(exact.decisions[0], "sliding_window")
    assert offer.exactness == "approximate" and not offer.feasible and "not under policy 'exact'" in offer.reason
    assert chosen(exact.decisions[0]) != "sliding_window"
    covering = make_plan([causal], device_spec("h200"), "exact", 4096, window=4096)
    assert candidate(covering.decisions[0], "sliding_window").exactness == "exact"
    no_window = make_plan([causal], device_spec("h200"), "approximate", 131072)
    assert "pass window=W" in candidate(no_window.decisions[0], "sliding_window").reason


def test_retrain_variants_need_policy_any_and_train():
    causal = site()
    for policy, train in [("exact", True), ("approximate", True), ("any", False)]:
        plan = make_plan([causal], device_spec("h200"), policy, 131072, train=train)
        assert chosen(plan.decisions[0]) not in ("linear", "ssd")
    plan = make_plan([causal], device_spec("h200"), "any", 1 << 20, train=True)
    linear = candidate(plan.decisions[0], "linear")
    assert linear.exactness == "retrain" and linear.feasible and linear.time_s is not None
    assert chosen(plan.decisions[0]) in ("linear", "ssd", "hyper")
    assert any("train=True" in note for note in make_plan([causal], H200, "any", 4096).notes)


def test_exact_policy_never_chooses_an_approximation():
    sites = [site(f"layers.{index}.attn") for index in range(3)] + [site("enc", mask=MaskSpec("none"))]
    plan = make_plan(sites, device_spec("h200"), "exact", 1 << 20, window=1024)
    assert all(decision.choice.exactness == "exact" for decision in plan.decisions)


def test_sites_get_different_choices():
    local = site("layers.0.attn", mask=MaskSpec("sliding_window", window=4096, proof="proved"))
    global_ = site("layers.1.attn")
    plan = make_plan([local, global_], device_spec("h200"), "exact", 131072)
    assert [chosen(decision) for decision in plan.decisions] == ["sliding_window", "sdpa_cudnn"]


@pytest.mark.parametrize("policy, window, faster, slower", [("approximate", 4096, "sliding_window", "sdpa_cudnn"),
                                                            ("approximate", None, "hyper", "sdpa_cudnn")])
def test_choice_flips_where_the_crossover_says(policy, window, faster, slower):
    spec = device_spec("h200")
    probe = make_plan([site()], spec, policy, 1 << 20, window=window).decisions[0]
    crossing = next(crossover for crossover in probe.crossovers if crossover.faster == faster)
    assert crossing.slower == slower
    length = crossing.sequence_length
    before = make_plan([site()], spec, policy, length - 1, window=window).decisions[0]
    after = make_plan([site()], spec, policy, length, window=window).decisions[0]
    assert chosen(before) == slower and chosen(after) == faster
    # The envelope agrees: `faster` is the cheapest from `length` on.
    assert (length, faster) in probe.envelope


def test_symbolic_crossover_equals_bisection(monkeypatch):
    decision = make_plan([site()], device_spec("h200"), "approximate", 1 << 20, window=4096).decisions[0]
    window, cudnn = candidate(decision, "sliding_window"), candidate(decision, "sdpa_cudnn")
    solved = crossover_length(window, cudnn, 1024, 65536)
    assert crossovers._solve_exactly(window.time_expr, cudnn.time_expr, 1024, 65536)  # the sympy path ran
    monkeypatch.setattr(crossovers, "_solve_exactly", lambda *arguments: [])
    assert crossover_length(window, cudnn, 1024, 65536) == solved
    at = {SEQUENCE_LENGTH: solved}
    assert evaluate(window.time_expr, solved) < evaluate(cudnn.time_expr, solved)
    assert evaluate(window.time_expr, solved - 1) >= evaluate(cudnn.time_expr, solved - 1), at


def test_identical_sites_share_one_decision_and_keep_their_names():
    sites = [site(f"model.layers.{index}.self_attn") for index in range(80)]
    start = time.perf_counter()
    plan = make_plan(sites, device_spec("h200"), "exact", 131072)
    assert time.perf_counter() - start < 5
    assert [decision.site.name for decision in plan.decisions] == [s.name for s in sites]
    assert len({id(decision.choice) for decision in plan.decisions}) == 1


def test_invalid_arguments_are_refused():
    with pytest.raises(InvalidArgumentError, match="accepted: exact, approximate, any"):
        make_plan([site()], H200, "fast", 4096)
    with pytest.raises(InvalidArgumentError, match="window"):
        make_plan([site()], H200, "approximate", 4096, window=0)


# ----------------------------------------------------------------------------------------------------- whole plan


class TinyAttention(torch.nn.Module):
    def __init__(self, hidden=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, length, hidden))


@pytest.fixture(scope="module")
def tiny_capture():
    from passes.capture import capture
    from passes.match import find_sites

    model = TinyAttention().eval()
    captured = capture(model, (torch.randn(2, 67, 64),), {})
    return model, captured.graph_module, find_sites(captured.graph_module)


def test_memory_fit_counts_weights_and_activations(tiny_capture):
    model, graph_module, sites = tiny_capture
    plan = make_plan(sites, device_spec("h200"), "exact", 8192, graph_module=graph_module)
    memory = plan.memory
    weights = sum(parameter.numel() * 4 for parameter in model.parameters())
    assert memory.weights == weights and memory.fits
    # Live at the peak: at least the input and the qkv projection (B × L × 3·hidden fp32).
    assert memory.activations >= 2 * 8192 * (64 + 3 * 64) * 4
    assert memory.activations < 2 * 8192 * 64 * 4 * 20
    assert memory.total == pytest.approx(memory.weights + memory.activations + memory.attention)
    assert "fits on one device" in memory.verdict


def test_plan_that_does_not_fit_says_how_many_ring_devices(tiny_capture):
    _, graph_module, sites = tiny_capture
    length = 1 << 20
    full = make_plan(sites, device_spec("h200"), "exact", length, graph_module=graph_module)
    needed = full.memory.total
    small = dataclasses.replace(H200, memory_bytes=needed * 0.6, reserved_bytes=0.0, name="small")
    plan = make_plan(sites, small, "exact", length, graph_module=graph_module)
    memory = plan.memory
    assert not memory.fits and memory.ring_devices is not None and memory.ring_devices >= 2
    assert f"a ring of {memory.ring_devices} devices fits" in memory.verdict
    assert format_bytes(memory.total) in memory.verdict
    ring = make_plan(sites, small, "exact", length, memory.ring_devices, graph_module=graph_module)
    assert ring.memory.fits
    assert chosen(ring.decisions[0]) == "ring"
    assert "every site runs ring attention" in candidate(ring.decisions[0], "flash").reason
    if memory.ring_devices > 2:
        fewer = make_plan(sites, small, "exact", length, memory.ring_devices - 1, graph_module=graph_module)
        assert not fewer.memory.fits


def test_weights_larger_than_the_device_mean_no_plan(tiny_capture):
    _, graph_module, sites = tiny_capture
    plan = make_plan(sites, device_spec("h200"), "exact", 4096, graph_module=graph_module, weights_bytes=200e9)
    assert not plan.memory.fits and plan.memory.ring_devices is None
    assert plan.memory.verdict.startswith("no plan fits: the weights alone need 186.3 GiB")


@pytest.mark.parametrize("variant, exact", [("sdpa_cudnn", True), ("flash", True), ("sliding_window", False),
                                            ("hyper", True), ("linear", False), ("ssd", False)])
def test_every_variant_emits_a_call_that_runs(tiny_capture, variant, exact):
    """Each variant's emitted call replaces the site in the graph and runs on the CPU; exact ones (and HyperAttention,
    exact below its min_seq_len) reproduce the original; a window of 16 on 67 tokens changes the output."""
    import copy

    from backends.registry import emit

    model, graph_module, sites = tiny_capture
    plan = make_plan(sites, device_spec("h200"), "any", 67, train=True, window=16)
    decision = dataclasses.replace(plan.decisions[0], choice=candidate(plan.decisions[0], variant))
    rewritten = copy.deepcopy(graph_module)
    nodes = {node.name: node for node in rewritten.graph.nodes}
    node = nodes[decision.site.node]
    replacement = emit(rewritten.graph, node, decision, nodes)
    node.replace_all_uses_with(replacement)
    rewritten.graph.erase_node(node)
    rewritten.graph.eliminate_dead_code()
    rewritten.recompile()
    x = torch.randn(2, 67, 64)
    with torch.no_grad():
        expected, got = model(x), rewritten(x)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    difference = (got - expected).abs().max().item()
    assert (difference < 1e-4) == exact, difference


def test_training_counts_every_intermediate_and_the_saved_attention(tiny_capture):
    _, graph_module, sites = tiny_capture
    inference = make_plan(sites, device_spec("h200"), "exact", 8192, graph_module=graph_module).memory
    training = make_plan(sites, device_spec("h200"), "exact", 8192, graph_module=graph_module, train=True,
                         layer_repeat=4).memory
    assert training.weights == inference.weights
    assert training.activations > 4 * inference.activations  # all intermediates, for 4 layers
    assert training.attention > inference.attention  # plus each site's saved lse
    assert "every intermediate" in training.method and "scaled by 4" in training.method


def test_sdpa_preferring_cudnn_takes_grouped_heads_without_repeating_them():
    """The sdpa_cudnn rewrite hands grouped k/v to SDPA with enable_gqa: same result as repeating them."""
    from backends.dense.rule import sdpa_preferring_cudnn

    q = torch.randn(2, 8, 33, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 33, 16, dtype=torch.float64) for _ in range(2))
    repeated = [t.repeat_interleave(4, dim=1) for t in (k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(q, *repeated, is_causal=True, scale=0.3)
    torch.testing.assert_close(sdpa_preferring_cudnn(q, k, v, True, 0.3), expected, rtol=1e-12, atol=1e-12)
