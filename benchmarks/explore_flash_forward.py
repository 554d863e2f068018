"""Variants of the forward kernel, timed on the H200 before one goes into backends/flash/triton.py.

A reduced kernel (causal, optionally windowed; no padding, sinks or soft-capping; D=128; lengths a multiple of 128)
with constexpr switches, beside the package's kernel and its competitors, B=1, H=32, bf16:
  TMA      K, V, Q through device-side tensor descriptors instead of pointer loads
  PIPE     the interior loop issues the next tile's QK^T before this tile's softmax (hoping exp2 overlaps the MMA)
  FMA      row max on the raw scores, then one FMA (s * scale - m) per score instead of scaling the tile first
  WS       tl.range(..., warp_specialize=True) on the interior loop
  PERHEAD  where descriptors start and how they stride: 0 one base for the tensor, constant row stride (the
           fastest); 1 per (batch, head), runtime stride (as the package builds them); 2 per (batch, head), constant
           stride; 3 one base, runtime stride

    PYTHONPATH=. python3 benchmarks/explore_flash_forward.py              # every variant, 3 cases (~3 min)
    PYTHONPATH=. python3 benchmarks/explore_flash_forward.py --isolate    # the package against the best variant

Findings (benchmarks/RESULTS.md, "Tiled attention kernels with tensor descriptors"): TMA + FMA kept; PIPE 40-100% slower; WS no effect on Hopper.
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.flash.triton import _key_ranges, flash_forward  # noqa: E402


def _alloc(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


triton.set_allocator(_alloc)


@triton.jit
def _tile(acc, l_i, m_i, q, k, v, offs_m, start_n, window, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
          HAS_WINDOW: tl.constexpr, FMA: tl.constexpr):
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        vis = offs_n[None, :] <= offs_m[:, None]
        if HAS_WINDOW:
            vis = vis & (offs_n[None, :] > offs_m[:, None] - window)
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        acc, l_i = _accumulate(acc, l_i, m_i, m_new, p, v)
    elif FMA:
        acc, l_i, m_new = _softmax_pv(acc, l_i, m_i, s, v, qk_scale)
    else:
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        acc, l_i = _accumulate(acc, l_i, m_i, m_new, p, v)
    return acc, l_i, m_new


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, v, qk_scale):
    """The FMA form: row max of the raw scores, then one s * scale - max per score."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    acc, l_i = _accumulate(acc, l_i, m_i, m_new, p, v)
    return acc, l_i, m_new


@triton.jit
def _accumulate(acc, l_i, m_i, m_new, p, v):
    """Rescale the running sum and accumulator to the new max, then add this tile's P @ V."""
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return tl.dot(p.to(v.dtype), v, acc), l_i


@triton.jit
def _load_kv(K, V, desc_k, desc_v, kv_row0, start_n, offs_d, stride_n, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    if TMA:
        k = desc_k.load([kv_row0 + start_n, 0])
        v = desc_v.load([kv_row0 + start_n, 0])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + offs_n[:, None] * stride_n + offs_d[None, :])
        v = tl.load(V + offs_n[:, None] * stride_n + offs_d[None, :])
    return k, v


