"""What a variant is, as the planner sees it, and the checks several variants share.

Each variant folder has a `rule.py` that builds its `Variant`: where it applies (`offer`), how a call is emitted into
a graph (`emit`), what it costs (its cost module), its default efficiencies per device family, the kernels that
calibrating a device times for it (`probes`), and how fidelity treats it (`fidelity`). backends/registry.py lists
the variants; nothing else names them.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from passes.records import AttentionSite

EXACTNESS_ALLOWED = {"exact": ("exact",), "approximate": ("exact", "approximate"),
                     "any": ("exact", "approximate", "retrain")}

# Mask kinds the tiled kernel expresses without the mask tensor; "arbitrary" runs with the tensor (exactly).
TILED_MASKS = ("none", "causal", "sliding_window", "padding", "bias", "arbitrary")
HALF_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class PlanContext:
    """What a variant may need to know besides the site: the target, the policy and the user's options.

    window / sinks: the window (keys per query) and sink tokens to impose where a site's own mask has no window,
    under policy "approximate" or "any" (make_plan's `window=`, `sinks=`). train: the model will be trained, which
    is what lets the retrain variants (linear, ssd) in under policy "any"."""

    device: Any  # backends.hardware.DeviceSpec
    policy: str = "exact"
    max_len: int = 1
    world_size: int = 1
    train: bool = False
    window: Optional[int] = None
    sinks: int = 0


@dataclass(frozen=True)
class Offer:
    """A variant's answer for one site: what would run it, how exact it is there, with which parameters; or why
    it does not apply (not_applicable)."""

    implementation: str
    exactness: str
    parameters: tuple = ()
    not_applicable: Optional[str] = None

    def parameter(self, name: str, default: Any = None) -> Any:
        return dict(self.parameters).get(name, default)


def _cost_module(cost: Any):
    """A cost module given as a module or as its dotted name."""
    return importlib.import_module(cost) if isinstance(cost, str) else cost


@dataclass(frozen=True)
class KernelProbe:
    """One kernel that calibrating a device times: its efficiency key, the cost module (or its dotted name) and
    implementation that model it, and a factory that returns the call to time for (q, k, v)."""

    work: str
    module: Any
    implementation: str
    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Callable[[], Any]]
    window: Optional[int] = None
    gpu_only: bool = True
    mask_tensor: bool = False

    def costs(self, shape):
        return _cost_module(self.module).costs(shape)


@dataclass(frozen=True)
class Fidelity:
    """How the fidelity check treats a variant's approximate candidates.

    shown: the parameters a candidate's label shows ("sliding_window(W=64, sinks=4)").
    defaults: the parameters of a candidate built by hand (make_candidate) that the caller does not give.
    unmeasured(candidate, sample_length): why batches of that length cannot exercise the candidate (it is
        exact there), or None.
    bound(site, batches, candidate): extra figures of a site's error (a dict of SiteError fields), from the site's
        recorded inputs, one {role: tensor} per sample batch."""

    shown: tuple = ()
    defaults: tuple = ()
    unmeasured: Optional[Callable[[Any, int], Optional[str]]] = None
    bound: Optional[Callable[[AttentionSite, list, Any], dict]] = None


EXACT = Fidelity()


@dataclass(frozen=True)
class Variant:
    """A way to compute attention, as the planner sees it.

    offer(site, context) -> Offer. emit(graph, node, site, nodes, candidate=None) -> the node computing the site's
    output (candidate: the planner's Candidate, whose parameters carry e.g. an imposed window).
    cost_module: the module (or its dotted name) whose costs(shape) models the variant.
    efficiency: default efficiencies per device family ({"hopper": {work: fraction}, "ampere": ..., "cpu": ...};
        "ada" takes "ampere"'s), leads until a device is calibrated. probes: what calibrating a device times.
    keeps_mask: the variant's kernels take the site's mask tensor where one must be kept (the tiled kernels).
    sharded: the variant runs over world_size devices (ring)."""

    name: str
    title: str  # for people: "exact tiled", "sliding window", ...
    cost_module: Any
    offer: Callable[[AttentionSite, PlanContext], Offer]
    emit: Optional[Callable[..., torch.fx.Node]] = None
    efficiency: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    probes: tuple = ()
    fidelity: Fidelity = EXACT
    keeps_mask: bool = False
    sharded: bool = False

    def costs(self, shape):
        return _cost_module(self.cost_module).costs(shape)


# ---------------------------------------------------------------------------------------------------------------
# When variants apply


def on_gpu(device) -> bool:
    return getattr(device, "kind", "gpu") != "cpu"


def tiled_obstacle(site: AttentionSite) -> Optional[str]:
    """Why our tiled kernels (flash, sliding window) cannot run a site exactly, or None. They take tanh soft-capping
    and attention-sink logits; the other variants refuse them with `score_modifier_obstacle`."""
    if site.unsupported:
        return site.unsupported
    if site.dropout_p != 0.0:
        return f"dropout_p={site.dropout_p}: the tiled kernels have no dropout (exact only in eval)"
    if site.mask.kind not in TILED_MASKS:
        return f"mask kind {site.mask.kind!r} is not expressed by the tiled kernels"
    if site.mask.bias is not None and site.mask.tensor is None:
        return "an additive bias without its tensor cannot be kept exactly"
    if site.mask.kind == "arbitrary" and site.mask.tensor is None:
        return f"the mask could not be proved and has no tensor to keep ({site.mask.proof})"
    if site.heads % site.kv_heads:
        return f"{site.heads} query heads are not a multiple of {site.kv_heads} kv heads"
    return None


def score_modifier_obstacle(site: AttentionSite, kernel: str) -> Optional[str]:
    """Why `kernel` (a variant without soft-capping or sink logits) cannot run the site, or None."""
    if site.softcap is not None:
        return (f"tanh soft-capping ({site.softcap:g}) is not in {kernel} (the flash and sliding_window variants "
                "take it)")
    if site.sinks is not None:
        return f"attention-sink logits are not in {kernel} (the flash and sliding_window variants take them)"
    return None


def keeps_mask_tensor(site: AttentionSite) -> bool:
    """Whether a tiled rewrite must keep the site's mask tensor (an unproved mask, or a bias)."""
    return site.mask.kind == "arbitrary" or site.mask.bias is not None


def structure_only(site: AttentionSite) -> Optional[str]:
    """Why a site's mask is more than a proved none/causal structure (padding, a bias, an unproved tensor), or None.
    A proved causal mask that the model builds as a tensor is structure: the rewrite drops the tensor."""
    mask = site.mask
    if mask.kind not in ("none", "causal"):
        return f"the mask is {mask.describe()}"
    if mask.key_padding or mask.bias:
        return f"the mask is {mask.describe()} (padding or bias: a tensor to keep)"
    return None


def original_implementation(device, site: AttentionSite) -> str:
    """What runs the site as the model wrote it: SDPA's choice of kernel for SDPA calls, else the eager ops.

    SDPA on CUDA takes its flash kernel first (PyTorch keeps cuDNN opt-in on Hopper), the memory-efficient kernel
    where flash cannot run (a mask tensor, fp32, head_dim > 256), and the math path (materialized) with neither;
    on the CPU its fused flash kernel."""
    if site.form != "sdpa":
        return "eager"
    if not on_gpu(device):
        return "sdpa-cpu-flash"
    if site.head_dim > 256 or site.value_dim != site.head_dim and site.value_dim > 256:
        return "sdpa-math"
    if site.mask.tensor is not None or site.mask.key_padding or site.dtype not in HALF_DTYPES:
        return "sdpa-efficient"
    return "sdpa-flash"


def retrain_offer(kind: str, causal_only: bool):
    """The offer of a variant that is another architecture (linear attention, SSD): under policy "any" with
    train=True, at sites of proved none/causal structure (causal only: `causal_only`)."""
    def offer(site: AttentionSite, context: PlanContext) -> Offer:
        reason = None
        if not context.train:
            reason = (f"{kind} is another architecture (retrain class): offered under policy 'any' with "
                      "train=True only")
        elif structure_only(site):
            reason = f"{kind} replaces none/causal attention; {structure_only(site)}"
        elif causal_only and site.mask.kind != "causal":
            reason = f"{kind} is a causal recurrence; the site is not causal"
        elif site.unsupported:
            reason = site.unsupported
        return Offer("triton" if on_gpu(context.device) else "reference", "retrain", not_applicable=reason)
    return offer


# ---------------------------------------------------------------------------------------------------------------
# Emitting calls


def repeat_kv(graph: torch.fx.Graph, node: torch.fx.Node, groups: int) -> torch.fx.Node:
    """k or v with each of its heads repeated `groups` times (for kernels without grouped heads)."""
    if groups == 1:
        return node
    return graph.call_function(torch.ops.aten.repeat_interleave.self_int, (node, groups, 1))


def scaled_query(graph, site: AttentionSite, query: torch.fx.Node) -> torch.fx.Node:
    """q times scale·sqrt(D), for kernels that apply the default 1/sqrt(D) themselves."""
    factor = site.effective_scale() * math.sqrt(site.head_dim)
    if abs(factor - 1.0) < 1e-12:
        return query
    return graph.call_function(torch.ops.aten.mul.Tensor, (query, factor))


def backend_call(module: str, name: str, **keywords):
    """A probe's factory: (q, k, v) -> a call of module.name(q, k, v, **keywords)."""
    def factory(q, k, v):
        function = getattr(importlib.import_module(module), name)
        return lambda: function(q, k, v, **keywords)
    return factory
