"""Exact tiled attention in Triton: one forward kernel and three backward kernels for full, causal, sliding-window
(with attention sinks) and key-padded attention, with grouped-query heads.

Reading order: the visibility rule and the block ranges that every kernel shares, the forward kernel, the backward
kernels (delta preprocess, dK/dV, dQ), the small autotuner, and the launch wrappers `flash_forward` and
`flash_backward`. The custom op and its autograd live in backends/flash/op.py.

Visibility of key j to query i (positions from 0, top-left aligned as SDPA's is_causal):
    causal, no window      j <= i
    causal, window W       i - W < j <= i
    not causal, window W   |i - j| < W
    sinks n (with a window) j < n is visible too (still j <= i when causal)
    key_padding_mask       keys with mask False are never visible
A row with no visible key gives out = 0 and lse = -inf.

Tiling: a program owns BLOCK_M queries (forward, dQ) or BLOCK_N keys (dK/dV) and walks the other side in three
ranges: blocks that some query/key pair of the tile cannot see are SKIPPED by the loop bounds; blocks that every pair
sees run without a mask; only the edge blocks (window start, diagonal, sequence tail, sink blocks) evaluate the mask.
(One pipelined loop with a uniform mask branch was measured too: 6% slower causal forward, 8% slower backward on the
H200, within noise for the sliding window; three loops stay.)
Scores are kept in the log2 domain: log2(e) is folded into the scale so the softmax uses exp2.
On Hopper-class GPUs the tiles arrive through tensor descriptors (TMA: asynchronous copies, no address registers,
zero-filled tails), built per (batch, head) so that any 16-byte-aligned layout qualifies; other layouts and older
GPUs take pointer loads (`_load_rows`). Measured on the H200: 9-12% faster forward, 18% faster dK/dV kernel.
Exponentials: all on the special-function unit (exp2, 16 per clock per SM) by default; a forward launch configuration
may put a fixed share of each unmasked score tile's columns on a polynomial exp2 evaluated with FMAs (`_exp2_split`,
as FlashAttention-4 does). That share is tuned in only for non-causal attention without a window at head dim 128,
16-bit, 16k-32k keys (1 of 16 chunks, 3-4% faster at 32k on the H100); elsewhere it measured slower or no faster
(or, from 64k keys, was not measured).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from backends.flash.options import AttentionOptions
from passes.errors import BackendError

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def gluon_forward():
    """The warp-specialized Gluon forward's module (backends/flash/hopper.py) when ATTENTION_PLANNER_GLUON=1 and this
    Triton has Gluon's Hopper API; else None. Off by default: it measured slower than this file's forward
    (benchmarks/RESULTS.md, "Warp-specialized forward in Gluon"). When on, the forward's tuner times it beside the
    Triton configurations and keeps it only where it is faster."""
    if os.environ.get("ATTENTION_PLANNER_GLUON") != "1":
        return None
    try:
        from backends.flash import hopper
    except (ImportError, AttributeError):  # no Gluon, or one whose Hopper API differs
        return None
    return hopper


# ----------------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _visible(rows, cols, kv_len, window, sinks, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_SINKS: tl.constexpr):
    """Boolean tile: may query `rows` see key `cols` (broadcast shapes, e.g. (M, 1) and (1, N))."""
    visible = cols < kv_len
    if HAS_WINDOW:
        if CAUSAL:
            band = (cols <= rows) & (cols > rows - window)
        else:
            band = (cols > rows - window) & (cols < rows + window)
        if HAS_SINKS:
            sink = cols < sinks
            if CAUSAL:
                sink = sink & (cols <= rows)
            band = band | sink
        visible = visible & band
    elif CAUSAL:
        visible = visible & (cols <= rows)
    return visible


@triton.jit
def _key_ranges(m_first, m_last, kv_len, window, sinks, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Key ranges for queries m_first..m_last: (sink_blocks, key_lo, full_lo, full_hi, key_hi).

    [0, sink_blocks * BLOCK_N) and [key_lo, full_lo): masked (sinks, window start);
    [full_lo, full_hi): every query sees every key, no mask; [full_hi, key_hi): masked (diagonal, window end, tail).
    Keys outside these ranges are invisible to every query of the block and are never loaded.
    """
    if CAUSAL:
        key_hi = tl.minimum(kv_len, m_last + 1)
    elif HAS_WINDOW:
        key_hi = tl.minimum(kv_len, m_last + window)
    else:
        key_hi = kv_len + 0 * m_first
    key_lo = 0 * m_first
    full_lo = 0 * m_first
    if HAS_WINDOW:
        # Floor/ceil on non-negative values only: integer division truncates toward zero.
        key_lo = tl.maximum(m_first - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = (tl.maximum(m_last - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    key_lo = tl.minimum(key_lo, key_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, key_lo), key_hi)
    if CAUSAL:
        full_hi = (m_first + 1) // BLOCK_N * BLOCK_N
    elif HAS_WINDOW:
        full_hi = (m_first + window) // BLOCK_N * BLOCK_N
    else:
        full_hi = kv_len + 0 * m_first
    # Unmasked blocks must also lie wholly inside the keys (the partial last block is masked).
    full_hi = tl.minimum(full_hi, kv_len // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(tl.minimum(full_hi, key_hi), full_lo)
    sink_blocks = 0 * m_first
    if HAS_SINKS:
        # Sink keys that the window range does not already cover.
        sink_blocks = (tl.minimum(sinks, key_lo) + BLOCK_N - 1) // BLOCK_N
    return sink_blocks, key_lo, full_lo, full_hi, key_hi


@triton.jit
def _query_ranges(n_first, n_last, q_len, window, sinks, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Query ranges for keys n_first..n_last: (q_lo, full_lo, full_hi, q_hi), the mirror of _key_ranges.

    [q_lo, full_lo) and [full_hi, q_hi) are masked; [full_lo, full_hi) sees all keys of the block.
    """
    if CAUSAL:
        q_lo = n_first // BLOCK_M * BLOCK_M
    elif HAS_WINDOW:
        q_lo = tl.maximum(n_first - window + 1, 0) // BLOCK_M * BLOCK_M
    else:
        q_lo = 0 * n_first
    if HAS_WINDOW:
        q_hi = tl.minimum(q_len, n_last + window)
    else:
        q_hi = q_len + 0 * n_first
    if CAUSAL:
        full_lo = (n_last + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    elif HAS_WINDOW:
        full_lo = (tl.maximum(n_last - window + 1, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        full_lo = q_lo
    if HAS_WINDOW:
        full_hi = (n_first + window) // BLOCK_M * BLOCK_M
    else:
        full_hi = q_hi
    if HAS_SINKS:
        # A key block holding sinks is seen by every later query: widen to all of them, all masked (rare blocks).
        holds_sinks = n_first < sinks
        if CAUSAL:
            q_lo = tl.where(holds_sinks, n_first // BLOCK_M * BLOCK_M, q_lo)
        else:
            q_lo = tl.where(holds_sinks, 0, q_lo)
        q_hi = tl.where(holds_sinks, q_len, q_hi)
        full_lo = tl.where(holds_sinks, q_hi, full_lo)
    q_lo = tl.minimum(q_lo, q_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, q_lo), q_hi)
    # Query rows past q_len need no mask: they load zeros and lse = +inf, so they contribute nothing.
    full_hi = tl.maximum(tl.minimum(full_hi, q_hi), full_lo)
    return q_lo, full_lo, full_hi, q_hi


@triton.jit
def _soft_cap(scores, softcap_log2):
    """(capped, t): tanh soft-capping of log2-domain scores, in fp32, and t = tanh(s / softcap) for the backward.

    LOG2E * c * tanh(s / c) = c2 * tanh(s2 / c2) with c2 = c * LOG2E and s2 = s * LOG2E, so the cap applies to the
    log2-domain scores as it is. tanh(x) = 1 - 2 / (exp(2x) + 1) through exp2: one form for every Triton version
    and the interpreter (no libdevice); exp2 overflowing to inf gives 1 and underflowing to 0 gives -1, never NaN;
    its absolute error stays ~1e-7 in fp32 (FlashAttention uses the ~1e-3 hardware tanh.approx).
    """
    t = 1.0 - 2.0 / (tl.math.exp2(scores * (2.8853900817779268 / softcap_log2)) + 1.0)
    return softcap_log2 * t, t


# A score tile's columns are counted in EXP2_CHUNKS equal chunks for the split between the exponential units; a
# forward launch configuration's optional fifth entry says how many of them take the polynomial (0: all exp2).
EXP2_CHUNKS = 16


@triton.jit
def _exp2_poly(x, DEGREE: tl.constexpr):
    """2^x for finite x <= ~127 on the FMA units, without the special-function unit (MUFU, 16 per clock per SM).

    Cody-Waite: x = n + f with n = round(x) (adding 1.5 * 2^23 rounds in the adder, which also leaves n in the low
    mantissa bits of the sum: no float-to-int conversion, which runs at the MUFU's rate), 2^f by a polynomial,
    and n added to the exponent bits. The sum's bits are 0x4B400000 + n; shifted left by 23 the constant part
    leaves the 32 bits, so (bits << 23) is n << 23 exactly. x is clamped at -126, where 2^x is a subnormal or 0,
    i.e. 0 next to a row's maximum of 1: callers pass x = s - max <= ~0, never -inf (masked tiles use exp2).
    Coefficients: minimax relative error on [-1/2, 1/2] with p(0) = 1 exactly (a row's maximum gets exactly 1).
    Max relative error in fp32: degree 3 1.0e-4, 20x under bf16's half-ulp (2^-9), so 16-bit P rounds as with
    exp2; degree 5 1.1e-7, fp32 rounding, for fp32 inputs. tests/test_flash_triton.py holds both bounds.
    """
    x = tl.maximum(x, -126.0)
    shifted = x + 12582912.0
    f = x - (shifted - 12582912.0)
    if DEGREE == 5:
        p = 0.0013264728477224708
        p = p * f + 0.009671512991189957
        p = p * f + 0.05550733581185341
        p = p * f + 0.24022242426872253
        p = p * f + 0.6931470036506653
    else:
        p = 0.05500893294811249 * f + 0.2422109991312027
        p = p * f + 0.6932829022407532
    p = p * f + 1.0
    bits = p.to(tl.int32, bitcast=True) + (shifted.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_split(x, POLY: tl.constexpr, CHUNKS: tl.constexpr, DEGREE: tl.constexpr):
    """2^x of a (rows, columns) tile: the first POLY of CHUNKS equal column chunks by _exp2_poly (FMA units), the
    rest by exp2 (MUFU), so that both units work on one tile, as FlashAttention-4 splits its exponentials.

    The halves come from reshape (rows, 2, columns / 2) + permute + split: the column bits that pick a chunk are
    register bits of the MMA accumulator's layout for chunks of >= 8 columns, so the split and the join move no
    data (the sm_90 compile test checks the PTX: the expected number of ex2 instructions fewer, no added shared-
    memory access or shuffle).
    """
    if POLY == 0:
        y = tl.math.exp2(x)
    elif POLY == CHUNKS:
        y = _exp2_poly(x, DEGREE)
    else:
        first, second = tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, x.shape[1] // 2]), [0, 2, 1]))
        if POLY >= CHUNKS // 2:
            first = _exp2_poly(first, DEGREE)
            second = _exp2_split(second, POLY - CHUNKS // 2, CHUNKS // 2, DEGREE)
        else:
            first = _exp2_split(first, POLY, CHUNKS // 2, DEGREE)
            second = tl.math.exp2(second)
        y = tl.reshape(tl.permute(tl.join(first, second), [0, 2, 1]), [x.shape[0], x.shape[1]])
    return y


# Sizes and counts vary per call: no recompile for values that happen to be 1 or multiples of 16 (strides keep it).
_RUNTIME_INTS = ["heads", "kv_heads", "group", "q_len", "kv_len", "window", "sinks", "q_rows", "k_rows", "v_rows"]


def _jit_runtime_ints(fn):
    return triton.jit(fn, do_not_specialize=[name for name in _RUNTIME_INTS if name in fn.__code__.co_varnames])


# ----------------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_descriptor(base, rows, columns, row_stride, BLOCK_ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """A tensor descriptor (TMA) over the (rows, columns) row-major matrix at `base`, copying (BLOCK_ROWS, WIDTH)
    tiles; rows past the end arrive as zeros."""
    return tl.make_tensor_descriptor(base, shape=[rows, columns], strides=[row_stride, 1],
                                     block_shape=[BLOCK_ROWS, WIDTH])


@triton.jit
def _row_and_column(offset, row_stride):
    """Where element `offset` of a tensor lies in its storage seen as rows of `row_stride` (int32 coordinates)."""
    return (offset // row_stride).to(tl.int32), (offset % row_stride).to(tl.int32)


@triton.jit
def _load_rows(src, row0, col0, first_row, stride_row, row_count, WIDTH: tl.constexpr, ROWS: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows first_row .. first_row + ROWS of a (row_count, WIDTH) matrix, zeros past row_count.

    With USE_TMA, `src` is a tensor descriptor: the copy engine (TMA) fetches the tile asynchronously without
    address registers; the matrix starts at (row0, col0) of the descriptor's (0, 0 for one built per head, which
    fills rows past the end with zeros itself). Else `src` is the matrix's base pointer.
    """
    # One return at the end: Triton 3.6 still compiles what follows a return inside a constexpr branch.
    if USE_TMA:
        rows = src.load([row0 + first_row, col0])
    else:
        offs_row = first_row + tl.arange(0, ROWS)
        ptrs = src + offs_row[:, None] * stride_row + tl.arange(0, WIDTH)[None, :]
        if MASKED:
            rows = tl.load(ptrs, mask=offs_row[:, None] < row_count, other=0.0)
        else:  # an unmasked block lies wholly inside the rows
            rows = tl.load(ptrs)
    return rows


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_src, v_src, k_row0, k_col0, v_row0, v_col0, bias_base, stride_kn, stride_vn,
              start_n, offs_m, kv_len, window, sinks, qk_scale, softcap_log2, D_QK: tl.constexpr, D_V: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SINKS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr,
              TENSOR_DESC: tl.constexpr, INPUT_PRECISION: tl.constexpr, POLY_EXP2: tl.constexpr,
              POLY_DEGREE: tl.constexpr):
    """One key block of the online softmax: scores, running max/sum update, accumulate P @ V.

    k_src, v_src: tensor descriptors when USE_TMA (of this (batch, kv head), or with TENSOR_DESC of the whole
    tensor, this head's rows starting at (row0, col0)), else base pointers.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_src, k_row0, k_col0, start_n, stride_kn, kv_len, D_QK, BLOCK_N, MASKED, USE_TMA)
    # V is requested with K, before the scores: its copy then overlaps QK^T and the softmax (6% on the H200 with TMA)
    v = _load_rows(v_src, v_row0, v_col0, start_n, stride_vn, kv_len, D_V, BLOCK_N, MASKED, USE_TMA)
    if TENSOR_DESC and MASKED:  # rows past kv_len are another head's (or batch's): p = 0 there, but 0 * inf = nan
        v = tl.where((offs_n < kv_len)[:, None], v, 0.0)
    raw = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MASKED or HAS_SOFTCAP or HAS_PAD:
        scores = raw * qk_scale
        if HAS_SOFTCAP:  # before the padding and the masks, as the models do
            scores, _ = _soft_cap(scores, softcap_log2)
        if HAS_PAD:
            scores += tl.load(bias_base + offs_n, mask=offs_n < kv_len, other=float("-inf"))[None, :]
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], kv_len, window, sinks, CAUSAL, HAS_WINDOW,
                               HAS_SINKS)
            scores = tl.where(visible, scores, float("-inf"))
        # m_i starts finite (-1e30), so a fully masked tile keeps m_new finite and exp2(-inf - m_new) = 0, never NaN.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
    else:
        # Plain interior tile: the row max of the raw scores, scaled after (qk_scale > 0, the wrapper sees to it),
        # then one FMA per score (raw * scale - max) instead of a multiply and a subtract: 3-4% on the H200.
        m_new = tl.maximum(m_i, tl.max(raw, 1) * qk_scale)
        # POLY_EXP2 of EXP2_CHUNKS column chunks on the FMA units (0: all on MUFU). Only here: the scores are finite
        # (no -inf from masks or padding, which the clamped polynomial would turn into 2^-126, not 0).
        p = _exp2_split(raw * qk_scale - m_new[:, None], POLY_EXP2, 16, POLY_DEGREE)  # 16 = EXP2_CHUNKS
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@_jit_runtime_ints
def _attn_fwd(Q, K, V, Out, LSE, Bias, SinkLogits,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_bias_b,
              heads, group, q_len, kv_len, window, sinks, qk_scale, softcap_log2, q_rows, k_rows, v_rows,
              D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_PAD: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_SINK_LOGITS: tl.constexpr, USE_TMA: tl.constexpr,
              TENSOR_DESC: tl.constexpr, INPUT_PRECISION: tl.constexpr, POLY_EXP2: tl.constexpr = 0,
              POLY_DEGREE: tl.constexpr = 3):
    # Heaviest query blocks first (under causality the last block sees the most keys): the grid's tail is short work.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    kv_head = head // group
    q_offset = batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_offset = batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_offset = batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q_base = Q + q_offset
    k_base = K + k_offset
    v_base = V + v_offset
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    bias_base = Bias + batch.to(tl.int64) * stride_bias_b

    m_first = block_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, q_len) - 1
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, D_V)
    k_src = k_base
    v_src = v_base
    q_src = q_base
    q_row0 = 0
    q_col0 = 0
    k_row0 = 0
    k_col0 = 0
    v_row0 = 0
    v_col0 = 0
    if USE_TMA and TENSOR_DESC:
        # One descriptor over each tensor's storage seen as (rows, row stride): this head's matrix starts at
        # (row0, col0). Tails are other heads' rows, not zeros: masked tiles zero V there (_fwd_tile).
        q_row0, q_col0 = _row_and_column(q_offset, stride_qm)
        k_row0, k_col0 = _row_and_column(k_offset, stride_kn)
        v_row0, v_col0 = _row_and_column(v_offset, stride_vn)
        q_src = _row_descriptor(Q, q_rows, stride_qm, stride_qm, BLOCK_M, D_QK)
        k_src = _row_descriptor(K, k_rows, stride_kn, stride_kn, BLOCK_N, D_QK)
        v_src = _row_descriptor(V, v_rows, stride_vn, stride_vn, BLOCK_N, D_V)
    elif USE_TMA:  # descriptors of this (batch, head)'s matrices: bounds known to the copy engine, tails zero-filled
        q_src = _row_descriptor(q_base, q_len, D_QK, stride_qm, BLOCK_M, D_QK)
        k_src = _row_descriptor(k_base, kv_len, D_QK, stride_kn, BLOCK_N, D_QK)
        v_src = _row_descriptor(v_base, kv_len, D_V, stride_vn, BLOCK_N, D_V)
    q = _load_rows(q_src, q_row0, q_col0, m_first, stride_qm, q_len, D_QK, BLOCK_M, True, USE_TMA)

    # Running max, running sum and the accumulator stay in fp32 whatever the input dtype.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    if HAS_SINK_LOGITS:
        # The sink logit is each row's first score, with no value: the running max and sum start from it (acc from
        # 0), so the online softmax counts it once in the denominator and the lse. A -inf sink leaves l_i = 0.
        sink_log2 = tl.load(SinkLogits + head).to(tl.float32) * 1.4426950408889634
        m_i = tl.maximum(m_i, sink_log2)
        l_i = tl.math.exp2(sink_log2 - m_i)

    sink_blocks, key_lo, full_lo, full_hi, key_hi = _key_ranges(
        m_first, m_last, kv_len, window, sinks, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SINKS)
    # Masked: the sink blocks, then the window's first blocks (one loop over both, so one copy of the body).
    masked_head_blocks = sink_blocks + (full_lo - key_lo + BLOCK_N - 1) // BLOCK_N
    for index in range(0, masked_head_blocks):
        start_n = tl.where(index < sink_blocks, index * BLOCK_N, key_lo + (index - sink_blocks) * BLOCK_N)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, k_row0, k_col0, v_row0, v_col0, bias_base,
                                  stride_kn, stride_vn, start_n, offs_m, kv_len, window, sinks, qk_scale,
                                  softcap_log2, D_QK, D_V, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SINKS, HAS_PAD,
                                  HAS_SOFTCAP, USE_TMA, TENSOR_DESC, INPUT_PRECISION, POLY_EXP2, POLY_DEGREE)
    # Interior: every query sees every key, no mask.
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, k_row0, k_col0, v_row0, v_col0, bias_base,
                                  stride_kn, stride_vn, start_n, offs_m, kv_len, window, sinks, qk_scale,
                                  softcap_log2, D_QK, D_V, BLOCK_N, False, CAUSAL, HAS_WINDOW, HAS_SINKS, HAS_PAD,
                                  HAS_SOFTCAP, USE_TMA, TENSOR_DESC, INPUT_PRECISION, POLY_EXP2, POLY_DEGREE)
    # Masked: the diagonal (causal), the window's end (not causal) and the partial last key block.
    for start_n in range(full_hi, key_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, k_row0, k_col0, v_row0, v_col0, bias_base,
                                  stride_kn, stride_vn, start_n, offs_m, kv_len, window, sinks, qk_scale,
                                  softcap_log2, D_QK, D_V, BLOCK_N, True, CAUSAL, HAS_WINDOW, HAS_SINKS, HAS_PAD,
                                  HAS_SOFTCAP, USE_TMA, TENSOR_DESC, INPUT_PRECISION, POLY_EXP2, POLY_DEGREE)

    empty_row = l_i == 0.0  # no visible key (and no sink logit): out = 0, lse = -inf
    l_safe = tl.where(empty_row, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < q_len
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + batch_head.to(tl.int64) * q_len + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(Out, DO, DLSE, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    heads, q_len, D_V: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (fp32), minus dL/dlse_i when the lse itself carries a gradient."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_V)
    row_ok = offs_m < q_len
    o = tl.load(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_index = batch_head.to(tl.int64) * q_len + offs_m
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, so an lse gradient enters dS = P * (dP - delta) with the opposite sign.
        delta -= tl.load(DLSE + row_index, mask=row_ok, other=0.0)
    tl.store(Delta + row_index, delta, mask=row_ok)


@triton.jit
def _load_row_stats(LSE, Delta, row_index, row_ok):
    """lse in the log2 domain and delta for a block of query rows.

    Rows with no visible key (lse = -inf) and rows past q_len get +inf, so exp2(s - lse) = 0 for every key there.
    """
    lse = tl.load(LSE + row_index, mask=row_ok, other=float("inf"))
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + row_index, mask=row_ok, other=0.0)
    return lse_log2, delta


@triton.jit
def _bwd_kv_tile(dk, dv, k, v, bias, q_src, do_src, dq_dst, LSE, Delta, stride_qm, stride_dom, stride_dqm,
                 start_m, row_base, offs_n, q_len, kv_len, window, sinks, qk_scale, softcap_log2, sm_scale,
                 D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_PAD: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr, BULK_DQ: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """One query block's contribution to dK, dV of the program's key block (computed transposed: keys x queries).

    q_src, do_src (and dq_dst, fp32, with ATOMIC_DQ): tensor descriptors of this (batch, head) when USE_TMA, else
    base pointers.
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, D_QK)
    row_ok = offs_m < q_len
    q = _load_rows(q_src, 0, 0, start_m, stride_qm, q_len, D_QK, BLOCK_M, True, USE_TMA)
    do = _load_rows(do_src, 0, 0, start_m, stride_dom, q_len, D_V, BLOCK_M, True, USE_TMA)
    lse_log2, delta = _load_row_stats(LSE, Delta, row_base + offs_m, row_ok)

    scores_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        scores_t, tanh_t = _soft_cap(scores_t, softcap_log2)
    if HAS_PAD:
        scores_t += bias[:, None]
    if MASKED:
        visible = _visible(offs_m[None, :], offs_n[:, None], kv_len, window, sinks, CAUSAL, HAS_WINDOW, HAS_SINKS)
        scores_t = tl.where(visible, scores_t, float("-inf"))
    p_t = tl.math.exp2(scores_t - lse_log2[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    # dS = P * (dP - delta), kept in fp32 until it enters the next product.
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:  # through the cap: d (c * tanh(s / c)) / ds = 1 - tanh^2
        ds_t = ds_t * (1.0 - tanh_t * tanh_t)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=INPUT_PRECISION) * sm_scale
        if BULK_DQ:  # one bulk reduce-add of the tile by the copy engine instead of BLOCK_M * D element atomics
            dq_dst.atomic_add([start_m, 0], dq)
        else:
            tl.atomic_add(dq_dst + offs_m[:, None] * stride_dqm + offs_dqk[None, :], dq, mask=row_ok[:, None],
                          sem="relaxed")
    return dk, dv


@_jit_runtime_ints
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, Bias, DK, DV, DQ,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   stride_dqb, stride_dqh, stride_dqm, stride_bias_b,
                   heads, kv_heads, group, q_len, kv_len, window, sinks, qk_scale, softcap_log2, sm_scale,
                   D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_PAD: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr, BULK_DQ: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    block_n = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    batch = batch_kv_head // kv_heads
    kv_head = batch_kv_head % kv_heads
    n_first = block_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, kv_len) - 1
    offs_n = n_first + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, D_QK)
    offs_dv = tl.arange(0, D_V)
    key_ok = offs_n < kv_len
    k = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_dqk[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_dv[None, :], mask=key_ok[:, None], other=0.0)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_PAD:
        bias = tl.load(Bias + batch.to(tl.int64) * stride_bias_b + offs_n, mask=key_ok, other=float("-inf"))
    # Accumulated in fp32 over every query head of the group: GQA's dK/dV sum, without repeating K/V.
    dk = tl.zeros([BLOCK_N, D_QK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_V], dtype=tl.float32)
    q_lo, full_lo, full_hi, q_hi = _query_ranges(n_first, n_last, q_len, window, sinks, BLOCK_M, CAUSAL, HAS_WINDOW,
                                                 HAS_SINKS)
    # Key rows past kv_len need no mask in unmasked blocks: their K, V are zero and their dK, dV rows are not stored.
    for member in range(0, group):
        head = kv_head * group + member
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        dq_base = DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
        row_base = (batch * heads + head).to(tl.int64) * q_len
        q_src = q_base
        do_src = do_base
        dq_dst = dq_base
        if USE_TMA:
            if BULK_DQ:
                dq_dst = _row_descriptor(dq_base, q_len, D_QK, stride_dqm, BLOCK_M, D_QK)
            q_src = _row_descriptor(q_base, q_len, D_QK, stride_qm, BLOCK_M, D_QK)
            do_src = _row_descriptor(do_base, q_len, D_V, stride_dom, BLOCK_M, D_V)
        for start_m in range(q_lo, full_lo, BLOCK_M):
            dk, dv = _bwd_kv_tile(dk, dv, k, v, bias, q_src, do_src, dq_dst, LSE, Delta, stride_qm, stride_dom,
                                  stride_dqm, start_m, row_base, offs_n, q_len, kv_len, window, sinks, qk_scale,
                                  softcap_log2, sm_scale, D_QK, D_V, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_SINKS,
                                  HAS_PAD, HAS_SOFTCAP, ATOMIC_DQ, USE_TMA, BULK_DQ, INPUT_PRECISION)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _bwd_kv_tile(dk, dv, k, v, bias, q_src, do_src, dq_dst, LSE, Delta, stride_qm, stride_dom,
                                  stride_dqm, start_m, row_base, offs_n, q_len, kv_len, window, sinks, qk_scale,
                                  softcap_log2, sm_scale, D_QK, D_V, BLOCK_M, False, CAUSAL, HAS_WINDOW, HAS_SINKS,
                                  HAS_PAD, HAS_SOFTCAP, ATOMIC_DQ, USE_TMA, BULK_DQ, INPUT_PRECISION)
        for start_m in range(full_hi, q_hi, BLOCK_M):
            dk, dv = _bwd_kv_tile(dk, dv, k, v, bias, q_src, do_src, dq_dst, LSE, Delta, stride_qm, stride_dom,
                                  stride_dqm, start_m, row_base, offs_n, q_len, kv_len, window, sinks, qk_scale,
                                  softcap_log2, sm_scale, D_QK, D_V, BLOCK_M, True, CAUSAL, HAS_WINDOW, HAS_SINKS,
                                  HAS_PAD, HAS_SOFTCAP, ATOMIC_DQ, USE_TMA, BULK_DQ, INPUT_PRECISION)
    dk *= sm_scale
    tl.store(DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_dqk[None, :], dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_q_tile(dq, q, do, lse_log2, delta, k_src, v_src, bias_base, stride_kn, stride_vn, start_n, offs_m,
                kv_len, window, sinks, qk_scale, softcap_log2, D_QK: tl.constexpr, D_V: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SINKS: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """One key block's contribution to dQ of the program's query block (k_src, v_src as in _fwd_tile)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_src, 0, 0, start_n, stride_kn, kv_len, D_QK, BLOCK_N, MASKED, USE_TMA)
    v = _load_rows(v_src, 0, 0, start_n, stride_vn, kv_len, D_V, BLOCK_N, MASKED, USE_TMA)
    scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        scores, tanh = _soft_cap(scores, softcap_log2)
    if HAS_PAD:
        scores += tl.load(bias_base + offs_n, mask=offs_n < kv_len, other=float("-inf"))[None, :]
    if MASKED:
        visible = _visible(offs_m[:, None], offs_n[None, :], kv_len, window, sinks, CAUSAL, HAS_WINDOW, HAS_SINKS)
        scores = tl.where(visible, scores, float("-inf"))
    p = tl.math.exp2(scores - lse_log2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:  # through the cap: d (c * tanh(s / c)) / ds = 1 - tanh^2
        ds = ds * (1.0 - tanh * tanh)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)


@_jit_runtime_ints
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, Bias, DQ,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm, stride_bias_b,
                 heads, group, q_len, kv_len, window, sinks, qk_scale, softcap_log2, sm_scale,
                 D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_PAD: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, USE_TMA: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest first, as in the forward
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    kv_head = head // group
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    bias_base = Bias + batch.to(tl.int64) * stride_bias_b
    k_src = k_base
    v_src = v_base
    if USE_TMA:
        k_src = _row_descriptor(k_base, kv_len, D_QK, stride_kn, BLOCK_N, D_QK)
        v_src = _row_descriptor(v_base, kv_len, D_V, stride_vn, BLOCK_N, D_V)
    m_first = block_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, q_len) - 1
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, D_QK)
    offs_dv = tl.arange(0, D_V)
    row_ok = offs_m < q_len
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_dqk[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :], mask=row_ok[:, None], other=0.0)
    lse_log2, delta = _load_row_stats(LSE, Delta, batch_head.to(tl.int64) * q_len + offs_m, row_ok)
    dq = tl.zeros([BLOCK_M, D_QK], dtype=tl.float32)

    sink_blocks, key_lo, full_lo, full_hi, key_hi = _key_ranges(
        m_first, m_last, kv_len, window, sinks, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_SINKS)
    masked_head_blocks = sink_blocks + (full_lo - key_lo + BLOCK_N - 1) // BLOCK_N
    for index in range(0, masked_head_blocks):
        start_n = tl.where(index < sink_blocks, index * BLOCK_N, key_lo + (index - sink_blocks) * BLOCK_N)
        dq = _bwd_q_tile(dq, q, do, lse_log2, delta, k_src, v_src, bias_base, stride_kn, stride_vn, start_n, offs_m,
                         kv_len, window, sinks, qk_scale, softcap_log2, D_QK, D_V, BLOCK_N, True, CAUSAL,
                         HAS_WINDOW, HAS_SINKS, HAS_PAD, HAS_SOFTCAP, USE_TMA, INPUT_PRECISION)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _bwd_q_tile(dq, q, do, lse_log2, delta, k_src, v_src, bias_base, stride_kn, stride_vn, start_n, offs_m,
                         kv_len, window, sinks, qk_scale, softcap_log2, D_QK, D_V, BLOCK_N, False, CAUSAL,
                         HAS_WINDOW, HAS_SINKS, HAS_PAD, HAS_SOFTCAP, USE_TMA, INPUT_PRECISION)
    for start_n in range(full_hi, key_hi, BLOCK_N):
        dq = _bwd_q_tile(dq, q, do, lse_log2, delta, k_src, v_src, bias_base, stride_kn, stride_vn, start_n, offs_m,
                         kv_len, window, sinks, qk_scale, softcap_log2, D_QK, D_V, BLOCK_N, True, CAUSAL,
                         HAS_WINDOW, HAS_SINKS, HAS_PAD, HAS_SOFTCAP, USE_TMA, INPUT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_dqk[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations and a small cached autotuner
# ----------------------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query block, BLOCK_N the key block in every kernel.
_INTERPRETER_CONFIG = (16, 16, 4, 1)
_FORWARD_CONFIGS = {
    # head dim <= 128, 16-bit. (64, 64, 4, 2-3), two programs per SM, tuned within 5% but timed 10% apart from run
    # to run on the H200: left out, so that tuning does not pick a noisy winner.
    "small": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3)],
    "large": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],  # head dim 256 or fp32: shared memory bound
    # Non-causal, no window, head dim 128, 16-bit, length bucket 32k (16k-32k keys): the 128-key tiles put 1 of
    # EXP2_CHUNKS (16) column chunks of their exponentials on the FMA units. Measured on the H100 at 32k: 3.3% and
    # 4.1% faster than the same tiles all on exp2 (two runs, faster in 10 of 10 interleaved rounds). Not kept
    # elsewhere (RESULTS.md, "Exponentials on the FMA units"): 8k and 16k no gain, causal 1-5% slower, window 1-2%,
    # head dim 64 5-9%; 64k and longer unmeasured, so today's kernel there.
    "small, full, long": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2, 1), (128, 128, 8, 3, 1)],
}
_DKDV_CONFIGS = {
    # The last two keep 64 keys per program: half the fp32 dK/dV accumulators of BLOCK_N = 128, whose registers spill
    # on the H200 (ptxas). (64, 64, 4, 2) wins there: 8.87 ms against 10.40 for (64, 128, 8, 2), causal 16k.
    "small": [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
    "large": [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
_DQ_CONFIGS = {
    "small": [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3)],
    "large": [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
_TUNED: dict = {}
TUNING_LOG: list = []  # (kernel, key, {config: median ms}) of each tuning run, for benchmarks and reports


def _config_set(table: dict, head_dim: int, dtype: torch.dtype) -> list:
    if _interpreting():
        return [_INTERPRETER_CONFIG]  # CI runs the interpreter: one small tile, no tuning
    return table["large" if head_dim > 128 or dtype == torch.float32 else "small"]


def _length_bucket(length: int) -> int:
    """Tuning is cached per power-of-two length from 1024 up, not per exact length."""
    return max(1024, triton.next_power_of_2(max(1, length)))


def _launch_tuned(name: str, key: tuple, configs: list, launch: Callable[[tuple], None],
                  prepare: Optional[Callable[[], None]] = None) -> tuple:
    """Run `launch(config)` with the fastest of `configs` for `key`, timing each once and caching the choice.

    `prepare` runs before every timed launch and before the real one (it zeroes an accumulated output).
    """
    cache_key = (name,) + key
    config = _TUNED.get(cache_key)
    if config is None:
        if len(configs) == 1:
            config = configs[0]
        else:
            timings = {}
            for candidate in configs:
                def run(candidate=candidate):
                    if prepare is not None:
                        prepare()
                    launch(candidate)
                try:
                    timings[candidate] = triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
                except Exception:  # a config that does not fit (shared memory, registers) is skipped
                    timings[candidate] = float("inf")
            config = min(timings, key=timings.get)
            TUNING_LOG.append((name, key, timings))
            if timings[config] == float("inf"):
                raise BackendError(f"no launch configuration of {name} fits this device for {key}")
        _TUNED[cache_key] = config
    if prepare is not None:
        prepare()
    launch(config)
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor]):
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise BackendError(f"the Triton attention kernel takes float16, bfloat16 or float32 q, k, v of one dtype; got "
                           f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise BackendError("q, k, v must be (batch, heads, sequence, head_dim); got shapes "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        raise BackendError(f"kv heads ({k.shape[1]}) must divide q heads ({q.shape[1]}) and match v's ({v.shape[1]})")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise BackendError(f"head dims up to {MAX_HEAD_DIM} are accepted; got q/k {q.shape[-1]}, v {v.shape[-1]}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2]):
        raise BackendError(f"key_padding_mask must be (batch, keys) = {(q.shape[0], k.shape[2])}; got "
                           f"{tuple(key_padding_mask.shape)}")


def _padded_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two (at least 16, the smallest tensor-core product)."""
    return max(16, triton.next_power_of_2(head_dim))


def _pad_last(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the head dim (zeros change no dot product), and make it unit-stride for vector loads."""
    if tensor.shape[-1] != size:
        return torch.nn.functional.pad(tensor, (0, size - tensor.shape[-1]))
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _padding_bias(key_padding_mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(batch, keys) fp32 additive bias, 0 for real keys and -inf for padding; a 1-element dummy when absent."""
    if key_padding_mask is None:
        return torch.zeros(1, 1, dtype=torch.float32, device=like.device)
    bias = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=like.device)
    return bias.masked_fill_(~key_padding_mask.to(device=like.device, dtype=torch.bool), float("-inf"))


def _structure(q_len: int, kv_len: int, causal: bool, window: Optional[int], sinks: int) -> tuple[bool, int, bool, int]:
    """(has_window, window, has_sinks, sinks) with a window that hides nothing dropped (then sinks change nothing)."""
    if window is not None and window < 1:
        raise BackendError(f"window must be a positive number of keys; got {window}")
    if sinks < 0:
        raise BackendError(f"sinks must be >= 0; got {sinks}")
    if window is None:
        return False, 0, False, 0
    covers_all = window >= q_len if causal else window >= max(q_len, kv_len)
    if covers_all:
        return False, 0, False, 0
    return True, int(window), sinks > 0, int(min(sinks, kv_len))


def _check_score_modifiers(q: torch.Tensor, softcap: Optional[float], sink_logits: Optional[torch.Tensor]) -> None:
    if softcap is not None and not 0 < softcap < float("inf"):
        raise BackendError(f"softcap must be a positive finite number or None; got {softcap!r}")
    if sink_logits is not None and (tuple(sink_logits.shape) != (q.shape[1],) or not sink_logits.is_floating_point()
                                    or sink_logits.device != q.device):
        raise BackendError(f"sink_logits must be a float tensor of shape (q_heads,) = ({q.shape[1]},) on {q.device}; "
                           f"got {sink_logits.dtype} {tuple(sink_logits.shape)} on {sink_logits.device}")


def _softcap_log2(softcap: Optional[float]) -> float:
    """The cap in the kernels' log2-domain scores (0.0, unused, without soft-capping)."""
    return 0.0 if softcap is None else float(softcap) * LOG2E


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need a Hopper-class GPU (or the interpreter), 16-byte aligned bases and row strides.

    Layouts that miss the alignment (odd strides, offset views) take the pointer loads; results are the same.
    """
    first = tensors[0]
    if not _interpreting() and not (first.is_cuda and torch.cuda.get_device_capability(first.device)[0] >= 9):
        return False
    return all(tensor.data_ptr() % 16 == 0 and all(stride * tensor.element_size() % 16 == 0
                                                   for stride in tensor.stride()[:-1]) for tensor in tensors)


# "head": one descriptor per (batch, head) matrix, any aligned layout, tails zero-filled by the copy engine (measured
# on the H200). "tensor": one descriptor over each tensor's storage, the forward only, where every head's matrix lies
# at an aligned column of it (contiguous heads, and a model's transpose(1, 2) views): one per-program address
# computation less, untimed yet (benchmarks/explore_flash_forward.py --isolate measures the difference it aims at).
_DESCRIPTOR_SCOPE = "head"


def _whole_tensor_rows(tensor: torch.Tensor) -> Optional[int]:
    """Height of `tensor`'s storage seen as a matrix of (row stride) columns, when every (batch, head) matrix lies
    inside one row band at a 16-byte aligned column (so one descriptor reaches all of them); else None."""
    return _whole_tensor_rows_for(tuple(tensor.shape), tuple(tensor.stride()), tensor.element_size())


@functools.lru_cache(maxsize=256)
def _whole_tensor_rows_for(shape: tuple, strides: tuple, element_size: int) -> Optional[int]:
    batch, heads, length, width = shape
    stride_b, stride_h, stride_row, stride_col = strides
    if stride_col != 1 or length < 1 or stride_row < width:
        return None
    offsets = (torch.arange(batch, dtype=torch.int64)[:, None] * stride_b
               + torch.arange(heads, dtype=torch.int64)[None, :] * stride_h)
    columns = offsets % stride_row
    if int((columns + width).max()) > stride_row or bool(((columns * element_size) % 16).any()):
        return None
    last = int(offsets.max()) + (length - 1) * stride_row + width - 1
    rows = last // stride_row + 1
    return rows if rows < 2**31 else None


def _torch_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Kernels that build tensor descriptors on the device need Triton's scratch allocator; set one (torch memory)
    when the process has none, and leave a user's or Inductor's own allocator in place."""
    if _interpreting():
        return
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        missing = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another Triton layout: set ours
        missing = True
    if missing:
        triton.set_allocator(_torch_scratch)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products; tf32 would cost them three decimal digits.
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Optional[AttentionOptions] = None, *,
                  config: Optional[tuple] = None, **keywords) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass: (out like q with v's head dim, lse (batch, q_heads, queries) natural log fp32).

    options: an AttentionOptions (or its fields as keywords, which replace those of `options`); no attn_mask here.

    `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages[, poly_exp2]) forces a launch configuration (tests); None
    autotunes. poly_exp2: how many of EXP2_CHUNKS column chunks of each unmasked score tile take the polynomial exp2
    on the FMA units (_exp2_split); 0 or absent: every exponential on the special-function unit.
    softcap: tanh soft-capping of the scaled scores (before the masks). sink_logits: (q_heads,) one logit per query
    head in every row's softmax, with no value; the lse includes it.
    """
    options = AttentionOptions.of(options, **keywords)
    causal, window, sinks, scale, softcap = (options.causal, options.window, options.sinks, options.scale_for(q),
                                             options.softcap)
    key_padding_mask, sink_logits = options.key_padding_mask, options.sink_logits
    _check_inputs(q, k, v, key_padding_mask)
    _check_score_modifiers(q, softcap, sink_logits)
    batch, heads, q_len, d_qk = q.shape
    kv_heads, kv_len, d_v = k.shape[1], k.shape[2], v.shape[3]
    has_window, window_size, has_sinks, sink_count = _structure(q_len, kv_len, causal, window, sinks)
    d_qk_pad, d_v_pad = _padded_dim(d_qk), _padded_dim(d_v)
    q_, k_, v_ = _pad_last(q, d_qk_pad), _pad_last(k, d_qk_pad), _pad_last(v, d_v_pad)
    out = torch.empty(batch, heads, q_len, d_v_pad, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out[..., :d_v], lse
    bias = _padding_bias(key_padding_mask, q)
    sink_logits_ = lse if sink_logits is None else sink_logits.contiguous()  # any pointer when absent
    if scale < 0:  # the kernel takes the row max before scaling: a positive scale, with q negated (exact)
        q_, scale = -q_, -scale
    use_tma = _tma_usable(q_, k_, v_)
    if use_tma:
        _ensure_scratch_allocator()
    rows = [_whole_tensor_rows(tensor) for tensor in (q_, k_, v_)] if use_tma and _DESCRIPTOR_SCOPE == "tensor" \
        else [None]
    tensor_desc = None not in rows

    def launch(cfg):
        if cfg[0] == "hopper":  # the warp-specialized Gluon kernel (backends/flash/hopper.py)
            gluon_forward().hopper_forward(q_, k_, v_, causal=causal, window=window_size, has_window=has_window,
                                           scale=scale, config=cfg[1:], out=out, lse=lse)
            return
        block_m, block_n, num_warps, num_stages = cfg[:4]
        poly_exp2 = cfg[4] if len(cfg) > 4 else 0
        # The split's finest chunk: block_n * (largest power of two dividing poly_exp2) / EXP2_CHUNKS columns.
        finest = block_n * (poly_exp2 & -poly_exp2 or EXP2_CHUNKS) // EXP2_CHUNKS
        if not 0 <= poly_exp2 <= EXP2_CHUNKS or finest < 8 and not _interpreting():
            # chunks under 8 columns would split across threads of the MMA layout: data movement, not a free split
            raise BackendError(f"polynomial exp2: 0..{EXP2_CHUNKS} chunks of >= 8 columns; got {cfg}")
        grid = (triton.cdiv(q_len, block_m), batch * heads)
        _attn_fwd[grid](
            q_, k_, v_, out, lse, bias, sink_logits_,
            q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
            v_.stride(0), v_.stride(1), v_.stride(2), out.stride(0), out.stride(1), out.stride(2), bias.stride(0),
            heads, heads // kv_heads, q_len, kv_len, window_size, sink_count, scale * LOG2E, _softcap_log2(softcap),
            *(rows if tensor_desc else (0, 0, 0)), D_QK=d_qk_pad, D_V=d_v_pad, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_WINDOW=has_window,
            HAS_SINKS=has_sinks, HAS_PAD=key_padding_mask is not None, HAS_SOFTCAP=softcap is not None,
            HAS_SINK_LOGITS=sink_logits is not None, USE_TMA=use_tma, TENSOR_DESC=tensor_desc,
            INPUT_PRECISION=_input_precision(q.dtype), POLY_EXP2=poly_exp2,
            POLY_DEGREE=5 if q.dtype == torch.float32 else 3, num_warps=num_warps, num_stages=num_stages,
        )

    if config is not None:
        launch(config)
    else:
        head_dim, bucket = max(d_qk_pad, d_v_pad), _length_bucket(max(q_len, kv_len))
        key = (head_dim, causal, has_window, q.dtype, bucket)
        key += ("softcap",) if softcap is not None else ()  # the tanh changes the balance: tuned apart
        key += ("tensor descriptors",) if tensor_desc else ()
        configs = _config_set(_FORWARD_CONFIGS, head_dim, q.dtype)
        if (configs is _FORWARD_CONFIGS["small"] and head_dim == 128 and not causal and not has_window
                and bucket == 32768):
            configs = _FORWARD_CONFIGS["small, full, long"]
        hopper = gluon_forward()
        if hopper is not None and hopper.applies(q_, k_, v_, has_sinks=has_sinks, key_padding_mask=key_padding_mask,
                                                 softcap=softcap, sink_logits=sink_logits, scale=scale):
            # Timed against the Triton configurations: the Gluon kernel runs only where it measured faster (and a
            # Triton whose Gluon cannot build it scores it as not fitting).
            key += ("hopper",)
            configs = [("hopper",) + config for config in hopper.CONFIGS] + list(configs)
        _launch_tuned("forward", key, configs, launch)
    return (out if d_v_pad == d_v else out[..., :d_v]), lse


def flash_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, options: Optional[AttentionOptions] = None, *,
                   grad_lse: Optional[torch.Tensor] = None, config: Optional[tuple] = None, dq_mode: str = "separate",
                   **keywords) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: (dq, dk, dv) in the inputs' dtypes; dk, dv summed over each kv head's query group.

    With sink logits nothing changes here: the saved lse includes them, and their own gradient is an O(rows)
    reduction (backends/flash/blockwise.py `sink_logits_gradient`). softcap: as in the forward.

    grad_lse: optional gradient of the returned lse. config: (BLOCK_M, BLOCK_N, num_warps, num_stages) for both
    kernels (tests); None autotunes each. dq_mode: "separate" (a dQ kernel that recomputes the scores, deterministic)
    or "atomic" (dQ added atomically in fp32 by the dK/dV kernel: two fewer products, nondeterministic order).
    """
    options = AttentionOptions.of(options, **keywords)
    causal, window, sinks, scale, softcap = (options.causal, options.window, options.sinks, options.scale_for(q),
                                             options.softcap)
    key_padding_mask = options.key_padding_mask
    _check_inputs(q, k, v, key_padding_mask)
    _check_score_modifiers(q, softcap, None)
    if dq_mode not in ("separate", "atomic"):
        raise BackendError(f"dq_mode must be 'separate' or 'atomic'; got {dq_mode!r}")
    batch, heads, q_len, d_qk = q.shape
    kv_heads, kv_len, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads // kv_heads
    has_window, window_size, has_sinks, sink_count = _structure(q_len, kv_len, causal, window, sinks)
    d_qk_pad, d_v_pad = _padded_dim(d_qk), _padded_dim(d_v)
    q_, k_, v_ = _pad_last(q, d_qk_pad), _pad_last(k, d_qk_pad), _pad_last(v, d_v_pad)
    out_, do_ = _pad_last(out, d_v_pad), _pad_last(grad_out.to(q.dtype), d_v_pad)
    lse = lse.to(torch.float32).contiguous()
    dk = torch.empty(batch, kv_heads, kv_len, d_qk_pad, dtype=q.dtype, device=q.device)
    dv = torch.empty(batch, kv_heads, kv_len, d_v_pad, dtype=q.dtype, device=q.device)
    atomic = dq_mode == "atomic"
    dq = torch.empty(batch, heads, q_len, d_qk_pad, dtype=torch.float32 if atomic else q.dtype, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq[..., :d_qk].to(q.dtype), dk[..., :d_qk], dv[..., :d_v]
    bias = _padding_bias(key_padding_mask, q)
    delta = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    dlse = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    preprocess_block = 64 if d_v_pad <= 128 else 32
    _bwd_preprocess[(triton.cdiv(q_len, preprocess_block), batch * heads)](
        out_, do_, dlse if dlse is not None else delta, delta,
        out_.stride(0), out_.stride(1), out_.stride(2), do_.stride(0), do_.stride(1), do_.stride(2),
        heads, q_len, D_V=d_v_pad, BLOCK_M=preprocess_block, HAS_DLSE=dlse is not None,
    )
    head_dim = max(d_qk_pad, d_v_pad)
    use_tma = _tma_usable(q_, k_, v_, do_, dq)
    if use_tma:
        _ensure_scratch_allocator()
    common = dict(D_QK=d_qk_pad, D_V=d_v_pad, USE_TMA=use_tma, CAUSAL=causal, HAS_WINDOW=has_window,
                  HAS_SINKS=has_sinks, HAS_PAD=key_padding_mask is not None, HAS_SOFTCAP=softcap is not None,
                  INPUT_PRECISION=_input_precision(q.dtype))
    softcap_log2 = _softcap_log2(softcap)
    tune_key = (head_dim, causal, has_window, q.dtype, group > 1, _length_bucket(max(q_len, kv_len)))
    tune_key += ("softcap",) if softcap is not None else ()

    def launch_dkdv(cfg):
        block_m, block_n, num_warps, num_stages = cfg
        _attn_bwd_dkdv[(triton.cdiv(kv_len, block_n), batch * kv_heads)](
            q_, k_, v_, do_, lse, delta, bias, dk, dv, dq,
            q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
            v_.stride(0), v_.stride(1), v_.stride(2), do_.stride(0), do_.stride(1), do_.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), bias.stride(0),
            heads, kv_heads, group, q_len, kv_len, window_size, sink_count, scale * LOG2E, softcap_log2, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC_DQ=atomic,
            # the interpreter has no bulk reduce: element atomics there
            BULK_DQ=atomic and use_tma and not _interpreting(), num_warps=num_warps, num_stages=num_stages, **common,
        )

    def launch_dq(cfg):
        block_m, block_n, num_warps, num_stages = cfg
        _attn_bwd_dq[(triton.cdiv(q_len, block_m), batch * heads)](
            q_, k_, v_, do_, lse, delta, bias, dq,
            q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
            v_.stride(0), v_.stride(1), v_.stride(2), do_.stride(0), do_.stride(1), do_.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), bias.stride(0),
            heads, group, q_len, kv_len, window_size, sink_count, scale * LOG2E, softcap_log2, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common,
        )

    if config is not None:
        if atomic:
            dq.zero_()
        launch_dkdv(config)
        if not atomic:
            launch_dq(config)
    else:
        _launch_tuned("dkdv" + ("-atomic" if atomic else ""), tune_key,
                      _config_set(_DKDV_CONFIGS, head_dim, q.dtype), launch_dkdv,
                      prepare=dq.zero_ if atomic else None)
        if not atomic:
            _launch_tuned("dq", tune_key, _config_set(_DQ_CONFIGS, head_dim, q.dtype), launch_dq)
    dq = dq[..., :d_qk] if d_qk_pad != d_qk else dq
    dk = dk[..., :d_qk] if d_qk_pad != d_qk else dk
    dv = dv[..., :d_v] if d_v_pad != d_v else dv
    return dq.to(q.dtype), dk, dv
