"""The cost model against counts made independently: FLOPs counted by torch's FlopCounterMode and by hand, visible
pairs counted from the reference mask, memory measured with torch.profiler's allocation events, and the roofline and
calibration arithmetic."""
from __future__ import annotations

import math

import pytest
import sympy
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import planner  # noqa: F401  (imports the package first: passes <-> planner import order)
from backends.dense import cost as dense_cost
from backends.flash import cost as flash_cost
from backends.flash.blockwise import blockwise_attention_forward
from backends.flash.options import AttentionOptions
from backends.flash.naive import visible_keys
from backends.hyper import cost as hyper_cost
from backends.linear import cost as linear_cost
from backends.ring import cost as ring_cost
from backends.sliding_window import cost as window_cost
from backends.mamba2 import cost as ssd_cost
from planner.calibration import builtin_calibration, kernel_efficiency, reference_shape
from planner.costs import SEQUENCE_LENGTH as L
from planner.costs import CostShape, Costs, evaluate, time_expression, visible_pairs
from planner.devices import BUILTIN_DEVICES, device_spec


def shape(implementation="", *, batch=2, heads=4, kv_heads=4, head_dim=32, value_dim=32, dtype="float32",
          causal=False, window=None, sinks=0, world_size=1, mask_tensor=False, options=()):
    return CostShape(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim, q_len=L,
                     kv_len=L, dtype=dtype, causal=causal, window=window, world_size=world_size,
                     implementation=implementation, mask_tensor=mask_tensor, sinks=sinks, options=options)


