"""How long planning takes on the CPU: `attention-planner plan llama-3-70b --max-len 128k --device h200` (the
goal: under 10 s on a 2-core CPU, with no weight memory), and optimize() on the demo model.

Runs the CLI in fresh processes (wall time, as a user sees it, imports included), and once in process with the time
of each step; prints a short table last and, with --append, appends it to benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/bench_planner.py [--runs 3] [--append]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["plan", "llama-3-70b", "--max-len", "128k", "--device", "h200", "--quiet"]


def cli_run() -> tuple[float, int, float]:
    """(wall seconds, peak RSS in bytes, CPU seconds) of one CLI run in a fresh process."""
    script = ("import resource, sys\nfrom planner.cli import main\ncode = main(sys.argv[1:])\n"
              "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
              "print('MAXRSS', usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr)\nsys.exit(code)\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, *COMMAND], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    fields = next(line.split() for line in result.stderr.splitlines() if line.startswith("MAXRSS"))
    return seconds, int(fields[1]) * 1024, float(fields[2])


def in_process_steps() -> dict[str, float]:
    """Seconds of each step of planning llama-3-70b, in this process."""
    steps = {}
    start = time.perf_counter()
    import planner  # noqa: F401
    from passes.capture import capture
    from passes.match import find_sites
    from planner.devices import device_spec
    from planner.plan import make_plan
    from planner.presets import EXAMPLE_LENGTH, PRESETS, _full_weights, build_model

    import torch

    steps["import planner"] = time.perf_counter() - start
    mark = time.perf_counter()
    chosen = PRESETS["llama-3-70b"]
    model = build_model(chosen, 1)
    weights = _full_weights(model, 1, chosen.layers)
    steps["import transformers + build on meta"] = time.perf_counter() - mark
    mark = time.perf_counter()
    captured = capture(model, (torch.zeros((1, EXAMPLE_LENGTH), dtype=torch.long, device="meta"),),
                       {"logits_to_keep": 1})
    steps["capture (torch.export, 1 layer)"] = time.perf_counter() - mark
    mark = time.perf_counter()
    sites = find_sites(captured.graph_module)
    steps[f"find sites ({len(sites)} found in the captured layer)"] = time.perf_counter() - mark
    mark = time.perf_counter()
    sites = [site for site in sites for _ in range(80)]
    make_plan(sites, device_spec("h200"), "exact", 131072, graph_module=captured.graph_module, weights_bytes=weights)
    steps[f"plan {len(sites)} sites + memory fit"] = time.perf_counter() - mark
    steps["total"] = time.perf_counter() - start
    # The planning step alone on llama-3-70b's attention shape, whatever the detector finds on meta captures.
    import sympy

    from planner.records import AttentionSite, MaskSpec

    length = sympy.Symbol("s0", positive=True, integer=True)
    synthetic = [AttentionSite(name=f"model.layers.{index}.self_attn", source="modeling_llama.py:1", form="sdpa",
                               node="sdpa", query="q", key="k", value="v", batch=1, heads=64, kv_heads=8,
                               q_len=length, kv_len=length, head_dim=128, value_dim=128, scale=None,
                               mask=MaskSpec("causal", proof="synthetic"), dtype="bfloat16", hints=(("s0", 67),))
                 for index in range(80)]
    mark = time.perf_counter()
    make_plan(synthetic, device_spec("h200"), "exact", 131072, weights_bytes=weights)
    steps["(separately) plan 80 synthetic causal 64/8kv sites"] = time.perf_counter() - mark
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    arguments = parser.parse_args()
    runs = [cli_run() for _ in range(arguments.runs)]
    times = [run[0] for run in runs]
    cpu = [run[2] for run in runs]
    steps = in_process_steps()
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    load = os.getloadavg()[0]
    lines = [
        "",
        "## Planner overhead on the CPU — planner/cli.py, planner/presets.py",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average "
        f"{load:.1f} at the end of the run; Python {platform.python_version()}; revision `{revision}`.",
        f"Command: `PYTHONPATH=. python benchmarks/bench_planner.py --runs {arguments.runs}`.",
        "",
        "| what | median | runs |",
        "|---|---|---|",
        f"| `attention-planner {' '.join(COMMAND)}` wall time (fresh process, imports included) | "
        f"{statistics.median(times):.1f} s | {', '.join(f'{t:.1f}' for t in times)} |",
        f"| its CPU time (user + system; the wall time on an idle machine is about this) | "
        f"{statistics.median(cpu):.1f} s | {', '.join(f'{t:.1f}' for t in cpu)} |",
        f"| its peak RSS (llama-3-70b's bf16 weights would be 131.4 GiB) | "
        f"{statistics.median(run[1] for run in runs) / 2**30:.2f} GiB | |",
    ]
    for step, seconds in steps.items():
        lines.append(f"| in process: {step} | {seconds:.2f} s | 1 |")
    text = "\n".join(lines)
    print(text)
    if arguments.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as results:
            results.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
