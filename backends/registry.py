"""What the planner may ask of a variant: does it apply to a site in a planning context, with which implementation,
how exact is it there, what does it cost, and how is a call emitted into a graph.

The planner and the passes import this module, never a kernel's internals.

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

import importlib
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from backends.ring.rule import emit_ring
from passes.errors import BackendError
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


@dataclass(frozen=True)
class Variant:
    """A way to compute attention, as the planner sees it.

    offer(site, context) -> Offer. emit(graph, node, site, nodes, candidate=None) -> the node computing the site's
    output (candidate: the planner's Candidate, whose parameters carry e.g. an imposed window)."""

    name: str
    title: str  # for people: "exact tiled", "sliding window", ...
    cost_module: str
    offer: Callable[[AttentionSite, PlanContext], Offer]
    emit: Optional[Callable[..., torch.fx.Node]] = None

    def costs(self, shape):
        return importlib.import_module(self.cost_module).costs(shape)


# ---------------------------------------------------------------------------------------------------------------
# When variants apply


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
    if getattr(device, "kind", "gpu") == "cpu":
        return "sdpa-cpu-flash"
    if site.head_dim > 256 or site.value_dim != site.head_dim and site.value_dim > 256:
        return "sdpa-math"
    if site.mask.tensor is not None or site.mask.key_padding or site.dtype not in HALF_DTYPES:
        return "sdpa-efficient"
    return "sdpa-flash"


def _dense_offer(site: AttentionSite, context: PlanContext) -> Offer:
    return Offer(original_implementation(context.device, site), "exact")  # the original always applies


def _tiled_implementation(device, site: AttentionSite) -> str:
    if getattr(device, "kind", "gpu") == "cpu":
        # SDPA's fused CPU kernel runs the unmasked tiles unless a mask tensor, padding or soft-capping is in them.
        plain = keeps_mask_tensor(site) or site.mask.key_padding is not None or site.softcap is not None
        return "blockwise" if plain else "blockwise-sdpa"
    # A mask tensor kept for exactness runs in the blockwise loop; structured masks run in the Triton kernel.
    return "blockwise" if keeps_mask_tensor(site) else "triton"


def _flash_offer(site: AttentionSite, context: PlanContext) -> Offer:
    implementation = _tiled_implementation(context.device, site)
    obstacle = tiled_obstacle(site)
    if obstacle is None and site.mask.kind == "sliding_window" and (site.mask.window or 0) < context.max_len:
        obstacle = "the mask is a sliding window: the sliding_window variant runs it"
    if obstacle:
        return Offer(implementation, "exact", not_applicable=obstacle)
    return Offer(implementation, "exact")


def _sdpa_cudnn_offer(site: AttentionSite, context: PlanContext) -> Offer:
    device = context.device
    reason = tiled_obstacle(site) or score_modifier_obstacle(site, "SDPA") or structure_only(site)
    if reason is None and getattr(device, "family", "") != "hopper":
        reason = f"SDPA's cuDNN kernel is chosen only on Hopper GPUs; the target is {device.name}"
    if reason is None and site.dtype not in HALF_DTYPES:
        reason = f"cuDNN attention takes bfloat16/float16; the site is {site.dtype}"
    if reason is None and (site.head_dim > 128 or site.value_dim != site.head_dim):
        reason = f"cuDNN attention takes head_dim <= 128 with equal value dim; the site has {site.head_dim}"
    if reason is None and site.form == "sdpa" and original_implementation(device, site) == "sdpa-cudnn":
        reason = "the original already runs cuDNN"
    return Offer("sdpa-cudnn", "exact", not_applicable=reason)


def _sliding_window_offer(site: AttentionSite, context: PlanContext) -> Offer:
    implementation = _tiled_implementation(context.device, site)
    obstacle = tiled_obstacle(site)
    if obstacle:
        return Offer(implementation, "exact", not_applicable=obstacle)
    mask = site.mask
    if mask.kind == "sliding_window":
        window = mask.window
        return Offer(implementation, "exact", (("window", window), ("sinks", 0), ("imposed", False)))
    if mask.kind not in ("none", "causal", "padding") or keeps_mask_tensor(site):
        reason = f"a window over the site's {mask.describe()} mask is not offered (only none, causal or padding masks)"
        return Offer(implementation, "approximate", not_applicable=reason)
    if context.window is None:
        return Offer(implementation, "approximate",
                     not_applicable="the mask has no window; pass window=W (policy approximate) to impose one")
    parameters = (("window", context.window), ("sinks", context.sinks), ("imposed", True))
    # A window that covers every position of the longest sequence changes nothing: exact.
    covers = context.window >= context.max_len and context.sinks == 0
    return Offer(implementation, "exact" if covers else "approximate", parameters)


def _ring_offer(site: AttentionSite, context: PlanContext) -> Offer:
    reason = tiled_obstacle(site) or score_modifier_obstacle(site, "ring attention")
    if reason is None and context.world_size < 2:
        reason = "runs over world_size > 1 devices (optimize(..., world_size=P), --world-size P); planned for one device"
    if reason is None and (keeps_mask_tensor(site) or site.mask.key_padding or site.q_len != site.kv_len):
        reason = f"ring attention takes self-attention with a structured mask; the site has {site.mask.describe()}"
    parameters = (("world_size", context.world_size), ("layout", "zigzag"))
    return Offer("triton" if getattr(context.device, "kind", "gpu") != "cpu" else "blockwise", "exact", parameters,
                 reason)


def _retrain_offer(kind: str, causal_only: bool):
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
        return Offer("triton" if getattr(context.device, "kind", "gpu") != "cpu" else "reference", "retrain",
                     not_applicable=reason)
    return offer


HYPER_DEFAULTS = (("block_size", 256), ("sample_size", 256), ("num_projections", 7), ("min_seq_len", 4096))


def _hyper_offer(site: AttentionSite, context: PlanContext) -> Offer:
    reason = tiled_obstacle(site) or score_modifier_obstacle(site, "HyperAttention") or structure_only(site)
    implementation = "triton" if getattr(context.device, "kind", "gpu") != "cpu" else "reference"
    return Offer(implementation, "approximate", HYPER_DEFAULTS, reason)


# ---------------------------------------------------------------------------------------------------------------
# Emitting calls


def _repeat_kv(graph: torch.fx.Graph, node: torch.fx.Node, groups: int) -> torch.fx.Node:
    if groups == 1:
        return node
    return graph.call_function(torch.ops.aten.repeat_interleave.self_int, (node, groups, 1))


def _emit_sink_logits(graph: torch.fx.Graph, site: AttentionSite, nodes: dict) -> Optional[torch.fx.Node]:
    """The site's sink logits as a (heads,) node, or None. The detector records the tensor behind the model's
    reshape/expand (gpt-oss: the (heads,) parameter); one logit shared by every head is expanded."""
    if site.sinks is None:
        return None
    sinks = nodes[site.sinks]
    value = sinks.meta.get("val")
    count = value.numel() if isinstance(value, torch.Tensor) else None
    if count == site.heads:
        return graph.call_function(torch.ops.aten.reshape.default, (sinks, [site.heads]))
    if count == 1:
        flat = graph.call_function(torch.ops.aten.reshape.default, (sinks, [1]))
        return graph.call_function(torch.ops.aten.expand.default, (flat, [site.heads]))
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else "unknown"
    raise BackendError(f"{site.name}: the attention-sink logits {site.sinks} have shape {shape}; the tiled kernels "
                       f"take one logit per query head ({site.heads}) or one for all")


def _emit_tiled(graph: torch.fx.Graph, node: torch.fx.Node, site: AttentionSite, nodes: dict,
                window: Optional[int], sinks: int, causal: bool) -> torch.fx.Node:
    """attention_planner::flash_attention(q, k, v, padding, mask, causal, window, sinks, scale, "auto", softcap,
    sink_logits)[0]."""
    importlib.import_module("backends.flash.op")  # registers the op
    mask = site.mask
    keep_tensor = keeps_mask_tensor(site)
    with graph.inserting_before(node):
        arguments = (
            nodes[site.query], nodes[site.key], nodes[site.value],
            nodes[mask.key_padding] if mask.key_padding else None,
            nodes[mask.tensor] if keep_tensor and mask.tensor else None,
            causal, window if window is not None else -1, sinks, float(site.effective_scale()), "auto",
        )
        if site.softcap is not None or site.sinks is not None:  # else the call stays as before these arguments
            arguments += (None if site.softcap is None else float(site.softcap), _emit_sink_logits(graph, site, nodes))
        call = graph.call_function(torch.ops.attention_planner.flash_attention.default, arguments)
        output = graph.call_function(operator.getitem, (call, 0))
    return output


def _emit_flash(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    mask = site.mask
    window = mask.window if mask.kind == "sliding_window" else None
    return _emit_tiled(graph, node, site, nodes, window, 0, mask.is_causal)


def _emit_sliding_window(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    mask = site.mask
    parameters = dict(candidate.parameters) if candidate is not None else {}
    window = parameters.get("window", mask.window if mask.kind == "sliding_window" else None)
    if window is None:
        raise BackendError(f"sliding_window at {site.name}: no window: the site's mask has none and the rewrite was "
                           "not given the planner's candidate (with its window parameter)")
    # An imposed window keeps the site's own causality: a causal site gets a causal band, a full one |i - j| < W.
    causal = mask.is_causal
    return _emit_tiled(graph, node, site, nodes, int(window), int(parameters.get("sinks", 0)), causal)


def sdpa_preferring_cudnn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
                          scale: float) -> torch.Tensor:
    """SDPA with cuDNN's kernel first on CUDA (then flash, memory-efficient, math); plain SDPA elsewhere, so a
    module planned for an H200 still runs on the CPU. Grouped k/v heads go in as they are (enable_gqa: cuDNN takes
    them in torch >= 2.11, our floor; repeating them cost a copy of k and v per call)."""
    grouped = query.shape[1] != key.shape[1]
    if not query.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                                                enable_gqa=grouped)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        context = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: restrict to cuDNN, which is then the only choice
        context = sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    with context:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                                                enable_gqa=grouped)


