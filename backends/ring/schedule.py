"""Which (query rows × key rows) blocks each rank computes at each step of the ring: a pure function of the layout.

At step s, rank r holds the K/V shard of rank (r − s) mod P. Each rank's shard is one or two runs of consecutive
positions (backends/ring/layout.py); every pair (query run, key run) is classified once:
  all visible   -> a "full" block: the kernel runs with no mask;
  none visible  -> skipped: not computed, and (past the last step any rank needs) not even transferred;
  some visible  -> a "diagonal" block when both runs are the same positions (the kernel's own causal / window mask,
                   in local indices, is then the global mask), else a "masked" block (an explicit mask built from the
                   global positions; only sliding windows produce these).
Full blocks of one step that tile a rectangle merge into one kernel call. Without a window, step 0 is one causal
call on the whole local shard: local positions increase with the local index, so the local causal mask is the
global one even across the two zigzag chunks.

Zigzag, causal, no window (chunks of c positions, rank r holds chunks r and 2P−1−r), the usual balancing falls out:
  step 0             causal on the local 2c × 2c shard             c(c+1) + c² visible pairs
  source rank < r    all 2c local queries × the first c remote keys   2c² pairs
  source rank > r    the last c local queries × all 2c remote keys    2c² pairs
so every rank does the same work at every step. Contiguous layout: rank r does r·n² + n(n+1)/2, the last rank
almost 2P−1 times the first.

`count_block_work()` records the blocks the op actually runs, so tests can check the op against this schedule.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from backends.ring.layout import LocalChunk, local_chunks

BLOCK_KINDS = ("full", "diagonal", "masked")


@dataclass(frozen=True)
class Block:
    """One kernel call: local query rows [q_start, q_end) against rows [k_start, k_end) of the visiting K/V shard."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    kind: str  # one of BLOCK_KINDS
    q_position: int  # global position of row q_start ("masked" blocks have consecutive positions on both sides)
    k_position: int  # global position of row k_start
    work: int  # visible (query, key) pairs: what a kernel that skips hidden tiles spends its FLOPs on


@dataclass(frozen=True)
class RingStep:
    step: int
    source_rank: int  # whose K/V shard this rank holds at this step
    blocks: tuple[Block, ...]


def visible_pair_count(
    q_position: int, q_length: int, k_position: int, k_length: int, *, causal: bool, window: Optional[int]
) -> int:
    """Number of visible (query, key) pairs between two runs of consecutive positions (same rule as the reference:
    causal j <= i; window W: with causal i − W < j, without |i − j| < W)."""
    if q_length <= 0 or k_length <= 0:
        return 0
    queries = torch.arange(q_position, q_position + q_length, dtype=torch.int64)
    lowest = torch.full_like(queries, k_position)
    highest = torch.full_like(queries, k_position + k_length - 1)
    if causal:
        highest = torch.minimum(highest, queries)
    if window is not None:
        lowest = torch.maximum(lowest, queries - window + 1)
        if not causal:
            highest = torch.minimum(highest, queries + window - 1)
    return int((highest - lowest + 1).clamp_min(0).sum())


def _classify(q_chunk: LocalChunk, k_chunk: LocalChunk, causal: bool, window: Optional[int]) -> tuple[str, int]:
    """("all" | "none" | "some", visible pairs) for one pair of runs."""
    work = visible_pair_count(q_chunk.global_start, q_chunk.length, k_chunk.global_start, k_chunk.length,
                              causal=causal, window=window)
    if work == 0:
        return "none", 0
    if work == q_chunk.length * k_chunk.length:
        return "all", work
    return "some", work


def _merge_full_blocks(blocks: list[Block]) -> list[Block]:
    """Full blocks that exactly tile their bounding rectangle become one call (they never overlap)."""
    full = [b for b in blocks if b.kind == "full"]
    if len(full) < 2:
        return blocks
    q_start, q_end = min(b.q_start for b in full), max(b.q_end for b in full)
    k_start, k_end = min(b.k_start for b in full), max(b.k_end for b in full)
    area = sum((b.q_end - b.q_start) * (b.k_end - b.k_start) for b in full)
    if area != (q_end - q_start) * (k_end - k_start):
        return blocks
    merged = Block(q_start, q_end, k_start, k_end, "full", -1, -1, sum(b.work for b in full))
    return [merged] + [b for b in blocks if b.kind != "full"]


