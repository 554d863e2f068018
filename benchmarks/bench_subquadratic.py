"""GPU check and benchmark of the sub-quadratic families: linear attention, Mamba-2 SSD, HyperAttention.

One run does everything (the device time is scarce): bf16 correctness against the float64 references at small
sizes (forward and gradients, chunked == recurrent), a small sweep of the chunk kernels' launch parameters, then
forward (and forward+backward) medians at B=1, H=32, D=128, bf16, 128k tokens beside their competitors: fla's
chunk_linear_attn / chunk_simple_gla (fla-core, run in a subprocess with its autotune lists trimmed, when installed)
and SDPA's cuDNN causal attention for HyperAttention, whose error against the exact output is printed beside.

    PYTHONPATH=. python3 benchmarks/bench_subquadratic.py [--seq 131072] [--out DIR] [--no-fla]

Prints a markdown table last; writes results.json (and the fla log) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

import torch
import triton

import backends
from backends.hyper.naive import hyper_attention_naive
from backends.linear import chunk as linear_chunk
from backends.linear.naive import linear_attention_naive
from backends.linear.op import linear_attention_recurrent_op
from backends.mamba2.naive import ssd_naive

START = time.time()
RESULTS: dict = {"correctness": {}, "sweep": {}, "timings": {}, "hyper": {}, "fla": {}}


def log(message: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {message}", flush=True)


def bench(function, warmup=25, rep=100) -> float:
    return triton.testing.do_bench(function, warmup=warmup, rep=rep, return_mode="median")


def relative_error(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------------------------
# Correctness (bf16 on the GPU against float64 references)
# ------------------------------------------------------------------------------------------------------------------
def decay_tensor(kind, batch, heads, seq_len, key_dim, device):
    if kind == "none":
        return None
    shape = {"per_head": (heads,), "per_position": (batch, heads, seq_len),
             "per_channel": (batch, heads, seq_len, key_dim)}[kind]
    return -torch.rand(shape, device=device) * 0.5 - 0.01


def check_linear(device, seq_len=300, heads=2, dim=128):
    for kind in ("none", "per_head", "per_position", "per_channel"):
        q, k, v = (torch.randn(1, heads, seq_len, dim, device=device) * 0.3 for _ in range(3))
        decay = decay_tensor(kind, 1, heads, seq_len, dim, device)
        state = torch.randn(1, heads, dim, dim, device=device) * 0.3
        inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)] + [
            None if decay is None else decay.requires_grad_(), state.requires_grad_()]
        out, final = backends.linear_attention(*inputs[:3], decay=inputs[3], initial_state=inputs[4],
                                               return_state=True)
        ref_out, ref_final = linear_attention_naive(*inputs[:3], decay=inputs[3], initial_state=inputs[4],
                                                    return_state=True)
        grad_out = torch.randn_like(out)
        leaves = [t for t in inputs if t is not None]
        grads = torch.autograd.grad((out.float() * grad_out.float()).sum() + final.sum(), leaves)
        ref_grads = torch.autograd.grad((ref_out.double() * grad_out.double()).sum() + ref_final.sum(), leaves)
        with torch.no_grad():
            step_out, _ = linear_attention_recurrent_op(
                *(t.detach() for t in inputs[:3]),
                None if decay is None else (decay.detach().view(1, heads, 1).expand(1, heads, seq_len).contiguous()
                                            if decay.dim() == 1 else decay.detach()), state.detach())
        names = ["dq", "dk", "dv"] + (["d_decay"] if decay is not None else []) + ["d_state"]
        row = {"out": relative_error(out, ref_out), "final_state": relative_error(final, ref_final),
               "recurrent_vs_chunked": relative_error(step_out, out)}
        row.update({name: relative_error(g, r) for name, g, r in zip(names, grads, ref_grads)})
        RESULTS["correctness"][f"linear/{kind}"] = row
        log(f"linear {kind}: " + ", ".join(f"{key} {value:.1e}" for key, value in row.items()))


def check_ssd(device, seq_len=300, heads=2, head_dim=128, state_dim=128):
    x = torch.randn(1, heads, seq_len, head_dim, device=device).bfloat16()
    dt = torch.rand(1, heads, seq_len, device=device) * 0.1 + 0.01
    A = -torch.rand(heads, device=device) * 4 - 0.5
    B, C = (torch.randn(1, 1, seq_len, state_dim, device=device).bfloat16() * 0.3 for _ in range(2))
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y, final = backends.ssd(*inputs, return_state=True)
    ref_y, ref_final = ssd_naive(*inputs, return_state=True)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad((y.float() * grad_y.float()).sum() + final.sum(), inputs)
    ref_grads = torch.autograd.grad((ref_y.double() * grad_y.double()).sum() + ref_final.sum(), inputs)
    row = {"y": relative_error(y, ref_y), "final_state": relative_error(final, ref_final)}
    row.update({f"d{name}": relative_error(g, r) for name, g, r in zip(("x", "dt", "A", "B", "C"), grads, ref_grads)})
    RESULTS["correctness"]["ssd"] = row
    log("ssd: " + ", ".join(f"{key} {value:.1e}" for key, value in row.items()))


def check_hyper(device, seq_len=8192):
    """Defaults (block 256, sample 256, min_seq_len 4096): one level of halving, the benchmark's tile shapes."""
    q, k, v = (torch.randn(1, 2, seq_len, 128, device=device).bfloat16() for _ in range(3))
    row = {}
    for causal in (False, True):
        name = "causal" if causal else "non_causal"
        ref = hyper_attention_naive(q, k, v, causal=causal, seed=1)
        with torch.no_grad():
            fused = backends.hyper_attention(q, k, v, causal=causal, seed=1)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        composed = backends.hyper_attention(*leaves, causal=causal, seed=1)
        grads = torch.autograd.grad(composed.float().square().sum(), leaves)
        row[f"{name}_inference_vs_dense_estimator"] = relative_error(fused, ref)
        row[f"{name}_autograd_vs_dense_estimator"] = relative_error(composed, ref)
        row[f"{name}_grads_finite"] = float(all(torch.isfinite(g).all() for g in grads))
        del ref
    RESULTS["correctness"]["hyper"] = row
    log("hyper: " + ", ".join(f"{key} {value:.1e}" for key, value in row.items()))


