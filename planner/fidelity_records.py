"""What the fidelity check measures and decides, as records (per-site error, end-to-end agreement, trials, the
greedy steps, the report) with their text, and the verdict arithmetic against a tolerance. planner/fidelity.py
measures; this module only holds and judges the numbers."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from backends.registry import VARIANTS
from passes.records import Candidate

# name -> (direction, meaning). "max": the measured value must not exceed the limit; "min": must not fall below.
TOLERANCE_KEYS: dict[str, tuple[str, str]] = {
    "kl_mean": ("max", "mean KL(original || candidate) of the output distributions, nats per position"),
    "kl_p99": ("max", "99th percentile of the per-position KL(original || candidate), nats"),
    "top1": ("min", "fraction of positions whose most likely output is unchanged"),
    "cosine_mean": ("min", "mean cosine similarity of the output vectors (encoders: embeddings)"),
    "cosine_min": ("min", "smallest cosine similarity of an output vector"),
    "site_rel_error": ("max", "relative Frobenius error of a site's attention output, the site switched alone"),
    "site_cosine": ("min", "mean cosine similarity of a site's attention output vectors, the site switched alone"),
}
DISTRIBUTION_KEYS = ("kl_mean", "kl_p99", "top1")
EMBEDDING_KEYS = ("cosine_mean", "cosine_min")
SITE_KEYS = ("site_rel_error", "site_cosine")


# ---------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class SiteError:
    """How far one site's attention output moves when that site alone is switched (its inputs stay the original's).

    mass_kept_mean / mass_kept_min: the softmax mass inside the window and sinks (windows only); bound_max: the
    largest bound 2 (1 - m_w) max||v|| over queries; bound_holds: whether every query's error is within its bound."""

    max_abs_error: float
    rel_frobenius_error: float
    cosine: float
    finite: bool
    mass_kept_mean: Optional[float] = None
    mass_kept_min: Optional[float] = None
    error_norm_max: Optional[float] = None
    bound_max: Optional[float] = None
    bound_holds: Optional[bool] = None


@dataclass(frozen=True)
class EndToEnd:
    """The model's output against the original's over all sample positions (None: not requested)."""

    positions: int
    finite: bool
    kl_mean: Optional[float] = None
    kl_p99: Optional[float] = None
    kl_max: Optional[float] = None
    top1: Optional[float] = None
    cosine_mean: Optional[float] = None
    cosine_min: Optional[float] = None

    def value(self, name: str) -> Optional[float]:
        return getattr(self, name, None)


@dataclass(frozen=True)
class Trial:
    """One candidate measured at one site, switched alone: the site error, the end-to-end effect, the verdict."""

    site: str
    candidate: Candidate
    site_error: Optional[SiteError]
    end_to_end: Optional[EndToEnd]
    passed: bool
    reason: str

    @property
    def label(self) -> str:
        return candidate_label(self.candidate)


@dataclass(frozen=True)
class Step:
    """One greedy step: `site` added to the sites accepted so far, the combination verified end to end."""

    site: str
    candidate: Candidate
    accepted_before: tuple[str, ...]
    end_to_end: EndToEnd
    passed: bool
    reason: str