@triton.jit
def _fwd_exp(Q, K, V, Out, seq_len, heads, window, qk_scale,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
             TMA: tl.constexpr, PIPE: tl.constexpr, FMA: tl.constexpr, WS: tl.constexpr,
             PERHEAD: tl.constexpr = 0, stride_n=128):
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * seq_len  # contiguous (B*H, N, D)
    m_first = block_m * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    base = bh.to(tl.int64) * seq_len * D
    Kb = K + base
    Vb = V + base
    desc_k = None
    desc_v = None
    if PERHEAD == 1:  # per (batch, head) base, runtime row stride: what the package does
        row0 = 0
        desc_q = tl.make_tensor_descriptor(Q + base, shape=[seq_len, D], strides=[stride_n, 1], block_shape=[BLOCK_M, D])
        desc_k = tl.make_tensor_descriptor(K + base, shape=[seq_len, D], strides=[stride_n, 1], block_shape=[BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V + base, shape=[seq_len, D], strides=[stride_n, 1], block_shape=[BLOCK_N, D])
        q = desc_q.load([m_first, 0])
    elif PERHEAD == 2:  # per (batch, head) base, constant row stride
        row0 = 0
        desc_q = tl.make_tensor_descriptor(Q + base, shape=[seq_len, D], strides=[D, 1], block_shape=[BLOCK_M, D])
        desc_k = tl.make_tensor_descriptor(K + base, shape=[seq_len, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V + base, shape=[seq_len, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        q = desc_q.load([m_first, 0])
    elif PERHEAD == 3:  # one base for the whole tensor, runtime row stride
        desc_q = tl.make_tensor_descriptor(Q, shape=[heads * seq_len, D], strides=[stride_n, 1],
                                           block_shape=[BLOCK_M, D])
        desc_k = tl.make_tensor_descriptor(K, shape=[heads * seq_len, D], strides=[stride_n, 1],
                                           block_shape=[BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V, shape=[heads * seq_len, D], strides=[stride_n, 1],
                                           block_shape=[BLOCK_N, D])
        q = desc_q.load([row0 + m_first, 0])
    elif TMA:
        desc_q = tl.make_tensor_descriptor(Q, shape=[heads * seq_len, D], strides=[D, 1], block_shape=[BLOCK_M, D])
        desc_k = tl.make_tensor_descriptor(K, shape=[heads * seq_len, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V, shape=[heads * seq_len, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        q = desc_q.load([row0 + m_first, 0])
    else:
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    sink_blocks, key_lo, full_lo, full_hi, key_hi = _key_ranges(
        m_first, m_first + BLOCK_M - 1, seq_len, window, 0, BLOCK_N, True, HAS_WINDOW, False)
    for start_n in range(key_lo, full_lo, BLOCK_N):
        k, v = _load_kv(Kb, Vb, desc_k, desc_v, row0, start_n, offs_d, D, BLOCK_N, TMA)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, offs_m, start_n, window, qk_scale, BLOCK_N, True, HAS_WINDOW,
                              FMA)
    if PIPE:
        if full_hi > full_lo:
            k, v = _load_kv(Kb, Vb, desc_k, desc_v, row0, full_lo, offs_d, D, BLOCK_N, TMA)
            s = tl.dot(q, tl.trans(k))
            for start_n in range(full_lo + BLOCK_N, full_hi, BLOCK_N):
                k_next, v_next = _load_kv(Kb, Vb, desc_k, desc_v, row0, start_n, offs_d, D, BLOCK_N, TMA)
                s_next = tl.dot(q, tl.trans(k_next))  # in flight while this tile's exp2 runs
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, qk_scale)
                s = s_next
                v = v_next
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, qk_scale)
    elif WS:
        for start_n in tl.range(full_lo, full_hi, BLOCK_N, warp_specialize=True):
            k, v = _load_kv(Kb, Vb, desc_k, desc_v, row0, start_n, offs_d, D, BLOCK_N, TMA)
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, offs_m, start_n, window, qk_scale, BLOCK_N, False,
                                  HAS_WINDOW, FMA)
    else:
        for start_n in range(full_lo, full_hi, BLOCK_N):
            k, v = _load_kv(Kb, Vb, desc_k, desc_v, row0, start_n, offs_d, D, BLOCK_N, TMA)
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, offs_m, start_n, window, qk_scale, BLOCK_N, False,
                                  HAS_WINDOW, FMA)
    for start_n in range(full_hi, key_hi, BLOCK_N):
        k, v = _load_kv(Kb, Vb, desc_k, desc_v, row0, start_n, offs_d, D, BLOCK_N, TMA)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, offs_m, start_n, window, qk_scale, BLOCK_N, True, HAS_WINDOW,
                              FMA)
    out = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty))


