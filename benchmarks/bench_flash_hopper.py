"""The warp-specialized Hopper forward (backends/flash/hopper.py) against the Triton forward (backends/flash/triton.py,
at the tuner's choice) and SDPA's cuDNN kernel, in one run. B=1, bf16, triton.testing.do_bench medians, each
variant once per round in rotated order; "ratio" is the median over rounds of the Triton kernel's time over the
variant's in the same round (> 1: faster).

    PYTHONPATH=. python3 benchmarks/bench_flash_hopper.py                  # correctness, then timings
    PYTHONPATH=. python3 benchmarks/bench_flash_hopper.py --cases causal32k --configs "128,2,1,1;128,2,1,0" --rounds 3

Correctness first (the FlashAttention rule): max |out - float32 reference| at most 2x that of SDPA in bf16, and the
lse within 1e-3 of the reference's, at odd sizes of every case kind, each configuration, on poisoned outputs.
Appends to $OUT/flash_hopper.jsonl; prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from backends.flash import hopper
from backends.flash import triton as flash_triton
from bench_flash_poly_exp2 import visible  # the benchmarks directory is on the path when run as a script

torch.backends.cuda.matmul.allow_tf32 = False

# name: (length, heads, kv_heads, head_dim, causal, window)
CASES = {
    "causal32k": (32768, 32, 32, 128, True, None),
    "noncausal32k": (32768, 32, 32, 128, False, None),
    "causal16k": (16384, 32, 32, 128, True, None),
    "window4096_128k": (131072, 32, 32, 128, True, 4096),
    "d64_8k": (8192, 32, 8, 64, True, None),
    "d64_32k": (32768, 32, 8, 64, True, None),
    "d64_128k": (131072, 32, 8, 64, True, None),
}
# (q_len, kv_len, heads, kv_heads, head_dim, causal, window, dtype)
CHECKS = [
    (1000, 1000, 4, 4, 128, True, None, torch.bfloat16),
    (3001, 3001, 4, 1, 128, True, None, torch.bfloat16),
    (777, 1333, 4, 2, 128, False, None, torch.bfloat16),
    (3000, 3000, 4, 4, 128, True, 700, torch.bfloat16),
    (3000, 3000, 2, 2, 128, False, 700, torch.float16),
    (2100, 2100, 8, 2, 64, True, None, torch.bfloat16),
    (1500, 900, 2, 2, 64, False, 300, torch.bfloat16),
    (129, 129, 2, 2, 128, True, None, torch.float16),
]


def bench(function) -> float:
    return triton.testing.do_bench(function, warmup=25, rep=120, return_mode="median")


def inputs(q_len, kv_len, heads, kv_heads, head_dim, dtype, seed, q_gain=1.0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, q_len, head_dim, device="cuda", dtype=dtype, generator=generator) * q_gain
    k, v = (torch.randn(1, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype, generator=generator)
            for _ in range(2))
    return q, k, v


def reference(q, k, v, mask):
    """Dense float32 attention and its natural-log lse, one head at a time; rows that see no key give out 0 and lse
    -inf (the kernels' contract)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="cuda")
    for h in range(q.shape[1]):
        scores = (q[0, h].float() @ k[0, h // group].float().T) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        out[0, h] = torch.softmax(scores, -1).nan_to_num(0.0) @ v[0, h // group].float()
        lse[0, h] = torch.logsumexp(scores, -1)
    return out, lse


def triton_forward(q, k, v, causal, window):
    return flash_triton.flash_forward(q, k, v, causal=causal, window=window, sinks=0, scale=q.shape[-1] ** -0.5)


def hopper_forward(q, k, v, causal, window, config, out=None, lse=None):
    # the window as flash_forward passes it: dropped where it hides nothing
    has_window, window_size, _, _ = flash_triton._structure(q.shape[2], k.shape[2], causal, window, 0)
    return hopper.hopper_forward(q, k, v, causal=causal, window=window_size, has_window=has_window,
                                 scale=q.shape[-1] ** -0.5, config=config, out=out, lse=lse)


def sdpa(q, k, v, causal, window, mask):
    grouped = q.shape[1] != k.shape[1]
    if window is None and q.shape[2] == k.shape[2]:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=grouped)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)


def check(configs, rows):
    for index, (q_len, kv_len, heads, kv_heads, head_dim, causal, window, dtype) in enumerate(CHECKS):
        for q_gain in (1.0, 4.0):  # 4x: peakier rows, exponents far below the row maximum
            q, k, v = inputs(q_len, kv_len, heads, kv_heads, head_dim, dtype, seed=index * 10 + int(q_gain),
                             q_gain=q_gain)
            mask = visible(q_len, kv_len, causal, window)
            expected, expected_lse = reference(q, k, v, mask)
            seen = mask.any(-1)  # SDPA gives NaN for rows that see no key: its error over the others
            sdpa_error = (sdpa(q, k, v, causal, window, mask).float() - expected)[:, :, seen].abs().max().item()
            for config in configs:
                label = f"{q_len}x{kv_len} h{heads}/{kv_heads} d{head_dim} causal={causal} window={window} " \
                        f"{str(dtype)[6:]} gain {q_gain} config {config}"
                # Poisoned: an element the kernel does not write fails the check.
                out = torch.full_like(q, float("nan"))
                lse = torch.full(q.shape[:3], float("nan"), device="cuda")
                try:
                    hopper_forward(q, k, v, causal, window, config, out, lse)
                    torch.cuda.synchronize()
                except Exception as failure:  # noqa: BLE001 - reported as a failed check, the others still run
                    print(f"[check] {label}: {type(failure).__name__}: {str(failure)[:1500]}", flush=True)
                    rows.append(dict(kind="check", case=label, ok=False))
                    continue
                error = (out.float() - expected).abs().max().item()
                empty_ok = bool((lse[:, :, ~seen] == float("-inf")).all())
                lse_error = ((lse[:, :, seen] - expected_lse[:, :, seen]).abs().max().item() if empty_ok
                             else float("nan"))
                ok = error == error and error <= 2 * sdpa_error and lse_error <= 1e-3  # NaN fails
                rows.append(dict(kind="check", case=label, error=error, sdpa_error=sdpa_error, lse_error=lse_error,
                                 ok=ok))
                print(f"[check] {label}: ours {error:.3e} sdpa {sdpa_error:.3e} lse {lse_error:.2e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)


def time_case(name, configs, rounds, rows):
    length, heads, kv_heads, head_dim, causal, window = CASES[name]
    q, k, v = inputs(length, length, heads, kv_heads, head_dim, torch.bfloat16, seed=length)
    variants = {"triton (tuned)": lambda: triton_forward(q, k, v, causal, window)}
    for config in configs:
        variants[f"hopper {config}"] = lambda config=config: hopper_forward(q, k, v, causal, window, config)
    if window is None:
        variants["SDPA cuDNN"] = lambda: sdpa(q, k, v, causal, None, None)
    with torch.no_grad():
        for label, function in list(variants.items()):
            try:
                function()
                torch.cuda.synchronize()
            except Exception as failure:  # noqa: BLE001 - a configuration that does not fit is a result
                print(f"[time] {name} {label}: {type(failure).__name__}: {str(failure)[:300]}", flush=True)
                del variants[label]
        times = {label: [] for label in variants}
        labels = list(variants)
        for round_index in range(rounds):
            for label in labels[round_index % len(labels):] + labels[:round_index % len(labels)]:
                times[label].append(bench(variants[label]))
    flops = 4 * heads * head_dim * float(visible_pairs(length, causal, window))
    for label in labels:
        ratios = sorted(b / t for b, t in zip(times[labels[0]], times[label]))
        row = dict(kind="time", case=name, impl=label, ms=statistics.median(times[label]), all_ms=times[label],
                   ratio=statistics.median(ratios), tflops=flops / statistics.median(times[label]) / 1e9)
        rows.append(row)
        print(f"[time] {name:16s} {label:26s} {row['ms']:9.4f} ms {row['tflops']:6.1f} TFLOP/s "
              f"triton/this {row['ratio']:.3f}: " + " ".join(f"{t:.3f}" for t in times[label]), flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def visible_pairs(length, causal, window):
    if window is not None:
        return sum(min(i + 1, window) for i in range(0, length, 1)) if causal else None
    return length * (length + 1) // 2 if causal else length * length


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--configs", default=";".join(",".join(str(int(x)) for x in c) for c in hopper.CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-check", action="store_true")
    arguments = parser.parse_args()
    configs = [tuple(int(x) for x in one.split(",")) for one in arguments.configs.split(";")]
    configs = [(c[0], c[1], bool(c[2]), bool(c[3])) for c in configs]
    start = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows: list = []
    if not arguments.no_check:
        check(configs, rows)
    for name in arguments.cases.split(","):
        time_case(name, configs, arguments.rounds, rows)
    print(f"\nbench time {time.time() - start:.0f}s")
    with open(os.path.join(os.environ.get("OUT", "."), "flash_hopper.jsonl"), "a") as log:  # one file per run of calls
        for row in rows:
            log.write(json.dumps(row) + "\n")
    failed = [row for row in rows if row["kind"] == "check" and not row["ok"]]
    print(f"checks: {sum(row['kind'] == 'check' for row in rows)} run, {len(failed)} failed")
    print("\n| case | kernel | median ms | TFLOP/s | triton / this |\n|---|---|---|---|---|")
    for row in rows:
        if row["kind"] == "time":
            print(f"| {row['case']} | {row['impl']} | {row['ms']:.4g} | {row['tflops']:.0f} | {row['ratio']:.3f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