def _emit_sdpa_cudnn(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    arguments = (nodes[site.query], nodes[site.key], nodes[site.value], site.mask.is_causal,
                 float(site.effective_scale()))
    with graph.inserting_before(node):
        return graph.call_function(sdpa_preferring_cudnn, arguments)


def _scaled_query(graph, site: AttentionSite, query: torch.fx.Node) -> torch.fx.Node:
    """q times scale·sqrt(D), for kernels that apply the default 1/sqrt(D) themselves."""
    factor = site.effective_scale() * math.sqrt(site.head_dim)
    if abs(factor - 1.0) < 1e-12:
        return query
    return graph.call_function(torch.ops.aten.mul.Tensor, (query, factor))


def _emit_hyper(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    function = importlib.import_module("backends.hyper.op").hyper_attention
    parameters = dict(candidate.parameters) if candidate is not None else dict(HYPER_DEFAULTS)
    groups = site.heads // site.kv_heads
    with graph.inserting_before(node):
        query = _scaled_query(graph, site, nodes[site.query])
        key = _repeat_kv(graph, nodes[site.key], groups)
        value = _repeat_kv(graph, nodes[site.value], groups)
        keywords = {name: parameters[name] for name, _ in HYPER_DEFAULTS if name in parameters}
        return graph.call_function(function, (query, key, value), {"causal": site.mask.is_causal, **keywords})


def _emit_linear(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    """Linear attention with the elu+1 feature map (the starting point that training then adapts)."""
    function = importlib.import_module("backends.linear.op").linear_attention
    groups = site.heads // site.kv_heads
    with graph.inserting_before(node):
        key = _repeat_kv(graph, nodes[site.key], groups)
        value = _repeat_kv(graph, nodes[site.value], groups)
        return graph.call_function(function, (nodes[site.query], key, value),
                                   {"feature_map": "elu+1", "causal": site.mask.is_causal})


SSD_INITIAL_DECAY = -1.0 / 4096  # A: a slow decay (half-life ~2.8k positions) to start training from


def ssd_from_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SSD in attention's roles (C = q, B = k, x = v), dt = 1 and a constant slow decay per head: the starting
    point of a retrained state-space layer, not an approximation of the softmax."""
    ssd = importlib.import_module("backends.ssd.op").ssd
    batch, heads, length, _ = query.shape
    groups = heads // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dt = torch.ones(batch, heads, length, dtype=value.dtype, device=value.device)
    decay = torch.full((heads,), SSD_INITIAL_DECAY, dtype=torch.float32, device=value.device)
    return ssd(value, dt, decay, key, query)


def _emit_ssd(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    with graph.inserting_before(node):
        return graph.call_function(ssd_from_attention, (nodes[site.query], nodes[site.key], nodes[site.value]))


VARIANTS: dict[str, Variant] = {
    "dense": Variant("dense", "the original", "backends.dense.cost", _dense_offer),
    "sdpa_cudnn": Variant("sdpa_cudnn", "SDPA cuDNN", "backends.dense.cost", _sdpa_cudnn_offer, _emit_sdpa_cudnn),
    "flash": Variant("flash", "exact tiled", "backends.flash.cost", _flash_offer, _emit_flash),
    "sliding_window": Variant("sliding_window", "sliding window", "backends.sliding_window.cost",
                              _sliding_window_offer, _emit_sliding_window),
    "ring": Variant("ring", "ring", "backends.ring.cost", _ring_offer, emit_ring),
    "hyper": Variant("hyper", "HyperAttention", "backends.hyper.cost", _hyper_offer, _emit_hyper),
    "linear": Variant("linear", "linear attention", "backends.linear.cost", _retrain_offer("linear attention", False),
                      _emit_linear),
    "ssd": Variant("ssd", "SSD (Mamba-2)", "backends.ssd.cost", _retrain_offer("SSD", True), _emit_ssd),
}


def register(variant: Variant) -> None:
    """Add or replace a variant."""
    VARIANTS[variant.name] = variant


def variants_for(policy: str) -> list[Variant]:
    """Every registered variant; which of them a policy admits is decided per site, from each Offer's exactness
    (a sliding window is exact on one site and approximate on another)."""
    if policy not in EXACTNESS_ALLOWED:
        raise KeyError(policy)
    return list(VARIANTS.values())


def emit(graph: torch.fx.Graph, node: torch.fx.Node, decision, nodes: dict) -> torch.fx.Node:
    """Emit the call that the decision's chosen candidate names (what passes/rewrite.py should call)."""
    variant = VARIANTS[decision.choice.variant]
    if variant.emit is None:
        raise BackendError(f"variant {variant.name!r} has no rewrite")
    return variant.emit(graph, node, decision.site, nodes, decision.choice)
