"""Exact attention forward for Hopper GPUs (sm_90) in Gluon, warp-specialized as FlashAttention-3 schedules it.

Why a second forward kernel: in backends/flash/triton.py a program's matrix products and its exponentials run one
after the other (Triton 3.6 cannot express their overlap on Hopper), so the causal forward takes the tensor-core time
plus the exponential time. Here a program owns 2 x 64 query rows and runs three partitions:

    producer (1 warp)          Q once, then K and V tiles by TMA into a ring of STAGES shared-memory slots
    consumer 0, consumer 1     64 query rows each (one warpgroup): S = Q K^T, online softmax, O += P V, by wgmma
    (4 warps each)

Both consumers read the same K/V slots; a K slot is released when both have finished S = Q K^T with it, a V slot
when both have finished O += P V (so the next K lands a product earlier). With PINGPONG the two consumers take turns
issuing their products (two mbarriers pass the turn), so that one warpgroup's softmax runs while the other's
products occupy the tensor cores; without it the warp scheduler interleaves them as it likes. With OVERLAP a
consumer issues S_{i+1} before P_i V_i and computes the softmax of S_{i+1} while P_i V_i runs.

Scope: what the planner's exact rewrites need most, no more: causal, full or sliding-window (no sinks) attention,
no key padding, no soft-capping, no sink logits, 16-bit q/k/v with one head dim of 64 or 128, grouped-query heads.
`applies` says False for anything else (and off Hopper), and flash_forward keeps the Triton kernel there. Outputs
match that kernel's contract: (out, lse) with lse the natural-log row logsumexp in fp32, -inf for empty rows.

Status: correct on the H200 (the FlashAttention rule at odd sizes, every configuration of that run) but 0.70-0.98x
the Triton kernel's speed in its first run (benchmarks/RESULTS.md, "Warp-specialized forward in Gluon"), so
flash_forward offers it to its tuner only with ATTENTION_PLANNER_GLUON=1. The K/V slots freed apart and the 3-4 slot
rings came after that run and are not yet measured.

Visibility (top-left aligned, as backends/flash/triton.py): causal j <= i; window W causal i - W < j <= i, not causal
|i - j| < W. Scores are kept in the log2 domain (log2(e) folded into the scale).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# The TMA tile load is `tma.async_load` from Triton 3.7 and `tma.async_copy_global_to_shared` before (removed since).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

LOG2E = 1.4426950408889634
HALF_M = 64  # query rows per consumer warpgroup: 64 x BLOCK_N fp32 scores + 64 x D fp32 output in registers
NUM_WARPS = 4  # the default partition (consumer 0); consumer 1 and the producer are worker partitions
# Registers per thread at launch, over the 3 warpgroups (65536 / 384 rounded down to a multiple of 8); inside, the
# producer gives its share back (24) and the consumers take 240 each.
MAX_REGISTERS = 168

# (BLOCK_N, STAGES, PINGPONG, OVERLAP): the key tile, the K/V ring depth, whether the consumers take turns, whether
# a consumer's softmax of S_{i+1} runs under its own P_i V_i.
CONFIGS = [(128, 3, True, True), (128, 2, True, True), (64, 4, True, True), (64, 3, True, True)]


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, batch,
              head, kv_head, m_first, tile_lo, tile_count, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    # Both halves of the program's queries on one barrier; the consumers wait on it once.
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [batch, head, m_first, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [batch, head, m_first + q_desc.block_type.shape[2], 0], q_bar,
                                    q_smem.index(1))
    for i in range(tile_count):
        slot = i % STAGES
        # A fresh mbarrier counts as having completed the phase before its first: the first STAGES waits pass.
        # K and V slots are freed apart (K after S = Q K^T, V after O += P V): the next K lands a product earlier.
        empty_phase = ((i // STAGES) & 1) ^ 1
        start_n = (tile_lo + i) * BLOCK_N
        mbarrier.wait(k_empty.index(slot), empty_phase)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        _tma_load(k_desc, [batch, kv_head, start_n, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), empty_phase)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        _tma_load(v_desc, [batch, kv_head, start_n, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _take_turn(turns, turn, HALF: gl.constexpr, PINGPONG: gl.constexpr):
    # Consumer HALF issues its products in its turns only: waits for the other's pass, counted in `turn`.
    if PINGPONG:
        mbarrier.wait(turns.index(HALF), (turn & 1) ^ (1 - HALF))


@gluon.jit
def _pass_turn(turns, HALF: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index(1 - HALF), count=1)


@gluon.jit
def _softmax_tile(s, m_i, l_i, rows, row_first, row_last, start_n, kv_len, window, qk_scale,
                  p_layout: gl.constexpr, o_rows: gl.constexpr, P_DTYPE: gl.constexpr, BLOCK_N: gl.constexpr,
                  CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr):
    """One key tile of the online softmax: (m_i, l_i, alpha by which O is rescaled (O's row layout), P in the
    A-operand layout of O's product)."""
    # Edge tiles only evaluate the mask: the window's start, the diagonal, the partial last key tile.
    edge = start_n + BLOCK_N > kv_len
    if CAUSAL:
        edge = edge | (start_n + BLOCK_N - 1 > row_first)
    if HAS_WINDOW:
        edge = edge | (start_n <= row_last - window)
        if not CAUSAL:
            edge = edge | (start_n + BLOCK_N - 1 >= row_first + window)
    if edge:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        r = gl.expand_dims(rows, 1)
        c = gl.expand_dims(cols, 0)
        visible = c < kv_len
        if CAUSAL:
            visible = visible & (c <= r)
        if HAS_WINDOW:
            visible = visible & (c > r - window)
            if not CAUSAL:
                visible = visible & (c < r + window)
        scores = gl.where(visible, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(scores, axis=1))
        p = gl.exp2(scores - gl.expand_dims(m_new, 1))
    else:
        # Interior tile: the row max of the raw scores, scaled after (qk_scale > 0), then one FMA per score.
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, gl.expand_dims(gl.convert_layout(alpha, o_rows), 1), gl.convert_layout(p.to(P_DTYPE), p_layout)


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turns, out_ptr, lse_ptr, out_row0,
              m_first, tile_lo, tile_count, q_len, kv_len, window, qk_scale, HALF: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              HAS_WINDOW: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_D, 16])
    # P goes to the second product from registers, in the A-operand layout of O's wgmma: the score accumulator's
    # registers already hold it in that order, so the conversion moves no data.
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    row_first = m_first + HALF * 64
    rows = row_first + gl.arange(0, 64, layout=s_rows)
    row_last = row_first + 63
    # Running max, running sum and the accumulator in fp32 whatever the input dtype. m_i starts finite so that a
    # row whose first tiles are all masked keeps exp2(-inf - m_i) = 0, never NaN.
    m_i = gl.full([64], -1.0e30, gl.float32, layout=s_rows)
    l_i = gl.full([64], 0.0, gl.float32, layout=s_rows)
    acc = gl.zeros([64, HEAD_D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)

    q = q_smem.index(HALF).reshape([64, HEAD_D])
    mbarrier.wait(q_bar, 0)
    # Every wgmma below is asynchronous; its operands in registers (P, the accumulator) stay alive, untouched, until
    # a wait that names them in `deps` (the hardware reads them while the product runs).
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turns, 0, HALF, PINGPONG)
    s = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), zero_s, use_acc=False,
                      is_async=True)
    _pass_turn(turns, HALF, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    m_i, l_i, alpha, p = _softmax_tile(s, m_i, l_i, rows, row_first, row_last, tile_lo * BLOCK_N, kv_len, window,
                                       qk_scale, p_layout, o_rows, q.dtype, BLOCK_N, CAUSAL, HAS_WINDOW)
    for i in range(tile_count - 1):
        slot = i % STAGES
        following = (i + 1) % STAGES
        if not OVERLAP:
            acc = acc * alpha
        # One turn issues P_i V_i and S_{i+1} = Q K_{i+1}^T back to back (FlashAttention-3's order).
        mbarrier.wait(v_ready.index(slot), (i // STAGES) & 1)
        mbarrier.wait(k_ready.index(following), ((i + 1) // STAGES) & 1)
        _take_turn(turns, i + 1, HALF, PINGPONG)
        if OVERLAP:
            # S_{i+1} first: its softmax then runs while P_i V_i is still on the tensor cores.
            s = warpgroup_mma(q, k_smem.index(following).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), zero_s,
                              use_acc=False, is_async=True)
            acc = warpgroup_mma(p, v_smem.index(slot).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
            _pass_turn(turns, HALF, PINGPONG)
            s = warpgroup_mma_wait(1, deps=(s,))
            mbarrier.arrive(k_empty.index(following), count=1)
            m_i, l_i, alpha_next, p_next = _softmax_tile(s, m_i, l_i, rows, row_first, row_last,
                                                         (tile_lo + i + 1) * BLOCK_N, kv_len, window, qk_scale,
                                                         p_layout, o_rows, q.dtype, BLOCK_N, CAUSAL, HAS_WINDOW)
            acc, p = warpgroup_mma_wait(0, deps=(acc, p))
            acc = acc * alpha_next
            p = p_next
        else:
            acc = warpgroup_mma(p, v_smem.index(slot).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
            s = warpgroup_mma(q, k_smem.index(following).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), zero_s,
                              use_acc=False, is_async=True)
            _pass_turn(turns, HALF, PINGPONG)
            acc, s, p = warpgroup_mma_wait(0, deps=(acc, s, p))
            mbarrier.arrive(k_empty.index(following), count=1)
            m_i, l_i, alpha, p = _softmax_tile(s, m_i, l_i, rows, row_first, row_last, (tile_lo + i + 1) * BLOCK_N,
                                               kv_len, window, qk_scale, p_layout, o_rows, q.dtype, BLOCK_N, CAUSAL,
                                               HAS_WINDOW)
        # Both consumers arrive: the producer refills the slot after the second.
        mbarrier.arrive(v_empty.index(slot), count=1)
    slot = (tile_count - 1) % STAGES
    if not OVERLAP:
        acc = acc * alpha
    mbarrier.wait(v_ready.index(slot), ((tile_count - 1) // STAGES) & 1)
    _take_turn(turns, tile_count, HALF, PINGPONG)
    acc = warpgroup_mma(p, v_smem.index(slot).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
    _pass_turn(turns, HALF, PINGPONG)
    acc, p = warpgroup_mma_wait(0, deps=(acc, p))
    mbarrier.arrive(v_empty.index(slot), count=1)

    empty = l_i == 0.0  # no visible key: out = 0, lse = -inf
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, o_rows), 1)
    rows_ok = rows < q_len
    gl.store(lse_ptr + out_row0 + rows, lse, mask=rows_ok)
    o_r = row_first + gl.arange(0, 64, layout=o_rows)
    o_c = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    offsets = gl.expand_dims((out_row0 + o_r) * HEAD_D, 1) + gl.expand_dims(o_c, 0)
    gl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(o_r < q_len, 1))


@gluon.jit
def _attn_fwd_hopper(q_desc, k_desc, v_desc, out_ptr, lse_ptr, heads, group, q_len, kv_len, window, qk_scale,
                     BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                     HAS_WINDOW: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr):
    # Heaviest query blocks first (under causality the last block sees the most keys): the grid's tail is short work.
    block_m = gl.num_programs(0) - 1 - gl.program_id(0)
    batch_head = gl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    kv_head = head // group
    m_first = block_m * 128
    m_last = gl.minimum(m_first + 127, q_len - 1)

    # Keys any row of the program may see: [key_lo, key_hi), walked in whole tiles from key_lo's.
    key_hi = kv_len
    if CAUSAL:
        key_hi = gl.minimum(kv_len, m_last + 1)
    elif HAS_WINDOW:
        key_hi = gl.minimum(kv_len, m_last + window)
    tile_lo = 0 * m_first
    if HAS_WINDOW:
        tile_lo = gl.maximum(m_first - window + 1, 0) // BLOCK_N
    # At least one tile: a program whose rows see no key (a window past the keys' end) then runs one fully masked
    # tile, which leaves l = 0 (out 0, lse -inf); the consumers' pipeline needs no empty case.
    tile_count = gl.maximum(gl.cdiv(key_hi - tile_lo * BLOCK_N, BLOCK_N), 1)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=2)
        mbarrier.init(v_empty.index(s), count=2)
    mbarrier.init(turns.index(0), count=1)
    mbarrier.init(turns.index(1), count=1)

    out_row0 = batch_head.to(gl.int64) * q_len
    first_half: gl.constexpr = 0
    second_half: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turns, out_ptr, lse_ptr,
                     out_row0, m_first, tile_lo, tile_count, q_len, kv_len, window, qk_scale, first_half, BLOCK_N,
                     HEAD_D, STAGES, CAUSAL, HAS_WINDOW, PINGPONG, OVERLAP)),
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turns, out_ptr, lse_ptr,
                     out_row0, m_first, tile_lo, tile_count, q_len, kv_len, window, qk_scale, second_half, BLOCK_N,
                     HEAD_D, STAGES, CAUSAL, HAS_WINDOW, PINGPONG, OVERLAP)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, batch,
                     head, kv_head, m_first, tile_lo, tile_count, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])


