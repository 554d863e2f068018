"""Ring attention: layout, schedule and balance (pure functions), the one-process simulation, and the op itself on
2 and 4 gloo processes against dense attention on the whole sequence (float64), forward and gradients."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import ring_worker
from backends.ring.layout import global_positions, shard, unshard
from backends.ring.naive import ring_attention_reference, simulate_ring
from backends.ring.op import merge_block
from backends.ring.schedule import ring_schedule, ring_step_count, visible_pair_count, work_per_step
from planner.errors import BackendError, InvalidArgumentError

LAYOUTS = ("zigzag", "contiguous")


# ---- layout ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size,chunk", [(1, 3), (2, 5), (3, 1), (4, 3)])
@pytest.mark.parametrize("dim", [0, 2, -1])
def test_shard_unshard_round_trip(layout, world_size, chunk, dim):
    length = 2 * world_size * chunk
    shape = [3, 2, 4]
    shape[dim] = length
    tensor = torch.randn(shape)
    shards = [shard(tensor, dim, rank, world_size, layout) for rank in range(world_size)]
    assert all(s.shape[dim] == length // world_size for s in shards)
    assert torch.equal(unshard(shards, dim, layout), tensor)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size,chunk", [(1, 2), (2, 3), (4, 5)])
def test_global_positions_match_shard_of_arange(layout, world_size, chunk):
    length = 2 * world_size * chunk
    for rank in range(world_size):
        expected = shard(torch.arange(length), 0, rank, world_size, layout)
        assert torch.equal(global_positions(length // world_size, rank, world_size, layout), expected)


def test_zigzag_positions_are_chunks_r_and_mirror():
    # 2 ranks, chunk 3: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert global_positions(6, 0, 2, "zigzag").tolist() == [0, 1, 2, 9, 10, 11]
    assert global_positions(6, 1, 2, "zigzag").tolist() == [3, 4, 5, 6, 7, 8]
    assert global_positions(6, 1, 2, "contiguous").tolist() == [6, 7, 8, 9, 10, 11]


def test_layout_errors_name_the_problem():
    with pytest.raises(InvalidArgumentError, match="not divisible by 4"):
        shard(torch.randn(10), 0, 0, 2, "zigzag")
    with pytest.raises(InvalidArgumentError, match="accepted: zigzag, contiguous"):
        shard(torch.randn(8), 0, 0, 2, "striped")
    with pytest.raises(InvalidArgumentError, match="rank 2"):
        global_positions(4, 2, 2, "zigzag")
    with pytest.raises(InvalidArgumentError, match="divisible by 2"):
        global_positions(5, 0, 2, "zigzag")


# ---- schedule and balance ----------------------------------------------------------------------------------------

def _brute_force_pairs(q_positions, k_positions, causal, window):
    i, j = q_positions[:, None], k_positions[None, :]
    visible = torch.ones(len(q_positions), len(k_positions), dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= (i - j < window) if causal else ((i - j).abs() < window)
    return int(visible.sum())


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 4), (False, 4), (True, 1)])
def test_visible_pair_count_matches_brute_force(causal, window):
    for q_start, q_len, k_start, k_len in [(0, 5, 0, 5), (10, 7, 3, 4), (3, 4, 10, 7), (6, 1, 0, 9)]:
        expected = _brute_force_pairs(torch.arange(q_start, q_start + q_len), torch.arange(k_start, k_start + k_len),
                                      causal, window)
        assert visible_pair_count(q_start, q_len, k_start, k_len, causal=causal, window=window) == expected


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_zigzag_causal_work_is_balanced_every_step(world_size, chunk):
    work = work_per_step(world_size, 2 * chunk, causal=True, window=None, layout="zigzag")
    for step in range(world_size):
        assert len({work[rank][step] for rank in range(world_size)}) == 1, work
    # Total equals the causal triangle of the whole sequence: nothing lost, nothing counted twice.
    length = 2 * world_size * chunk
    assert sum(map(sum, work)) == length * (length + 1) // 2


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_contiguous_causal_work_is_unbalanced(world_size):
    chunk = 16
    totals = [sum(w) for w in work_per_step(world_size, 2 * chunk, causal=True, window=None, layout="contiguous")]
    assert totals == sorted(totals) and totals[-1] > (2 * world_size - 2) * totals[0]


def test_zigzag_causal_blocks_follow_the_usual_rule():
    chunk, world_size = 4, 4
    rank = 2
    steps = ring_schedule(rank, world_size, 2 * chunk, causal=True, window=None, layout="zigzag")
    assert [(b.q_start, b.q_end, b.k_start, b.k_end, b.kind) for b in steps[0].blocks] == [(0, 8, 0, 8, "diagonal")]
    for step in steps[1:]:
        (block,) = step.blocks
        if step.source_rank < rank:  # all local queries × the first half of the remote shard
            assert (block.q_start, block.q_end, block.k_start, block.k_end) == (0, 8, 0, 4)
        else:  # the second half of the local queries × the whole remote shard
            assert (block.q_start, block.q_end, block.k_start, block.k_end) == (4, 8, 0, 8)
        assert block.kind == "full"


def test_window_visits_only_ranks_inside_it_in_contiguous_layout():
    # Window 5 over shards of 4: a rank needs its own shard and the previous one only.
    assert ring_step_count(8, 4, causal=True, window=5, layout="contiguous") == 2
    assert ring_step_count(8, 4, causal=True, window=4, layout="contiguous") == 2
    assert ring_step_count(8, 4, causal=True, window=1, layout="contiguous") == 1
    assert ring_step_count(8, 4, causal=True, window=None, layout="contiguous") == 8
    # Zigzag, chunks of 8, window 5: chunk m needs chunk m − 1 only, which is the previous rank's (step 1) or, for
    # the mirrored chunk, the next rank's (step P − 1); the steps in between compute nothing.
    work = work_per_step(8, 16, causal=True, window=5, layout="zigzag")
    assert all(w == 0 for rank_work in work for w in rank_work[2:-1])
    assert all(rank_work[0] > 0 for rank_work in work)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 1), (True, 4), (True, 13),
                                           (False, 3), (False, 9)])
def test_simulated_ring_equals_dense_attention(world_size, layout, causal, window):
    chunk = 3
    length = 2 * world_size * chunk
    q = torch.randn(2, 4, length, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, length, 8, dtype=torch.float64), torch.randn(2, 2, length, 8, dtype=torch.float64)
    actual = simulate_ring(q, k, v, world_size, causal=causal, window=window, layout=layout)
    expected = ring_attention_reference(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_merge_block_is_exact_and_handles_empty_rows():
    # Split the keys of one attention in two; merging the halves must give attention over all keys.
    from backends.flash.naive import attention_reference

    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[0, :3] = False  # row 0 sees nothing in the first half
    mask[1] = False  # row 1 sees nothing at all
    full_out, full_lse = attention_reference(q, k, v, attn_mask=mask, return_lse=True)
    out = torch.zeros(1, 2, 5, 4, dtype=torch.float64)
    lse = torch.full((1, 2, 5), float("-inf"), dtype=torch.float64)
    for keys in (slice(0, 3), slice(3, 5)):
        block_out, block_lse = attention_reference(q, k[:, :, keys], v[:, :, keys], attn_mask=mask[:, keys],
                                                   return_lse=True)
        merge_block(out, lse, block_out, block_lse)
    torch.testing.assert_close(out, full_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=1e-12)
    assert not torch.isnan(out).any()


def test_ring_attention_refuses_bad_input_before_communicating():
    from backends import ring_attention

    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(BackendError, match="as long as the Q shard"):
        ring_attention(q, torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(BackendError, match="even local length"):
        ring_attention(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(InvalidArgumentError, match="accepted: zigzag, contiguous"):
        ring_attention(q, q, q, layout="striped")
    with pytest.raises(BackendError, match="window must be"):
        ring_attention(q, q, q, window=0)
    with pytest.raises(BackendError, match="torch.distributed initialized"):
        ring_attention(q, q, q)


# ---- the op on gloo processes ------------------------------------------------------------------------------------

def _spawn(world_size: int, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp(f"ring{world_size}")
    try:
        mp.start_processes(ring_worker.worker, args=(world_size, str(directory / "store"), str(directory)),
                           nprocs=world_size, join=True, start_method="spawn")
    except Exception as error:  # a rank that met an exception wrote it before leaving: show that, not the exit code
        written = sorted(directory.glob("rank*.json"))
        found = [f"{path.stem} {name}:\n{result['exception']}" for path in written
                 for name, result in json.loads(path.read_text()).items() if "exception" in result]
        raise AssertionError(f"ring workers on {world_size} processes failed: {error}\n" + "\n".join(found)) from None
    results = []
    for rank in range(world_size):
        with open(os.path.join(directory, f"rank{rank}.json")) as handle:
            results.append(json.load(handle))
    return results


class _RingRuns(dict):
    """The workers' results per world size, spawned on first use (a world size whose tests all skip costs nothing)."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, world_size: int) -> list:
        self[world_size] = _spawn(world_size, self.tmp_path_factory)
        return self[world_size]


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    return _RingRuns(tmp_path_factory)


