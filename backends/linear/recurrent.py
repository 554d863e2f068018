"""Recurrent linear attention with decay: the step form for decoding, one Triton program per (head, value block).

Each program keeps its slice of the state (key_dim x BV) in registers and walks the positions in order:

    S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_t^T        o_t = S_t^T q_t

It computes exactly what backends/linear/chunk.py computes (same state layout, same decay forms), at one matrix-
vector product per position instead of chunk-sized matrix products: the right form for generating a few tokens
from a carried state, the wrong one for a long prompt. Forward only (decoding needs no gradient).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from backends.linear.chunk import DECAY_CHANNEL, DECAY_NONE, DECAY_SCALAR, accumulator_dtype, decay_mode


@triton.jit
def _recurrent_forward_kernel(
    q_ptr, k_ptr, v_ptr, decay_ptr, initial_ptr, out_ptr, final_ptr,
    seq_len, heads, group,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, HAS_INITIAL: tl.constexpr, ACC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_qk = (i_bh // heads) * (heads // group) + (i_bh % heads) // group
    keys = tl.arange(0, BK)
    values = i_v * BV + tl.arange(0, BV)
    key_mask = keys < K
    value_mask = values < V
    state_mask = key_mask[:, None] & value_mask[None, :]
    state_offsets = keys[:, None] * V + values[None, :]
    q_base = q_ptr + i_qk * seq_len * K
    k_base = k_ptr + i_qk * seq_len * K
    v_base = v_ptr + i_bh * seq_len * V
    out_base = out_ptr + i_bh * seq_len * V
    state = tl.zeros([BK, BV], dtype=ACC)
    if HAS_INITIAL:
        state += tl.load(initial_ptr + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(ACC)
    for t in range(seq_len):
        query = tl.load(q_base + t * K + keys, mask=key_mask, other=0.0).to(ACC)
        key = tl.load(k_base + t * K + keys, mask=key_mask, other=0.0).to(ACC)
        value = tl.load(v_base + t * V + values, mask=value_mask, other=0.0).to(ACC)
        if DECAY == 1:
            state = state * tl.exp(tl.load(decay_ptr + i_bh * seq_len + t).to(ACC))
        elif DECAY == 2:
            factor = tl.exp(tl.load(decay_ptr + (i_bh * seq_len + t) * K + keys, mask=key_mask, other=0.0).to(ACC))
            state = state * factor[:, None]
        state += key[:, None] * value[None, :]
        out = tl.sum(query[:, None] * state, axis=0)
        tl.store(out_base + t * V + values, out.to(out_ptr.dtype.element_ty), mask=value_mask)
    tl.store(final_ptr + i_bh * K * V + state_offsets, state.to(final_ptr.dtype.element_ty), mask=state_mask)


def recurrent_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                      initial_state: Optional[torch.Tensor]):
    """Causal linear attention, step by step. Same arguments and results as chunk.chunk_forward (no chunk size).

    Returns (out like v, final state (batch, heads, key_dim, value_dim) in float32, float64 for float64 inputs).
    """
    batch, heads, seq_len, value_dim = v.shape
    key_dim = q.shape[-1]
    group = heads // q.shape[1]
    accumulator = accumulator_dtype(q.dtype)
    mode = decay_mode(log_decay)
    decay = log_decay.contiguous() if mode != DECAY_NONE else torch.zeros(1, dtype=accumulator, device=q.device)
    out = torch.empty_like(v)
    final = torch.empty(batch, heads, key_dim, value_dim, dtype=accumulator, device=q.device)
    if initial_state is not None:
        initial_state = initial_state.to(accumulator).contiguous()
    key_block = triton.next_power_of_2(key_dim)
    # Small value blocks: the state slice (key_dim x BV) lives in registers for the whole walk.
    value_block = min(triton.next_power_of_2(value_dim), 32 if key_block > 64 else 64)
    grid = (triton.cdiv(value_dim, value_block), batch * heads)
    _recurrent_forward_kernel[grid](
        q, k, v, decay, initial_state if initial_state is not None else final, out, final, seq_len, heads, group,
        K=key_dim, V=value_dim, BK=key_block, BV=value_block, DECAY=mode, HAS_INITIAL=initial_state is not None,
        ACC=tl.float64 if accumulator == torch.float64 else tl.float32,
    )
    return out, final


__all__ = ["recurrent_forward", "DECAY_NONE", "DECAY_SCALAR", "DECAY_CHANNEL"]