@dataclass
class FidelityReport:
    """What measure_plan measured and decided (numbers in `trials`, `steps`, `final`)."""

    tolerance: dict
    batches: int
    positions: int
    calibration_lengths: dict  # site name -> longest key length seen in the sample batches
    plan_max_len: Optional[int] = None
    trials: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    final: Optional[EndToEnd] = None
    accepted: dict = field(default_factory=dict)  # site -> candidate label
    refused: dict = field(default_factory=dict)  # site -> reason
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        """A table for people: each trial, each greedy step, the final verification."""
        lines = [f"fidelity: tolerance {format_tolerance(self.tolerance)}; {self.batches} sample batch(es), "
                 f"{self.positions} output positions"]
        if self.trials:
            lines.append("  each candidate alone:")
            for trial in self.trials:
                lines.append(f"    {trial.site}: {trial.label}: {'pass' if trial.passed else 'FAIL'}: {trial.reason}")
        if self.steps:
            lines.append("  greedy, least sensitive first (each combination verified end to end):")
            for step in self.steps:
                before = f" + {len(step.accepted_before)} accepted" if step.accepted_before else ""
                lines.append(f"    {step.site}{before}: {'accepted' if step.passed else 'REFUSED'}: {step.reason}")
        if self.final is not None:
            lines.append(f"  final plan end to end: {describe_end_to_end(self.final)}")
        for site, text in self.accepted.items():
            lines.append(f"  approximate: {site}: {text}")
        for site, reason in self.refused.items():
            lines.append(f"  kept exact: {site}: {reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: candidates by their labels, measurements as dicts."""
        def trial(item: Trial) -> dict:
            return {"site": item.site, "candidate": item.label, "passed": item.passed, "reason": item.reason,
                    "site_error": _as_dict(item.site_error), "end_to_end": _as_dict(item.end_to_end)}

        def step(item: Step) -> dict:
            return {"site": item.site, "candidate": candidate_label(item.candidate),
                    "accepted_before": list(item.accepted_before), "passed": item.passed, "reason": item.reason,
                    "end_to_end": _as_dict(item.end_to_end)}

        return {"tolerance": dict(self.tolerance), "batches": self.batches, "positions": self.positions,
                "calibration_lengths": dict(self.calibration_lengths), "plan_max_len": self.plan_max_len,
                "trials": [trial(item) for item in self.trials], "steps": [step(item) for item in self.steps],
                "final": _as_dict(self.final), "accepted": dict(self.accepted), "refused": dict(self.refused),
                "notes": list(self.notes)}


def _as_dict(record: Any) -> Optional[dict]:
    return None if record is None else dataclasses.asdict(record)


def candidate_label(candidate: Optional[Candidate]) -> str:
    """'sliding_window(W=64, sinks=4)', 'hyper(block_size=8, ...)', 'flash', 'dense'."""
    if candidate is None:
        return "dense"
    variant = VARIANTS.get(candidate.variant)
    shown = variant.fidelity.shown if variant is not None else ()
    parameters = [f"{'W' if name == 'window' else name}={candidate.parameter(name)}" for name in shown
                  if candidate.parameter(name) is not None]
    return f"{candidate.variant}({', '.join(parameters)})" if parameters else candidate.variant


def format_tolerance(tolerance: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {'<=' if TOLERANCE_KEYS[name][0] == 'max' else '>='} {value:g}"
                     for name, value in tolerance.items())


def describe_end_to_end(result: EndToEnd) -> str:
    parts = [] if result.finite else ["NON-FINITE output"]
    for name, template in (("kl_mean", "KL mean {:.3g}"), ("kl_p99", "KL p99 {:.3g}"), ("top1", "top-1 {:.4f}"),
                           ("cosine_mean", "cosine mean {:.5f}"), ("cosine_min", "cosine min {:.5f}")):
        value = result.value(name)
        if value is not None:
            parts.append(template.format(value))
    return ", ".join(parts) + f" ({result.positions} positions)"


def describe_site_error(error: SiteError) -> str:
    text = (f"site rel. error {error.rel_frobenius_error:.3g}, cosine {error.cosine:.5f}, max abs "
            f"{error.max_abs_error:.3g}")
    if error.mass_kept_mean is not None:
        text += (f", mass kept mean {error.mass_kept_mean:.4f} / min {error.mass_kept_min:.4f}, error "
                 f"{error.error_norm_max:.3g} <= bound {error.bound_max:.3g}: "
                 f"{'holds' if error.bound_holds else 'VIOLATED'}")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def violations(tolerance: Mapping[str, float], end_to_end: Optional[EndToEnd] = None,
               error: Optional[SiteError] = None) -> list[str]:
    """Each tolerance that the measurements break, in words ("kl_p99 0.84 > 0.1")."""
    broken = []
    if end_to_end is not None and not end_to_end.finite:
        broken.append("the output has NaN or Inf")
    if error is not None and not error.finite:
        broken.append("the site's attention output has NaN or Inf")
    for name, limit in tolerance.items():
        direction = TOLERANCE_KEYS[name][0]
        if name in SITE_KEYS:
            if error is None:
                continue
            value = error.rel_frobenius_error if name == "site_rel_error" else error.cosine
        else:
            if end_to_end is None:
                continue
            value = end_to_end.value(name)
            if value is None:
                broken.append(f"{name} was not measured (compare the outputs as "
                              f"{'logits' if name in DISTRIBUTION_KEYS else 'embeddings'})")
                continue
        if (direction == "max" and not value <= limit) or (direction == "min" and not value >= limit):
            broken.append(f"{name} {value:.4g} {'>' if direction == 'max' else '<'} {limit:g}")
    return broken


def sensitivity(tolerance: Mapping[str, float], end_to_end: EndToEnd) -> float:
    """How much of the end-to-end tolerance one site uses up: the largest ratio of measured damage to allowed damage
    (KL over its limit; 1 - similarity over 1 - its limit). Sites switch in increasing order of this."""
    ratios = [0.0]
    for name, limit in tolerance.items():
        value = end_to_end.value(name)
        if name in SITE_KEYS or value is None:
            continue
        if TOLERANCE_KEYS[name][0] == "max":
            ratios.append(value / limit if limit > 0 else (math.inf if value > 0 else 0.0))
        else:
            allowed = 1.0 - limit
            ratios.append((1.0 - value) / allowed if allowed > 0 else (math.inf if value < 1.0 else 0.0))
    return max(ratios) if end_to_end.finite else math.inf