# Four processes repeat two's cases (and the subgroup): the full suite runs them (--long), CI runs two and eight.
CASES = [pytest.param(world_size, case["name"], id=f"P{world_size}-{case['name']}",
                      marks=[pytest.mark.long] if world_size == 4 else [])
         for world_size in (2, 4, 8) for case in ring_worker.cases(world_size)]


@pytest.mark.parametrize("world_size,name", CASES)
def test_ring_attention_matches_dense_attention(ring_results, world_size, name):
    for rank, results in enumerate(ring_results[world_size]):
        result = results[name]
        assert "exception" not in result, f"rank {rank}:\n{result.get('exception')}"
        if result.get("skipped"):
            continue
        for quantity, error in result["errors"].items():
            assert error <= result["tolerance"], f"rank {rank}: {quantity} max error {error:.3g}"
        # The op ran exactly the scheduled blocks, and the backward the same blocks again.
        assert result["counted_work"] == result["scheduled_work"], f"rank {rank}"
        assert result["backward_work"] == result["scheduled_total"], f"rank {rank}"


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.long)])
def test_zigzag_ranks_did_equal_work(ring_results, world_size):
    counted = [results["zigzag-causal0"]["counted_work"] for results in ring_results[world_size]]
    assert len({tuple(c) for c in counted}) == 1
    counted = [results["zigzag-causal1"]["counted_work"] for results in ring_results[world_size]]
    assert len({tuple(c) for c in counted}) == 1, counted
    contiguous = [sum(results["contiguous-causal1"]["counted_work"]) for results in ring_results[world_size]]
    assert contiguous == sorted(contiguous) and contiguous[0] < contiguous[-1]


