"""The plot of benchmarks/bench_e2e.py: seconds per forward and peak memory against the sequence length, log-log, one
line per configuration, one row of panels per model. Lengths where a configuration ran out of memory (or was skipped
as estimated out of memory) are marked with an x on the panel's top edge.

    python benchmarks/plot_e2e.py e2e.jsonl -o benchmarks/e2e.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Union

GIB = 1024 ** 3
ORDER = ("eager", "sdpa", "inductor", "planner", "planner-compile")
STYLE = {"eager": ("tab:gray", "s"), "sdpa": ("tab:blue", "o"), "inductor": ("tab:orange", "^"),
         "planner": ("tab:green", "D"), "planner-compile": ("tab:olive", "v")}


def load(path: Union[str, Path]) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _out_of_memory(record: dict) -> bool:
    return record.get("status") == "oom" or str(record.get("reason", "")).startswith("estimated OOM")


def plot(records: list[dict], path: Union[str, Path]) -> Path:
    """Write the figure of the forward records to `path` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forward = [record for record in records if record.get("section") == "forward"]
    models = list(dict.fromkeys(record["model"] for record in forward))
    figure, axes = plt.subplots(max(len(models), 1), 2, figsize=(12, 4.2 * max(len(models), 1)), squeeze=False)
    for row, model in enumerate(models):
        time_axis, memory_axis = axes[row]
        mine = [record for record in forward if record["model"] == model]
        configs = sorted({record["config"] for record in mine}, key=lambda c: ORDER.index(c) if c in ORDER else 99)
        for config in configs:
            color, marker = STYLE.get(config, ("black", "."))
            ok = sorted((r["length"], r["seconds"], r.get("peak_bytes")) for r in mine
                        if r["config"] == config and r.get("status") == "ok")
            failed = [r["length"] for r in mine if r["config"] == config and _out_of_memory(r)]
            label = config + (f" (OOM from {min(failed) // 1024}k)" if failed else "")
            if ok:
                time_axis.plot([o[0] for o in ok], [o[1] for o in ok], marker=marker, color=color, label=label)
                memory_axis.plot([o[0] for o in ok if o[2]], [o[2] / GIB for o in ok if o[2]], marker=marker,
                                 color=color, label=label)
            for axis in (time_axis, memory_axis):
                for length in failed:
                    axis.plot([length], [1.0], marker="x", color=color, markersize=10, clip_on=False,
                              transform=axis.get_xaxis_transform())
        lengths = sorted({record["length"] for record in mine})
        for axis, ylabel in ((time_axis, "seconds per forward"), (memory_axis, "peak memory (GiB)")):
            axis.set_xscale("log", base=2)
            axis.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
            axis.set_yscale("log")
            axis.set_xlabel("sequence length (tokens)")
            axis.set_ylabel(ylabel)
            axis.set_title(f"{model}: {ylabel.split(' (')[0]}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot bench_e2e.py's JSON lines.")
    parser.add_argument("jsonl", help="e2e.jsonl written by benchmarks/bench_e2e.py")
    parser.add_argument("-o", "--output", default="e2e.png")
    arguments = parser.parse_args()
    print(plot(load(arguments.jsonl), arguments.output))


if __name__ == "__main__":
    main()
