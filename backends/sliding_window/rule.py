"""The sliding window: exact where the site's mask is that window (or the window covers max_len), approximate where a
window is imposed on full attention (make_plan(..., window=W)); its fidelity check bounds the error by the softmax
mass the window keeps."""
from __future__ import annotations

from typing import Optional

import torch

from backends.flash.rule import emit_tiled, tiled_implementation
from backends.sliding_window import cost
from backends.variant import (Fidelity, KernelProbe, Offer, PlanContext, Variant, backend_call, keeps_mask_tensor,
                              tiled_obstacle)
from passes.errors import BackendError
from passes.records import AttentionSite

BOUND_SLACK = 1e-4  # relative slack for rounding when checking the window bound


def _offer(site: AttentionSite, context: PlanContext) -> Offer:
    implementation = tiled_implementation(context.device, site)
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


def _emit(graph, node, site, nodes, candidate=None) -> torch.fx.Node:
    mask = site.mask
    parameters = dict(candidate.parameters) if candidate is not None else {}
    window = parameters.get("window", mask.window if mask.kind == "sliding_window" else None)
    if window is None:
        raise BackendError(f"sliding_window at {site.name}: no window: the site's mask has none and the rewrite was "
                           "not given the planner's candidate (with its window parameter)")
    # An imposed window keeps the site's own causality: a causal site gets a causal band, a full one |i - j| < W.
    causal = mask.is_causal
    return emit_tiled(graph, node, site, nodes, int(window), int(parameters.get("sinks", 0)), causal)


def _unmeasured(candidate, sample_length: int) -> Optional[str]:
    window, sinks = candidate.parameter("window"), int(candidate.parameter("sinks", 0) or 0)
    if window is not None and window + sinks >= sample_length:
        return (f"the window ({window} keys + {sinks} sinks) covers all {sample_length} keys of the "
                "sample batches, so they cannot measure it; measure at the deployment length")
    return None


def window_bound_check(site: AttentionSite, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       window: int, sinks: int, key_padding_mask: Optional[torch.Tensor] = None,
                       attn_mask: Optional[torch.Tensor] = None) -> dict:
    """For one batch of a site's q, k, v (batch, heads, sequence, head_dim), per query (batch, heads, queries):
    "mass": the softmax mass m_w that a window of `window` keys plus the first `sinks` keys keeps, from the tiled
    op's log-sum-exps (linear memory): m_w = exp(lse_window - lse_full); "bound": 2 (1 - m_w) max_j ||v_j||;
    "error": ||o - o_w||; "holds": error <= bound (+ rounding slack) for every query."""
    from backends.flash.op import tiled_attention

    options = dict(causal=site.mask.is_causal, scale=site.effective_scale(), key_padding_mask=key_padding_mask,
                   attn_mask=attn_mask, return_lse=True)
    if site.mask.kind == "sliding_window" and site.mask.window is not None:
        options["window"] = site.mask.window  # the site's own window belongs to the original
    original, lse_full = tiled_attention(query, key, value, **options)
    options["window"] = min(window, options.get("window") or window)
    windowed, lse_window = tiled_attention(query, key, value, sinks=sinks, **options)
    mass = torch.exp(lse_window.double() - lse_full.double())
    mass = torch.where(torch.isfinite(lse_full), mass, torch.ones_like(mass))  # a row with no key loses nothing
    groups = query.shape[1] // value.shape[1]
    value_norm = value.double().norm(dim=-1).amax(dim=-1).repeat_interleave(groups, dim=1)  # (batch, heads)
    bound = 2.0 * (1.0 - mass).clamp_min(0.0) * value_norm[..., None]
    error = (windowed.double() - original.double()).norm(dim=-1)
    slack = BOUND_SLACK * (1.0 + original.double().norm(dim=-1))
    return {"mass": mass, "bound": bound, "error": error, "holds": bool((error <= bound + slack).all())}


def window_bound(site: AttentionSite, batches: list, candidate) -> dict:
    """The mass a window keeps and the bound ||o - o_w|| <= 2 (1 - m_w) max||v||, checked per query on the
    sample batches (each a {role: tensor} of the site's recorded inputs)."""
    window, sinks = int(candidate.parameter("window")), int(candidate.parameter("sinks", 0) or 0)
    masses, bound_max, error_max, holds = [], 0.0, 0.0, True
    for inputs in batches:
        check = window_bound_check(site, inputs["query"], inputs.get("key"), inputs.get("value"), window, sinks,
                                   inputs.get("key_padding"), inputs.get("mask"))
        masses.append(check["mass"].flatten())
        holds = holds and check["holds"]
        bound_max = max(bound_max, float(check["bound"].max()))
        error_max = max(error_max, float(check["error"].max()))
    mass = torch.cat(masses)
    return dict(mass_kept_mean=float(mass.mean()), mass_kept_min=float(mass.min()), error_norm_max=error_max,
                bound_max=bound_max, bound_holds=holds)


SLIDING_WINDOW = Variant(
    "sliding_window", "sliding window", cost, _offer, _emit,
    efficiency={"hopper": {"sliding_window": 0.5}, "ampere": {"sliding_window": 0.45},
                "cpu": {"sliding_window": 0.3}},
    probes=(KernelProbe("sliding_window", cost, "triton",
                        backend_call("backends.sliding_window.op", "sliding_window_attention", window=4096),
                        window=4096),),
    fidelity=Fidelity(shown=("window", "sinks"), defaults=(("sinks", 0), ("imposed", True)),
                      unmeasured=_unmeasured, bound=window_bound),
    keeps_mask=True,
)
