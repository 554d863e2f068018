"""Worker processes for tests/test_ring.py: each rank runs every case of a list against the whole-sequence reference
and writes its findings to a JSON file; the tests read the files. One spawn per world size keeps the suite fast."""
from __future__ import annotations

import os
import traceback
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from rank_results import save_rank_results

FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 2e-5


def make_case(name, *, batch=2, heads=4, kv_heads=2, chunk=3, head_dim=8, causal=False, window=None,
              layout="zigzag", dtype="float64", impl=None, subgroup=None, scale=None, pass_bytes=None):
    return dict(name=name, batch=batch, heads=heads, kv_heads=kv_heads, chunk=chunk, head_dim=head_dim,
                causal=causal, window=window, layout=layout, dtype=dtype, impl=impl, subgroup=subgroup, scale=scale,
                pass_bytes=pass_bytes)


def cases(world_size: int) -> list[dict]:
    """The cases for one world size (chunk = positions per zigzag chunk; odd chunks make odd shard halves)."""
    if world_size == 8:  # eight processes on a small CI machine: the layouts, a window, and the lean backward
        return [make_case("zigzag-causal1", causal=True, chunk=2),
                make_case("contiguous-causal0", causal=False, layout="contiguous", chunk=2),
                make_case("zigzag-causal1-window", causal=True, window=9, chunk=2),
                make_case("zigzag-causal-head-passes", causal=True, kv_heads=2, heads=4, chunk=2, pass_bytes=1)]
    found = []
    for layout in ("zigzag", "contiguous"):
        for causal in (False, True):
            found.append(make_case(f"{layout}-causal{int(causal)}", causal=causal, layout=layout))
            found.append(make_case(f"{layout}-causal{int(causal)}-window", causal=causal, layout=layout,
                                   window=4 if world_size == 4 else 5, chunk=5))
    found.append(make_case("zigzag-causal-mha", causal=True, kv_heads=4))
    found.append(make_case("zigzag-causal-mqa-scale", causal=True, kv_heads=1, scale=0.3, chunk=4))
    found.append(make_case("zigzag-causal-window-wide", causal=True, window=11, chunk=3))
    found.append(make_case("contiguous-causal-window-inside-shard", causal=True, window=2, chunk=3,
                           layout="contiguous"))
    found.append(make_case("zigzag-causal-reference-impl", causal=True, impl="reference"))
    # A tiny pass budget: kv heads go round one at a time (backends.ring.op.head_passes).
    found.append(make_case("zigzag-causal-window-head-passes", causal=True, window=7, kv_heads=4, heads=8,
                           pass_bytes=1))
    found.append(make_case("contiguous-full-head-passes", causal=False, layout="contiguous", kv_heads=2, heads=4,
                           pass_bytes=1))
    found.append(make_case("zigzag-causal-float32", causal=True, dtype="float32", chunk=7, head_dim=16))
    if world_size == 4:
        found.append(make_case("zigzag-causal-subgroup", causal=True, subgroup=[1, 3]))
    return found


def _inputs(case, generator):
    dtype = getattr(torch, case["dtype"])
    members = case["subgroup"] or None
    ring_size = len(members) if members else dist.get_world_size()
    length = 2 * ring_size * case["chunk"]
    shape_q = (case["batch"], case["heads"], length, case["head_dim"])
    shape_kv = (case["batch"], case["kv_heads"], length, case["head_dim"])
    q, k, v, grad_out = (torch.randn(shape, generator=generator, dtype=dtype) for shape in
                         (shape_q, shape_kv, shape_kv, shape_q))
    return q, k, v, grad_out


def _gather(tensor, group):
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return shards


def run_case(case, groups) -> dict:
    from backends import ring_attention
    from backends.ring.layout import shard, unshard
    from backends.ring.naive import ring_attention_reference
    from backends.ring.schedule import count_block_work, work_per_step

    generator = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))  # same inputs on every rank
    q, k, v, grad_out = _inputs(case, generator)
    group = groups.get(tuple(case["subgroup"])) if case["subgroup"] else None
    if case["subgroup"] and dist.get_rank() not in case["subgroup"]:
        return {"skipped": True}
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    layout = case["layout"]
    local = [shard(t, 2, rank, size, layout).requires_grad_(t is not grad_out) for t in (q, k, v, grad_out)]
    import backends.ring.op as ring_op

    default_pass_bytes = ring_op.PASS_BYTES
    ring_op.PASS_BYTES = case["pass_bytes"] or default_pass_bytes
    try:
        with count_block_work() as counter:
            out = ring_attention(local[0], local[1], local[2], group=group, causal=case["causal"],
                                 window=case["window"], layout=layout, scale=case["scale"], impl=case["impl"])
            out.backward(local[3])
    finally:
        ring_op.PASS_BYTES = default_pass_bytes
    passes = len(ring_op.head_passes(q.shape[0], k.shape[1], q.shape[1] // k.shape[1], local[0].shape[2],
                                     q.shape[3], case["pass_bytes"]))

    full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = ring_attention_reference(*full, causal=case["causal"], window=case["window"], scale=case["scale"])
    expected.backward(grad_out)

    errors = {"out": _max_error(unshard(_gather(out.detach(), group), 2, layout), expected)}
    for name, local_tensor, full_tensor in zip("qkv", local, full):
        errors[f"d{name}"] = _max_error(unshard(_gather(local_tensor.grad, group), 2, layout), full_tensor.grad)
    scheduled = work_per_step(size, local[0].shape[2], causal=case["causal"], window=case["window"], layout=layout)
    counted = [work // passes for work in counter.work("forward")]  # every pass runs the same blocks
    tolerance = FLOAT64_TOLERANCE if case["dtype"] == "float64" else FLOAT32_TOLERANCE
    return {"errors": errors, "tolerance": tolerance, "counted_work": counted,
            "scheduled_work": scheduled[rank][:len(counted)], "scheduled_total": sum(scheduled[rank]),
            "backward_work": sum(counter.work("backward")) // passes, "passes": passes}


def _max_error(actual, expected) -> float:
    return float((actual.double() - expected.double()).abs().max())


def run_opcheck() -> str:
    from backends.ring.comm import group_name_of
    from backends.ring.op import ring_attention_op

    size = dist.get_world_size()
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 2 * 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 2 * 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 2 * 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert size >= 1
    torch.library.opcheck(ring_attention_op, (q, k, v, group_name_of(None), True, -1, "zigzag", 0.5, "auto"))
    return "ok"


def worker(rank: int, world_size: int, store_path: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    try:
        groups = {(1, 3): dist.new_group([1, 3])} if world_size == 4 else {}
        for case in cases(world_size):
            try:
                results[case["name"]] = run_case(case, groups)
            except Exception:
                # The other ranks may be waiting inside the op for this one: record the traceback and leave at once,
                # so that the test reports it now instead of a barrier timeout a minute later.
                results[case["name"]] = {"exception": traceback.format_exc()}
                save_rank_results(result_dir, rank, results)
                os._exit(1)
            dist.barrier()
        if world_size == 2:
            try:
                results["opcheck"] = {"status": run_opcheck()}
            except Exception:
                results["opcheck"] = {"exception": traceback.format_exc()}
    finally:
        save_rank_results(result_dir, rank, results)
        dist.destroy_process_group()
