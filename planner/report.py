"""The rewrite report: what was found, what the planner decided and why. It reads the Plan; it never recomputes a
decision (the plots evaluate the plan's own expressions at more lengths).

`summary()` is for people, `to_json()` for programs, `save_html(path)` for both (one self-contained page with the
per-site table and log-log plots of every candidate's estimated time and memory against the sequence length).

JSON schema (version 1), stable: keys are only added, never renamed or removed, within a version. Keys marked (+)
were added after the first release of version 1 and may be absent from older files.
{
  "schema_version": 1,
  "model": str,                      # class name of the model (or the preset's name)
  "device": {"name", "memory_bytes", "memory_bandwidth", "matrix_flops": {dtype: FLOP/s}, "source",
             (+) "key", (+) "family", (+) "usable_bytes", (+) "interconnect_bandwidth", (+) "launch_overhead_s",
             (+) "efficiency": {work: fraction of peak}},
  "policy": "exact" | "approximate" | "any",
  "max_len": int, "world_size": int,
  (+) "train": bool, (+) "window": int | null, (+) "sinks": int,
  "notes": [str],                    # plan-wide remarks (e.g. no attention found, layers represented)
  "fidelity": null | {...},          # planner.fidelity.FidelityReport.to_dict(): tolerance, per-candidate trials
                                     # (site and end-to-end errors, passed), the final plan's end-to-end check
  (+) "memory": {"usable_bytes", "weights_bytes", "activations_bytes", "masks_bytes", "attention_bytes",
                 "total_bytes", "fits": bool, "ring_devices": int | null, "verdict": str, "method": str} | null,
  (+) "groups": [{"label": str, "sites": [site name]}],   # sites with identical decisions, as summary() groups them
  "sites": [{
     "name", "source", "form", "dtype",
     "shape": {"batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "value_dim"},   # ints or symbol strings
     "scale": float | null,
     "mask": {"kind", "window", "chunk", "key_padding", "bias", "tensor", "proof", "description"},
     "choice": {"variant", "implementation", "exactness"} | null,     # null: left as it is
     "rewritten": bool, "reason": str,
     "candidates": [{"variant", "implementation", "exactness", "feasible", "time_s", "memory_bytes", "reason",
                     "time_expr", "memory_expr",                       # expressions as strings in L
                     (+) "parameters": {name: value}, (+) "flops", (+) "bytes_moved", (+) "comm_bytes",
                     (+) "bound": "compute" | "memory" | "interconnect" | "launches" | null,
                     (+) "work",                                        # its efficiency key: "flash", "flash@d64"
                     (+) "saved_bytes", (+) "fits_up_to": int | null}],
     "crossovers": [{"faster", "slower", "sequence_length"}],         # where the cheapest candidate changes
     (+) "envelope": [{"from_length": int, "variant": str}],          # the cheapest candidate from each length on
     "notes": [str]
  }]
}
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from passes.errors import PlannerError
from passes.records import AttentionSite, Candidate, Plan, SiteDecision
from planner.lengths import format_length
from planner.plan import _site_signature, format_bytes, format_seconds, label, memory_at, time_at

SCHEMA_VERSION = 1
PLOT_EXTRA = "pip install matplotlib (or, from a clone, pip install -e '.[plot]')"


def _size(value: Any) -> Any:
    return value if isinstance(value, int) else str(value)


def _readable_size(value: Any, site: AttentionSite) -> str:
    """A size for people: the input's sequence length reads 'seq', any other symbolic size 'any'."""
    if isinstance(value, int):
        return str(value)
    sequence = {str(symbol) for symbol in site.sequence_symbols}
    text = str(value)
    for symbol in sorted(getattr(value, "free_symbols", ()), key=lambda item: -len(str(item))):
        text = re.sub(rf"\b{re.escape(str(symbol))}\b", "seq" if str(symbol) in sequence else "any", text)
    return text.replace("((", "(").replace("))", ")")


