"""The forward kernel with part of its exponentials on the FMA units (a polynomial exp2, `_exp2_split` in
backends/flash/triton.py) against today's kernel (all exp2 on the special-function unit) and SDPA's cuDNN kernel, in
one run. B=1, bf16, triton.testing.do_bench medians; ours at the tuner's launch configuration for the case, then the
same configuration with POLY of EXP2_CHUNKS (16) column chunks of every unmasked score tile on the polynomial.

    PYTHONPATH=. python3 benchmarks/bench_flash_poly_exp2.py                 # correctness, then timings (~6 min)
    PYTHONPATH=. python3 benchmarks/bench_flash_poly_exp2.py --poly 0,1,2 --rounds 7 --cases causal32k,d64_8k

Correctness first (the FlashAttention rule): max |out - float32 reference| of each variant at most 2x that of SDPA
in bf16, at smaller sizes of each case's kind (the kernels are the same: lengths are runtime arguments). Writes
$OUT/poly_exp2.jsonl; prints a markdown table last.
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

from backends.flash import triton as flash_triton

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# name: (length, heads, kv_heads, head_dim, causal, window)
CASES = {
    "causal32k": (32768, 32, 32, 128, True, None),
    "noncausal8k": (8192, 32, 32, 128, False, None),
    "noncausal16k": (16384, 32, 32, 128, False, None),
    "noncausal32k": (32768, 32, 32, 128, False, None),
    "noncausal64k": (65536, 32, 32, 128, False, None),
    "window4096_128k": (131072, 32, 32, 128, True, 4096),
    "d64_8k": (8192, 32, 8, 64, True, None),
    "d64_32k": (32768, 32, 8, 64, True, None),
}
LABELS = {"causal32k": "D=128 causal 32k", "noncausal32k": "D=128 non-causal 32k",
          "noncausal8k": "D=128 non-causal 8k", "noncausal16k": "D=128 non-causal 16k",
          "noncausal64k": "D=128 non-causal 64k",
          "window4096_128k": "D=128 window 4096 128k", "d64_8k": "D=64 GQA 32/8 causal 8k",
          "d64_32k": "D=64 GQA 32/8 causal 32k"}
CHECK_LENGTH = {"window4096_128k": 3000}  # the window must hide keys at the check's length: window 4096 -> 700
CHECK_WINDOW = {"window4096_128k": 700}


def bench(function) -> float:
    return triton.testing.do_bench(function, warmup=50, rep=300, return_mode="median")


def inputs(length, heads, kv_heads, head_dim, seed, q_gain=1.0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator) * q_gain
    k, v = (torch.randn(1, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
            for _ in range(2))
    return q, k, v


def ours(q, k, v, causal, window, config):
    return flash_triton.flash_forward(q, k, v, causal=causal, window=window, sinks=0, scale=q.shape[-1] ** -0.5,
                                      key_padding_mask=None, config=config)[0]


def tuned_config(q, k, v, causal, window):
    """The launch configuration the tuner picks for this case (today's kernel)."""
    before = set(flash_triton._TUNED)
    ours(q, k, v, causal, window, None)
    new = [key for key in flash_triton._TUNED if key not in before and key[0] == "forward"]
    return flash_triton._TUNED[new[-1]] if new else None


def visible(q_len, kv_len, causal, window):
    """(q_len, kv_len) bool: which key each query sees (top-left aligned, as the kernels)."""
    rows = torch.arange(q_len, device="cuda")[:, None]
    cols = torch.arange(kv_len, device="cuda")[None, :]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device="cuda")
    if causal:
        mask &= cols <= rows
    if window is not None:
        mask &= (cols > rows - window) if causal else ((cols > rows - window) & (cols < rows + window))
    return mask