def run_exp(q, k, v, window, cfg, tma, pipe, fma, ws, perhead=0):
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    bm, bn, warps, stages = cfg
    grid = (N // bm, B * H)
    _fwd_exp[grid](q, k, v, out, N, B * H, window or 0, D ** -0.5 * 1.4426950408889634, D=D, BLOCK_M=bm, BLOCK_N=bn,
                   HAS_WINDOW=window is not None, TMA=tma or perhead > 0, PIPE=pipe, FMA=fma, WS=ws, PERHEAD=perhead,
                   num_warps=warps,
                   num_stages=stages)
    return out


def flops(N, H, D, window):
    if window is None:
        pairs = N * (N + 1) / 2
    else:
        pairs = sum(min(i + 1, window) for i in range(0, N, 1)) if N < 70000 else \
            window * (window + 1) / 2 + (N - window) * window
    return 4 * D * pairs * H


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    H, D = 32, 128
    cases = [("causal 32k", 32768, None), ("window 4096 32k", 32768, 4096), ("window 4096 128k", 131072, 4096)]
    variants = []
    for cfg in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)]:
        for tma, pipe, fma, ws in [(0, 0, 0, 0), (0, 0, 1, 0), (1, 0, 1, 0), (0, 1, 1, 0), (1, 1, 1, 0), (1, 0, 1, 1)]:
            variants.append((cfg, tma, pipe, fma, ws))
    only = next((arg for arg in sys.argv[1:] if not arg.startswith("--")), None)  # a case name's part
    rows = []
    for name, N, window in cases:
        if only and only not in name:
            continue
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        f = flops(N, H, D, window)
        ref = flash_forward(q, k, v, causal=True, window=window, sinks=0, scale=D ** -0.5, key_padding_mask=None)[0]
        ms = triton.testing.do_bench(lambda: flash_forward(q, k, v, causal=True, window=window, sinks=0,
                                                           scale=D ** -0.5, key_padding_mask=None))
        rows.append((name, "ours (package, tuned)", ms, f / ms / 1e9, 0.0))
        if window is None:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True))
            rows.append((name, "SDPA cuDNN", ms, f / ms / 1e9, 0.0))
        elif N <= 32768:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            W = window
            bm_ = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (ki > qi - W), None, None, N, N,
                                    device="cuda", _compile=True)
            flex = torch.compile(flex_attention)
            flex(q, k, v, block_mask=bm_)
            ms = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=bm_))
            rows.append((name, "FlexAttention", ms, f / ms / 1e9, 0.0))
        for cfg, tma, pipe, fma, ws in variants:
            label = f"{cfg} tma={tma} pipe={pipe} fma={fma} ws={ws}"
            try:
                out = run_exp(q, k, v, window, cfg, tma, pipe, fma, ws)
                err = (out.float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench(lambda: run_exp(q, k, v, window, cfg, tma, pipe, fma, ws))
                rows.append((name, label, ms, f / ms / 1e9, err))
            except Exception as e:  # noqa: BLE001
                rows.append((name, label + " FAIL " + str(e).splitlines()[0][:80], float("nan"), 0, 0))
            print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    print("\n== forward variants (B=1, H=32, D=128, bf16, causal) ==")
    for name, label, ms, tf, err in rows:
        print(f"{name:18s} {label:60s} {ms:8.3f} ms {tf:6.0f} TFLOP/s err {err:.1e}")


def main2():
    torch.manual_seed(0)
    H, D, N = 32, 128, 32768
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    f = flops(N, H, D, None)
    ref = flash_forward(q, k, v, causal=True, window=None, sinks=0, scale=D ** -0.5, key_padding_mask=None,
                        config=(128, 128, 8, 3))[0]
    rows = []
    def bench(label, fn):
        out = fn()
        err = (out.float() - ref.float()).abs().max().item()
        ms = triton.testing.do_bench(fn)
        rows.append((label, ms, f / ms / 1e9, err)); print(rows[-1], flush=True)
    cfg = (128, 128, 8, 3)
    kw = dict(causal=True, window=None, sinks=0, scale=D ** -0.5, key_padding_mask=None, config=cfg)
    bench("package", lambda: flash_forward(q, k, v, **kw)[0])
    bench("exp tma fma global desc", lambda: run_exp(q, k, v, None, cfg, 1, 0, 1, 0))
    bench("exp tma fma per-head desc", lambda: run_exp(q, k, v, None, cfg, 1, 0, 1, 0, perhead=1))
    bench("exp tma fma per-head desc, constant stride", lambda: run_exp(q, k, v, None, cfg, 1, 0, 1, 0, perhead=2))
    bench("exp tma fma global desc, runtime stride", lambda: run_exp(q, k, v, None, cfg, 1, 0, 1, 0, perhead=3))
    for name, window, length in (("window 4096 32k", 4096, 32768), ("window 4096 128k", 4096, 131072)):
        q2, k2, v2 = (torch.randn(1, H, length, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        kw2 = dict(causal=True, window=window, sinks=0, scale=D ** -0.5, key_padding_mask=None, config=cfg)
        ms = triton.testing.do_bench(lambda: flash_forward(q2, k2, v2, **kw2))
        rows.append(("package " + name, ms, flops(length, H, D, window) / ms / 1e9, 0.0)); print(rows[-1], flush=True)
    print("\n== isolation, causal 32k, (128,128,8,3) ==")
    for label, ms, tf, err in rows:
        print(f"{label:40s} {ms:8.3f} ms {tf:6.0f} TFLOP/s err {err:.1e}")


if __name__ == "__main__":
    main2() if "--isolate" in sys.argv[1:] else main()
