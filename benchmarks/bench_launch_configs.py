"""Forward launch configurations of our tiled kernel, each forced (no tuner), beside SDPA's cuDNN kernel in the same
run: exact causal attention at head dim 64 with grouped heads (H=32, 8 kv heads: the Llama-3.2-1B shape of the
end-to-end benchmark) and the causal window of 4096 at 128k, head dim 128 (its 16 ms goal). B=1, bf16,
triton.testing.do_bench medians.

    PYTHONPATH=. python3 benchmarks/bench_launch_configs.py            # prints a markdown table last

The head-dim-64 figures feed planner/calibration.py's "@d64" entries (ours at the tuner's choice).
"""
from __future__ import annotations

import sys

import torch
import triton

from backends.flash import triton as flash_triton
from backends.dense.rule import sdpa_preferring_cudnn

D64_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3),
               (64, 128, 4, 2), (128, 128, 4, 3))
WINDOW_CONFIGS = ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (64, 128, 4, 3))


def bench(function) -> float:
    return triton.testing.do_bench(function, warmup=25, rep=100, return_mode="median")


def inputs(length: int, heads: int, kv_heads: int, head_dim: int):
    torch.manual_seed(length)
    q = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v


def ours(q, k, v, window, config):
    return lambda: flash_triton.flash_forward(q, k, v, causal=True, window=window, sinks=0, scale=q.shape[-1] ** -0.5,
                                              key_padding_mask=None, config=config)


def time_config(rows, case, function, label):
    try:
        rows.append((case, label, bench(function)))
    except Exception as error:  # a configuration that does not fit (shared memory) is a result, not a crash
        rows.append((case, f"{label}: {type(error).__name__}", float("nan")))
    print(f"[r] {rows[-1][0]:28s} {rows[-1][1]:34s} {rows[-1][2]:9.4f} ms", flush=True)


def main() -> int:
    rows: list = []
    with torch.no_grad():
        for length in (8192, 32768, 131072):
            q, k, v = inputs(length, 32, 8, 64)
            case = f"D=64 GQA 32/8 causal {length // 1024}k"
            cudnn = lambda: sdpa_preferring_cudnn(q, k, v, True, 64 ** -0.5)  # noqa: E731
            time_config(rows, case, cudnn, "SDPA cuDNN")
            for config in D64_CONFIGS if length < 131072 else D64_CONFIGS[:2] + D64_CONFIGS[4:6]:
                time_config(rows, case, ours(q, k, v, None, config), f"ours {config}")
            time_config(rows, case, cudnn, "SDPA cuDNN, again")
            del q, k, v
            torch.cuda.empty_cache()
        q, k, v = inputs(131072, 32, 32, 128)
        for config in WINDOW_CONFIGS:
            time_config(rows, "D=128 window 4096 128k", ours(q, k, v, 4096, config), f"ours {config}")
    print("\n| case | kernel (BLOCK_M, BLOCK_N, warps, stages) | ms |\n|---|---|---|")
    for case, label, ms in rows:
        print(f"| {case} | {label} | {ms:.4g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
