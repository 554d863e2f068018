"""Chunkwise-parallel linear attention with decay: Triton kernels, forward and backward.

The recurrence (one head; q, k: key_dim, v: value_dim, S: key_dim x value_dim, g: log-decay, <= 0):

    S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_t^T        o_t = S_t^T q_t

g is absent (plain linear attention), one number per position (RetNet's constant decay broadcast over time, Mamba-2's
dt*A), or one number per position and key channel (GLA / RWKV-6). Within a chunk of `chunk_size` positions, with
b_t the chunk-local cumulative sum of g and S_c the state entering the chunk:

    o_t     = (q_t * exp(b_t)) S_c + sum_{s <= t in chunk} [sum_k q_tk k_sk exp(b_tk - b_sk)] v_s
    S_{c+1} = exp(b_last) * S_c + sum_s (k_s * exp(b_last - b_s)) v_s^T

Every exponent here is a difference b_t - b_s with t >= s, hence <= 0: nothing overflows, provided the differences
with t < s are masked to -inf *before* exp (they are). For per-channel decay the score matrix cannot be one matrix
product, because exp(b_t - b_s) does not factor without exp(-b_s) (which overflows). Such chunks are split into
sub-blocks of 16: off-diagonal sub-blocks factor through a reference point between them (both factors <= 1), the
diagonal ones are summed elementwise over the key channels.

Kernels (grid axes last-to-first: batch*heads, then blocks):
  _state_forward_kernel   sequential over chunks: the state entering every chunk, and the final state
  _output_forward_kernel  parallel over row blocks: inter-chunk (q against the chunk's state) + intra-chunk part
  _state_backward_kernel  sequential over chunks backwards: gradient of the state leaving every chunk
  _value_backward_kernel  parallel: dv
  _query_key_backward_kernel  parallel: dq, dk, and the per-position gradient of the cumulative decay
The gradient of g follows from dq and dk: with G the global cumulative decay, dL/dG_t = q_t*dq_t - k_t*dk_t (plus
S_T*dS_T at the last position), and dg is the reverse cumulative sum of that (done in PyTorch, float32).

q and k may have fewer heads than v (Mamba-2's groups): value head h reads query/key head h // (heads / qk_heads).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from passes.errors import BackendError

DECAY_NONE, DECAY_SCALAR, DECAY_CHANNEL = 0, 1, 2
CHANNEL_BLOCK = 16  # sub-block for per-channel decay: the elementwise diagonal part is BLOCK x BLOCK x key_dim


@triton.jit
def _load_rows(pointer, rows, columns, row_limit, column_limit, stride):
    mask = (rows[:, None] < row_limit) & (columns[None, :] < column_limit)
    return tl.load(pointer + rows[:, None] * stride + columns[None, :], mask=mask, other=0.0)


@triton.jit
def _load_values(v_base, scale_base, rows, values, seq_len, V: tl.constexpr, VALUE_SCALE: tl.constexpr,
                 ACC: tl.constexpr):
    """v rows, times a per-position scale when VALUE_SCALE (Mamba-2's v = x * dt, never materialized)."""
    block = _load_rows(v_base, rows, values, seq_len, V, V)
    if VALUE_SCALE:
        scale = tl.load(scale_base + rows, mask=rows < seq_len, other=0.0).to(ACC)
        block = (block * scale[:, None]).to(block.dtype)
    return block


@triton.jit
def _load_decay(decay_pointer, rows, columns, column_limit, DECAY: tl.constexpr):
    """Cumulative log-decay at `rows`: (rows,) for scalar decay, (rows, columns) per channel.

    The cumulative decay tensor is padded to whole chunks (with zeros beyond the sequence), so rows need no mask.
    """
    if DECAY == 2:
        return tl.load(decay_pointer + rows[:, None] * column_limit + columns[None, :],
                       mask=columns[None, :] < column_limit, other=0.0)
    else:
        return tl.load(decay_pointer + rows)


@triton.jit
def _state_forward_kernel(
    k_ptr, v_ptr, scale_ptr, decay_ptr, initial_ptr, states_ptr, final_ptr,
    seq_len, num_chunks, heads, group,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, DECAY: tl.constexpr, HAS_INITIAL: tl.constexpr,
    VALUE_SCALE: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_qk = (i_bh // heads) * (heads // group) + (i_bh % heads) // group
    keys = i_k * BK + tl.arange(0, BK)
    values = i_v * BV + tl.arange(0, BV)
    state_mask = (keys[:, None] < K) & (values[None, :] < V)
    state_offsets = keys[:, None] * V + values[None, :]
    k_base = k_ptr + i_qk * seq_len * K
    v_base = v_ptr + i_bh * seq_len * V
    scale_base = scale_ptr + i_bh * seq_len
    decay_base = decay_ptr + i_bh * num_chunks * CHUNK * (K if DECAY == 2 else 1)
    # The running state stays in the accumulator type; only the per-chunk copies take the input dtype.
    state = tl.zeros([BK, BV], dtype=ACC)
    if HAS_INITIAL:
        state += tl.load(initial_ptr + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(ACC)
    for chunk in range(num_chunks):
        tl.store(states_ptr + (i_bh * num_chunks + chunk) * K * V + state_offsets,
                 state.to(states_ptr.dtype.element_ty), mask=state_mask)
        last = chunk * CHUNK + CHUNK - 1
        update = tl.zeros([BK, BV], dtype=ACC)
        for start in tl.static_range(0, CHUNK, ROWS):  # unrolled: the chunk loop is the one pipelined
            rows = chunk * CHUNK + start + tl.arange(0, ROWS)
            keys_block = _load_rows(k_base, rows, keys, seq_len, K, K)
            values_block = _load_rows(v_base, rows, values, seq_len, V, V)
            # A per-position factor scales v, the operand that is not transposed (k^T goes to the matrix unit as
            # loaded): exp(b_last - b_s) <= 1, the decay from the position to the chunk's end, times Mamba-2's dt.
            if DECAY == 1:
                row_factor = tl.exp((tl.load(decay_base + last) - tl.load(decay_base + rows)).to(ACC))
                if VALUE_SCALE:
                    row_factor = row_factor * tl.load(scale_base + rows, mask=rows < seq_len, other=0.0).to(ACC)
                values_block = (values_block * row_factor[:, None]).to(values_block.dtype)
            elif VALUE_SCALE:
                row_factor = tl.load(scale_base + rows, mask=rows < seq_len, other=0.0).to(ACC)
                values_block = (values_block * row_factor[:, None]).to(values_block.dtype)
            if DECAY == 2:
                last_row = tl.load(decay_base + last * K + keys, mask=keys < K, other=0.0)
                decay_to_end = tl.exp((last_row[None, :] - _load_decay(decay_base, rows, keys, K, DECAY)).to(ACC))
                keys_block = (keys_block * decay_to_end).to(keys_block.dtype)
            update += tl.dot(tl.trans(keys_block), values_block, input_precision=PREC, out_dtype=ACC)
        if DECAY == 1:
            state = state * tl.exp(tl.load(decay_base + last).to(ACC))
        elif DECAY == 2:
            state = state * tl.exp(tl.load(decay_base + last * K + keys, mask=keys < K, other=0.0).to(ACC))[:, None]
        state += update
    tl.store(final_ptr + i_bh * K * V + state_offsets, state.to(final_ptr.dtype.element_ty), mask=state_mask)


@triton.jit
def _channel_scores(q_base, k_base, decay_base, row_start, column_start, seq_len,
                    K: tl.constexpr, BLOCK: tl.constexpr, KC: tl.constexpr, ACC: tl.constexpr):
    """Diagonal sub-block of per-channel decay scores: sum_k q_tk k_sk exp(b_tk - b_sk) for s <= t, else 0.

    Summed elementwise over key channels in slices of KC (the exponent is masked to -inf above the diagonal before
    exp, so exp never sees a positive argument).
    """
    rows = row_start + tl.arange(0, BLOCK)
    columns = column_start + tl.arange(0, BLOCK)
    causal = rows[:, None, None] >= columns[None, :, None]
    scores = tl.zeros([BLOCK, BLOCK], dtype=ACC)
    for channel_start in range(0, K, KC):
        channels = channel_start + tl.arange(0, KC)
        q_slice = _load_rows(q_base, rows, channels, seq_len, K, K).to(ACC)
        k_slice = _load_rows(k_base, columns, channels, seq_len, K, K).to(ACC)
        b_rows = _load_decay(decay_base, rows, channels, K, 2).to(ACC)
        b_columns = _load_decay(decay_base, columns, channels, K, 2).to(ACC)
        exponent = tl.where(causal, b_rows[:, None, :] - b_columns[None, :, :], float("-inf"))
        scores += tl.sum(q_slice[:, None, :] * k_slice[None, :, :] * tl.exp(exponent), axis=2)
    return scores


@triton.jit
def _output_forward_kernel(
    q_ptr, k_ptr, v_ptr, scale_ptr, decay_ptr, states_ptr, out_ptr,
    seq_len, num_chunks, heads, group,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, DECAY: tl.constexpr, VALUE_SCALE: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    i_v, i_row, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_qk = (i_bh // heads) * (heads // group) + (i_bh % heads) // group
    chunk = (i_row * BLOCK) // CHUNK
    first_block = chunk * (CHUNK // BLOCK)
    keys = tl.arange(0, BK)
    values = i_v * BV + tl.arange(0, BV)
    rows = i_row * BLOCK + tl.arange(0, BLOCK)
    q_base = q_ptr + i_qk * seq_len * K
    k_base = k_ptr + i_qk * seq_len * K
    v_base = v_ptr + i_bh * seq_len * V
    scale_base = scale_ptr + i_bh * seq_len
    decay_base = decay_ptr + i_bh * num_chunks * CHUNK * (K if DECAY == 2 else 1)

    queries = _load_rows(q_base, rows, keys, seq_len, K, K)
    state = _load_rows(states_ptr + (i_bh * num_chunks + chunk) * K * V, keys, values, K, V, V)
    # Inter-chunk: the query decayed from the chunk's start, against the state entering the chunk.
    if DECAY == 0:
        decayed_queries = queries
    elif DECAY == 1:
        # A per-row factor is applied to the product's rows afterwards, leaving q as loaded.
        b_rows = _load_decay(decay_base, rows, keys, K, DECAY).to(ACC)
        decayed_queries = queries
    else:
        b_rows = _load_decay(decay_base, rows, keys, K, DECAY).to(ACC)
        decayed_queries = (queries * tl.exp(b_rows)).to(queries.dtype)
        # Reference point for off-diagonal sub-blocks: the cumulative decay at this block's first row.
        reference = tl.load(decay_base + (i_row * BLOCK) * K + keys, mask=keys < K, other=0.0).to(ACC)
        referenced_queries = (queries * tl.exp(b_rows - reference[None, :])).to(queries.dtype)
    out = tl.dot(decayed_queries, state.to(queries.dtype), input_precision=PREC, out_dtype=ACC)
    if DECAY == 1:
        out = out * tl.exp(b_rows)[:, None]

    # Intra-chunk: column blocks from the chunk's start up to and including the diagonal one.
    for i_col in range(first_block, i_row + 1):
        columns = i_col * BLOCK + tl.arange(0, BLOCK)
        values_block = _load_rows(v_base, columns, values, seq_len, V, V)
        if DECAY == 2:
            if i_col < i_row:
                keys_block = _load_rows(k_base, columns, keys, seq_len, K, K)
                b_columns = _load_decay(decay_base, columns, keys, K, DECAY).to(ACC)
                referenced_keys = (keys_block * tl.exp(reference[None, :] - b_columns)).to(keys_block.dtype)
                scores = tl.dot(referenced_queries, tl.trans(referenced_keys), input_precision=PREC, out_dtype=ACC)
            else:
                scores = _channel_scores(q_base, k_base, decay_base, i_row * BLOCK, i_col * BLOCK, seq_len,
                                         K, BLOCK, KC, ACC)
        else:
            keys_block = _load_rows(k_base, columns, keys, seq_len, K, K)
            scores = tl.dot(queries, tl.trans(keys_block), input_precision=PREC, out_dtype=ACC)
            if DECAY == 1:
                b_columns = _load_decay(decay_base, columns, keys, K, DECAY).to(ACC)
                exponent = tl.where(rows[:, None] >= columns[None, :], b_rows[:, None] - b_columns[None, :],
                                    float("-inf"))
                scores = scores * tl.exp(exponent)
            else:
                scores = tl.where(rows[:, None] >= columns[None, :], scores, 0.0)
        if VALUE_SCALE:  # (A diag(dt)) V: scale the score columns, leaving v as loaded
            scores = scores * tl.load(scale_base + columns, mask=columns < seq_len, other=0.0).to(ACC)[None, :]
        out += tl.dot(scores.to(values_block.dtype), values_block, input_precision=PREC, out_dtype=ACC)
    out_mask = (rows[:, None] < seq_len) & (values[None, :] < V)
    tl.store(out_ptr + i_bh * seq_len * V + rows[:, None] * V + values[None, :], out.to(out_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _state_backward_kernel(
    q_ptr, do_ptr, decay_ptr, grad_final_ptr, grad_states_ptr, grad_initial_ptr,
    seq_len, num_chunks, heads, group,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, DECAY: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Mirror of _state_forward_kernel: dS_c = exp(b_last) dS_{c+1} + (q * exp(b))^T do over chunk c."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_qk = (i_bh // heads) * (heads // group) + (i_bh % heads) // group
    keys = i_k * BK + tl.arange(0, BK)
    values = i_v * BV + tl.arange(0, BV)
    state_mask = (keys[:, None] < K) & (values[None, :] < V)
    state_offsets = keys[:, None] * V + values[None, :]
    q_base = q_ptr + i_qk * seq_len * K
    do_base = do_ptr + i_bh * seq_len * V
    decay_base = decay_ptr + i_bh * num_chunks * CHUNK * (K if DECAY == 2 else 1)
    grad_state = tl.zeros([BK, BV], dtype=ACC)
    if HAS_GRAD_FINAL:
        grad_state += tl.load(grad_final_ptr + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(ACC)
    for reverse_chunk in range(num_chunks):
        chunk = num_chunks - 1 - reverse_chunk
        # grad_states[c] is the gradient of the state *leaving* chunk c (what dk and dv of chunk c need).
        tl.store(grad_states_ptr + (i_bh * num_chunks + chunk) * K * V + state_offsets,
                 grad_state.to(grad_states_ptr.dtype.element_ty), mask=state_mask)
        last = chunk * CHUNK + CHUNK - 1
        update = tl.zeros([BK, BV], dtype=ACC)
        for start in tl.static_range(0, CHUNK, ROWS):  # unrolled: the chunk loop is the one pipelined
            rows = chunk * CHUNK + start + tl.arange(0, ROWS)
            queries = _load_rows(q_base, rows, keys, seq_len, K, K)
            grad_out = _load_rows(do_base, rows, values, seq_len, V, V)
            if DECAY == 1:  # the per-row factor on the operand that is not transposed, as in the forward
                grad_out = (grad_out * tl.exp(tl.load(decay_base + rows).to(ACC))[:, None]).to(grad_out.dtype)
            elif DECAY == 2:
                queries = (queries * tl.exp(_load_decay(decay_base, rows, keys, K, DECAY).to(ACC))).to(queries.dtype)
            update += tl.dot(tl.trans(queries), grad_out, input_precision=PREC, out_dtype=ACC)
        if DECAY == 1:
            grad_state = grad_state * tl.exp(tl.load(decay_base + last).to(ACC))
        elif DECAY == 2:
            grad_state = grad_state * tl.exp(
                tl.load(decay_base + last * K + keys, mask=keys < K, other=0.0).to(ACC))[:, None]
        grad_state += update
    tl.store(grad_initial_ptr + i_bh * K * V + state_offsets, grad_state.to(grad_initial_ptr.dtype.element_ty),
             mask=state_mask)


@triton.jit
def _value_backward_kernel(
    q_ptr, k_ptr, do_ptr, decay_ptr, grad_states_ptr, dv_ptr,
    seq_len, num_chunks, heads, group,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """dv_s = sum_{t >= s in chunk} A_ts do_t + (k_s * exp(b_last - b_s)) dS_{c+1}, for one block of positions s."""
    i_v, i_col, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_qk = (i_bh // heads) * (heads // group) + (i_bh % heads) // group
    chunk = (i_col * BLOCK) // CHUNK
    end_block = (chunk + 1) * (CHUNK // BLOCK)
    keys = tl.arange(0, BK)
    values = i_v * BV + tl.arange(0, BV)
    columns = i_col * BLOCK + tl.arange(0, BLOCK)
    last = chunk * CHUNK + CHUNK - 1
    q_base = q_ptr + i_qk * seq_len * K
    k_base = k_ptr + i_qk * seq_len * K
    do_base = do_ptr + i_bh * seq_len * V
    decay_base = decay_ptr + i_bh * num_chunks * CHUNK * (K if DECAY == 2 else 1)

    keys_block = _load_rows(k_base, columns, keys, seq_len, K, K)
    grad_state = _load_rows(grad_states_ptr + (i_bh * num_chunks + chunk) * K * V, keys, values, K, V, V)
    if DECAY == 0:
        decayed_keys = keys_block
    elif DECAY == 1:
        b_columns = _load_decay(decay_base, columns, keys, K, DECAY).to(ACC)
        decayed_keys = (keys_block * tl.exp(tl.load(decay_base + last).to(ACC) - b_columns)[:, None]).to(
            keys_block.dtype)
    else:
        b_columns = _load_decay(decay_base, columns, keys, K, DECAY).to(ACC)
        b_last = tl.load(decay_base + last * K + keys, mask=keys < K, other=0.0).to(ACC)
        decayed_keys = (keys_block * tl.exp(b_last[None, :] - b_columns)).to(keys_block.dtype)
        # Reference for off-diagonal sub-blocks (rows after this block): the decay at this block's last position.
        reference = tl.load(decay_base + (i_col * BLOCK + BLOCK - 1) * K + keys, mask=keys < K, other=0.0).to(ACC)
        referenced_keys = (keys_block * tl.exp(reference[None, :] - b_columns)).to(keys_block.dtype)
    grad_values = tl.dot(decayed_keys, grad_state.to(keys_block.dtype), input_precision=PREC, out_dtype=ACC)

    for i_row in range(i_col, end_block):
        rows = i_row * BLOCK + tl.arange(0, BLOCK)
        grad_out = _load_rows(do_base, rows, values, seq_len, V, V)
        if DECAY == 2:
            if i_row > i_col:
                queries = _load_rows(q_base, rows, keys, seq_len, K, K)
                b_rows = _load_decay(decay_base, rows, keys, K, DECAY).to(ACC)
                referenced_queries = (queries * tl.exp(b_rows - reference[None, :])).to(queries.dtype)
                scores = tl.dot(referenced_queries, tl.trans(referenced_keys), input_precision=PREC, out_dtype=ACC)
            else:
                scores = _channel_scores(q_base, k_base, decay_base, i_row * BLOCK, i_col * BLOCK, seq_len,
                                         K, BLOCK, KC, ACC)
        else:
            queries = _load_rows(q_base, rows, keys, seq_len, K, K)
            scores = tl.dot(queries, tl.trans(keys_block), input_precision=PREC, out_dtype=ACC)
            if DECAY == 1:
                b_rows = _load_decay(decay_base, rows, keys, K, DECAY).to(ACC)
                exponent = tl.where(rows[:, None] >= columns[None, :], b_rows[:, None] - b_columns[None, :],
                                    float("-inf"))
                scores = scores * tl.exp(exponent)
            else:
                scores = tl.where(rows[:, None] >= columns[None, :], scores, 0.0)
        grad_values += tl.dot(tl.trans(scores.to(grad_out.dtype)), grad_out, input_precision=PREC, out_dtype=ACC)
    mask = (columns[:, None] < seq_len) & (values[None, :] < V)
    tl.store(dv_ptr + i_bh * seq_len * V + columns[:, None] * V + values[None, :],
             grad_values.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _query_key_backward_kernel(
    q_ptr, k_ptr, v_ptr, scale_ptr, do_ptr, decay_ptr, states_ptr, grad_states_ptr, dq_ptr, dk_ptr, grad_decay_ptr,
    seq_len, num_chunks, heads, group,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, DECAY: tl.constexpr, VALUE_SCALE: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """dq and dk of one block of positions, and q*dq - k*dk for the decay's gradient.

    dq_t = (do_t S_c^T) * exp(b_t) + sum_{s <= t} dA_ts k_s * exp(b_t - b_s)
    dk_s = (v_s dS_{c+1}^T) * exp(b_last - b_s) + sum_{t >= s} dA_ts q_t * exp(b_t - b_s),   dA_ts = do_t . v_s
    Key channels: all of them in one program for no / scalar decay (the decay's gradient sums over them); a slice of
    BK per program for per-channel decay (each channel's gradient is independent, and the elementwise diagonal part
    is BLOCK x BLOCK x BK). dq, dk are per value head; the caller sums them over a group sharing q/k.
    """
    i_k, i_block, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_qk = (i_bh // heads) * (heads // group) + (i_bh % heads) // group
    chunk = (i_block * BLOCK) // CHUNK
    first_block = chunk * (CHUNK // BLOCK)
    end_block = (chunk + 1) * (CHUNK // BLOCK)
    last = chunk * CHUNK + CHUNK - 1
    keys = i_k * BK + tl.arange(0, BK)
    values = tl.arange(0, BV)
    positions = i_block * BLOCK + tl.arange(0, BLOCK)
    q_base = q_ptr + i_qk * seq_len * K
    k_base = k_ptr + i_qk * seq_len * K
    v_base = v_ptr + i_bh * seq_len * V
    do_base = do_ptr + i_bh * seq_len * V
    scale_base = scale_ptr + i_bh * seq_len
    decay_base = decay_ptr + i_bh * num_chunks * CHUNK * (K if DECAY == 2 else 1)

    queries = _load_rows(q_base, positions, keys, seq_len, K, K)
    keys_block = _load_rows(k_base, positions, keys, seq_len, K, K)
    values_block = _load_values(v_base, scale_base, positions, values, seq_len, V, VALUE_SCALE, ACC)
    grad_out = _load_rows(do_base, positions, values, seq_len, V, V)
    state = _load_rows(states_ptr + (i_bh * num_chunks + chunk) * K * V, keys, values, K, V, V).to(queries.dtype)
    grad_state = _load_rows(grad_states_ptr + (i_bh * num_chunks + chunk) * K * V, keys, values, K, V, V).to(
        queries.dtype)
    grad_queries = tl.dot(grad_out, tl.trans(state), input_precision=PREC, out_dtype=ACC)
    grad_keys = tl.dot(values_block, tl.trans(grad_state), input_precision=PREC, out_dtype=ACC)
    if DECAY == 1:
        b_positions = _load_decay(decay_base, positions, keys, K, DECAY).to(ACC)
        grad_queries = grad_queries * tl.exp(b_positions)[:, None]
        grad_keys = grad_keys * tl.exp(tl.load(decay_base + last).to(ACC) - b_positions)[:, None]
    elif DECAY == 2:
        b_positions = _load_decay(decay_base, positions, keys, K, DECAY).to(ACC)
        b_last = tl.load(decay_base + last * K + keys, mask=keys < K, other=0.0).to(ACC)
        grad_queries = grad_queries * tl.exp(b_positions)
        grad_keys = grad_keys * tl.exp(b_last[None, :] - b_positions)
        # Off-diagonal sub-blocks factor through reference points: this block's first position for dq (keys come
        # before it), its last position for dk (queries come after it). Both factors are then <= 1.
        first_reference = tl.load(decay_base + (i_block * BLOCK) * K + keys, mask=keys < K, other=0.0).to(ACC)
        last_reference = tl.load(decay_base + (i_block * BLOCK + BLOCK - 1) * K + keys, mask=keys < K,
                                 other=0.0).to(ACC)
        off_diagonal_dq = tl.zeros([BLOCK, BK], dtype=ACC)
        off_diagonal_dk = tl.zeros([BLOCK, BK], dtype=ACC)

    # dq: key blocks s from the chunk's start to this block.
    for i_col in range(first_block, i_block + 1):
        columns = i_col * BLOCK + tl.arange(0, BLOCK)
        other_keys = _load_rows(k_base, columns, keys, seq_len, K, K)
        other_values = _load_values(v_base, scale_base, columns, values, seq_len, V, VALUE_SCALE, ACC)
        grad_scores = tl.dot(grad_out, tl.trans(other_values), input_precision=PREC, out_dtype=ACC)
        if DECAY == 2:
            b_columns = _load_decay(decay_base, columns, keys, K, DECAY).to(ACC)
            if i_col < i_block:
                referenced_keys = (other_keys * tl.exp(first_reference[None, :] - b_columns)).to(other_keys.dtype)
                off_diagonal_dq += tl.dot(grad_scores.to(other_keys.dtype), referenced_keys, input_precision=PREC,
                                          out_dtype=ACC)
            else:
                factors = tl.exp(tl.where(positions[:, None, None] >= columns[None, :, None],
                                          b_positions[:, None, :] - b_columns[None, :, :], float("-inf")))
                grad_queries += tl.sum(grad_scores[:, :, None] * other_keys.to(ACC)[None, :, :] * factors, axis=1)
        else:
            if DECAY == 1:
                b_columns = _load_decay(decay_base, columns, keys, K, DECAY).to(ACC)
                exponent = tl.where(positions[:, None] >= columns[None, :],
                                    b_positions[:, None] - b_columns[None, :], float("-inf"))
                grad_scores = grad_scores * tl.exp(exponent)
            else:
                grad_scores = tl.where(positions[:, None] >= columns[None, :], grad_scores, 0.0)
            grad_queries += tl.dot(grad_scores.to(other_keys.dtype), other_keys, input_precision=PREC, out_dtype=ACC)
    # dk: query blocks t from this block to the chunk's end.
    for i_row in range(i_block, end_block):
        rows = i_row * BLOCK + tl.arange(0, BLOCK)
        other_queries = _load_rows(q_base, rows, keys, seq_len, K, K)
        other_grad_out = _load_rows(do_base, rows, values, seq_len, V, V)
        grad_scores = tl.dot(other_grad_out, tl.trans(values_block), input_precision=PREC, out_dtype=ACC)
        if DECAY == 2:
            b_rows = _load_decay(decay_base, rows, keys, K, DECAY).to(ACC)
            if i_row > i_block:
                referenced_queries = (other_queries * tl.exp(b_rows - last_reference[None, :])).to(
                    other_queries.dtype)
                off_diagonal_dk += tl.dot(tl.trans(grad_scores.to(other_queries.dtype)), referenced_queries,
                                          input_precision=PREC, out_dtype=ACC)
            else:
                factors = tl.exp(tl.where(rows[:, None, None] >= positions[None, :, None],
                                          b_rows[:, None, :] - b_positions[None, :, :], float("-inf")))
                grad_keys += tl.sum(grad_scores[:, :, None] * other_queries.to(ACC)[:, None, :] * factors, axis=0)
        else:
            if DECAY == 1:
                b_rows = _load_decay(decay_base, rows, keys, K, DECAY).to(ACC)
                exponent = tl.where(rows[:, None] >= positions[None, :], b_rows[:, None] - b_positions[None, :],
                                    float("-inf"))
                grad_scores = grad_scores * tl.exp(exponent)
            else:
                grad_scores = tl.where(rows[:, None] >= positions[None, :], grad_scores, 0.0)
            grad_keys += tl.dot(tl.trans(grad_scores.to(other_queries.dtype)), other_queries, input_precision=PREC,
                                out_dtype=ACC)
    if DECAY == 2:
        grad_queries += off_diagonal_dq * tl.exp(b_positions - first_reference[None, :])
        grad_keys += off_diagonal_dk * tl.exp(last_reference[None, :] - b_positions)

    row_mask = positions < seq_len
    mask = row_mask[:, None] & (keys[None, :] < K)
    out_offsets = i_bh * seq_len * K + positions[:, None] * K + keys[None, :]
    tl.store(dq_ptr + out_offsets, grad_queries.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + out_offsets, grad_keys.to(dk_ptr.dtype.element_ty), mask=mask)
    # The decay's gradient uses dq, dk before rounding to the output dtype.
    grad_decay = queries.to(ACC) * grad_queries - keys_block.to(ACC) * grad_keys
    if DECAY == 1:
        tl.store(grad_decay_ptr + i_bh * seq_len + positions, tl.sum(grad_decay, axis=1).to(
            grad_decay_ptr.dtype.element_ty), mask=row_mask)
    elif DECAY == 2:
        tl.store(grad_decay_ptr + out_offsets, grad_decay.to(grad_decay_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------------------------
def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and states are float32, except for float64 inputs (the tests' precision), which stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_settings(dtype: torch.dtype):
    # float32 inputs use exact (not tf32) products: the float32 path is the precise one; bf16/fp16 is the fast one.
    accumulator = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "ieee" if dtype == torch.float32 else None
    return precision, accumulator


def decay_mode(log_decay: Optional[torch.Tensor]) -> int:
    if log_decay is None:
        return DECAY_NONE
    return DECAY_CHANNEL if log_decay.dim() == 4 else DECAY_SCALAR


def cumulative_decay(log_decay: Optional[torch.Tensor], chunk_size: int, num_chunks: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Chunk-local inclusive cumulative sums of the log-decay, padded with zeros to whole chunks.

    Returns (batch, heads, num_chunks * chunk_size) or (..., key_dim); a one-element dummy when there is no decay.
    """
    if log_decay is None:
        return torch.zeros(1, dtype=dtype)
    batch, heads, seq_len = log_decay.shape[:3]
    padded = torch.zeros(batch, heads, num_chunks * chunk_size, *log_decay.shape[3:], dtype=dtype,
                         device=log_decay.device)
    padded[:, :, :seq_len] = log_decay
    chunked = padded.view(batch, heads, num_chunks, chunk_size, *log_decay.shape[3:]).cumsum(dim=3)
    return chunked.view(padded.shape).contiguous()


# Launch parameters per kernel (the benchmark overrides them to sweep). Values chosen on an H200 at 128k, bf16.
# ROWS: rows per step of the sequential state kernels; BLOCK: rows per program of the output kernel (no or scalar
# decay; per-channel decay always uses CHANNEL_BLOCK). Both are clipped to the chunk size.
# The forward values are the fastest of benchmarks/bench_subquadratic.py's sweep (H200, T=128k, H=32, D=128, bf16).
LAUNCH = {
    "state": dict(BK=64, BV=64, ROWS=64, num_warps=4, num_stages=4),
    "output": dict(BV=128, BLOCK=64, num_warps=4, num_stages=2),
    "state_backward": dict(BK=64, BV=64, ROWS=64, num_warps=4, num_stages=3),
    "value_backward": dict(BV=64, num_warps=4, num_stages=2),
    "query_key_backward": dict(num_warps=8, num_stages=2),
}
# {chunk_size: {kernel: settings}} overrides: SSD's chunk 256 steps the state 128 rows at a time.
LAUNCH_BY_CHUNK: dict = {
    256: dict(LAUNCH, state=dict(BK=64, BV=64, ROWS=128, num_warps=4, num_stages=3)),
}


def _launch(name: str, key_dim: int = 0, value_dim: int = 0, chunk_size: int = 64):
    """(block sizes clipped to the head dims and the chunk, compiler options) for one kernel."""
    settings = dict(LAUNCH_BY_CHUNK.get(chunk_size, {}).get(name, LAUNCH[name]))
    options = dict(num_warps=settings.pop("num_warps"), num_stages=settings.pop("num_stages"))
    if "BK" in settings:
        settings["BK"] = min(settings["BK"], triton.next_power_of_2(key_dim))
    if "BV" in settings:
        settings["BV"] = min(settings["BV"], triton.next_power_of_2(value_dim))
    for rows in ("ROWS", "BLOCK"):
        if rows in settings:
            settings[rows] = min(settings[rows], chunk_size)
    return settings, options


def _or_dummy(tensor: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """Kernels take a pointer for every optional input; a constexpr flag says whether it is read."""
    return tensor if tensor is not None else dummy


def _block_sizes(key_dim: int, value_dim: int, chunk_size: int, mode: int):
    full_key = triton.next_power_of_2(key_dim)
    full_value = triton.next_power_of_2(value_dim)
    block = CHANNEL_BLOCK if mode == DECAY_CHANNEL else min(64, chunk_size)  # backward kernels' row block
    return dict(block=block, full_key=full_key, full_value=full_value, channel_slice=min(full_key, 32))


def _check_chunk_size(chunk_size: int) -> None:
    # Powers of two >= 16 are whole numbers of blocks (64, or 16 for per-channel decay) and valid matrix shapes.
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise BackendError(f"chunk_size must be a power of two >= 16; got {chunk_size}")


def _state_pass(k, v, value_scale, cumulative, initial_state, chunk_size, mode, sizes, heads, group):
    """Launch _state_forward_kernel: states entering every chunk (input dtype for half inputs) and the final one."""
    batch, _, seq_len, key_dim = k.shape
    value_dim = v.shape[-1]
    num_chunks = triton.cdiv(seq_len, chunk_size)
    accumulator = accumulator_dtype(k.dtype)
    state_dtype = k.dtype if k.dtype in (torch.float16, torch.bfloat16) else accumulator
    states = torch.empty(batch, heads, num_chunks, key_dim, value_dim, dtype=state_dtype, device=k.device)
    final = torch.empty(batch, heads, key_dim, value_dim, dtype=accumulator, device=k.device)
    precision, acc = _dot_settings(k.dtype)
    blocks, options = _launch("state", key_dim, value_dim, chunk_size)
    grid = (triton.cdiv(key_dim, blocks["BK"]), triton.cdiv(value_dim, blocks["BV"]), batch * heads)
    _state_forward_kernel[grid](
        k, v, _or_dummy(value_scale, final), cumulative, _or_dummy(initial_state, final), states, final,
        seq_len, num_chunks, heads, group,
        K=key_dim, V=value_dim, CHUNK=chunk_size, DECAY=mode,
        HAS_INITIAL=initial_state is not None, VALUE_SCALE=value_scale is not None, PREC=precision, ACC=acc,
        **blocks, **options,
    )
    return states, final


def chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                  initial_state: Optional[torch.Tensor], chunk_size: int,
                  value_scale: Optional[torch.Tensor] = None):
    """Causal linear attention with decay, chunked. Returns (out like v, final state (batch, heads, K, V)).

    q, k: (batch, qk_heads, seq, key_dim), v: (batch, heads, seq, value_dim), qk_heads divides heads; log_decay:
    None, (batch, heads, seq) or (batch, heads, seq, key_dim); initial_state: (batch, heads, key_dim, value_dim).
    value_scale: None or (batch, heads, seq): the values used are v * value_scale[..., None] (Mamba-2's x * dt),
    scaled as they are loaded. All contiguous. The final state is float32 (float64 for float64 inputs).
    """
    batch, heads, seq_len, value_dim = v.shape
    key_dim = q.shape[-1]
    group = heads // q.shape[1]
    mode = decay_mode(log_decay)
    _check_chunk_size(chunk_size)
    num_chunks = triton.cdiv(seq_len, chunk_size)
    accumulator = accumulator_dtype(q.dtype)
    sizes = _block_sizes(key_dim, value_dim, chunk_size, mode)
    cumulative = cumulative_decay(log_decay, chunk_size, num_chunks, accumulator).to(q.device)
    if initial_state is not None:
        initial_state = initial_state.to(accumulator).contiguous()
    states, final = _state_pass(k, v, value_scale, cumulative, initial_state, chunk_size, mode, sizes, heads, group)
    out = torch.empty_like(v)
    precision, acc = _dot_settings(q.dtype)
    blocks, options = _launch("output", value_dim=value_dim, chunk_size=chunk_size)
    if mode == DECAY_CHANNEL:
        blocks["BLOCK"] = CHANNEL_BLOCK
    grid = (triton.cdiv(value_dim, blocks["BV"]), num_chunks * (chunk_size // blocks["BLOCK"]), batch * heads)
    _output_forward_kernel[grid](
        q, k, v, _or_dummy(value_scale, final), cumulative, states, out, seq_len, num_chunks, heads, group,
        K=key_dim, V=value_dim, BK=sizes["full_key"], KC=sizes["channel_slice"], CHUNK=chunk_size,
        DECAY=mode, VALUE_SCALE=value_scale is not None, PREC=precision, ACC=acc, **blocks, **options,
    )
    return out, final


def chunk_backward(grad_out: torch.Tensor, grad_final: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, log_decay: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                   final_state: torch.Tensor, chunk_size: int, value_scale: Optional[torch.Tensor] = None):
    """Gradients of chunk_forward. Returns (dq, dk, dv, d_log_decay or None, d_initial_state or None).

    With value_scale, dv is the gradient of the scaled values v * value_scale (the caller applies the chain rule).

    The per-chunk states are recomputed (one more sequential pass) instead of kept from the forward: they are
    num_chunks * key_dim * value_dim per head, as large as q itself for chunk 64 and head dim 128.
    """
    batch, heads, seq_len, value_dim = v.shape
    qk_heads, key_dim = q.shape[1], q.shape[-1]
    group = heads // qk_heads
    mode = decay_mode(log_decay)
    num_chunks = triton.cdiv(seq_len, chunk_size)
    accumulator = accumulator_dtype(q.dtype)
    sizes = _block_sizes(key_dim, value_dim, chunk_size, mode)
    cumulative = cumulative_decay(log_decay, chunk_size, num_chunks, accumulator).to(q.device)
    if initial_state is not None:
        initial_state = initial_state.to(accumulator).contiguous()
    grad_out = grad_out.contiguous()
    states, _ = _state_pass(k, v, value_scale, cumulative, initial_state, chunk_size, mode, sizes, heads, group)
    precision, acc = _dot_settings(q.dtype)

    grad_states = torch.empty_like(states)
    grad_initial = torch.empty(batch, heads, key_dim, value_dim, dtype=accumulator, device=q.device)
    if grad_final is not None:
        grad_final = grad_final.to(accumulator).contiguous()
    blocks, options = _launch("state_backward", key_dim, value_dim, chunk_size)
    grid = (triton.cdiv(key_dim, blocks["BK"]), triton.cdiv(value_dim, blocks["BV"]), batch * heads)
    _state_backward_kernel[grid](
        q, grad_out, cumulative, _or_dummy(grad_final, grad_initial), grad_states, grad_initial,
        seq_len, num_chunks, heads, group,
        K=key_dim, V=value_dim, CHUNK=chunk_size, DECAY=mode,
        HAS_GRAD_FINAL=grad_final is not None, PREC=precision, ACC=acc, **blocks, **options,
    )

    blocks = num_chunks * (chunk_size // sizes["block"])
    grad_v = torch.empty_like(v)
    value_blocks, options = _launch("value_backward", value_dim=value_dim, chunk_size=chunk_size)
    grid = (triton.cdiv(value_dim, value_blocks["BV"]), blocks, batch * heads)
    _value_backward_kernel[grid](
        q, k, grad_out, cumulative, grad_states, grad_v, seq_len, num_chunks, heads, group,
        K=key_dim, V=value_dim, BK=sizes["full_key"], KC=sizes["channel_slice"], CHUNK=chunk_size,
        BLOCK=sizes["block"], DECAY=mode, PREC=precision, ACC=acc, **value_blocks, **options,
    )

    # dq, dk per value head; float32 when a group's heads are summed afterwards.
    per_head_dtype = q.dtype if group == 1 else accumulator
    grad_q = torch.empty(batch, heads, seq_len, key_dim, dtype=per_head_dtype, device=q.device)
    grad_k = torch.empty_like(grad_q)
    if mode == DECAY_NONE:
        grad_decay = torch.empty(1, dtype=accumulator, device=q.device)
    else:
        grad_decay = torch.empty(log_decay.shape, dtype=accumulator, device=q.device)
    key_block = sizes["channel_slice"] if mode == DECAY_CHANNEL else sizes["full_key"]
    grid = (triton.cdiv(key_dim, key_block), blocks, batch * heads)
    _query_key_backward_kernel[grid](
        q, k, v, _or_dummy(value_scale, grad_initial), grad_out, cumulative, states, grad_states, grad_q, grad_k,
        grad_decay, seq_len, num_chunks, heads, group,
        K=key_dim, V=value_dim, BK=key_block, BV=sizes["full_value"], CHUNK=chunk_size, BLOCK=sizes["block"],
        DECAY=mode, VALUE_SCALE=value_scale is not None, PREC=precision, ACC=acc, **_launch("query_key_backward")[1],
    )
    if group > 1:
        grad_q = grad_q.view(batch, qk_heads, group, seq_len, key_dim).sum(2).to(q.dtype)
        grad_k = grad_k.view(batch, qk_heads, group, seq_len, key_dim).sum(2).to(k.dtype)

    grad_log_decay = None
    if mode != DECAY_NONE:
        if grad_final is not None:
            # The final state carries exp(G_last) on every term: dL/dG_last += sum over values of dS_T * S_T.
            final_term = (grad_final * final_state.to(accumulator)).sum(-1)
            grad_decay[:, :, -1] += final_term.sum(-1) if mode == DECAY_SCALAR else final_term
        grad_log_decay = grad_decay.flip(2).cumsum(2).flip(2).to(log_decay.dtype)
    return grad_q, grad_k, grad_v, grad_log_decay, (grad_initial if initial_state is not None else None)