# ------------------------------------------------------------------------------------------------------------------
# Timings at long sequence
# ------------------------------------------------------------------------------------------------------------------
def linear_inputs(seq_len, device, heads=32, dim=128):
    q, k, v = (torch.randn(1, heads, seq_len, dim, device=device, dtype=torch.bfloat16) * 0.1 for _ in range(3))
    return q, k, v


def _sweep(label, run, kernel, configs, store):
    timings = []
    for config in configs:
        store[kernel] = config
        try:
            timings.append((bench(run), config))
        except Exception as error:  # a config that does not fit this device
            log(f"sweep {label} {config} failed: {type(error).__name__}: {str(error)[:120]}")
    timings.sort(key=lambda item: item[0])
    store[kernel] = timings[0][1]
    RESULTS["sweep"][label] = [(round(ms, 3), config) for ms, config in timings]
    log(f"sweep {label}: " + "; ".join(f"{ms:.2f} ms {config}" for ms, config in timings))


def sweep(seq_len, device):
    """Launch parameters of the forward kernels: chunk 64 (linear, scalar decay) and chunk 256 (SSD)."""
    q, k, v = linear_inputs(seq_len, device)
    decay = -torch.rand(32, device=device) * 0.1
    run = lambda: backends.linear_attention(q, k, v, decay=decay)  # noqa: E731
    _sweep("chunk 64 state", run, "state", [
        dict(BK=64, BV=64, ROWS=64, num_warps=4, num_stages=3), dict(BK=64, BV=64, ROWS=64, num_warps=4, num_stages=4),
        dict(BK=64, BV=128, ROWS=64, num_warps=8, num_stages=3)], linear_chunk.LAUNCH)
    _sweep("chunk 64 output", run, "output", [
        dict(BV=128, BLOCK=64, num_warps=4, num_stages=2), dict(BV=128, BLOCK=64, num_warps=4, num_stages=3),
        dict(BV=128, BLOCK=64, num_warps=8, num_stages=3)], linear_chunk.LAUNCH)
    x = torch.randn(1, 32, seq_len, 128, device=device, dtype=torch.bfloat16)
    dt = torch.rand(1, 32, seq_len, device=device) * 0.1 + 0.01
    A = -torch.rand(32, device=device) * 4 - 0.5
    B, C = (torch.randn(1, 1, seq_len, 128, device=device, dtype=torch.bfloat16) * 0.1 for _ in range(2))
    run = lambda: backends.ssd(x, dt, A, B, C)  # noqa: E731
    store = linear_chunk.LAUNCH_BY_CHUNK.setdefault(256, dict(linear_chunk.LAUNCH))
    _sweep("chunk 256 state", run, "state", [
        dict(BK=64, BV=64, ROWS=64, num_warps=4, num_stages=3), dict(BK=64, BV=64, ROWS=128, num_warps=4, num_stages=3),
        dict(BK=64, BV=64, ROWS=128, num_warps=8, num_stages=2)], store)
    _sweep("chunk 256 output", run, "output", [
        dict(BV=128, BLOCK=64, num_warps=4, num_stages=2), dict(BV=128, BLOCK=128, num_warps=8, num_stages=2),
        dict(BV=64, BLOCK=128, num_warps=8, num_stages=2)], store)