def test_opcheck_on_two_ranks(ring_results):
    for rank, results in enumerate(ring_results[2]):
        assert results["opcheck"] == {"status": "ok"}, f"rank {rank}:\n{results['opcheck'].get('exception')}"


def test_head_passes_split_kv_heads_evenly_under_the_budget():
    from backends.ring.op import head_passes

    assert head_passes(1, 32, 1, 1024, 128, pass_bytes=2**40) == [(0, 32)]
    assert head_passes(1, 8, 4, 16, 8, pass_bytes=1) == [(i, i + 1) for i in range(8)]
    per_kv_head = 1 * 131072 * 128 * 4 * (2 * 1 + 4)
    passes = head_passes(1, 32, 1, 131072, 128, pass_bytes=4 * per_kv_head)
    assert passes == [(i, i + 4) for i in range(0, 32, 4)]
    assert len(head_passes(1, 6, 1, 100, 8, pass_bytes=4 * 100 * 8 * 4 * 6)) == 2  # 4 per pass does not divide 6


def test_ring_runs_multiple_head_passes(ring_results):
    assert all(results["zigzag-causal-window-head-passes"]["passes"] == 4 for results in ring_results[2])
    assert all(results["zigzag-causal-head-passes"]["passes"] == 2 for results in ring_results[8])


def test_eight_zigzag_ranks_did_equal_work(ring_results):
    """Eight gloo processes (the largest GPU count of one host, on the CPU): zigzag causal work is the same on every rank."""
    counted = [results["zigzag-causal1"]["counted_work"] for results in ring_results[8]]
    assert len({tuple(c) for c in counted}) == 1, counted