def _step_blocks(
    rank: int, source: int, world_size: int, local_len: int, causal: bool, window: Optional[int], layout: str
) -> tuple[Block, ...]:
    q_chunks = local_chunks(local_len, rank, world_size, layout)
    k_chunks = local_chunks(local_len, source, world_size, layout)
    pairs = [(qc, kc, *_classify(qc, kc, causal, window)) for qc in q_chunks for kc in k_chunks]
    if all(visibility == "none" for *_, visibility, _ in pairs):
        return ()
    if source == rank and causal and window is None:
        # Same positions on both sides and increasing with the local index: one causal call covers every pair.
        return (Block(0, local_len, 0, local_len, "diagonal", -1, -1, sum(work for *_, work in pairs)),)
    blocks = []
    for qc, kc, visibility, work in pairs:
        if visibility == "none":
            continue
        if visibility == "all":
            kind = "full"
        elif qc.global_start == kc.global_start and qc.length == kc.length:
            kind = "diagonal"
        else:
            kind = "masked"
        blocks.append(Block(qc.local_start, qc.local_start + qc.length, kc.local_start, kc.local_start + kc.length,
                            kind, qc.global_start, kc.global_start, work))
    return tuple(_merge_full_blocks(blocks))


@functools.lru_cache(maxsize=256)
def ring_schedule(
    rank: int, world_size: int, local_len: int, *, causal: bool, window: Optional[int], layout: str
) -> tuple[RingStep, ...]:
    """The blocks `rank` computes at each of the P steps of the ring (a step may have none)."""
    return tuple(
        RingStep(step, (rank - step) % world_size,
                 _step_blocks(rank, (rank - step) % world_size, world_size, local_len, causal, window, layout))
        for step in range(world_size)
    )


def ring_step_count(world_size: int, local_len: int, *, causal: bool, window: Optional[int], layout: str) -> int:
    """Steps the ring must run: one past the last step at which any rank has a block. K/V shards travel
    `ring_step_count − 1` hops; with a window in the contiguous layout that stops early (ranks outside the window
    are never visited). In zigzag a window reaches back through the late chunks, so shards still go round, but the
    steps in between compute nothing."""
    last = 0
    for rank in range(world_size):
        for step in ring_schedule(rank, world_size, local_len, causal=causal, window=window, layout=layout):
            if step.blocks:
                last = max(last, step.step)
    return last + 1


def work_per_step(
    world_size: int, local_len: int, *, causal: bool, window: Optional[int], layout: str
) -> list[list[int]]:
    """work[rank][step]: visible (query, key) pairs that rank computes at that step."""
    return [
        [sum(b.work for b in step.blocks)
         for step in ring_schedule(rank, world_size, local_len, causal=causal, window=window, layout=layout)]
        for rank in range(world_size)
    ]


@dataclass
class BlockWorkCounter:
    """What the op actually ran: (phase, step, block) for every kernel call, phase "forward" or "backward"."""

    calls: list[tuple[str, int, Block]] = field(default_factory=list)

    def work(self, phase: str = "forward") -> list[int]:
        """Visible pairs per step, for the given phase."""
        steps = max((step for p, step, _ in self.calls if p == phase), default=-1) + 1
        totals = [0] * steps
        for p, step, block in self.calls:
            if p == phase:
                totals[step] += block.work
        return totals


_ACTIVE_COUNTERS: list[BlockWorkCounter] = []


@contextlib.contextmanager
def count_block_work() -> Iterator[BlockWorkCounter]:
    """Record every block that ring_attention computes in this process while the context is open."""
    counter = BlockWorkCounter()
    _ACTIVE_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTERS.remove(counter)


def record_block(phase: str, step: int, block: Block) -> None:
    for counter in _ACTIVE_COUNTERS:
        counter.calls.append((phase, step, block))