def time_linear_and_ssd(seq_len, device):
    q, k, v = linear_inputs(seq_len, device)
    decays = {
        "linear (no decay)": None,
        "linear, scalar decay per head (RetNet)": -torch.rand(32, device=device) * 0.1,
        "linear, data-dependent scalar decay (B,H,T)": -torch.rand(1, 32, seq_len, device=device) * 0.1,
        "linear, per-channel decay (GLA, B,H,T,K)": -torch.rand(1, 32, seq_len, 128, device=device) * 0.1,
    }
    for name, decay in decays.items():
        forward = bench(lambda: backends.linear_attention(q, k, v, decay=decay))
        RESULTS["timings"][name] = {"forward_ms": forward}
        log(f"{name}: forward {forward:.3f} ms")
    x = torch.randn(1, 32, seq_len, 128, device=device, dtype=torch.bfloat16)
    dt = torch.rand(1, 32, seq_len, device=device) * 0.1 + 0.01
    A = -torch.rand(32, device=device) * 4 - 0.5
    B, C = (torch.randn(1, 1, seq_len, 128, device=device, dtype=torch.bfloat16) * 0.1 for _ in range(2))
    for chunk_size in (256, 64):
        forward = bench(lambda: backends.ssd(x, dt, A, B, C, chunk_size=chunk_size))
        RESULTS["timings"][f"ssd (groups=1, P=N=128), chunk {chunk_size}"] = {"forward_ms": forward}
        log(f"ssd chunk {chunk_size}: forward {forward:.3f} ms")
    # Forward + backward, for the record (no goal is set on it).
    for name, decay in list(decays.items())[:2]:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(v)

        def step():
            out = backends.linear_attention(*leaves, decay=decay)
            torch.autograd.grad(out, leaves, grad)

        RESULTS["timings"][name]["forward_backward_ms"] = bench(step, warmup=5, rep=50)
        log(f"{name}: forward+backward {RESULTS['timings'][name]['forward_backward_ms']:.3f} ms")
    leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C)]

    def ssd_step():
        y = backends.ssd(*leaves)
        torch.autograd.grad(y, leaves, torch.ones_like(y))

    RESULTS["timings"]["ssd (groups=1, P=N=128), chunk 256"]["forward_backward_ms"] = bench(ssd_step, warmup=5,
                                                                                            rep=50)


