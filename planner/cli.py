"""The `attention-planner` command.

    attention-planner plan MODEL --max-len 128k --device h200 [--policy exact] [--html report.html] [--json] [--quiet]
    attention-planner presets
    attention-planner calibrate [--device cuda]
    attention-planner demo [...]

MODEL is a built-in preset (`attention-planner presets` lists them: real published configs, built on the meta device,
so no weights are allocated) or 'package.module:function' returning a model (or (model, example_inputs)).
Progress goes to stderr (silenced by --quiet); the report (or its JSON with --json) to stdout.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from passes.errors import PlannerError
from planner.calibration import calibrate
from planner import demo
from planner.pipeline import PlanOptions
from planner.presets import PRESETS, Progress, plan_callable, plan_preset

COMMANDS = ("plan", "presets", "calibrate", "demo")


def _plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-planner plan",
                                     description="Plan every attention site of a model for a sequence length and a "
                                                 "device, and print the report.")
    parser.add_argument("model", help="a preset (see `attention-planner presets`) or 'package.module:function'")
    parser.add_argument("--max-len", required=True, help="the longest sequence to plan for: 4096, 32k, 128k, 1M")
    parser.add_argument("--device", default="h200", help="target: h100, h200, a100-80gb, a100-40gb, l4, rtx4090, "
                                                         "cpu, or cuda (the real GPU) (default h200)")
    parser.add_argument("--policy", default="exact", choices=("exact", "approximate", "any"))
    parser.add_argument("--world-size", type=int, default=1, help="devices to shard the sequence over (ring)")
    parser.add_argument("--train", action="store_true", help="plan for training (admits retrain variants under "
                                                             "--policy any; counts saved activations)")
    parser.add_argument("--window", default=None, help="a sliding window to offer where sites have none "
                                                       "(approximate unless it covers --max-len)")
    parser.add_argument("--sinks", type=int, default=0, help="sink tokens kept visible with --window")
    parser.add_argument("--batch", type=int, default=1, help="batch size (presets; default 1)")
    parser.add_argument("--html", default=None, help="also write the report as a self-contained HTML page")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def plan_command(argv: Sequence[str]) -> int:
    arguments = _plan_parser().parse_args(argv)
    progress = Progress(quiet=arguments.quiet)
    # The CLI only plans: approximate choices are shown as estimates, with nothing to measure them on.
    options = PlanOptions.create(arguments.max_len, arguments.device, arguments.policy, rewrites=False,
                                 names={"max_len": "--max-len", "window": "--window"}, train=arguments.train,
                                 window=arguments.window, sinks=arguments.sinks, world_size=arguments.world_size)
    if arguments.model.strip().lower() in PRESETS:
        report = plan_preset(arguments.model, options, batch=arguments.batch, progress=progress)
    else:
        report = plan_callable(arguments.model, options, progress=progress)
    if arguments.html:
        progress(f"writing {arguments.html}")
        report.save_html(arguments.html)
    print(report.to_json() if arguments.json else report.summary())
    progress("done")
    return 0


def presets_command(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(prog="attention-planner presets", description="List the model presets.").parse_args(argv)
    for name, chosen in sorted(PRESETS.items()):
        config = chosen.config
        print(f"{name:14} {chosen.repository:30} layers={config['num_hidden_layers']} "
              f"hidden={config['hidden_size']} heads={config['num_attention_heads']}/{config['num_key_value_heads']}kv"
              + (f" window={config['sliding_window']}" if config.get("sliding_window")
                 and config.get("use_sliding_window", True) else ""))
    return 0


def calibrate_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="attention-planner calibrate",
                                     description="Measure the device's ceilings and each kernel's efficiency; save "
                                                 "them for the planner.")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    arguments = parser.parse_args(argv)
    spec = calibrate(arguments.device, verbose=True)
    print(f"{spec.name}: {spec.source}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `attention-planner` (pyproject: attention-planner = "planner.cli:main")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "plan":
            return plan_command(rest)
        if command == "presets":
            return presets_command(rest)
        if command == "calibrate":
            return calibrate_command(rest)
        if command == "demo":
            return demo.main(rest)
    except PlannerError as error:
        print(f"attention-planner {command}: error: {error}", file=sys.stderr)
        return 1
    print(f"attention-planner: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
