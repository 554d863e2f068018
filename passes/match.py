"""Find attention sites in an ATen graph.

Each matcher is a plain function `(node) -> AttentionSite | None` whose name says what it matches. `find_sites`
runs all matchers over the graph in order; the first that claims a node wins. A matcher that fails on a node leaves
that node alone (the model keeps its original computation there), so that detection never breaks a model.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from passes.detect_adapters import KeyPaddingAdapter, SiteAdapter
from passes.detect_attention import UnsupportedSite, _with_symbols, build_sdpa_site, match_softmax_attention
from passes.detect_layout import LayoutError
from passes.symbolic import index_symbol
from passes.graph_info import dtype_name, module_path, node_argument, shape_of, size_hints, source_line
from passes.masks import IndexSpace, MaskTerm, analyze_mask, padding_drop_dims, sdpa_mask
from passes.records import AttentionSite, MaskSpec

# Set to re-raise matcher errors instead of skipping the node (tests do).
STRICT = os.environ.get("ATTENTION_PLANNER_STRICT") == "1"

SDPA_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default,)


def match_scaled_dot_product_attention(node: torch.fx.Node) -> Optional[AttentionSite]:
    """A call of F.scaled_dot_product_attention: q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa.

    Seen through its operands' layout ops first (repeated kv heads fold back, the attn_mask is proved); when that
    analysis cannot follow the operands, the call is taken as it is, with q, k, v the call's own arguments."""
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    try:
        return build_sdpa_site(node)
    except (UnsupportedSite, LayoutError):
        pass
    return match_scaled_dot_product_attention_as_called(node)


def match_scaled_dot_product_attention_as_called(node: torch.fx.Node) -> Optional[AttentionSite]:
    """The SDPA call with its own q, k, v nodes (already (batch, heads, sequence, head_dim))."""
    query, key, value = node.args[0], node.args[1], node.args[2]
    attn_mask = node_argument(node, 3, "attn_mask")
    dropout_p = node_argument(node, 4, "dropout_p", 0.0)
    is_causal = node_argument(node, 5, "is_causal", False)
    scale = node_argument(node, 6, "scale")
    enable_gqa = node_argument(node, 7, "enable_gqa", False)

    q_shape, k_shape, v_shape = shape_of(query), shape_of(key), shape_of(value)
    unsupported = None
    if q_shape is None or k_shape is None or v_shape is None:
        unsupported = "q, k or v has no recorded shape"
        q_shape = k_shape = v_shape = (1, 1, 1, 1)
    elif not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
        unsupported = f"q has {len(q_shape)} dims; only (batch, heads, sequence, head_dim) inputs are rewritten"
        q_shape, k_shape, v_shape = _as_four_dims(q_shape), _as_four_dims(k_shape), _as_four_dims(v_shape)
    heads, kv_heads = q_shape[1], k_shape[1]
    if unsupported is None and heads != kv_heads and not enable_gqa:
        unsupported = f"q has {heads} heads and k {kv_heads}, without enable_gqa (SDPA broadcasting)"
    if unsupported is None and not all(isinstance(size, int) for size in (heads, kv_heads, q_shape[3], v_shape[3])):
        unsupported = "heads or head_dim is symbolic"
    if unsupported is None and isinstance(scale, torch.fx.Node):
        unsupported = "the scale is a graph value, not a constant"

    hints = {}
    for tensor in (query, key, value):
        hints.update(size_hints(tensor))
    mask, adapter = _sdpa_mask_and_adapter(node, attn_mask, is_causal, q_shape, k_shape, unsupported)
    return AttentionSite(
        name=module_path(node),
        source=source_line(node),
        form="sdpa",
        node=node.name,
        query=query.name,
        key=key.name,
        value=value.name,
        batch=q_shape[0],
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_shape[2],
        kv_len=k_shape[2],
        head_dim=q_shape[3],
        value_dim=v_shape[3],
        scale=None if scale is None or isinstance(scale, torch.fx.Node) else float(scale),
        mask=mask,
        dropout_p=float(dropout_p) if isinstance(dropout_p, (int, float)) else -1.0,
        dtype=dtype_name(query),
        hints=tuple(sorted(hints.items())),
        unsupported=unsupported,
        adapter=adapter,
    )