def _shape_text(site: AttentionSite) -> str:
    """'B=any H=32/8kv L=S=seq D=128': sizes as the site sees them ('seq': the input's length)."""
    heads = f"{site.heads}" if site.heads == site.kv_heads else f"{site.heads}/{site.kv_heads}kv"
    if site.q_len == site.kv_len:
        lengths = f"L=S={_readable_size(site.q_len, site)}"
    else:
        lengths = f"L={_readable_size(site.q_len, site)} S={_readable_size(site.kv_len, site)}"
    dims = f"D={site.head_dim}" if site.value_dim in (None, site.head_dim) else f"D={site.head_dim} Dv={site.value_dim}"
    return f"B={_readable_size(site.batch, site)} H={heads} {lengths} {dims}"


def _format_bytes(count: Optional[float]) -> str:
    return "-" if count is None else format_bytes(count)


def _format_seconds(seconds: Optional[float]) -> str:
    return "-" if seconds is None else format_seconds(seconds)


def _label(candidate: Candidate) -> str:
    return label(candidate)


def compress_names(names: list[str]) -> str:
    """['layers.0.attn', 'layers.1.attn', 'layers.2.attn'] -> 'layers.{0..2}.attn'; other lists: the first name and
    how many more."""
    if len(names) == 1:
        return names[0]
    pieces = [re.split(r"(\d+)", name) for name in names]
    if len({len(piece) for piece in pieces}) == 1:
        varying = [index for index in range(len(pieces[0])) if len({piece[index] for piece in pieces}) > 1]
        if len(varying) == 1 and varying[0] % 2 == 1:
            position = varying[0]
            numbers = [int(piece[position]) for piece in pieces]
            steps = {b - a for a, b in zip(numbers, numbers[1:])}
            if steps == {1}:
                middle = f"{{{numbers[0]}..{numbers[-1]}}}"
            elif len(steps) == 1 and len(numbers) > 3:
                middle = f"{{{numbers[0]},{numbers[1]}..{numbers[-1]}}}"
            else:
                middle = "{" + ",".join(str(number) for number in numbers) + "}"
            template = pieces[0]
            return "".join(template[:position]) + middle + "".join(template[position + 1:])
    return f"{names[0]} (+{len(names) - 1} more)"