def time_hyper(seq_len, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for scale in (1.0, 2.0):
        q, k, v = (torch.randn(1, 32, seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
        q, k = q * scale, k * scale
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            if scale == 1.0:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(3):
                    start.record()
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                RESULTS["hyper"]["sdpa_cudnn_causal_ms"] = sorted(times)[1]
                log(f"SDPA cuDNN causal: {sorted(times)[1]:.1f} ms")
        out = backends.hyper_attention(q, k, v, causal=True)
        error = relative_error(out, exact)
        RESULTS["hyper"][f"error_inputs_x{scale:g}"] = error
        if scale == 1.0:
            RESULTS["hyper"]["causal_ms"] = bench(lambda: backends.hyper_attention(q, k, v, causal=True),
                                                  warmup=50, rep=300)
            log(f"hyper causal: {RESULTS['hyper']['causal_ms']:.1f} ms")
        log(f"hyper error (q, k scaled by {scale:g}): {error:.3f}")
        del exact, out


# ------------------------------------------------------------------------------------------------------------------
# fla, in a subprocess (its autotuner compiles dozens of configs per kernel: trimmed here, and time-boxed)
# ------------------------------------------------------------------------------------------------------------------
FLA_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    from triton.runtime import autotuner
    original = autotuner.Autotuner.__init__
    def trimmed(self, fn, arg_names, configs, *args, **kwargs):
        keep = [c for c in configs if c.num_warps in (4, 8) and c.num_stages in (2, 3)] or configs[:2]
        keep.sort(key=lambda c: -(c.kwargs.get('BK', 0) + c.kwargs.get('BV', 0)))
        original(self, fn, arg_names, keep[:4], *args, **kwargs)
    autotuner.Autotuner.__init__ = trimmed
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla
    T = int(sys.argv[1])
    q, k, v = (torch.randn(1, T, 32, 128, device='cuda', dtype=torch.bfloat16) * 0.1 for _ in range(3))
    g = -torch.rand(1, T, 32, device='cuda') * 0.1
    gamma = -torch.rand(32, device='cuda') * 0.1
    runs = {
        'chunk_linear_attn(normalize=False)': lambda: chunk_linear_attn(q, k, v, normalize=False),
        'chunk_simple_gla(g_gamma)': lambda: chunk_simple_gla(q, k, v, g_gamma=gamma),
        'chunk_simple_gla(g)': lambda: chunk_simple_gla(q, k, v, g=g),
    }
    for name, run in runs.items():
        try:
            ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode='median')
            print('FLA ' + json.dumps({name: ms}), flush=True)
        except Exception as error:
            print('FLA ' + json.dumps({name: 'failed: ' + type(error).__name__ + ': ' + str(error)[:200]}), flush=True)
""")


def time_fla(seq_len, out_dir, timeout_s):
    try:
        completed = subprocess.run([sys.executable, "-c", FLA_SCRIPT, str(seq_len)], capture_output=True, text=True,
                                   timeout=timeout_s)
        output = completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        output += f"\n(timed out after {timeout_s} s)"
    with open(os.path.join(out_dir, "fla.log"), "w") as handle:
        handle.write(output)
    for line in output.splitlines():
        if line.startswith("FLA "):
            RESULTS["fla"].update(json.loads(line[4:]))
    log(f"fla: {RESULTS['fla'] or output[-400:]}")


# ------------------------------------------------------------------------------------------------------------------
def markdown_table(seq_len) -> str:
    timings = RESULTS["timings"]
    fla = RESULTS["fla"]
    lines = [f"| kernel (B=1, H=32, D=128, bf16, T={seq_len}) | forward ms | fwd+bwd ms | competitor (same run) |",
             "|---|---|---|---|"]
    competitor = {
        "linear (no decay)": fla.get("chunk_linear_attn(normalize=False)"),
        "linear, scalar decay per head (RetNet)": fla.get("chunk_simple_gla(g_gamma)"),
        "linear, data-dependent scalar decay (B,H,T)": fla.get("chunk_simple_gla(g)"),
        "ssd (groups=1, P=N=128), chunk 256": fla.get("chunk_simple_gla(g)"),
    }
    for name, row in timings.items():
        other = competitor.get(name)
        other = f"{other:.3f}" if isinstance(other, float) else "-"
        lines.append(f"| {name} | {row['forward_ms']:.3f} | {row.get('forward_backward_ms', float('nan')):.3f} | "
                     f"{other} |")
    hyper = RESULTS["hyper"]
    if "causal_ms" in hyper:
        lines.append(f"| hyper_attention causal (defaults) | {hyper['causal_ms']:.1f} | - | SDPA cuDNN causal "
                     f"{hyper.get('sdpa_cudnn_causal_ms', float('nan')):.1f} "
                     f"({hyper.get('sdpa_cudnn_causal_ms', float('nan')) / hyper['causal_ms']:.1f}x); rel. error "
                     f"{hyper.get('error_inputs_x1', float('nan')):.3f} (N(0,1) q,k), "
                     f"{hyper.get('error_inputs_x2', float('nan')):.3f} (q,k x2) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=131072)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--fla-timeout", type=int, default=40)
    args = parser.parse_args()
    device = "cuda"
    RESULTS["env"] = {"torch": torch.__version__, "triton": triton.__version__,
                      "gpu": torch.cuda.get_device_name(), "seq": args.seq}
    log(f"{RESULTS['env']}")
    torch.manual_seed(0)
    # In order of priority: a run stopped at its time limit keeps what came first (results.json after each).
    sections = [("linear correctness", lambda: check_linear(device)), ("ssd correctness", lambda: check_ssd(device))]
    if not args.no_sweep:
        sections.append(("sweep", lambda: sweep(args.seq, device)))
    sections += [("linear/ssd timings", lambda: time_linear_and_ssd(args.seq, device)),
                 ("hyper correctness", lambda: check_hyper(device)),
                 ("hyper timings", lambda: time_hyper(args.seq, device))]
    if not args.no_fla:
        sections.append(("fla", lambda: time_fla(args.seq, args.out, args.fla_timeout)))
    for name, section in sections:
        try:
            section()
        except Exception as error:  # keep going: one broken section must not cost the others' device time
            import traceback

            RESULTS.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            log(f"SECTION FAILED {name}: {type(error).__name__}: {str(error)[:300]}")
        torch.cuda.empty_cache()
        RESULTS["launch"] = {"default": linear_chunk.LAUNCH, "by_chunk": linear_chunk.LAUNCH_BY_CHUNK}
        with open(os.path.join(args.out, "results.json"), "w") as handle:
            json.dump(RESULTS, handle, indent=1, default=str)
    print("\nCorrectness (relative L2 error, bf16 vs float64 reference):")
    for name, row in RESULTS["correctness"].items():
        print(f"  {name}: " + ", ".join(f"{key} {value:.1e}" for key, value in row.items()))
    print(f"\nlaunch: {linear_chunk.LAUNCH}\nlaunch for chunk 256: {linear_chunk.LAUNCH_BY_CHUNK.get(256)}\n")
    print(markdown_table(args.seq))
    if "errors" in RESULTS:
        print("\nERRORS in: " + ", ".join(RESULTS["errors"]))


if __name__ == "__main__":
    main()
