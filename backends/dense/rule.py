"""The original attention (dense, as the model computes it) and SDPA's cuDNN kernel chosen explicitly."""
from __future__ import annotations

import torch

from backends.dense import cost
from backends.variant import (HALF_DTYPES, KernelProbe, Offer, PlanContext, Variant, original_implementation,
                              score_modifier_obstacle, structure_only, tiled_obstacle)
from passes.records import AttentionSite


def _dense_offer(site: AttentionSite, context: PlanContext) -> Offer:
    return Offer(original_implementation(context.device, site), "exact")  # the original always applies


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


def _sdpa_call(backend_name: str):
    def factory(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def call():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return call
    return factory


def _sdpa_masked_call(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    length = q.shape[2]
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()

    def call():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return call


def _sdpa_cpu_call(q, k, v):
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


DENSE = Variant(
    "dense", "the original", cost, _dense_offer,
    efficiency={"hopper": {"sdpa-flash": 0.34, "sdpa-efficient": 0.2},
                "ampere": {"sdpa-flash": 0.6, "sdpa-efficient": 0.4},
                "cpu": {"sdpa-flash": 0.3, "sdpa-efficient": 0.3, "sdpa-cpu-flash": 0.3}},
    probes=(KernelProbe("sdpa-flash", cost, "sdpa-flash", _sdpa_call("FLASH_ATTENTION")),
            KernelProbe("sdpa-efficient", cost, "sdpa-efficient", _sdpa_masked_call, mask_tensor=True),
            KernelProbe("sdpa-cpu-flash", cost, "sdpa-cpu-flash", _sdpa_cpu_call, gpu_only=False)),
)
SDPA_CUDNN = Variant(
    "sdpa_cudnn", "SDPA cuDNN", cost, _sdpa_cudnn_offer, _emit_sdpa_cudnn,
    efficiency={"hopper": {"sdpa-cudnn": 0.58}, "ampere": {"sdpa-cudnn": 0.5}, "cpu": {"sdpa-cudnn": 0.3}},
    probes=(KernelProbe("sdpa-cudnn", cost, "sdpa-cudnn", _sdpa_call("CUDNN_ATTENTION")),),
)
