"""Split-K decoding attention in Triton ("flash-decoding"): T new queries per row read a KV cache once.

Why split K: a decoding step has one query (or a few) per head, so a kernel with one program per (batch, head) has
batch * kv_heads programs, far fewer than a GPU has multiprocessors, and each walks the whole cache alone. The step is
bound by reading the cache, so the work is split along the cache instead: `num_splits` programs per (batch, kv head)
each read one chunk of the row's visible slots and write a partial result (out normalized by its own softmax sum,
and its log-sum-exp); a second small kernel merges the partials with the usual lse weights. The partials are
(batch * q_heads * T * num_splits) rows of value_dim floats: small beside the cache.

Why grouped-query heads are packed: under grouped-query attention q_heads // kv_heads query heads read the same K/V.
One program takes all of them (and all T queries) as the rows of its query tile, so each K/V byte is read from memory
once per step, not once per query head; the scores are then a (rows x BLOCK_N) matrix product (tensor cores).

Chunks are cut from each row's visible range, not from the whole cache: a row of 37 tokens in a cache of 128k slots
costs 37 slots, and a linear cache with a window reads only the window (and the sinks). The grid has static size
(num_splits depends on shapes only), so a step can be captured in a CUDA graph. A rolling buffer is read whole: every
slot's position is computed from its index and the row's length (the wrap-around), and masked by the same rule.

Everything accumulates in fp32; scores are kept in the log2 domain (log2(e) folded into the scale, exp2 in the
softmax), as in backends/flash/triton.py. The op and its validation live in backends/decode/op.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from backends.common import interpreting

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROWS = 64  # query rows (grouped heads x T) per program; more rows take more programs (each reads K/V again)
MAX_SPLITS = 64


@triton.jit
def _slot_position(slot, end, sinks, ring, ROLLING: tl.constexpr):
    """The absolute position that cache `slot` holds once `end` positions are written (-1: never written)."""
    if ROLLING:
        # Sinks keep their own slot; ring slot sinks + r holds the latest position sinks + j, j % ring == r,
        # j < end - sinks. Only non-negative values are divided (integer division truncates toward zero).
        r = slot - sinks
        written = end - sinks
        laps = tl.maximum(written - 1 - r, 0) // ring
        ring_position = tl.where(r <= written - 1, sinks + r + ring * laps, -1)
        position = tl.where(slot < sinks, tl.where(slot < end, slot, -1), ring_position)
    else:
        position = tl.where(slot < end, slot, -1)
    return position


@triton.jit
def _decode_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_s, slot_hi, query_position, begin, end,
                 window, sinks, ring, qk_scale, softcap_log2, head_dim, value_dim, BLOCK_N: tl.constexpr,
                 D_QK: tl.constexpr, D_V: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
                 ROLLING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One block of BLOCK_N cache slots: scores of every query row, masks from the slots' positions, online softmax."""
    offs_s = start_s + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_QK)
    offs_dv = tl.arange(0, D_V)
    in_range = offs_s < slot_hi
    # K and V are requested together before the scores, so V's copy overlaps the product and the softmax.
    k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :],
                mask=in_range[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_dv[None, :],
                mask=in_range[:, None] & (offs_dv[None, :] < value_dim), other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        # c * tanh(s / c) on log2-domain scores is c2 * tanh(s2 / c2) with c2 = c * log2(e); tanh through exp2
        # (1 - 2 / (exp2(2 log2(e) x) + 1)): no libdevice, saturates to +-1 without NaN.
        scores = softcap_log2 * (1.0 - 2.0 / (tl.math.exp2(scores * (2.8853900817779268 / softcap_log2)) + 1.0))
    position = _slot_position(offs_s, end, sinks, ring, ROLLING)[None, :]
    visible = in_range[None, :] & (position >= begin) & (position <= query_position[:, None])
    if HAS_WINDOW:
        in_window = query_position[:, None] - position < window
        if HAS_SINKS:
            in_window = in_window | (position < sinks)
        visible = visible & in_window
    scores = tl.where(visible, scores, float("-inf"))
    # m_i starts finite (-1e30): a block with nothing visible keeps it finite and exp2(-inf - m) = 0, never NaN.
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.math.exp2(scores - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["queries", "group", "kv_heads", "slots", "window", "sinks", "ring", "num_splits"])
def _decode_split(Q, K, V, CacheLen, Start, PartOut, PartLse,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  queries, group, kv_heads, slots, window, sinks, ring, num_splits, qk_scale, softcap_log2,
                  head_dim: tl.constexpr, value_dim: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                  D_QK: tl.constexpr, D_V: tl.constexpr, HAS_START: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SINKS: tl.constexpr, ROLLING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """Program (split, batch * kv_heads + kv_head, row block): the partial attention of ROWS query rows (grouped
    heads x T queries, row = head_in_group * T + t) over this split's chunk of the row's visible slots."""
    split = tl.program_id(0)
    batch_kv = tl.program_id(1)
    row_block = tl.program_id(2)
    batch = batch_kv // kv_heads
    kv_head = batch_kv % kv_heads
    end = tl.load(CacheLen + batch).to(tl.int32)
    begin = 0 * end
    if HAS_START:
        begin = tl.load(Start + batch).to(tl.int32)

    rows = row_block * ROWS + tl.arange(0, ROWS)
    row_ok = rows < group * queries
    head = kv_head * group + rows // queries
    t = rows % queries
    query_position = end - queries + t
    offs_d = tl.arange(0, D_QK)
    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh + t[:, None] * stride_qt
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    # The slots any row may see: [slot_lo, slot_hi), plus the sink slots [begin, sink_hi) outside it (linear cache).
    if ROLLING:
        slot_lo = 0 * end
        slot_hi = tl.minimum(end, slots)
        sink_hi = 0 * end
    else:
        slot_lo = tl.maximum(begin, 0)
        if HAS_WINDOW:  # the first query (position end - queries) sees back to end - queries - window + 1
            slot_lo = tl.maximum(slot_lo, end - queries - window + 1)
        slot_hi = tl.minimum(end, slots)
        sink_hi = 0 * end
        if HAS_SINKS:
            sink_hi = tl.minimum(sinks, slot_lo)
    # This split's chunk: an equal share of the range, whole blocks (empty for splits past a short row's end).
    span = tl.maximum(slot_hi - slot_lo, 0)
    chunk = (span + num_splits * BLOCK_N - 1) // (num_splits * BLOCK_N) * BLOCK_N
    chunk_lo = slot_lo + split * chunk
    chunk_hi = tl.minimum(slot_hi, chunk_lo + chunk)

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D_V], dtype=tl.float32)
    if HAS_SINKS and not ROLLING:
        # The sink slots before the window: the first split reads them (a few slots; the others skip the loop).
        sink_blocks = tl.where(split == 0, (tl.maximum(sink_hi - begin, 0) + BLOCK_N - 1) // BLOCK_N, 0)
        for index in range(0, sink_blocks):
            acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                         begin + index * BLOCK_N, sink_hi, query_position, begin, end, window, sinks,
                                         ring, qk_scale, softcap_log2, head_dim, value_dim, BLOCK_N, D_QK, D_V,
                                         HAS_WINDOW, HAS_SINKS, ROLLING, HAS_SOFTCAP, INPUT_PRECISION)
    for start_s in range(chunk_lo, chunk_hi, BLOCK_N):
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_s, chunk_hi,
                                     query_position, begin, end, window, sinks, ring, qk_scale, softcap_log2,
                                     head_dim, value_dim, BLOCK_N, D_QK, D_V, HAS_WINDOW, HAS_SINKS, ROLLING,
                                     HAS_SOFTCAP, INPUT_PRECISION)

    # Partial result: out normalized by this split's sum, lse in the log2 domain (-inf: nothing visible here).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    part_row = (batch_kv.to(tl.int64) * group * queries + rows) * num_splits + split
    offs_dv = tl.arange(0, D_V)
    tl.store(PartOut + part_row[:, None] * D_V + offs_dv[None, :], out, mask=row_ok[:, None])
    tl.store(PartLse + part_row, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits", "heads"])
def _decode_combine(PartOut, PartLse, SinkLogits, Out, Lse, stride_ob, stride_oh, stride_ot, num_splits, heads,
                    queries, value_dim: tl.constexpr, SPLITS: tl.constexpr, D_V: tl.constexpr,
                    HAS_SINK_LOGITS: tl.constexpr):
    """Program per query row (batch, q head, t): merge the splits' partials with weights exp2(lse_i - max)."""
    row = tl.program_id(0)  # = (batch * heads + head) * queries + t, the partials' row order
    batch = row // (heads * queries)
    head = (row // queries) % heads
    t = row % queries
    offs_split = tl.arange(0, SPLITS)
    offs_dv = tl.arange(0, D_V)
    split_ok = offs_split < num_splits
    lse = tl.load(PartLse + row.to(tl.int64) * num_splits + offs_split, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINK_LOGITS:
        # One more logit in the softmax with no value: it enlarges the denominator (and the lse) only.
        sink = tl.load(SinkLogits + head).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # nothing visible: weights exp2(-inf) = 0, not NaN
    weight = tl.math.exp2(lse - m_safe)
    denominator = tl.sum(weight, 0)
    if HAS_SINK_LOGITS:
        denominator += tl.math.exp2(sink - m_safe)
    partial = tl.load(PartOut + (row.to(tl.int64) * num_splits + offs_split)[:, None] * D_V + offs_dv[None, :],
                      mask=split_ok[:, None], other=0.0)
    safe = tl.where(denominator == 0.0, 1.0, denominator)
    out = tl.sum(partial * weight[:, None], 0) / safe
    total = tl.where(denominator == 0.0, float("-inf"), (m_safe + tl.math.log2(safe)) * 0.6931471805599453)
    tl.store(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + t * stride_ot + offs_dv,
             out.to(Out.dtype.element_ty), mask=offs_dv < value_dim)
    tl.store(Lse + row, total)


def _device_programs(device: torch.device) -> int:
    """How many programs keep the device busy: two per multiprocessor (a small fixed number under the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_splits(batch: int, kv_heads: int, row_blocks: int, visible_slots: int, block_n: int,
                   device: torch.device) -> int:
    """Splits per (batch, kv head): enough programs to fill the device, no split shorter than two blocks. Shapes only
    (no data), so that the grid is the same at every step."""
    programs = batch * kv_heads * row_blocks
    wanted = triton.cdiv(_device_programs(device), programs)
    return max(1, min(wanted, triton.cdiv(visible_slots, 2 * block_n), MAX_SPLITS))


def decode_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    scale: float,
    window: Optional[int],
    sinks: int,
    softcap: Optional[float],
    rolling: bool,
    start: Optional[torch.Tensor] = None,
    sink_logits: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: int = 4,
    num_stages: int = 3,  # three loads in flight: 1.52 against 1.78 ms for 16 layers at 128k (H100, graphed)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (batch, q_heads, T, value_dim) in q's dtype, lse (batch, q_heads, T) natural log float32). Inputs are
    validated by backends/decode/op.py; the caches' last dimension must be contiguous (they are read in place)."""
    batch, heads, queries, head_dim = q.shape
    kv_heads, slots, value_dim = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    group = heads // kv_heads
    out = torch.empty(batch, heads, queries, value_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, queries, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    d_qk = max(16, triton.next_power_of_2(head_dim))
    d_v = max(16, triton.next_power_of_2(value_dim))
    rows = max(16, min(MAX_ROWS, triton.next_power_of_2(group * queries)))  # tl.dot needs at least 16 rows
    row_blocks = triton.cdiv(group * queries, rows)
    block_n = block_n or (16 if interpreting() else 64)
    ring = max(1, slots - sinks)
    if rolling or window is None:
        visible_slots = slots
    else:
        visible_slots = min(slots, window + queries - 1)
    splits = num_splits or default_splits(batch, kv_heads, row_blocks, visible_slots, block_n, q.device)
    part_out = torch.empty(batch * heads * queries * splits, d_v, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch * heads * queries * splits, dtype=torch.float32, device=q.device)
    cache_len = cache_len.contiguous()
    start_ = cache_len if start is None else start.contiguous()  # any pointer when absent
    input_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split[(splits, batch * kv_heads, row_blocks)](
        q, k_cache, v_cache, cache_len, start_, part_out, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        queries, group, kv_heads, slots, 0 if window is None else int(window), int(sinks), ring, splits,
        float(scale) * LOG2E, 1.0 if softcap is None else float(softcap) * LOG2E,
        head_dim=head_dim, value_dim=value_dim, ROWS=rows, BLOCK_N=block_n, D_QK=d_qk, D_V=d_v,
        HAS_START=start is not None, HAS_WINDOW=window is not None, HAS_SINKS=bool(sinks) and (
            rolling or window is not None), ROLLING=rolling, HAS_SOFTCAP=softcap is not None,
        INPUT_PRECISION=input_precision, num_warps=num_warps, num_stages=num_stages,
    )
    sink_logits_ = lse if sink_logits is None else sink_logits.contiguous()  # any pointer when absent
    _decode_combine[(batch * heads * queries,)](
        part_out, part_lse, sink_logits_, out, lse, out.stride(0), out.stride(1), out.stride(2), splits, heads,
        queries, value_dim=value_dim, SPLITS=max(2, triton.next_power_of_2(splits)), D_V=d_v,
        HAS_SINK_LOGITS=sink_logits is not None, num_warps=4,
    )
    return out, lse