def reference(q, k, v, mask):
    """Dense float32 attention, one head at a time."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    for h in range(q.shape[1]):
        scores = (q[0, h].float() @ k[0, h // group].float().T) * q.shape[-1] ** -0.5
        out[0, h] = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v[0, h // group].float()
    return out


def sdpa(q, k, v, causal, window, mask):
    grouped = q.shape[1] != k.shape[1]
    if window is None:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=grouped)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)  # SDPA has no window


def valid(config, poly):
    """Whether the wrapper takes this chunk count at this BLOCK_N (chunks of >= 8 columns)."""
    chunks = flash_triton.EXP2_CHUNKS
    return poly == 0 or config[1] * (poly & -poly) // chunks >= 8


def check(name, config, polys, rows):
    length, heads, kv_heads, head_dim, causal, window = CASES[name]
    length, window = CHECK_LENGTH.get(name, 2048), CHECK_WINDOW.get(name, window)
    for q_gain in (1.0, 4.0):  # 4x: peakier rows, exponents far below the row maximum
        q, k, v = inputs(length, 4, 4 * kv_heads // heads, head_dim, seed=length + int(q_gain), q_gain=q_gain)
        mask = visible(length, length, causal, window)
        expected = reference(q, k, v, mask)
        sdpa_error = (sdpa(q, k, v, causal, window, mask).float() - expected).abs().max().item()
        for poly in polys + (None,):  # None: the tuner's choice
            out = torch.full_like(q, float("nan"))  # poisoned: an unwritten element fails the check
            if poly is not None and not valid(config, poly):
                continue
            try:
                out.copy_(ours(q, k, v, causal, window, None if poly is None else config + (poly,)))
            except Exception as failure:  # noqa: BLE001 - reported as a failed check, the others still run
                print(f"[check] {name} poly {poly}: {type(failure).__name__}: {str(failure)[:1500]}", flush=True)
            error = (out.float() - expected).abs().max().item()
            relative = ((out.float() - expected).norm() / expected.norm()).item()  # more sensitive than the max
            ok = error == error and error <= 2 * sdpa_error
            rows.append(dict(kind="check", case=name, poly=poly, q_gain=q_gain, error=error, sdpa_error=sdpa_error,
                             relative=relative, ok=ok))
            print(f"[check] {name:16s} gain {q_gain} poly {poly}/{flash_triton.EXP2_CHUNKS}: ours {error:.3e} "
                  f"sdpa {sdpa_error:.3e} relative {relative:.3e} {'ok' if ok else 'FAIL'}", flush=True)


def time_case(name, configs, polys, rounds, rows):
    """Every variant once per round, the order rotated each round, so that drift of the card's clock (seen as 5%
    between two timings of one kernel minutes apart on the H100) falls on all of them alike; per variant the median
    over rounds, and per round its ratio to today's kernel (the first configuration, poly 0) in the same round."""
    length, heads, kv_heads, head_dim, causal, window = CASES[name]
    q, k, v = inputs(length, heads, kv_heads, head_dim, seed=length)
    variants = {f"ours {config} poly {poly}/{flash_triton.EXP2_CHUNKS}":
                (poly, config, lambda poly=poly, config=config: ours(q, k, v, causal, window, config + (poly,)))
                for config in configs for poly in dict.fromkeys((0,) + polys) if valid(config, poly)}
    # the package as shipped: the tuner picks among its candidates (with the polynomial where it is tuned in)
    variants["ours, tuner's choice"] = (None, None, lambda: ours(q, k, v, causal, window, None))
    if window is None:
        variants["SDPA cuDNN"] = (None, None, lambda: sdpa(q, k, v, causal, None, None))
    times = {label: [] for label in variants}
    with torch.no_grad():
        for _, _, function in variants.values():
            function()  # compile and tune outside the timed rounds
        chosen = [config for key, config in flash_triton._TUNED.items() if key[0] == "forward"
                  and key[1:6] == (head_dim, causal, window is not None, torch.bfloat16, length)]
        print(f"[tuner] {name}: {chosen}", flush=True)
        labels = list(variants)
        for round_index in range(rounds):
            for label in labels[round_index % len(labels):] + labels[:round_index % len(labels)]:
                try:
                    times[label].append(triton.testing.do_bench(variants[label][2], warmup=25, rep=120,
                                                                return_mode="median"))
                except Exception as error:  # noqa: BLE001 - a variant that does not fit is a result
                    print(f"[time] {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    times[label].append(float("nan"))
    baseline = times[labels[0]]
    for label, (poly, config, _) in variants.items():
        ratios = sorted(b / t for b, t in zip(baseline, times[label]))  # > 1: faster than today's kernel
        row = dict(kind="time", case=name, impl=label, poly=poly, config=config and list(config),
                   ms=statistics.median(times[label]),
                   all_ms=times[label], ratio_median=statistics.median(ratios),
                   faster_rounds=sum(r > 1 for r in ratios))
        rows.append(row)
        print(f"[time] {LABELS[name]:26s} {label:28s} {row['ms']:9.4f} ms  today/this {row['ratio_median']:.3f} "
              f"(faster in {row['faster_rounds']}/{rounds}): " + " ".join(f"{t:.3f}" for t in times[label]),
              flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--poly", default="0,1,2,3,4")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--config", default="", help="BLOCK_M,BLOCK_N,warps,stages[;...] instead of the tuner's")
    arguments = parser.parse_args()
    polys = tuple(int(p) for p in arguments.poly.split(","))
    names = arguments.cases.split(",")
    start = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows: list = []
    configs = {}
    for name in names:
        length, heads, kv_heads, head_dim, causal, window = CASES[name]
        if arguments.config:
            configs[name] = [tuple(int(x) for x in one.split(",")) for one in arguments.config.split(";")]
        else:
            q, k, v = inputs(length, heads, kv_heads, head_dim, seed=length)
            configs[name] = [tuple(tuned_config(q, k, v, causal, window))[:4]]
            del q, k, v
        print(f"[config] {name}: {configs[name]}", flush=True)
        if not arguments.no_check:
            for config in configs[name]:
                check(name, config, polys, rows)
    for name in names:
        time_case(name, configs[name], polys, arguments.rounds, rows)
    print(f"\nbench time {time.time() - start:.0f}s")
    try:  # registers and spills of each compiled forward variant (Triton's kernel cache; layout varies by version)
        for cache in flash_triton._attn_fwd.device_caches.values():
            for compiled in cache[0].values():
                constants = str(getattr(compiled, "src", None) and compiled.src.constants)
                print(f"[regs] {compiled.n_regs} regs, {compiled.n_spills} spills: {constants[:300]}")
    except Exception as failure:  # noqa: BLE001 - informative only
        print(f"[regs] unavailable: {type(failure).__name__}: {failure}")
    with open(os.path.join(os.environ.get("OUT", "."), "poly_exp2.jsonl"), "w") as log:
        for row in rows:
            log.write(json.dumps(row) + "\n")
    failed = [row for row in rows if row["kind"] == "check" and not row["ok"]]
    print(f"checks: {sum(row['kind'] == 'check' for row in rows)} run, {len(failed)} failed")
    print("\n| case | kernel | median ms | today / this (median of rounds) | faster rounds |\n|---|---|---|---|---|")
    for row in rows:
        if row["kind"] == "time":
            print(f"| {LABELS[row['case']]} | {row['impl']} | {row['ms']:.4g} | {row['ratio_median']:.3f} | "
                  f"{row['faster_rounds']} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
