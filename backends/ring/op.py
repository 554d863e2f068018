"""Ring attention: `attention_planner::ring_attention` (+ its backward op) and the public `ring_attention`.

Each rank of a process group holds a shard of the sequence (backends/ring/layout.py) of Q, K and V. K and V (the kv
heads only; a rank's own shard is sent as it is, not copied) travel around the ring; at every step a rank computes
its queries against the visiting shard (backends/ring/schedule.py says which blocks) while the next shard is already
in flight, and merges the block into its running output by log-sum-exp.

Communication per rank and per step (n = local sequence length, B batch, Hkv kv heads, D head dim):
  forward   one K/V shard, 2·B·Hkv·n·D elements of the input dtype, for `ring_step_count − 1` steps;
  backward  the same K/V shard for `ring_step_count − 1` steps, plus the dK/dV accumulator of the visiting shard,
            2·B·Hkv·n·D elements in float32 (float64 for float64 inputs), for `ring_step_count` steps (the last
            transfer hands each shard's finished dK/dV to its owner).
With bf16 at B=1, Hkv=32, D=128 that is 16 KiB per local token forward and 48 KiB backward per step.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from backends.flash.op import validate_attention_inputs
from backends.ring.comm import PendingTransfer, Ring, group_name_of, resolve_group
from backends.ring.layout import check_layout, chunks_per_rank
from backends.ring.local import block_backward, block_forward, check_impl
from backends.ring.schedule import Block, record_block, ring_schedule, ring_step_count
from passes.errors import BackendError

NO_WINDOW = -1  # the op's encoding of "no window"


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _window_or_none(window: int) -> Optional[int]:
    return None if window == NO_WINDOW else window


def _unpack(buffer: torch.Tensor, first_shape, second_shape) -> tuple[torch.Tensor, torch.Tensor]:
    split = first_shape.numel()
    return buffer[:split].view(first_shape), buffer[split:].view(second_shape)


def merge_block(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In place, the exact merge of a block's (out, lse) into the running (out, lse), in the stable form
    out ← out − sigmoid(lse_b − lse)·(out − out_b);  lse ← lse − logsigmoid(lse − lse_b).
    Rows the block cannot see (lse_b = −inf) get weight 0 and keep their lse. Rows not written yet (lse = −inf) take
    the block as it is: there the formula's −inf − (−inf) would be NaN."""
    block_lse = block_lse.to(lse.dtype)
    fresh = torch.isneginf(lse)
    weight = torch.where(fresh, 1.0, torch.sigmoid(block_lse - lse))
    difference = out - block_out  # promoted to out's fp32; the one temporary of output size
    difference.mul_(weight.unsqueeze(-1))
    out.sub_(difference)
    lse.copy_(torch.where(fresh, block_lse, lse - F.logsigmoid(lse - block_lse)))


def _ring_plan(group_name: str, local_len: int, causal: bool, window: Optional[int], layout: str):
    ring = Ring(resolve_group(group_name))
    schedule = ring_schedule(ring.rank, ring.size, local_len, causal=causal, window=window, layout=layout)
    steps = ring_step_count(ring.size, local_len, causal=causal, window=window, layout=layout)
    return ring, schedule, steps


# Memory: the ring's temporaries (fp32 output and dQ accumulators, the K/V shard in flight, the fp32 dK/dV in flight)
# would be several times the inputs if every head went round at once. Heads go round in passes instead, a group of kv
# heads (with their query heads) at a time, so that the temporaries of one pass stay under PASS_BYTES and the memory
# per local token stays close to what a single device needs per token: the longest sequence grows ~P times.
PASS_BYTES = 2 * 2**30


