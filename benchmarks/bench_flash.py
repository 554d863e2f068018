"""Speed of the Triton tiled attention against PyTorch's SDPA (cuDNN and flash backends) and FlexAttention.

B=1, H=32, D=128, bf16, triton.testing.do_bench medians, every competitor in the same run. Useful FLOPs count only
visible (query, key) pairs: 4 * D * pairs per head forward, 2.5x that backward. Run on the H200:

    PYTHONPATH=. python3 benchmarks/bench_flash.py            # prints a table, writes $OUT/bench_flash.jsonl

Goals: causal sliding window W=4096 at 32k >= 1.2x FlexAttention, <= 16 ms at 128k; exact causal at 32k
>= 0.85x cuDNN; causal backward at 16k >= 0.8x cuDNN's backward.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from backends.flash.op import tiled_attention
from backends.flash import triton as flash_triton

BATCH, HEADS, HEAD_DIM, DTYPE = 1, 32, 128, torch.bfloat16
RESULTS = []


def visible_pairs(length: int, causal: bool, window) -> int:
    if window is None:
        return length * (length + 1) // 2 if causal else length * length
    w = min(window, length)
    return w * length - w * (w - 1) // 2  # causal band: query i sees min(i + 1, W) keys


def tflops(length, causal, window, ms, backward=False):
    flops = 4 * BATCH * HEADS * HEAD_DIM * visible_pairs(length, causal, window) * (2.5 if backward else 1.0)
    return flops / (ms * 1e-3) / 1e12


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def record(name, impl, length, causal, window, ms, backward=False, note=""):
    row = dict(name=name, impl=impl, length=length, causal=causal, window=window, backward=backward, ms=ms,
               tflops=tflops(length, causal, window, ms, backward) if ms == ms else float("nan"), note=note)
    RESULTS.append(row)
    print(f"[bench] {name:28s} {impl:22s} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s {note}", flush=True)


def inputs(length, requires_grad=False):
    torch.manual_seed(length)
    shape = (BATCH, HEADS, length, HEAD_DIM)
    return [torch.randn(shape, device="cuda", dtype=DTYPE, requires_grad=requires_grad) for _ in range(3)]


def try_bench(name, impl, length, causal, window, fn, backward=False, note=""):
    try:
        ms = bench(fn)
    except Exception as error:  # an out-of-memory competitor is a result, not a crash
        ms = float("nan")
        note = f"{type(error).__name__}: {str(error)[:80]}"
    record(name, impl, length, causal, window, ms, backward, note)
    torch.cuda.empty_cache()


def ours_forward(length, causal, window, name, descriptor_scope="head"):
    """Our kernel; descriptor_scope "tensor" times the forward's tensor-wide descriptors (untimed option)."""
    q, k, v = inputs(length)
    default_scope, flash_triton._DESCRIPTOR_SCOPE = flash_triton._DESCRIPTOR_SCOPE, descriptor_scope
    try:
        with torch.no_grad():
            fn = lambda: tiled_attention(q, k, v, causal=causal, window=window, impl="triton")  # noqa: E731
            fn()
            label = "triton (ours)" + (", tensor-wide desc." if descriptor_scope == "tensor" else "")
            try_bench(name, label, length, causal, window, fn,
                      note=f"cfg={flash_triton._TUNED.get(next(reversed(flash_triton._TUNED)))}")
    finally:
        flash_triton._DESCRIPTOR_SCOPE = default_scope


