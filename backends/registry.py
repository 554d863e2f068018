"""The variants the planner chooses from, in order of preference on a near-tie (the original first, then the exact
ones). Each variant's knowledge (where it applies, how it is emitted, its costs, default efficiencies, calibration
probes and fidelity treatment) is in its folder's rule.py; a new variant is a new folder and one line here.

Variants (name: exactness):
  dense           exact        the original, as the model computes it (implementation "eager", "sdpa-flash", ...)
  sdpa_cudnn      exact        SDPA's cuDNN kernel chosen explicitly (Hopper; SDPA itself prefers flash there)
  flash           exact        our exact tiled kernel (Triton on GPUs, the blockwise loop elsewhere)
  sliding_window  exact where the site's mask is that window, or the window covers max_len; else approximate
                  (a window imposed on full attention: needs make_plan(..., window=W))
  ring            exact        sequence sharded over world_size devices (only when world_size > 1)
  hyper           approximate  HyperAttention
  linear, ssd     retrain      other architectures: offered under policy "any" with train=True only
"""
from __future__ import annotations

import torch

from backends.dense.rule import DENSE, SDPA_CUDNN
from backends.flash.rule import FLASH
from backends.hyper.rule import HYPER
from backends.linear.rule import LINEAR
from backends.ring.rule import RING
from backends.sliding_window.rule import SLIDING_WINDOW
from backends.mamba2.rule import SSD
from backends.variant import (  # noqa: F401  (what the planner asks of a variant)
    EXACTNESS_ALLOWED,
    KernelProbe,
    Offer,
    PlanContext,
    Variant,
    keeps_mask_tensor,
)
from passes.errors import BackendError

VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (
    DENSE,
    SDPA_CUDNN,
    FLASH,
    SLIDING_WINDOW,
    RING,
    HYPER,
    LINEAR,
    SSD,
)}


def register(variant: Variant) -> None:
    """Add or replace a variant."""
    VARIANTS[variant.name] = variant


def variants_for(policy: str) -> list[Variant]:
    """Every registered variant; which of them a policy admits is decided per site, from each Offer's exactness
    (a sliding window is exact on one site and approximate on another)."""
    if policy not in EXACTNESS_ALLOWED:
        raise KeyError(policy)
    return list(VARIANTS.values())


def default_efficiency(family: str) -> dict[str, float]:
    """The variants' default efficiencies on a device family ("ada" takes "ampere"'s)."""
    family = "ampere" if family == "ada" else family
    return {work: value for variant in VARIANTS.values() for work, value in variant.efficiency.get(family, {}).items()}


def probes(on_gpu: bool) -> list[KernelProbe]:
    """The kernels that calibrating a device times: on a GPU, or on the CPU."""
    return [probe for variant in VARIANTS.values() for probe in variant.probes if probe.gpu_only == on_gpu]


def emit(graph: torch.fx.Graph, node: torch.fx.Node, decision, nodes: dict) -> torch.fx.Node:
    """Emit the call that the decision's chosen candidate names (what passes/rewrite.py should call)."""
    variant = VARIANTS[decision.choice.variant]
    if variant.emit is None:
        raise BackendError(f"variant {variant.name!r} has no rewrite")
    return variant.emit(graph, node, decision.site, nodes, decision.choice)