def head_passes(batch: int, kv_heads: int, group: int, local_len: int, head_dim: int,
                pass_bytes: Optional[int] = None) -> list[tuple[int, int]]:
    """[first, end) kv-head ranges processed one after the other: the fewest equal passes whose temporaries (about
    batch·n·head_dim·4·(2·group + 4) bytes per kv head, backward included) stay under `pass_bytes`."""
    budget = PASS_BYTES if pass_bytes is None else pass_bytes
    per_kv_head = batch * local_len * head_dim * 4 * (2 * group + 4)
    passes = next((count for count in range(1, kv_heads + 1)
                   if kv_heads % count == 0 and (kv_heads // count) * per_kv_head <= budget), kv_heads)
    size = kv_heads // passes
    return [(first, first + size) for first in range(0, kv_heads, size)]


def _passes_of(q, k):
    group = q.shape[1] // k.shape[1]
    for first, end in head_passes(q.shape[0], k.shape[1], group, q.shape[2], q.shape[3]):
        yield slice(first * group, end * group), slice(first, end)


def _ring_forward(q, k, v, group_name, causal, window, layout, scale, impl):
    ring, schedule, steps = _ring_plan(group_name, q.shape[2], causal, window, layout)
    batch, heads, local_len, _ = q.shape
    out = q.new_empty(batch, heads, local_len, v.shape[-1])
    lse = torch.empty(batch, heads, local_len, dtype=_accumulation_dtype(q.dtype), device=q.device)
    for q_heads, kv_heads in _passes_of(q, k):
        out[:, q_heads], lse[:, q_heads] = _ring_forward_pass(
            q[:, q_heads], k[:, kv_heads], v[:, kv_heads], ring, schedule, steps, causal, window, scale, impl)
    return out, lse


class _VisitingShards:
    """The K/V shard a rank holds at each step: its own (no copy) at step 0, then receive buffers, of which at most
    two pairs exist (the one computed on, the one being received), one pair when the ring makes a single hop."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.current = (k.contiguous(), v.contiguous())
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def post_next(self, ring: Ring) -> tuple[PendingTransfer, tuple[torch.Tensor, torch.Tensor]]:
        free = [pair for pair in self._buffers if pair[0] is not self.current[0]]
        if not free:
            free = [(torch.empty_like(self.current[0]), torch.empty_like(self.current[1]))]
            self._buffers += free
        return ring.shift(self.current, free[0]), free[0]


def _ring_forward_pass(q, k, v, ring, schedule, steps, causal, window, scale, impl):
    accumulation = _accumulation_dtype(q.dtype)
    batch, heads, local_len, _ = q.shape
    out = torch.zeros(batch, heads, local_len, v.shape[-1], dtype=accumulation, device=q.device)
    lse = torch.full((batch, heads, local_len), float("-inf"), dtype=accumulation, device=q.device)
    shards = _VisitingShards(k, v)
    for step in range(steps):
        # Post the next hop first: its transfer overlaps this step's compute (double buffering).
        pending, arriving = shards.post_next(ring) if step + 1 < steps else (None, None)
        visiting_k, visiting_v = shards.current
        for block in schedule[step].blocks:
            record_block("forward", step, block)
            block_out, block_lse = block_forward(q, visiting_k, visiting_v, block, causal=causal, window=window,
                                                 scale=scale, impl=impl)
            rows = slice(block.q_start, block.q_end)
            merge_block(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            del block_out, block_lse
        if pending is not None:
            pending.wait()
            shards.current = arriving
    return out, lse


def _ring_backward(grad_out, q, k, v, out, lse, group_name, causal, window, layout, scale, impl):
    ring, schedule, steps = _ring_plan(group_name, q.shape[2], causal, window, layout)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    passes = list(_passes_of(q, k))
    # The last dK/dV hop of a pass may overlap the next pass's compute, at the price of one more fp32 accumulator
    # alive; when passes are down to one kv head, memory is what is short, and each pass finishes on its own.
    overlap_passes = passes[0][1].stop - passes[0][1].start > 1
    unfinished = None
    backward_pass = _ring_backward_pass if overlap_passes else _lean_ring_backward_pass
    for q_heads, kv_heads in passes:
        grad_q[:, q_heads], finish = backward_pass(
            grad_out[:, q_heads], q[:, q_heads], k[:, kv_heads], v[:, kv_heads], out[:, q_heads], lse[:, q_heads],
            ring, schedule, steps, causal, window, scale, impl)
        if unfinished is not None:
            grad_k[:, unfinished[0]], grad_v[:, unfinished[0]] = unfinished[1]()
        unfinished = (kv_heads, finish)
        if not overlap_passes:
            grad_k[:, kv_heads], grad_v[:, kv_heads] = finish()
            unfinished = None
    if unfinished is not None:
        grad_k[:, unfinished[0]], grad_v[:, unfinished[0]] = unfinished[1]()
    return grad_q, grad_k, grad_v


def _ring_backward_pass(grad_out, q, k, v, out, lse, ring, schedule, steps, causal, window, scale, impl):
    """dQ of this pass, and a function that returns this rank's dK, dV once their last hop has arrived.

    dK/dV of the visiting shard travel as one fp32 accumulator: a rank receives the accumulator of the shard it will
    hold next while it computes, adds its own (bf16) block gradients once it has arrived, and sends it on. Two fp32
    buffers take turns: the one being sent and the one being received."""
    accumulation = _accumulation_dtype(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=accumulation, device=q.device)
    shards = _VisitingShards(k, v)
    accumulator, spare, grad_pending = None, None, None
    for step in range(steps):
        kv_pending, arriving = shards.post_next(ring) if step + 1 < steps else (None, None)
        visiting_k, visiting_v = shards.current
        block_grads = []
        for block in schedule[step].blocks:
            record_block("backward", step, block)
            block_grad_q, block_grad_k, block_grad_v = block_backward(
                grad_out, q, visiting_k, visiting_v, out, lse, block, causal=causal, window=window, scale=scale,
                impl=impl)
            grad_q[:, :, block.q_start:block.q_end] += block_grad_q
            block_grads.append((block, block_grad_k, block_grad_v))
            del block_grad_q
        if grad_pending is not None:
            grad_pending.wait()  # the accumulator of this step's shard has arrived; the one sent before is free
        else:
            accumulator = torch.zeros(k.numel() + v.numel(), dtype=accumulation, device=q.device)
        accumulated_k, accumulated_v = _unpack(accumulator, k.shape, v.shape)
        for block, block_grad_k, block_grad_v in block_grads:
            accumulated_k[:, :, block.k_start:block.k_end] += block_grad_k
            accumulated_v[:, :, block.k_start:block.k_end] += block_grad_v
        del block_grads, accumulated_k, accumulated_v
        incoming = spare if spare is not None else torch.empty_like(accumulator)
        if step + 1 < steps:
            grad_pending = ring.shift([accumulator], [incoming])
        else:  # the last hop hands each shard's finished dK/dV to its owner
            owner, sender = (ring.rank - step) % ring.size, (ring.rank + step) % ring.size
            grad_pending = ring.exchange([accumulator], owner, [incoming], sender)
        spare, accumulator = accumulator, incoming
        if kv_pending is not None:
            kv_pending.wait()
            shards.current = arriving
    del spare

    def finish():
        """dK/dV of this rank's own shard, once the last hop has arrived."""
        grad_pending.wait()
        return _unpack(accumulator, k.shape, v.shape)

    return grad_q, finish


# A "full" block's backward returns bf16 dK, dV for all its keys at once; cut along the keys into this many pieces,
# the lean pass holds a quarter of them (the kernels skip nothing in a full block, so the work is the same).
LEAN_KEY_PIECES = 4


def _key_pieces(block: Block, pieces: int) -> list[Block]:
    """`block` itself, or for a "full" block (no mask inside) up to `pieces` blocks over consecutive key ranges."""
    keys = block.k_end - block.k_start
    if block.kind != "full" or keys < 2 * pieces:
        return [block]
    size = -(-keys // pieces)
    rows = block.q_end - block.q_start
    return [dataclasses.replace(block, k_start=start, k_end=min(start + size, block.k_end),
                                k_position=block.k_position + start - block.k_start,
                                work=rows * (min(start + size, block.k_end) - start))
            for start in range(block.k_start, block.k_end, size)]


def _lean_ring_backward_pass(grad_out, q, k, v, out, lse, ring, schedule, steps, causal, window, scale, impl):
    """As _ring_backward_pass, for when memory is what is short (passes down to one kv head): block gradients are
    added as soon as each block is done, and the visiting K/V and the fp32 dK/dV accumulator each hop in place, a
    chunk at a time, after the step's compute. About 1.5 KiB less per local token and head (no second accumulator,
    no second K/V buffer, no list of block gradients); the hops no longer overlap compute, which at the lengths
    where memory is short costs well under 1% (a hop of one head's shard against a step of quadratic work)."""
    accumulation = _accumulation_dtype(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=accumulation, device=q.device)
    accumulator = torch.zeros(k.numel() + v.numel(), dtype=accumulation, device=q.device)
    accumulated_k, accumulated_v = _unpack(accumulator, k.shape, v.shape)
    visiting, (visiting_k, visiting_v) = None, (k.contiguous(), v.contiguous())
    for step in range(steps):
        for block in (piece for whole in schedule[step].blocks for piece in _key_pieces(whole, LEAN_KEY_PIECES)):
            record_block("backward", step, block)
            block_grad_q, block_grad_k, block_grad_v = block_backward(
                grad_out, q, visiting_k, visiting_v, out, lse, block, causal=causal, window=window, scale=scale,
                impl=impl)
            grad_q[:, :, block.q_start:block.q_end] += block_grad_q
            accumulated_k[:, :, block.k_start:block.k_end] += block_grad_k
            accumulated_v[:, :, block.k_start:block.k_end] += block_grad_v
            del block_grad_q, block_grad_k, block_grad_v
        if step + 1 < steps:
            if visiting is None:  # the rank's own k, v are never overwritten: the first hop takes a copy
                visiting = torch.cat([visiting_k.reshape(-1), visiting_v.reshape(-1)])
                visiting_k, visiting_v = _unpack(visiting, k.shape, v.shape)
            ring.shift_in_place(visiting, chunks=16)
            ring.shift_in_place(accumulator, chunks=16)
        else:  # the last hop hands each shard's finished dK/dV to its owner
            owner, sender = (ring.rank - step) % ring.size, (ring.rank + step) % ring.size
            ring.exchange_in_place(accumulator, owner, sender, chunks=16)
    del visiting, visiting_k, visiting_v
    return grad_q, lambda: (accumulated_k, accumulated_v)


@torch.library.custom_op("attention_planner::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, causal: bool, window: int,
                      layout: str, scale: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out like q with v's head dim, lse (batch, q_heads, local queries) in float32 / float64)."""
    return _ring_forward(q, k, v, group_name, causal, _window_or_none(window), layout, scale, impl)


@ring_attention_op.register_fake
def _(q, k, v, group_name, causal, window, layout, scale, impl):
    batch, heads, local_len, _ = q.shape
    return (q.new_empty(batch, heads, local_len, v.shape[-1]),
            q.new_empty(batch, heads, local_len, dtype=_accumulation_dtype(q.dtype)))


@torch.library.custom_op("attention_planner::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, group_name: str, causal: bool, window: int,
                               layout: str, scale: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) of this rank's shards; dK/dV travel the ring back to their owners."""
    return _ring_backward(grad_out.contiguous(), q, k, v, out, lse, group_name, causal, _window_or_none(window),
                          layout, scale, impl)


@ring_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, group_name, causal, window, layout, scale, impl):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, group_name, causal, window, layout, scale, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = (group_name, causal, window, layout, scale, impl)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = ring_attention_backward_op(grad_out, q, k, v, out, lse, *ctx.options)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(q, k, v, group, causal, window, layout) -> None:
    validate_attention_inputs(q, k, v)
    check_layout(layout)
    if k.shape[2] != q.shape[2]:
        raise BackendError(f"ring attention needs K/V shards as long as the Q shard (self-attention); got "
                           f"{q.shape[2]} queries and {k.shape[2]} keys")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise BackendError(f"window must be a positive number of keys or None; got {window!r}")
    if q.shape[2] % chunks_per_rank(layout):
        raise BackendError(f"layout {layout!r} needs an even local length (two chunks per rank); got {q.shape[2]}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None,
                   causal: bool = False, window: Optional[int] = None, layout: str = "zigzag",
                   scale: Optional[float] = None, impl: Optional[str] = None) -> torch.Tensor:
    """Exact softmax attention over a sequence sharded across the ranks of `group`, K/V passed around a ring.

    Args:
        q: this rank's shard, (batch, q_heads, local queries, head_dim). k, v: this rank's shards,
            (batch, kv_heads, local keys, head_dim), local keys == local queries; kv_heads divides q_heads
            (grouped-query attention: only kv heads travel).
        group: the process group (default: the world); every rank of it must call with the same arguments.
        causal: query at global position i sees keys j <= i.
        window: sliding window W: with causal, i − W < j; without, |i − j| < W. Only the ranks inside the window
            are visited.
        layout: "zigzag" (2P chunks, rank r holds chunks r and 2P−1−r: causal work balanced) or "contiguous";
            see backends/ring/layout.py for shard/unshard/global_positions.
        scale: multiplies q·k; default 1/sqrt(head_dim).
        impl: the kernel of each block: None (the project's flash op, Triton on CUDA), "triton", "blockwise",
            "reference", or "sdpa" (torch's fused CUDA flash kernels).

    Returns this rank's shard of the output, like q. Differentiable: dK/dV travel back around the ring.
    """
    _validate(q, k, v, group, causal, window, layout)
    impl = "auto" if impl is None else impl
    check_impl(impl)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = ring_attention_op(q, k, v, group_name_of(group), causal, NO_WINDOW if window is None else int(window),
                               layout, scale, impl)
    return out