def sdpa_forward(length, backend, label, name):
    q, k, v = inputs(length)
    with torch.no_grad(), sdpa_kernel(backend):
        try_bench(name, label, length, True, None, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def flex_forward(length, window, name):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = inputs(length)
    if window is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    try:
        block_mask = create_block_mask(mask_mod, None, None, length, length, device="cuda", _compile=True)
        compiled = torch.compile(flex_attention, dynamic=False)
        with torch.no_grad():
            compiled(q, k, v, block_mask=block_mask)
            try_bench(name, "FlexAttention", length, True, window,
                      lambda: compiled(q, k, v, block_mask=block_mask))
    except Exception as error:
        record(name, "FlexAttention", length, True, window, float("nan"),
               note=f"{type(error).__name__}: {str(error)[:80]}")
    torch.cuda.empty_cache()


def backward_case(length, causal, window, name, impl_label, forward):
    q, k, v = inputs(length, requires_grad=True)
    out = forward(q, k, v)
    grad_out = torch.randn_like(out)
    fn = lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)  # noqa: E731
    fn()
    try_bench(name, impl_label, length, causal, window, fn, backward=True)
    del out


def backward_kernels_case(length, name, dq_mode):
    """The backward kernels alone (flash_backward on a saved out and lse), dQ by its own kernel (recomputing S and
    dP: 7 products) or reduced atomically in fp32 by the dK/dV kernel (5 products)."""
    q, k, v = inputs(length)
    options = dict(causal=True, window=None, sinks=0, scale=HEAD_DIM ** -0.5, key_padding_mask=None)
    out, lse = flash_triton.flash_forward(q, k, v, **options)
    grad_out = torch.randn_like(out)
    fn = lambda: flash_triton.flash_backward(grad_out, q, k, v, out, lse, dq_mode=dq_mode, **options)  # noqa: E731
    fn()
    try_bench(name, f"triton kernels, {dq_mode} dQ", length, True, None, fn, backward=True)


def main() -> int:
    only = sys.argv[1:]
    want = lambda tag: not only or tag in only  # noqa: E731
    start = time.time()
    if want("causal"):
        name = "fwd causal 32k"
        ours_forward(32768, True, None, name)
        sdpa_forward(32768, SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN", name)
        sdpa_forward(32768, SDPBackend.FLASH_ATTENTION, "SDPA flash", name)
        flex_forward(32768, None, name)
        ours_forward(32768, True, None, name, descriptor_scope="tensor")
    if want("window"):
        ours_forward(32768, True, 4096, "fwd window 4096 32k")
        flex_forward(32768, 4096, "fwd window 4096 32k")
        ours_forward(131072, True, 4096, "fwd window 4096 128k")
        ours_forward(32768, True, 4096, "fwd window 4096 32k", descriptor_scope="tensor")
        ours_forward(131072, True, 4096, "fwd window 4096 128k", descriptor_scope="tensor")
    if want("backward"):
        length = 16384
        name = "bwd causal 16k"
        backward_case(length, True, None, name, "triton (ours)",
                      lambda q, k, v: tiled_attention(q, k, v, causal=True, impl="triton"))
        for backend, label in ((SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN"), (SDPBackend.FLASH_ATTENTION, "SDPA flash")):
            def theirs(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with sdpa_kernel(backend):
                backward_case(length, True, None, name, label, theirs)
        for dq_mode in ("separate", "atomic"):
            backward_kernels_case(length, name, dq_mode)
        backward_case(32768, True, 4096, "bwd window 4096 32k", "triton (ours)",
                      lambda q, k, v: tiled_attention(q, k, v, causal=True, window=4096, impl="triton"))
    print(f"\nbench time {time.time() - start:.0f}s")
    for name, key, timings in flash_triton.TUNING_LOG:
        print(f"[tune] {name} {key}: " + ", ".join(f"{c}={t:.3f}" for c, t in sorted(timings.items(), key=lambda x: x[1])))
    with open(os.path.join(os.environ.get("OUT", "."), "bench_flash.jsonl"), "w") as log:
        for row in RESULTS:
            log.write(json.dumps(row) + "\n")
    print(f"\n{'case':28s} {'impl':26s} {'ms':>8s} {'TFLOP/s':>8s}")
    for row in RESULTS:
        print(f"{row['name']:28s} {row['impl']:26s} {row['ms']:8.3f} {row['tflops']:8.1f} {row['note'][:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