@dataclass
class Report:
    """What optimize() did to a model. `summary()` for people, `to_json()` for programs, `save_html()` for both."""

    plan: Plan
    model: str = "model"
    notes: list[str] = field(default_factory=list)
    fidelity: Any = None  # planner.fidelity.FidelityReport when approximate choices were measured

    @property
    def decisions(self) -> tuple[SiteDecision, ...]:
        return self.plan.decisions

    @property
    def sites(self) -> list[AttentionSite]:
        return [decision.site for decision in self.plan.decisions]

    @property
    def rewritten(self) -> list[str]:
        return [decision.site.name for decision in self.plan.decisions if decision.rewritten]

    @property
    def memory(self):
        """The plan's whole-model memory fit (planner.plan.MemoryFit), or None."""
        return getattr(self.plan, "memory", None)

    def all_notes(self) -> list[str]:
        return list(self.plan.notes) + list(self.notes)

    def groups(self) -> list[tuple[str, list[SiteDecision]]]:
        """Decisions grouped by identical site signature and choice, in order of first appearance: (label, list)."""
        grouped: "OrderedDict[tuple, list[SiteDecision]]" = OrderedDict()
        for decision in self.plan.decisions:
            choice = decision.choice
            key = (_site_signature(decision.site), decision.site.source,
                   None if choice is None else (choice.variant, choice.implementation, choice.parameters))
            grouped.setdefault(key, []).append(decision)
        return [(compress_names([decision.site.name for decision in members]), members)
                for members in grouped.values()]

    # -----------------------------------------------------------------------------------------------------------
    # Text

    def summary(self) -> str:
        """A readable table, one row per group of identical sites (module, source line, shape, mask, choice, the
        estimate at max_len, why), then per group the candidates and crossovers, the memory fit and the notes."""
        plan = self.plan
        lines = [self._header(), f"device figures: {plan.device.source}"]
        groups = self.groups()
        if groups:
            lines.append("")
            lines.extend(_table(self._rows(groups)))
            for name, members in groups:
                lines.append("")
                lines.extend(self._group_details(name, members))
        memory = self.memory
        if memory is not None:
            lines.append("")
            lines.append(f"memory: {memory.verdict}")
        if self.fidelity is not None:
            lines.append("")
            lines.append(self.fidelity.summary())
        for note in self.all_notes():
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _header(self) -> str:
        plan = self.plan
        extras = []
        if plan.world_size > 1:
            extras.append(f"world_size={plan.world_size}")
        if getattr(plan, "window", None):
            extras.append(f"window={plan.window}")
        if getattr(plan, "train", False):
            extras.append("train=True")
        extra = (", " + ", ".join(extras)) if extras else ""
        return (f"attention-planner: {self.model} on {plan.device.name}, max_len={format_length(plan.max_len)}, "
                f"policy={plan.policy}{extra}: {len(self.rewritten)} of {len(plan.decisions)} attention sites "
                "rewritten")

    def _rows(self, groups) -> list[tuple[str, ...]]:
        at = format_length(self.plan.max_len)
        rows = [("sites", "n", "source", "shape", "mask", "choice", f"time@{at}", "memory", "why")]
        for name, members in groups:
            decision = members[0]
            site, choice = decision.site, decision.choice
            if choice is None:
                text, seconds, memory = "left as is", None, None
            elif choice.variant == "dense":
                text, seconds, memory = f"kept ({choice.implementation})", choice.time_s, choice.memory_bytes
            else:
                text, seconds, memory = _label(choice), choice.time_s, choice.memory_bytes
            rows.append((name, str(len(members)), _short_source(site.source), _shape_text(site), site.mask.describe(),
                         text, _format_seconds(seconds), _format_bytes(memory), decision.reason))
        return rows

    def _group_details(self, name: str, members: list[SiteDecision]) -> list[str]:
        decision = members[0]
        site = decision.site
        count = f" ({len(members)} sites)" if len(members) > 1 else ""
        lines = [f"{name}{count}: mask {site.mask.describe()}: {site.mask.proof}"]
        lines.append(f"  candidates at {self.plan.max_len:,} tokens:")
        for candidate in decision.candidates:
            mark = "*" if candidate is decision.choice else " "
            if candidate.time_s is None:
                lines.append(f"   {mark} {_label(candidate)}: {candidate.reason}")
                continue
            bound = getattr(candidate, "bound", None)
            bound_text = f", {bound}-bound" if bound else ""
            status = "" if candidate.feasible else f" - {candidate.reason}"
            lines.append(f"   {mark} {_label(candidate)}: {_format_seconds(candidate.time_s)}, "
                         f"{_format_bytes(candidate.memory_bytes)} extra{bound_text}{status}")
        envelope = getattr(decision, "envelope", ())
        if len(envelope) > 1 or decision.crossovers:
            names = {candidate.variant: _label(candidate) for candidate in decision.candidates}
            steps = [f"{names.get(crossover.faster, crossover.faster)} beats "
                     f"{names.get(crossover.slower, crossover.slower)} from {crossover.sequence_length:,} tokens"
                     for crossover in decision.crossovers]
            lines.append("  crossovers: " + "; ".join(steps))
        elif envelope:
            lines.append(f"  cheapest at every length up to {8 * self.plan.max_len:,} tokens: {envelope[0][1]}")
        for note in site.notes:
            lines.append(f"  note: {note}")
        return lines

    # -----------------------------------------------------------------------------------------------------------
    # JSON

    def to_dict(self) -> dict:
        plan = self.plan
        device = plan.device
        memory = self.memory
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "device": {
                "name": device.name,
                "memory_bytes": device.memory_bytes,
                "memory_bandwidth": device.memory_bandwidth,
                "matrix_flops": dict(device.matrix_flops),
                "source": device.source,
                "key": getattr(device, "key", ""),
                "family": getattr(device, "family", ""),
                "usable_bytes": getattr(device, "usable_bytes", device.memory_bytes),
                "interconnect_bandwidth": getattr(device, "interconnect_bandwidth", None),
                "launch_overhead_s": getattr(device, "launch_overhead_s", None),
                "efficiency": dict(getattr(device, "efficiency", {})),
            },
            "policy": plan.policy,
            "max_len": plan.max_len,
            "world_size": plan.world_size,
            "train": bool(getattr(plan, "train", False)),
            "window": getattr(plan, "window", None),
            "sinks": int(getattr(plan, "sinks", 0)),
            "notes": self.all_notes(),
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "memory": None if memory is None else {
                "usable_bytes": memory.usable_bytes, "weights_bytes": memory.weights,
                "activations_bytes": memory.activations, "masks_bytes": memory.masks,
                "attention_bytes": memory.attention, "total_bytes": memory.total, "fits": memory.fits,
                "ring_devices": memory.ring_devices, "verdict": memory.verdict, "method": memory.method,
            },
            "groups": [{"label": name, "sites": [decision.site.name for decision in members]}
                       for name, members in self.groups()],
            "sites": [_decision_dict(decision) for decision in plan.decisions],
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        """Stable JSON (schema in this module's docstring)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    # -----------------------------------------------------------------------------------------------------------
    # HTML

    def to_html(self, plot_format: str = "svg") -> str:
        """The report as one self-contained HTML page (plots inline as SVG, or as base64 PNG with plot_format="png";
        the JSON report embedded in a <script type="application/json" id="report-json">)."""
        plan = self.plan
        parts = [
            "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
            f"<title>attention-planner: {html.escape(self.model)}</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px;"
            "vertical-align:top;text-align:left}th{background:#f3f3f3}.fit{color:#176c2f}.nofit{color:#a11}"
            "figure{margin:1em 0}code{font-size:12px}</style></head><body>",
            f"<h1>{html.escape(self._header())}</h1>",
            f"<p>Device figures: {html.escape(plan.device.source)}</p>",
        ]
        memory = self.memory
        if memory is not None:
            css = "fit" if memory.fits else "nofit"
            parts.append(f"<p class=\"{css}\"><b>Memory:</b> {html.escape(memory.verdict)}</p>")
        groups = self.groups()
        if groups:
            rows = self._rows(groups)
            header = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
            parts.append(f"<table id=\"sites\"><thead><tr>{header}</tr></thead><tbody>")
            for row in rows[1:]:
                parts.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
            parts.append("</tbody></table>")
        for index, (name, members) in enumerate(groups):
            parts.append(f"<h2>{html.escape(name)}</h2>")
            parts.append("<pre>" + html.escape("\n".join(self._group_details(name, members))) + "</pre>")
            figure = _plot(members[0], plan, plot_format)
            parts.append(f"<figure id=\"plot-{index}\">{figure}<figcaption>Estimated time and extra memory of each "
                         f"candidate against the sequence length on {html.escape(plan.device.name)}; dashed: "
                         "max_len; the device's usable memory as a line.</figcaption></figure>")
        for note in self.all_notes():
            parts.append(f"<p>Note: {html.escape(note)}</p>")
        payload = self.to_json(indent=None).replace("</", "<\\/")
        parts.append(f"<script type=\"application/json\" id=\"report-json\">{payload}</script>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def save_html(self, path: Union[str, Path], plot_format: str = "svg") -> Path:
        """Write the page of `to_html()` to `path`; needs matplotlib (see PLOT_EXTRA)."""
        path = Path(path)
        path.write_text(self.to_html(plot_format), encoding="utf-8")
        return path

    def __str__(self) -> str:
        return self.summary()


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]


def _short_source(source: str) -> str:
    path, _, line = source.rpartition(":")
    return f"{path.rsplit('/', 1)[-1]}:{line}" if path else source


def _plot(decision: SiteDecision, plan: Plan, plot_format: str) -> str:
    """Log-log plot of every costed candidate's time and memory over sequence length, as inline SVG or PNG."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as error:
        raise PlannerError(f"save_html needs matplotlib for its plots: {PLOT_EXTRA}") from error
    max_len = plan.max_len
    high = 8 * max_len
    lengths = sorted({int(round(2 ** (step / 4))) for step in range(4 * 7, int(4 * math.log2(high)) + 1)})
    figure = Figure(figsize=(12, 4.2))
    time_axes, memory_axes = figure.subplots(1, 2)
    for candidate in decision.candidates:
        if candidate.time_expr is None:
            continue
        style = "-" if candidate.exactness == "exact" else "--"
        width = 2.5 if candidate is decision.choice else 1.2
        name = _label(candidate) + ("" if candidate.exactness == "exact" else f" [{candidate.exactness}]")
        time_axes.plot(lengths, time_at(candidate, lengths), style, linewidth=width, label=name)
        memory_values = [max(value, 1.0) for value in memory_at(candidate, lengths)]
        memory_axes.plot(lengths, memory_values, style, linewidth=width, label=name)
    usable = getattr(plan.device, "usable_bytes", plan.device.memory_bytes)
    memory_axes.axhline(usable, color="black", linewidth=1, label=f"{plan.device.name} usable memory")
    for axes in (time_axes, memory_axes):
        axes.axvline(max_len, color="gray", linestyle=":", linewidth=1.5, label=f"max_len = {max_len:,}")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        # Plain-text labels (lengths as 4k, 128k; times and bytes with units) and unlabeled minor ticks: the default
        # mathtext labels cost seconds of text layout.
        axes.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_length(int(round(value)))
                                                     if value >= 1 else ""))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("sequence length (tokens)")
        axes.grid(True, which="major", alpha=0.3)
    time_axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _format_seconds(value)))
    memory_axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _format_bytes(value)))
    time_axes.set_ylabel("estimated time per call")
    memory_axes.set_ylabel("extra memory per call")
    time_axes.set_title("time")
    memory_axes.set_title("memory")
    memory_axes.legend(fontsize=7, loc="lower right")
    figure.subplots_adjust(left=0.095, right=0.985, bottom=0.13, top=0.92, wspace=0.3)  # tight_layout: seconds
    buffer = io.BytesIO()
    if plot_format == "png":
        figure.savefig(buffer, format="png", dpi=110)
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"<img alt=\"time and memory against sequence length\" src=\"data:image/png;base64,{encoded}\">"
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue().decode("utf-8")
    return svg[svg.index("<svg"):]


