"""Mask proofs: a kind is claimed only when it holds for every length, and what is not proved keeps its tensor.

The traps are masks that agree with a structured one at the capture length and differ at others: a classifier that
looked at one example would call them causal. Every model here is also rewritten and compared with the original at
other lengths, including 1 and 2.
"""
from __future__ import annotations

import sympy
import torch
import torch.nn as nn

import planner  # noqa: F401  (planner/__init__ imports the passes; importing passes.masks first would be circular)
from passes.detect_symbolic import SymbolicEvaluator, index_symbol
from passes.masks import IndexSpace, MaskTerm, analyze_mask
from detector_support import assert_same, rewrite_exactly, strict_matchers  # noqa: F401

DIM, HEADS = 16, 2


class FusedQKV(nn.Module):
    """A fused q, k, v projection of DIM features (the attention forms below split it)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)


def positions(length: int):
    index = torch.arange(length)
    return index[:, None], index[None, :]  # query i, key j


MASKS = {
    # name: (function (length, attention_mask) -> visible, broadcastable to (batch, heads, q, k); expected kind, window)
    "causal": (lambda n, am: positions(n)[1] <= positions(n)[0], "causal", None),
    "window_4": (lambda n, am: (positions(n)[1] <= positions(n)[0]) & (positions(n)[0] - positions(n)[1] < 4),
                 "sliding_window", 4),
    "window_7_written_as_gt": (lambda n, am: (positions(n)[1] > positions(n)[0] - 7)
                               & (positions(n)[1] <= positions(n)[0]), "sliding_window", 7),
    "bidirectional": (lambda n, am: positions(n)[0] >= 0, "none", None),
    # Traps: causal at length 17, not at length >= 22.
    "causal_until_21": (lambda n, am: (positions(n)[1] <= positions(n)[0])
                        | (positions(n)[1] - positions(n)[0] > 20), "arbitrary", None),
    "band_both_ways": (lambda n, am: (positions(n)[0] - positions(n)[1]).abs() < 3, "arbitrary", None),
    "chunked_4": (lambda n, am: (positions(n)[0] // 4 == positions(n)[1] // 4)
                  & (positions(n)[1] <= positions(n)[0]), "chunked", None),
    "blocks_both_ways": (lambda n, am: positions(n)[0] // 4 == positions(n)[1] // 4, "arbitrary", None),
    "query_padding": (lambda n, am: (positions(n)[1] <= positions(n)[0]) & am.bool()[:, None, :, None],
                      "arbitrary", None),
    "causal_and_padding": (lambda n, am: (positions(n)[1] <= positions(n)[0]) & am.bool()[:, None, None, :],
                           "causal", None),
    "window_and_padding_from_ints": (lambda n, am: (positions(n)[1] <= positions(n)[0])
                                     & (positions(n)[1] > positions(n)[0] - 5) & (am[:, None, None, :] != 0),
                                     "sliding_window", 5),
}


class Masked(nn.Module):
    """q·kᵀ with a masked_fill(~visible) of a mask built by `name`'s function."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x, attention_mask):
        batch, length, _ = x.shape
        q, k, v = (t.view(batch, length, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        visible = MASKS[self.name][0](length, attention_mask)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf")) * 0.5
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, DIM)


class Stack(nn.Module):
    def __init__(self, names):
        super().__init__()
        self.layers = nn.ModuleDict({name: Masked(name) for name in names})

    def forward(self, x, attention_mask):
        return sum(layer(x, attention_mask) for layer in self.layers.values())


def inputs(batch: int, length: int, pad: int = 3):
    mask = torch.ones(batch, length, dtype=torch.long)
    if length > pad:
        mask[-1, length - pad:] = 0  # right padding: every query keeps at least its first key
    return torch.randn(batch, length, DIM), mask


def test_mask_kinds_are_proved_for_every_length_and_traps_stay_arbitrary():
    model = Stack(list(MASKS)).eval()
    graph_module, sites, plan = rewrite_exactly(model, inputs(2, 17))
    by_name = {site.name.split(".")[-1]: site for site in sites}
    assert sorted(by_name) == sorted(MASKS)
    for name, (_, kind, window) in MASKS.items():
        site = by_name[name]
        assert site.mask.kind == kind, (name, site.mask.proof)
        assert site.mask.window == window, name
        if kind == "arbitrary":
            assert site.mask.tensor is not None and "kept exactly" in site.mask.proof, name
        else:
            assert "for every length" in site.mask.proof, name
    assert by_name["chunked_4"].mask.chunk == 4
    assert by_name["causal_and_padding"].mask.key_padding == "attention_mask"
    assert by_name["window_and_padding_from_ints"].mask.key_padding == "attention_mask"
    # Exact at the capture length and at lengths on either side of the traps' turning point, 1 and 2 included.
    # Padded queries are left out: "query_padding" masks their every key (NaN in the original, 0 in the rewrite).
    for batch, length in ((2, 17), (3, 23), (2, 40), (1, 1), (2, 2)):
        x, attention_mask = inputs(batch, length)
        assert_same(model, graph_module, (x, attention_mask), rows=attention_mask.bool())


def test_kept_mask_tensors_are_rewritten_exactly():
    """An arbitrary mask keeps its tensor: the rewrite still runs the tiled op, with the tensor, exactly."""
    model = Stack(["causal_until_21", "blocks_both_ways"]).eval()
    graph_module, sites, plan = rewrite_exactly(model, inputs(2, 17))
    assert all(decision.rewritten for decision in plan.decisions)
    x, attention_mask = inputs(2, 31)
    assert_same(model, graph_module, (x, attention_mask))


# -- the evaluator and the classifier on their own ------------------------------------------------------------------

def traced(function, *args):
    from passes.capture import capture

    class One(nn.Module):
        def forward(self, first):
            return function(first)

    class Two(nn.Module):
        def forward(self, first, second):
            return function(first, second)

    return capture(One() if len(args) == 1 else Two(), args).graph_module


def output_node(graph_module):
    return next(node for node in graph_module.graph.nodes if node.op == "output").args[0][0]


def test_evaluator_reads_reshapes_back_into_atom_indices():
    """A (batch*heads, q, k) mask built by expanding a (batch, 1, 1, k) padding and flattening batch and heads."""

    def build(padding, x):
        batch, length = padding.shape
        additive = torch.zeros(batch, length).masked_fill(padding, float("-inf"))
        return additive.view(batch, 1, 1, length).expand(-1, 3, -1, -1).reshape(batch * 3, 1, length)

    graph_module = traced(build, torch.zeros(2, 9, dtype=torch.bool), torch.randn(2, 9))
    b, h, i, j = (index_symbol(name) for name in "bhij")
    evaluator = SymbolicEvaluator(graph_module)
    evaluator.bounds.update({h: 3})
    value = evaluator.value(output_node(graph_module), (b * 3 + h, sympy.Integer(0), j))
    assert value == sympy.Piecewise((-sympy.oo, sympy.Ne(sympy.Function("input_first")(b, j), 0)), (0, True))


def test_classifier_decides_at_every_breakpoint():
    """A window of 1000 keys: decided exactly from a handful of samples, not by enumerating positions."""

    def build(x):
        length = x.shape[1]
        query, key = positions(length)
        return (key <= query) & (key > query - 1000)

    graph_module = traced(build, torch.randn(2, 17))
    space = IndexSpace((), (index_symbol("i"),), (index_symbol("j"),),
                       {index_symbol("i"): sympy.Symbol("s0", positive=True, integer=True),
                        index_symbol("j"): sympy.Symbol("s0", positive=True, integer=True)})
    term = MaskTerm("keep", output_node(graph_module), ((index_symbol("i"),), (index_symbol("j"),)))
    analysis = analyze_mask(graph_module, [term], space, check_lengths=())
    assert (analysis.spec.kind, analysis.spec.window) == ("sliding_window", 1000)


def test_sdpa_bool_mask_with_padding_input_from_transformers_style_vmap_free_build():
    """SDPA with a 4-D bool mask built from arange comparisons and an attention_mask input: causal + padding."""

    class Model(FusedQKV):
        def forward(self, x, attention_mask):
            batch, length, _ = x.shape
            q, k, v = (t.view(batch, length, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
            cache_position = torch.arange(length)
            kv_index = torch.arange(length)
            visible = (kv_index[None, None, None, :] <= cache_position[None, None, :, None])
            visible = visible & attention_mask.to(torch.bool)[:, None, None, :]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
            return out.transpose(1, 2).reshape(batch, length, DIM)

    model = Model().eval()
    graph_module, sites, plan = rewrite_exactly(model, inputs(2, 17))
    (site,) = sites
    assert site.mask.kind == "causal" and site.mask.key_padding == "attention_mask"
    assert plan.decisions[0].rewritten
    x, attention_mask = inputs(3, 11)
    assert_same(model, graph_module, (x, attention_mask))


def test_numeric_check_catches_a_wrong_symbolic_result(monkeypatch):
    """The run at several lengths is an independent check: an evaluator that misreads tril as a band of 3 yields a
    sliding-window claim that the mask subgraph contradicts, and the mask stays arbitrary (its tensor kept)."""
    import passes.detect_symbolic as symbolic
    import passes.masks as masks

    def wrong_tril(evaluator, node, index):
        return sympy.And(sympy.Le(index[-1], index[-2]), sympy.Lt(index[-2] - index[-1], 3))

    class TrilMasked(FusedQKV):
        def forward(self, x):
            batch, length, _ = x.shape
            q, k, v = (t.view(batch, length, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
            visible = torch.ones(length, length, dtype=torch.bool).tril()
            scores = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
            return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, DIM)

    monkeypatch.setitem(symbolic.HANDLERS, torch.ops.aten.tril.default, wrong_tril)
    monkeypatch.setattr(masks, "_ANALYSES", masks.weakref.WeakKeyDictionary())
    model = TrilMasked().eval()
    graph_module, sites, plan = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.mask.kind == "arbitrary" and "numeric check" in site.mask.proof
    assert_same(model, graph_module, (torch.randn(2, 9, DIM),))  # the kept tensor keeps it exact
