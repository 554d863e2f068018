"""`attention-planner demo`: the product in one command, on the CPU, with no download.

Builds the small Llama-style model of planner/demo_model.py, optimizes it for max_len="128k" on target "h200", prints
the report, then runs original and rewritten at a length both can run (peak memory, max abs difference) and at a
length where the original's attention scores would need more than 4 GiB (the original is skipped there, with the
number printed).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

from planner.api import optimize
from planner.demo_model import DemoConfig, DemoLlama
from planner.lengths import format_length, parse_length
from planner.memory import measure_peak
from planner.plan import format_bytes

ORIGINAL_LIMIT_BYTES = 4 * 2**30  # the demo does not run the original where its scores alone need more than this


def score_bytes(config: DemoConfig, batch: int, length: int, attention: str) -> int:
    """Bytes of one layer's attention scores as the original computes them (fp32 scores + probabilities)."""
    return batch * config.num_heads * length * length * (4 if attention == "sdpa" else 4 + 4)


def _timed_run(model, input_ids):
    start = time.perf_counter()
    with torch.no_grad():
        output, peak = measure_peak(lambda: model(input_ids))
    return output, peak, time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attention-planner demo", description=__doc__.splitlines()[0])
    parser.add_argument("--short", default="1k", help="a length both models run (default 1k)")
    parser.add_argument("--long", default="16k", help="a length where only the rewritten model runs (default 16k)")
    parser.add_argument("--max-len", default="128k", help="the length to plan for (default 128k)")
    parser.add_argument("--device", default="h200", help="the target to plan for (default h200)")
    parser.add_argument("--attention", default="eager", choices=("eager", "sdpa"),
                        help="how the demo model writes attention (default eager: scores, mask, softmax by hand)")
    arguments = parser.parse_args(argv)
    short, long = parse_length(arguments.short, name="--short"), parse_length(arguments.long, name="--long")

    torch.manual_seed(0)
    config = DemoConfig(attention=arguments.attention)
    model = DemoLlama(config).eval()
    print(f"demo model: Llama-style, {config.num_layers} layers, {config.num_heads} heads ({config.num_kv_heads} kv), "
          f"head dim {config.head_dim}, attention written as {config.attention}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    start = time.perf_counter()
    optimized = optimize(model, max_len=arguments.max_len, device=arguments.device)
    print(f"optimize() took {time.perf_counter() - start:.1f} s\n")
    print(optimized.report.summary())
    print()

    input_ids = torch.randint(0, config.vocab_size, (1, short))
    original_out, original_peak, original_time = _timed_run(model, input_ids)
    optimized_out, optimized_peak, optimized_time = _timed_run(optimized, input_ids)
    difference = (original_out - optimized_out).abs().max().item()
    print(f"at {format_length(short)} tokens: original peak {format_bytes(original_peak)} in {original_time:.2f} s; "
          f"rewritten peak {format_bytes(optimized_peak)} in {optimized_time:.2f} s; max abs difference "
          f"{difference:.2e}")

    input_ids = torch.randint(0, config.vocab_size, (1, long))
    needed = score_bytes(config, 1, long, config.attention)
    if needed > ORIGINAL_LIMIT_BYTES:
        print(f"at {format_length(long)} tokens: original skipped: its attention scores need {format_bytes(needed)} "
              f"per layer (more than {format_bytes(ORIGINAL_LIMIT_BYTES)})")
    else:
        _, peak, seconds = _timed_run(model, input_ids)
        print(f"at {format_length(long)} tokens: original peak {format_bytes(peak)} in {seconds:.2f} s")
    output, peak, seconds = _timed_run(optimized, input_ids)
    finite = bool(torch.isfinite(output).all())
    print(f"at {format_length(long)} tokens: rewritten peak {format_bytes(peak)} in {seconds:.2f} s "
          f"(outputs finite: {finite})")
    return 0 if finite and difference < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