def _decision_dict(decision: SiteDecision) -> dict:
    site, choice = decision.site, decision.choice
    mask = site.mask
    return {
        "name": site.name,
        "source": site.source,
        "form": site.form,
        "dtype": site.dtype,
        "shape": {
            "batch": _size(site.batch), "heads": site.heads, "kv_heads": site.kv_heads, "q_len": _size(site.q_len),
            "kv_len": _size(site.kv_len), "head_dim": site.head_dim, "value_dim": site.value_dim,
        },
        "scale": site.scale,
        "mask": {
            "kind": mask.kind, "window": mask.window, "chunk": mask.chunk, "key_padding": mask.key_padding,
            "bias": mask.bias, "tensor": mask.tensor, "proof": mask.proof, "description": mask.describe(),
        },
        "choice": None if choice is None else {
            "variant": choice.variant, "implementation": choice.implementation, "exactness": choice.exactness,
        },
        "rewritten": decision.rewritten,
        "reason": decision.reason,
        "candidates": [_candidate_dict(candidate) for candidate in decision.candidates],
        "crossovers": [
            {"faster": crossover.faster, "slower": crossover.slower, "sequence_length": crossover.sequence_length}
            for crossover in decision.crossovers
        ],
        "envelope": [{"from_length": length, "variant": variant}
                     for length, variant in getattr(decision, "envelope", ())],
        "notes": list(site.notes) + ([f"unsupported: {site.unsupported}"] if site.unsupported else []),
    }


def _candidate_dict(candidate: Candidate) -> dict:
    return {
        "variant": candidate.variant, "implementation": candidate.implementation,
        "exactness": candidate.exactness, "feasible": candidate.feasible, "time_s": candidate.time_s,
        "memory_bytes": candidate.memory_bytes, "reason": candidate.reason,
        "time_expr": None if candidate.time_expr is None else str(candidate.time_expr),
        "memory_expr": None if candidate.memory_expr is None else str(candidate.memory_expr),
        "parameters": {name: value for name, value in candidate.parameters},
        "flops": getattr(candidate, "flops", None),
        "bytes_moved": getattr(candidate, "bytes_moved", None),
        "comm_bytes": getattr(candidate, "comm_bytes", None),
        "bound": getattr(candidate, "bound", None),
        "work": getattr(candidate, "work", None),
        "saved_bytes": getattr(candidate, "saved_bytes", None),
        "fits_up_to": getattr(candidate, "fits_up_to", None),
    }
