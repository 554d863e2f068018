"""Exact causal attention kernels by head dim, grouped-query shapes (Llama-3.2-1B has head dim 64): which
of SDPA flash (what transformers' sdpa path runs, grouped heads passed with enable_gqa), SDPA cuDNN behind the
planner's `sdpa_preferring_cudnn` (k/v repeated to the query heads) and our Triton kernel is fastest, so that the
cost model's per-implementation efficiencies can be checked away from head dim 128.

    PYTHONPATH=. python3 benchmarks/bench_dense_kernels.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import backends
from backends.dense.rule import sdpa_preferring_cudnn


def bench(function) -> float:
    return triton.testing.do_bench(function, warmup=25, rep=100, return_mode="median")


def main() -> None:
    heads, kv_heads = 32, 8
    rows = []
    for head_dim in (64, 128):
        for length in (8192, 32768):
            q = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            flops = 4 * head_dim * heads * length * (length + 1) / 2

            def flash_gqa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            times = {
                "sdpa flash (enable_gqa)": bench(flash_gqa),
                "planner sdpa_preferring_cudnn": bench(lambda: sdpa_preferring_cudnn(q, k, v, True, head_dim**-0.5)),
                "ours (triton)": bench(lambda: backends.flash_attention(q, k, v, causal=True)),
            }
            for name, ms in times.items():
                rows.append((head_dim, length, name, ms, flops / ms / 1e9))
    print("| head dim | length | kernel | ms | TFLOP/s |")
    print("|---|---|---|---|---|")
    for head_dim, length, name, ms, tflops in rows:
        print(f"| {head_dim} | {length} | {name} | {ms:.3f} | {tflops:.0f} |")


if __name__ == "__main__":
    main()