def _sdpa_mask_and_adapter(node, attn_mask, is_causal, q_shape, k_shape, unsupported):
    """Analyze SDPA's attn_mask like any mask (passes/masks.py); the only recipe SDPA needs is the key padding."""
    if unsupported or not isinstance(is_causal, bool) or (attn_mask is not None and is_causal) or \
            not isinstance(attn_mask, (torch.fx.Node, type(None))):
        return sdpa_mask(attn_mask if isinstance(attn_mask, torch.fx.Node) else None, is_causal), None
    if attn_mask is None:
        return sdpa_mask(None, is_causal), None
    symbols = tuple(index_symbol(name) for name in ("b", "h", "i", "j"))
    sizes = dict(zip(symbols, (q_shape[0], q_shape[1], q_shape[2], k_shape[2])))
    space = IndexSpace(symbols[:2], symbols[2:3], symbols[3:], sizes)
    mask_shape = shape_of(attn_mask)
    if mask_shape is None or len(mask_shape) > 4:
        return sdpa_mask(attn_mask, is_causal), None
    dims = tuple(() if size == 1 and sizes[symbol] != 1 else (symbol,)
                 for size, symbol in zip(mask_shape, symbols[4 - len(mask_shape):]))
    kind = "keep" if dtype_name(attn_mask) == "bool" else "add"
    analysis = analyze_mask(node.graph.owning_module, [MaskTerm(kind, attn_mask, dims, 1.0, -math.inf)], space)
    padding = None
    if analysis.key_padding is not None:
        finding = analysis.key_padding
        if finding.batch_symbol != symbols[0]:
            return MaskSpec(kind="arbitrary", tensor=attn_mask.name,
                            proof="the padding is not indexed by the batch; the mask tensor is kept exactly"), None
        padding = KeyPaddingAdapter(finding.node.name, finding.relation, finding.value, finding.negate,
                                    (q_shape[0], k_shape[2]),
                                    padding_drop_dims(len(shape_of(finding.node)), finding))
    adapter = SiteAdapter(key_padding=padding)
    if padding is not None:
        try:
            adapter = _with_symbols(adapter, node.graph)
        except UnsupportedSite as error:
            return MaskSpec(kind="arbitrary", tensor=attn_mask.name, proof=f"{analysis.spec.proof}; but {error}, so "
                            "the mask tensor is kept exactly"), None
    return analysis.spec, adapter


def _as_four_dims(shape: tuple) -> tuple:
    shape = tuple(shape)
    while len(shape) < 4:
        shape = (1,) + shape
    return shape[-4:]


MATCHERS: list[Callable[[torch.fx.Node], Optional[AttentionSite]]] = [
    match_scaled_dot_product_attention,
    match_softmax_attention,
]


def find_sites(graph_module: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every attention site in the graph, in graph order."""
    sites = []
    for node in graph_module.graph.nodes:
        for matcher in MATCHERS:
            try:
                site = matcher(node)
            except Exception:  # noqa: BLE001 - a matcher bug must not break the model; the node stays as it is
                if STRICT:
                    raise
                site = None
            if site is not None:
                sites.append(site)
                break
    return _unique_names(sites)


def _unique_names(sites: list[AttentionSite]) -> list[AttentionSite]:
    """Two sites in one module (or at top level) get #1, #2 suffixes so that names identify sites."""
    import dataclasses
    from collections import Counter

    counts = Counter(site.name for site in sites)
    seen: Counter = Counter()
    renamed = []
    for site in sites:
        name = site.name or "<top>"
        if counts[site.name] > 1:
            seen[site.name] += 1
            name = f"{name}#{seen[site.name]}"
        renamed.append(dataclasses.replace(site, name=name))
    return renamed