# ----------------------------------------------------------------------------------------------------------------------
# Launch wrapper
# ----------------------------------------------------------------------------------------------------------------------


def _shared_layout(block_shape: list, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(block_shape, gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _descriptor(tensor: torch.Tensor, rows: int) -> TensorDescriptor:
    """(batch, heads, sequence, head_dim) as a 4-d descriptor of [1, 1, rows, head_dim] boxes: any layout whose
    strides are 16-byte multiples, each head's tail zero-filled by the copy engine."""
    block = [1, 1, rows, tensor.shape[3]]
    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), block,
                            _shared_layout(block, tensor.dtype))


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, has_sinks: bool, key_padding_mask, softcap,
            sink_logits, scale: float) -> bool:
    """Whether `hopper_forward` computes this call (else the Triton kernel does): a Hopper GPU (compute capability
    9.0; wgmma is not on later chips), not the interpreter, and a call within `supports`."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return supports(q, k, v, has_sinks=has_sinks, key_padding_mask=key_padding_mask, softcap=softcap,
                    sink_logits=sink_logits, scale=scale)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, has_sinks: bool, key_padding_mask, softcap,
             sink_logits, scale: float) -> bool:
    """The kernel's scope, whatever the device: 16-bit q, k, v of one dtype and one head dim (64 or 128), no sinks,
    padding, soft-capping or sink logits, a positive scale, non-empty sequences, and layouts a tensor descriptor
    takes (contiguous head dim, 16-byte aligned base and strides)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if has_sinks or key_padding_mask is not None or softcap is not None or sink_logits is not None or scale <= 0:
        return False
    head_dim = q.shape[3]
    if head_dim not in (64, 128) or k.shape[3] != head_dim or v.shape[3] != head_dim:
        return False
    if q.shape[2] == 0 or k.shape[2] == 0:
        return False
    return all(t.stride(3) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3]) for t in (q, k, v))


def hopper_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int,
                   has_window: bool, scale: float, config: tuple, out: Optional[torch.Tensor] = None,
                   lse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of exact attention by the warp-specialized kernel; the caller has checked `applies`.

    config = (BLOCK_N, STAGES, PINGPONG, OVERLAP), one of CONFIGS or any with BLOCK_N in (64, 128). out (contiguous,
    like q) and lse ((batch, heads, queries) fp32, contiguous) are written in place when given.
    """
    block_n, stages, pingpong, overlap = config
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(q_len, 2 * HALF_M), batch * heads)
    _attn_fwd_hopper[grid](
        _descriptor(q, HALF_M), _descriptor(k, block_n), _descriptor(v, block_n), out, lse,
        heads, heads // kv_heads, q_len, kv_len, window if has_window else 0, scale * LOG2E,
        BLOCK_N=block_n, HEAD_D=head_dim, STAGES=stages, CAUSAL=causal, HAS_WINDOW=has_window,
        PINGPONG=pingpong, OVERLAP=overlap, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    return out, lse
