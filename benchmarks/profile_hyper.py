"""Where HyperAttention's causal time goes at 128k on the GPU (the goal: 5x cuDNN's exact causal attention).

Times the whole call and its pieces (the exact causal leaves, one level's sortLSH, its block-diagonal and sampled
attention calls, the merge) and prints torch.profiler's CUDA kernel table, so that the next change targets the
largest piece. B=1, H=32, D=128, bf16, inference (no gradients: the fused merge path).

    PYTHONPATH=. python3 benchmarks/profile_hyper.py --out $OUT
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import triton.testing

import backends
from backends.hyper import blockwise
from backends.hyper.lsh import gray_rank_table, lsh_sort_order, projection_directions


def bench(function) -> float:
    if not torch.cuda.is_available():  # a CPU smoke run: one timed call
        start = time.perf_counter()
        function()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(function, warmup=25, rep=100, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=131072)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    heads, head_dim, seq_len = 32, 128, args.seq
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, device=args.device, dtype=dtype) for _ in range(3))
    lines = []
    with torch.no_grad():
        whole = bench(lambda: backends.hyper_attention(q, k, v, causal=True))
        lines.append(f"hyper causal {seq_len}: {whole:.2f} ms")
        if args.device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            sdpa = torch.nn.functional.scaled_dot_product_attention
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn = bench(lambda: sdpa(q, k, v, is_causal=True))
                lines.append(f"SDPA cuDNN causal {seq_len}: {cudnn:.2f} ms -> hyper is {cudnn / whole:.2f}x faster")
                for scale in (1.0, 2.0):  # relative L2 error against the exact output
                    exact = sdpa(q * scale, k * scale, v, is_causal=True).float()
                    approx = backends.hyper_attention(q * scale, k * scale, v, causal=True).float()
                    error = ((approx - exact).norm() / exact.norm()).item()
                    lines.append(f"  relative error, q and k scaled by {scale:g}: {error:.3f}")
                    del exact, approx
        leaf = 4096
        view = (1, heads * seq_len // leaf, leaf, head_dim)
        leaves = bench(lambda: backends.flash_attention(q.view(view), k.view(view), v.view(view), causal=True,
                                                        return_lse=True))
        lines.append(f"  causal leaves ({seq_len // leaf} x {leaf}): {leaves:.2f} ms")
        half = seq_len // 2
        q_half, k_half = q[:, :, half:], k[:, :, :half]
        directions = projection_directions(1, head_dim, 7, q.device, q.dtype)
        table = gray_rank_table(7, q.device)
        sort_ms = bench(lambda: lsh_sort_order(q_half, directions, table))
        lines.append(f"  level 0 sortLSH of {half} queries: {sort_ms:.2f} ms (x2 with the keys)")
        options = dict(block_size=256, sample_size=256, num_projections=7, seed=1)
        level_ms = bench(lambda: blockwise.non_causal_hyper(q_half, k_half, v[:, :, :half], None, **options))
        lines.append(f"  level 0 estimator, PyTorch merge ({half} x {half}): {level_ms:.2f} ms")
        out = torch.empty(heads, seq_len, head_dim, device=args.device, dtype=torch.float32)
        lse = torch.zeros(heads, seq_len, device=args.device, dtype=torch.float32)
        if args.device == "cuda":  # the fused merge is a Triton kernel
            fused_ms = bench(lambda: blockwise.non_causal_hyper(q_half, k_half, v[:, :, :half], None,
                                                                destination=(out, lse, half, True), **options))
            lines.append(f"  level 0 estimator, fused merge: {fused_ms:.2f} ms")
        blocks = half // 256
        qb = q_half.reshape(heads * blocks, 1, 256, head_dim)
        kb = k_half.reshape(heads * blocks, 1, 256, head_dim)
        diag_ms = bench(lambda: backends.flash_attention(qb, kb, kb, return_lse=True))
        lines.append(f"  level 0 block-diagonal flash ({heads * blocks} x 256 x 256): {diag_ms:.2f} ms")
        mask = torch.rand(heads * blocks, 256, device=args.device) > 0.01
        diag_mask_ms = bench(lambda: backends.flash_attention(qb, kb, kb, return_lse=True, key_padding_mask=mask))
        lines.append(f"  same with a key padding mask: {diag_mask_ms:.2f} ms")

        from torch.profiler import ProfilerActivity, profile
        activity = ProfilerActivity.CUDA if args.device == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as profiler:
            for _ in range(3):
                backends.hyper_attention(q, k, v, causal=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
    sort_by = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    table_text = profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=70)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile_hyper.txt").write_text(table_text + "\n" + "\n".join(lines) + "\n")
    print(table_text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
