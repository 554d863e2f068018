"""The rewrite report: what was found, what the planner decided and why. It reads the Plan; it never recomputes it.

JSON schema (version 1), stable: keys are only added, never renamed or removed, within a version:
{
  "schema_version": 1,
  "model": str,                      # class name of the model
  "device": {"name", "memory_bytes", "memory_bandwidth", "matrix_flops": {dtype: FLOP/s}, "source"},
  "policy": "exact" | "approximate" | "any",
  "max_len": int, "world_size": int,
  "notes": [str],                    # plan-wide remarks (e.g. no attention found)
  "sites": [{
     "name", "source", "form", "dtype",
     "shape": {"batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "value_dim"},   # ints or symbol strings
     "scale": float | null,
     "mask": {"kind", "window", "chunk", "key_padding", "bias", "tensor", "proof", "description"},
     "choice": {"variant", "implementation", "exactness"} | null,     # null: left as it is
     "rewritten": bool, "reason": str,
     "candidates": [{"variant", "implementation", "exactness", "feasible", "time_s", "memory_bytes", "reason",
                     "time_expr", "memory_expr"}],                     # expressions as strings in L
     "crossovers": [{"faster", "slower", "sequence_length"}],
     "notes": [str]
  }]
}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from planner.lengths import format_length
from planner.records import AttentionSite, Plan, SiteDecision

SCHEMA_VERSION = 1


def _size(value: Any) -> Any:
    return value if isinstance(value, int) else str(value)


def _shape_text(site: AttentionSite) -> str:
    heads = f"{site.heads}" if site.heads == site.kv_heads else f"{site.heads}/{site.kv_heads}kv"
    return f"B={_size(site.batch)} H={heads} L={_size(site.q_len)} S={_size(site.kv_len)} D={site.head_dim}"


@dataclass
class Report:
    """What optimize() did to a model. `summary()` for people, `to_json()` for programs, `save_html()` for both."""

    plan: Plan
    model: str = "model"
    notes: list[str] = field(default_factory=list)

    @property
    def decisions(self) -> tuple[SiteDecision, ...]:
        return self.plan.decisions

    @property
    def sites(self) -> list[AttentionSite]:
        return [decision.site for decision in self.plan.decisions]

    @property
    def rewritten(self) -> list[str]:
        return [decision.site.name for decision in self.plan.decisions if decision.rewritten]

    def all_notes(self) -> list[str]:
        return list(self.plan.notes) + list(self.notes)

    def summary(self) -> str:
        """A readable table, one row per site (module, source line, shapes, mask, choice, why)."""
        plan = self.plan
        header = (f"attention-planner: {self.model} on {plan.device.name}, max_len={format_length(plan.max_len)}, "
                  f"policy={plan.policy}: {len(self.rewritten)} of {len(plan.decisions)} attention sites rewritten")
        rows = [("module", "source", "shape", "mask", "choice", "why")]
        for decision in plan.decisions:
            site = decision.site
            choice = "kept" if not decision.rewritten else f"{decision.choice.variant}/{decision.choice.implementation}"
            rows.append((site.name, _short_source(site.source), _shape_text(site), site.mask.describe(), choice,
                         decision.reason))
        lines = [header]
        if len(rows) > 1:
            widths = [max(len(row[column]) for row in rows) for column in range(5)]
            for row in rows:
                lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths)) + "  " + row[5])
            for decision in plan.decisions:
                lines.append(f"  {decision.site.name}: mask {decision.site.mask.describe()}: {decision.site.mask.proof}")
                for crossover in decision.crossovers:
                    lines.append(f"    {crossover.faster} beats {crossover.slower} from "
                                 f"{crossover.sequence_length:,} tokens")
        for note in self.all_notes():
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        plan = self.plan
        device = plan.device
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "device": {
                "name": device.name,
                "memory_bytes": device.memory_bytes,
                "memory_bandwidth": device.memory_bandwidth,
                "matrix_flops": dict(device.matrix_flops),
                "source": device.source,
            },
            "policy": plan.policy,
            "max_len": plan.max_len,
            "world_size": plan.world_size,
            "notes": self.all_notes(),
            "sites": [_decision_dict(decision) for decision in plan.decisions],
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        """Stable JSON (schema in this module's docstring)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def __str__(self) -> str:
        return self.summary()


def _short_source(source: str) -> str:
    path, _, line = source.rpartition(":")
    return f"{path.rsplit('/', 1)[-1]}:{line}" if path else source


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
        "candidates": [
            {
                "variant": candidate.variant, "implementation": candidate.implementation,
                "exactness": candidate.exactness, "feasible": candidate.feasible, "time_s": candidate.time_s,
                "memory_bytes": candidate.memory_bytes, "reason": candidate.reason,
                "time_expr": None if candidate.time_expr is None else str(candidate.time_expr),
                "memory_expr": None if candidate.memory_expr is None else str(candidate.memory_expr),
            }
            for candidate in decision.candidates
        ],
        "crossovers": [
            {"faster": crossover.faster, "slower": crossover.slower, "sequence_length": crossover.sequence_length}
            for crossover in decision.crossovers
        ],
        "notes": list(site.notes) + ([f"unsupported: {site.unsupported}"] if site.unsupported else []),
    }