def peak_allocated(function) -> tuple[object, int]:
    """(result, peak bytes that torch allocated during the call above what was live before), from the profiler's
    memory events (every CPU allocation and free, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = function()
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return result, peak


def eager_attention(q, k, v, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    probabilities = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probabilities @ v


# ----------------------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("length, head_dim, value_dim", [(37, 16, 16), (101, 32, 24)])
def test_dense_flops_match_flop_counter_and_hand_count(length, head_dim, value_dim):
    batch, heads = 2, 3
    q = torch.randn(batch, heads, length, head_dim)
    k = torch.randn(batch, heads, length, head_dim)
    v = torch.randn(batch, heads, length, value_dim)
    with FlopCounterMode(display=False) as counter:
        eager_attention(q, k, v, 0.1)
    by_hand = 2 * batch * heads * length * length * head_dim + 2 * batch * heads * length * length * value_dim
    costs = dense_cost.costs(shape("eager", batch=batch, heads=heads, kv_heads=heads, head_dim=head_dim,
                                   value_dim=value_dim))
    assert counter.get_total_flops() == by_hand
    assert evaluate(costs.flops, length) == by_hand


@pytest.mark.parametrize("causal, window, sinks", [(True, None, 0), (False, None, 0), (True, 7, 0), (False, 5, 0),
                                                    (True, 6, 2)])
@pytest.mark.parametrize("length", [1, 5, 23, 64])
def test_visible_pairs_equal_the_reference_mask_count(causal, window, sinks, length):
    positions = torch.arange(length)
    counted = int(visible_keys(positions, positions, causal=causal, window=window, sinks=sinks).sum())
    assert evaluate(visible_pairs(L, L, causal, window, sinks), length) == counted


def test_tiled_flops_count_visible_pairs_only():
    length, heads, head_dim = 97, 4, 32
    positions = torch.arange(length)
    causal_pairs = int(visible_keys(positions, positions, causal=True, window=None, sinks=0).sum())
    window_pairs = int(visible_keys(positions, positions, causal=True, window=16, sinks=0).sum())
    flash = flash_cost.costs(shape("triton", batch=1, heads=heads, causal=True))
    window = window_cost.costs(shape("triton", batch=1, heads=heads, causal=True, window=16))
    assert evaluate(flash.flops, length) == 2 * heads * causal_pairs * 2 * head_dim
    assert evaluate(window.flops, length) == 2 * heads * window_pairs * 2 * head_dim
    # head dim 32: the efficiency keys for small head dims (which fall back to the plain ones)
    assert window.work == "sliding_window@d64" and flash.work == "flash@d64"
    # A fused SDPA kernel skips causal blocks too; with a mask tensor it computes every pair and reads the mask.
    fused = dense_cost.costs(shape("sdpa-flash", batch=1, heads=heads, causal=True))
    masked = dense_cost.costs(shape("sdpa-efficient", batch=1, heads=heads, causal=False, mask_tensor=True))
    assert evaluate(fused.flops, length) == evaluate(flash.flops, length)
    assert evaluate(masked.flops, length) == 2 * heads * length * length * 2 * head_dim
    assert evaluate(masked.bytes, length) - evaluate(fused.bytes, length) == heads * length * length * 1


def test_ring_costs_split_the_work_and_send_one_shard_per_step():
    length, world = 4096, 4
    ring = ring_cost.costs(shape("triton", batch=1, heads=8, kv_heads=2, head_dim=64, value_dim=64,
                                 dtype="bfloat16", causal=True, world_size=world))
    flash = flash_cost.costs(shape("triton", batch=1, heads=8, kv_heads=2, head_dim=64, value_dim=64,
                                   dtype="bfloat16", causal=True))
    shard = 1 * 2 * (length // world) * (64 + 64) * 2  # K and V of the kv heads, bf16
    assert evaluate(ring.comm_bytes, length) == shard
    assert evaluate(ring.comm_steps, length) == world - 1
    assert math.isclose(world * evaluate(ring.flops, length), evaluate(flash.flops, length))
    windowed = ring_cost.costs(shape("triton", batch=1, heads=8, kv_heads=2, causal=True, window=512,
                                     world_size=8, head_dim=64, value_dim=64))
    assert evaluate(windowed.comm_steps, 8192) == 1 + 1  # a 512 window reaches one shard of 1024 back


def test_subquadratic_costs_by_hand():
    length, heads, dim = 8192, 2, 64
    linear = linear_cost.costs(shape("triton", batch=1, heads=heads, head_dim=dim, value_dim=dim, causal=True))
    chunk = linear_cost.CHUNK_SIZE
    assert evaluate(linear.flops, length) == heads * (2 * length * chunk * 2 * dim + 4 * length * dim * dim)
    assert evaluate(linear.memory, length) == heads * (length // chunk) * dim * dim * 4 + heads * dim * dim * 4
    ssd = ssd_cost.costs(shape("triton", batch=1, heads=heads, head_dim=dim, value_dim=dim, causal=True))
    assert evaluate(ssd.flops, length) == heads * (2 * length * 256 * 2 * dim + 4 * length * dim * dim)
    hyper = hyper_cost.costs(shape("triton", batch=1, heads=heads, head_dim=dim, value_dim=dim, causal=False))
    pairs = length * (256 + 256)
    projections = 2 * 2 * length * dim * 7
    assert evaluate(hyper.flops, length) == heads * (2 * pairs * 2 * dim + projections)
    # Below min_seq_len HyperAttention is exact attention: L² pairs, no hashing.
    assert evaluate(hyper.flops, 2048) == heads * 2 * 2048 * 2048 * 2 * dim
    causal = hyper_cost.costs(shape("triton", batch=1, heads=heads, head_dim=dim, value_dim=dim, causal=True))
    levels = math.log2(length / 4096)
    expected_pairs = levels * length / 2 * 512 + length * 4096 / 2
    assert math.isclose(evaluate(causal.flops, length),
                        heads * (2 * expected_pairs * 2 * dim + levels * projections), rel_tol=1e-9)


# ----------------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("length", [1100, 2100])
@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_memory_matches_measurement(length, masked):
    """The blockwise loop's extra memory (beyond its output), measured allocation by allocation, against the cost
    model: within 15%, and flat in L except for the lse."""
    batch, heads, kv_heads, dim = 1, 4, 2, 64
    q = torch.randn(batch, heads, length, dim)
    k = torch.randn(batch, kv_heads, length, dim)
    v = torch.randn(batch, kv_heads, length, dim)
    mask = torch.randn(length, length) if masked else None
    options = AttentionOptions(causal=True, scale=0.125, attn_mask=mask)
    (out, _), peak = peak_allocated(lambda: blockwise_attention_forward(q, k, v, options))
    measured = peak - out.numel() * out.element_size()
    implementation = "blockwise" if masked else "blockwise-sdpa"
    modeled = evaluate(flash_cost.costs(shape(implementation, batch=batch, heads=heads, kv_heads=kv_heads,
                                              head_dim=dim, value_dim=dim, causal=True,
                                              mask_tensor=masked)).memory, length)
    assert 0.85 < measured / modeled < 1.15, (measured, modeled)


def test_eager_memory_matches_measurement():
    batch, heads, length, dim = 1, 4, 700, 32
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.bfloat16) for _ in range(3))
    out, peak = peak_allocated(lambda: eager_attention(q, k, v, 0.1))
    measured = peak - out.numel() * out.element_size()
    modeled = evaluate(dense_cost.costs(shape("eager", batch=batch, heads=heads, head_dim=dim, value_dim=dim,
                                              dtype="bfloat16")).memory, length)
    # Measured: the bf16 scores, then softmax's fp32 output beside its fp32 input copy; modeled: fp32 + bf16 live.
    assert 0.75 < measured / modeled < 1.8, (measured, modeled)
    assert measured > heads * length * length * 4  # quadratic, as modeled


# ----------------------------------------------------------------------------------------------------- roofline


def test_roofline_takes_the_larger_term_plus_launches():
    device = BUILTIN_DEVICES["a100-80gb"]
    costs = Costs(flops=1e12 * L, bytes=1e9 * L, memory=0, work="matmul", launches=3)
    time = time_expression(costs, device, "bfloat16")
    compute = 1e12 / (312e12 * device.efficiency_of("matmul"))
    memory = 1e9 / (2.039e12 * device.efficiency_of("memory"))
    assert math.isclose(evaluate(time, 1), max(compute, memory) + 3 * device.launch_overhead_s)
    ring = Costs(flops=0, bytes=0, memory=0, comm_bytes=1e9, comm_steps=3, launches=0)
    expected = 3e9 / (device.interconnect_bandwidth * device.efficiency_of("interconnect"))
    assert math.isclose(evaluate(time_expression(ring, device, "bfloat16"), 1), expected)


def test_calibrated_efficiency_reproduces_the_measured_time():
    device = BUILTIN_DEVICES["h100"]
    costs = flash_cost.costs(reference_shape(32768, "triton"))
    efficiency = kernel_efficiency(device, costs, 32768, 0.02, "bfloat16")
    calibrated = type(device)(**{**device.__dict__, "efficiency": {**device.efficiency, "flash": efficiency}})
    assert math.isclose(evaluate(time_expression(costs, calibrated, "bfloat16"), 32768), 0.02, rel_tol=1e-6)


@pytest.mark.parametrize("module, implementation, window, length, measured", [
    (dense_cost, "sdpa-cudnn", None, 32768, 14.6e-3), (dense_cost, "sdpa-cudnn", None, 131072, 256e-3),
    (dense_cost, "sdpa-flash", None, 32768, 25.54e-3), (flash_cost, "triton", None, 32768, 17.41e-3),
    (window_cost, "triton", 4096, 32768, 4.56e-3), (window_cost, "triton", 4096, 131072, 20.26e-3),
    (linear_cost, "triton", None, 131072, 3.01e-3), (ssd_cost, "triton", None, 131072, 2.92e-3),
    (hyper_cost, "triton", None, 131072, 39.49e-3)])
def test_builtin_h200_measurements_reproduce_measured_times(module, implementation, window, length, measured):
    """Times measured on the H200 (B=1, H=32, D=128, bf16, causal; benchmarks/RESULTS.md): the planner's estimate
    within 15%."""
    spec = device_spec("h200")
    assert "measured on an H200" in spec.source
    costs = module.costs(reference_shape(length, implementation, window=window))
    estimate = evaluate(time_expression(costs, spec, "bfloat16"), length)
    assert 0.85 < estimate / measured < 1.15
    assert math.isclose(spec.efficiency_of("matmul"), 788 / 989, rel_tol=1e-3)


def test_calibrate_cpu_saves_and_is_applied(tmp_path, monkeypatch):
    from planner import calibration

    monkeypatch.setenv("ATTENTION_PLANNER_CACHE", str(tmp_path))
    probe = [probe for probe in calibration.default_probes(torch.device("cpu")) if probe.work == "sdpa-cpu-flash"]
    spec = calibration.calibrate("cpu", lengths=(128, 256), probes=probe)
    saved = calibration.calibration_path("cpu")
    assert saved.is_file()
    document = __import__("json").loads(saved.read_text())
    assert {"matmul", "memory", "sdpa-cpu-flash"} <= set(document["efficiency"])
    assert [record["length"] for record in document["measurements"]] == [128, 256]
    applied = device_spec("cpu")
    assert "calibrated" in applied.source
    assert applied.efficiency_of("sdpa-cpu-flash") == pytest.approx(document["efficiency"]["sdpa-cpu-flash"])
    assert spec.efficiency == applied.efficiency
    assert builtin_calibration(BUILTIN_DEVICES["h200"], "h200").efficiency_of("linear") < 0.2


def test_costs_are_sympy_in_the_sequence_length_only():
    for module, implementation, extra in [(dense_cost, "eager", {}), (flash_cost, "triton", {}),
                                          (window_cost, "triton", {"window": 64}), (linear_cost, "triton", {}),
                                          (ssd_cost, "triton", {}), (hyper_cost, "triton", {}),
                                          (ring_cost, "triton", {"world_size": 2})]:
        costs = module.costs(shape(implementation, causal=True, **extra))
        for expression in (costs.flops, costs.bytes, costs.memory):
            assert sympy.sympify(expression).free_symbols <= {L}, module.__name__


def test_small_head_dims_use_their_own_measured_efficiency_else_the_kernels():
    import dataclasses

    from planner.costs import time_expression, work_for_head_dim
    from planner.devices import device_spec

    assert work_for_head_dim("flash", 64) == "flash@d64" and work_for_head_dim("flash", 128) == "flash"
    base = device_spec("h100")
    measured = dataclasses.replace(base, efficiency={**base.efficiency, "flash": 0.5, "flash@d64": 0.25})
    unmeasured = dataclasses.replace(base, efficiency={**base.efficiency, "flash": 0.5})
    length = 65536  # compute-bound, launch overhead negligible

    def seconds(spec, head_dim):
        costs = flash_cost.costs(shape("triton", batch=1, heads=8, causal=True, head_dim=head_dim, value_dim=head_dim))
        return evaluate(time_expression(costs, spec, "bfloat16"), length) / evaluate(costs.flops, length)

    # per FLOP, D=64 takes twice as long where D<=64 was measured at half the efficiency, the same where it was not
    assert seconds(measured, 64) == pytest.approx(2 * seconds(measured, 128), rel=1e-2)
    assert seconds(unmeasured, 64) == pytest.approx(seconds(unmeasured, 128), rel=1e-2)
