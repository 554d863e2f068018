"""The detector on every form of softmax attention that model code writes, and the exact rewrite of what it finds.

Each form is captured with torch.export, detected, rewritten with the exact tiled op, and compared with the original
module on fresh inputs at the capture length and at another (odd) length and batch: the rewrite must hold for every
length, since the proof of its mask does.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import planner

from detector_support import (  # noqa: F401  (strict_matchers is an autouse fixture)
    assert_same,
    detect,
    flash_calls,
    rewrite_exactly,
    strict_matchers,
)

DIM, HEADS, HEAD_DIM = 32, 4, 8


class FusedQKV(nn.Module):
    """A fused q, k, v projection of DIM features (the attention forms below split it)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class ManualAttention(nn.Module):
    """q·kᵀ, scaled one of four ways, masked one of four ways, softmax (float32 upcast), dropout, ·v."""

    def __init__(self, scale_on: str = "scores", mask: str = "causal_fill", kv_heads: int = HEADS):
        super().__init__()
        self.scale_on, self.mask, self.kv_heads = scale_on, mask, kv_heads
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, kv_heads * HEAD_DIM)
        self.v = nn.Linear(DIM, kv_heads * HEAD_DIM)
        self.o = nn.Linear(DIM, DIM)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = split_heads(self.q(x), HEADS), split_heads(self.k(x), self.kv_heads), split_heads(self.v(x),
                                                                                                 self.kv_heads)
        if self.kv_heads != HEADS:  # repeat_kv as transformers writes it
            groups = HEADS // self.kv_heads
            k = k[:, :, None].expand(batch, self.kv_heads, groups, length, HEAD_DIM).reshape(batch, HEADS, length,
                                                                                             HEAD_DIM)
            v = v[:, :, None].expand(batch, self.kv_heads, groups, length, HEAD_DIM).reshape(batch, HEADS, length,
                                                                                             HEAD_DIM)
        scale = HEAD_DIM**-0.5
        if self.scale_on == "query":
            scores = (q * scale) @ k.transpose(-2, -1)
        elif self.scale_on == "split":
            scores = (q * scale**0.5) @ (k * scale**0.5).transpose(-2, -1)
        elif self.scale_on == "division":
            scores = q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * scale
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        if self.mask == "causal_fill":
            scores = scores.masked_fill(~causal, float("-inf"))
        elif self.mask == "causal_where":
            scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        elif self.mask == "causal_additive":
            scores = scores + torch.zeros(length, length).masked_fill(~causal, float("-inf"))
        weights = self.dropout(F.softmax(scores.float(), dim=-1).to(q.dtype))
        out = weights @ v
        return self.o(out.transpose(1, 2).reshape(batch, length, DIM))


class Stack(nn.Module):
    """Several attention modules in a row: one capture checks many forms (export dominates the test time)."""

    def __init__(self, **layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        for layer in self.layers.values():
            x = x + layer(x)
        return x


SCALINGS = ("scores", "query", "division", "split")
MASKS = ("causal_fill", "causal_where", "causal_additive", "none")


def test_manual_attention_scale_anywhere_and_every_mask_form():
    layers = {f"scale_{name}": ManualAttention(scale_on=name) for name in SCALINGS}
    layers.update({f"mask_{name}": ManualAttention(mask=name) for name in MASKS})
    model = Stack(**layers).eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    by_name = {site.name: site for site in sites}
    assert sorted(by_name) == sorted(f"layers.{name}" for name in layers)
    for name, site in by_name.items():
        assert site.form == "manual"
        assert site.scale == pytest.approx(HEAD_DIM**-0.5, rel=1e-12), name
        assert (site.heads, site.kv_heads, site.head_dim, site.value_dim) == (HEADS, HEADS, HEAD_DIM, HEAD_DIM)
        assert site.mask.kind == ("none" if name.endswith("_none") else "causal"), name
        if site.mask.kind == "causal":
            assert "for every length" in site.mask.proof and "257" in site.mask.proof
    assert flash_calls(graph_module) == len(layers)
    assert not any(node.target == torch.ops.aten.softmax.int for node in graph_module.graph.nodes)
    assert_same(model, graph_module, (torch.randn(2, 17, DIM),))
    assert_same(model, graph_module, (torch.randn(3, 29, DIM),))


def test_repeat_kv_folds_back_to_kv_heads():
    model = ManualAttention(kv_heads=2).eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert (site.heads, site.kv_heads) == (HEADS, 2)
    assert site.key == "linear_1" and site.value == "linear_2"  # the projections, before the repeat
    call = next(node for node in graph_module.graph.nodes if "flash_attention" in str(node.target))
    assert call.args[1].meta.get("val") is None or call.args[1].meta["val"].shape[1] == 2
    assert_same(model, graph_module, (torch.randn(3, 19, DIM),))


class EinsumAttention(FusedQKV):
    """einsum with heads last in the layout (b, l, h, d), a fused qkv projection split with chunk."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)) for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * HEAD_DIM**-0.5
        weights = scores.softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)


def test_einsum_attention_with_heads_last():
    model = EinsumAttention().eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.form == "einsum" and site.mask.kind == "none" and site.heads == HEADS
    assert_same(model, graph_module, (torch.randn(3, 21, DIM),))


class TransposedKeyEinsum(FusedQKV):
    """k is stored transposed ((b, h, d, l)); the contraction's index algebra, not the position, says which axis
    is the sequence."""

    def forward(self, x):
        q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
        k_transposed = k.transpose(-1, -2).contiguous()
        scores = torch.einsum("bhqd,bhdk->bhqk", q, k_transposed) / math.sqrt(HEAD_DIM)
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_transposed_key_is_read_by_index_algebra():
    model = TransposedKeyEinsum().eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.head_dim == HEAD_DIM and site.heads == HEADS
    assert_same(model, graph_module, (torch.randn(2, 13, DIM),))


class NeoXBaddbmm(FusedQKV):
    """GPT-NeoX's original form: baddbmm(zeros, q, kᵀ, beta=1, alpha=1/sqrt(d)) on (batch*heads, l, d)."""

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = (split_heads(t, HEADS).reshape(batch * HEADS, length, HEAD_DIM)
                   for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.baddbmm(torch.zeros(batch * HEADS, length, length), q, k.transpose(1, 2), beta=1.0,
                               alpha=1 / math.sqrt(HEAD_DIM))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.view(batch, HEADS, length, length).masked_fill(~causal, torch.finfo(x.dtype).min)
        weights = scores.softmax(-1).view(batch * HEADS, length, length)
        return torch.bmm(weights, v).view(batch, HEADS, length, HEAD_DIM).transpose(1, 2).reshape(batch, length, DIM)


def test_baddbmm_with_alpha():
    model = NeoXBaddbmm().eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.form == "baddbmm" and site.mask.kind == "causal"
    assert site.scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
    assert_same(model, graph_module, (torch.randn(3, 15, DIM),))


def alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (index + 1) / heads) for index in range(heads)])


class BloomAlibi(FusedQKV):
    """Bloom: baddbmm(alibi, q, kᵀ, beta=1, alpha=1/sqrt(d)), alibi = slopes[h] * key position, plus a causal fill."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(HEADS))

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = (split_heads(t, HEADS).reshape(batch * HEADS, length, HEAD_DIM)
                   for t in self.qkv(x).chunk(3, dim=-1))
        positions = torch.arange(length, dtype=x.dtype)
        alibi = (self.slopes[:, None] * positions[None, :]).repeat(batch, 1)[:, None, :]  # (b*h, 1, l)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(HEAD_DIM))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.view(batch, HEADS, length, length).masked_fill(~causal, torch.finfo(x.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).view(batch * HEADS, length, length)
        return torch.bmm(weights, v).view(batch, HEADS, length, HEAD_DIM).transpose(1, 2).reshape(batch, length, DIM)


def test_baddbmm_with_alibi_bias_keeps_the_bias():
    model = BloomAlibi().eval()
    graph_module, sites, plan = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.mask.kind == "causal" and site.mask.bias is not None and site.mask.tensor is not None
    assert "bias" in site.mask.proof
    assert plan.decisions[0].rewritten  # the bias runs as a kept additive tensor, exactly
    assert_same(model, graph_module, (torch.randn(2, 19, DIM),))


class RelativeBias(nn.Module):
    """T5-style: no scaling, a learned bias per (head, clipped relative position) added to the scores."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.table = nn.Embedding(9, HEADS)

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
        positions = torch.arange(length)
        relative = (positions[None, :] - positions[:, None]).clamp(-4, 4) + 4
        bias = self.table(relative).permute(2, 0, 1)[None]  # (1, h, l, l)
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        return (weights @ v).transpose(1, 2).reshape(batch, length, DIM)


def test_unscaled_relative_position_bias():
    from planner.pipeline import rewrite
    from planner.records import Candidate, Plan, SiteDecision

    model = RelativeBias().eval()
    graph_module, sites = detect(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.scale == 1.0
    assert site.mask.kind == "bias" and site.mask.bias == site.mask.tensor is not None
    # Rewritten with the tiled op whatever the planner's policy on bias sites: the bias is kept as a tensor.
    flash = Candidate("flash", "blockwise", "exact", 0.0, 0.0, True, "test")
    rewrite(graph_module, Plan(device=None, policy="exact", max_len=1, decisions=(SiteDecision(site, (), flash, ""),)))
    assert flash_calls(graph_module) == 1
    assert_same(model, graph_module, (torch.randn(2, 11, DIM),))


class SoftCapped(nn.Module):
    """Gemma-2: scores · scale, then cap · tanh(scores / cap), then the causal mask."""

    def __init__(self, cap: float = 30.0):
        super().__init__()
        self.cap = cap
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
        scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
        scores = torch.tanh(scores / self.cap) * self.cap
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, DIM)


def test_soft_capping_is_recorded_and_rewritten_exactly():
    model = SoftCapped().eval()
    graph_module, sites, plan = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.softcap == pytest.approx(30.0)
    assert site.scale == pytest.approx(HEAD_DIM**-0.5)
    assert site.mask.kind == "causal"
    assert plan.decisions[0].rewritten  # the tiled kernels take the cap: same function
    assert_same(model, graph_module, (torch.randn(2, 17, DIM),))


class Sinks(FusedQKV):
    """gpt-oss: a learned sink logit per head concatenated to the scores, dropped after the softmax."""

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(HEADS))

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
        scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(batch, -1, length, -1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        weights = F.softmax(logits, dim=-1)[..., :-1]
        return (weights @ v).transpose(1, 2).reshape(batch, length, DIM)


def test_attention_sinks_are_recorded_and_rewritten_exactly():
    model = Sinks().eval()
    graph_module, sites, plan = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.sinks == "sinks" and site.mask.kind == "causal"
    assert plan.decisions[0].rewritten
    assert_same(model, graph_module, (torch.randn(2, 17, DIM),))


class NanoGPTBlock(nn.Module):
    """nanoGPT's CausalSelfAttention in a pre-norm block: the causal mask is a registered tril buffer, sliced."""

    def __init__(self, block_size: int = 64):
        super().__init__()
        self.ln = nn.LayerNorm(DIM)
        self.c_attn = nn.Linear(DIM, 3 * DIM)
        self.c_proj = nn.Linear(DIM, DIM)
        self.attn_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size,
                                                                                            block_size))
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        batch, length, channels = x.size()
        q, k, v = self.c_attn(self.ln(x)).split(DIM, dim=2)
        k = k.view(batch, length, HEADS, channels // HEADS).transpose(1, 2)
        q = q.view(batch, length, HEADS, channels // HEADS).transpose(1, 2)
        v = v.view(batch, length, HEADS, channels // HEADS).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :length, :length] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(batch, length, channels)
        x = x + self.c_proj(y)
        return x + self.mlp(x)


def test_nanogpt_block_proves_its_buffer_mask():
    model = NanoGPTBlock().eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.mask.kind == "causal"
    assert "buffer bias is tril" in site.mask.proof
    assert_same(model, graph_module, (torch.randn(3, 37, DIM),))


def test_sdpa_forms():
    class SdpaForms(FusedQKV):
        def __init__(self):
            super().__init__()
            self.kv = nn.Linear(DIM, 2 * 2 * HEAD_DIM)

        def forward(self, x):
            batch, length, _ = x.shape
            q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
            k2, v2 = (split_heads(t, 2) for t in self.kv(x).chunk(2, dim=-1))
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            additive = torch.zeros(length, length).masked_fill(~causal, float("-inf"))
            outputs = [
                F.scaled_dot_product_attention(q, k, v, is_causal=True),
                F.scaled_dot_product_attention(q, k, v, attn_mask=causal),
                F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=0.2),
                F.scaled_dot_product_attention(q, k2, v2, is_causal=True, enable_gqa=True),
                F.scaled_dot_product_attention(q, k, v),
            ]
            return sum(output.transpose(1, 2).reshape(batch, length, DIM) for output in outputs)

    model = SdpaForms().eval()
    graph_module, sites, plan = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    assert [site.form for site in sites] == ["sdpa"] * 5
    assert [site.mask.kind for site in sites] == ["causal", "causal", "causal", "causal", "none"]
    assert sites[2].scale == pytest.approx(0.2)
    assert (sites[3].heads, sites[3].kv_heads) == (HEADS, 2)
    assert all(decision.rewritten for decision in plan.decisions)
    assert flash_calls(graph_module) == 5
    assert_same(model, graph_module, (torch.randn(3, 21, DIM),))


class MultiheadWrapper(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(DIM, HEADS, dropout=0.1, batch_first=batch_first)
        self.batch_first, self.need_weights = batch_first, need_weights

    def forward(self, x, key_padding_mask):
        length = x.shape[1 if self.batch_first else 0]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        return self.attention(x, x, x, key_padding_mask=key_padding_mask, attn_mask=causal,
                              need_weights=self.need_weights)[0]


def padding_mask(batch: int, length: int, pad_last: int = 3) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, length - pad_last:] = True  # True = padded key (nn.MultiheadAttention's convention)
    return mask


@pytest.mark.parametrize("batch_first, need_weights", [(True, True), (False, False), (True, False)])
def test_multihead_attention(batch_first, need_weights):
    model = MultiheadWrapper(batch_first, need_weights).eval()

    def inputs(batch, length):
        x = torch.randn(batch, length, DIM) if batch_first else torch.randn(length, batch, DIM)
        return x, padding_mask(batch, length)

    graph_module, sites, _ = rewrite_exactly(model, inputs(2, 17))
    (site,) = sites
    assert site.form == ("baddbmm" if need_weights else "sdpa")
    assert site.mask.kind == "causal" and site.mask.key_padding == "key_padding_mask"
    assert flash_calls(graph_module) == 1
    assert_same(model, graph_module, inputs(2, 17))
    assert_same(model, graph_module, inputs(3, 9))


def test_transformer_encoder_with_padding():
    layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, x, padding):
            return self.encoder(x, src_key_padding_mask=padding)

    model = Encoder().eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM), padding_mask(2, 17)))
    assert len(sites) == 2 and all(site.mask.kind == "padding" for site in sites)
    x, padding = torch.randn(3, 13, DIM), padding_mask(3, 13)
    assert_same(model, graph_module, (x, padding), rows=~padding)


class ClassifierAndRouter(nn.Module):
    """Softmaxes that are not attention: a mixture-of-experts router (softmax of x·W, top-k, weighted experts,
    combined with an einsum) and a classifier head."""

    def __init__(self):
        super().__init__()
        self.router = nn.Parameter(torch.randn(DIM, 4))
        self.experts = nn.Linear(DIM, 4 * DIM)
        self.head = nn.Linear(DIM, 5)

    def forward(self, x):
        weights = torch.softmax(x @ self.router, dim=-1)  # (b, l, experts)
        top, _ = weights.topk(2, dim=-1)
        experts = self.experts(x).unflatten(-1, (4, DIM))  # (b, l, experts, dim)
        mixed = torch.einsum("ble,bled->bld", weights, experts) * top.sum(-1, keepdim=True)
        return torch.softmax(self.head(mixed.mean(1)), dim=-1)


def test_router_and_classifier_softmax_are_not_sites():
    _, sites = detect(ClassifierAndRouter().eval(), (torch.randn(2, 17, DIM),))
    assert sites == []


class QueryAxisSoftmax(FusedQKV):
    """A softmax over the queries (dim=-2): attention-shaped, but not attention; recognized, left alone."""

    def forward(self, x):
        q, k, v = (split_heads(t, HEADS) for t in self.qkv(x).chunk(3, dim=-1))
        return ((q @ k.transpose(-1, -2)).softmax(dim=-2) @ v).sum()


def test_unsupported_site_is_recorded_and_left_exact():
    model = QueryAxisSoftmax().eval()
    graph_module, sites, plan = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.unsupported and "keys" in site.unsupported
    assert not plan.decisions[0].rewritten
    assert_same(model, graph_module, (torch.randn(2, 17, DIM),))


def test_matcher_errors_leave_the_node_alone(monkeypatch):
    import passes.match as match_module

    def broken(node):
        raise RuntimeError("matcher bug")

    monkeypatch.setattr(match_module, "STRICT", False)
    monkeypatch.setattr(match_module, "MATCHERS", [broken])
    model = ManualAttention().eval()
    graph_module, sites, _ = rewrite_exactly(model, (torch.randn(2, 17, DIM),))
    assert sites == []
    assert_same(model, graph_module, (torch.randn(2, 17, DIM),))


def test_training_mode_dropout_is_recorded_and_left_exact():
    model = ManualAttention(kv_heads=2).train()
    _, sites = detect(model, (torch.randn(2, 17, DIM),))
    (site,) = sites
    assert site.dropout_p == pytest.approx(0.1) and site.kv_heads == 2


def test_core_aten_graph_after_decompositions():
    """The same detector on core ATen (matmul -> expand/view/bmm, softmax -> _softmax, masked_fill -> where), the
    level of graph that the torch.compile backend sees."""
    from passes.match import find_sites
    from planner.pipeline import rewrite
    from detector_support import exact_plan

    model = Stack(gqa=ManualAttention(kv_heads=2), einsum=EinsumAttention(), nanogpt=NanoGPTBlock()).eval()
    example = torch.randn(2, 17, DIM)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO,
                                                                       1: torch.export.Dim.AUTO},), strict=False)
    graph_module = exported.run_decompositions().module()
    sites = find_sites(graph_module)
    assert [(site.mask.kind, site.heads, site.kv_heads) for site in sites] == [("causal", HEADS, 2),
                                                                               ("none", HEADS, HEADS),
                                                                               ("causal", HEADS, HEADS)]
    rewrite(graph_module, exact_plan(sites))
    assert flash_calls(graph_module) == 3
    assert_same(model, graph_module, (torch.randn(3, 19, DIM),))


def test_grouped_query_heads_with_a_batch_of_one_are_reported_as_heads():
    # With batch 1 the batch axis vanishes from the index algebra; the kv heads must not be taken for it.
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=16, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 128, (1, 37))
    site = planner.find_attention(model, (input_ids,), {"use_cache": False})[0]
    assert (site.batch, site.heads, site.kv_heads, site.head_dim) == (1, 16, 2, 16)
    optimized = planner.optimize(model, "8k", device="h200", example_inputs=(input_ids,),
                                 example_kwargs={"use_cache": False}, variant="flash")
    other = torch.randint(0, 128, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(optimized(other).logits, model(other, use_cache=False).logits, atol=1e-5,
                                   rtol=1e-5)


def test_returned_attention_weights_keep_the_site_with_the_reason():
    """need_weights=True with the weights returned: the quadratic matrix is an output, so rewriting saves nothing;
    the site is kept (the outputs, weights included, are the original's)."""

    class ReturnsWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x, need_weights=True)

    model = ReturnsWeights().eval()
    fast = planner.optimize(model, "32k", "h200", example_inputs=(torch.randn(2, 17, DIM),))
    (decision,) = fast.report.decisions
    assert decision.choice is None or decision.choice.variant == "dense"
    assert "attention weights are used beyond the product with V" in decision.reason
    x = torch.randn(3, 11, DIM)
    with torch.no_grad():
        for got, expected in zip(fast(x), model(x)):
            torch.testing.assert_close(got, expected)


class DropsItsWeights(FusedQKV):
    """Views its attention weights (after dropout) as a layer that returns them would, and its caller drops them
    (ProphetNet's main stream): nothing keeps the probabilities once the site is rewritten."""

    def forward(self, x):
        q, k, v = (split_heads(part, HEADS) for part in self.qkv(x).chunk(3, dim=-1))
        probabilities = F.dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1), 0.0,
                                  self.training)
        out = probabilities @ v
        self.weights = probabilities.view(x.shape[0], HEADS, x.shape[1], -1)  # kept, never returned
        return out.transpose(1, 2).reshape(x.shape)


def test_a_rewritten_site_leaves_no_softmax_behind():
    model = DropsItsWeights().eval()
    fast = planner.optimize(model, "32k", "h200", example_inputs=(torch.randn(2, 17, DIM),))
    assert flash_calls(fast.graph_module) == 1
    assert not any("softmax" in str(node.target) for node in fast.graph_module.graph.nodes)
    assert_same(model, fast, (torch.randn(3, 11, DIM),))


class VmapMask(FusedQKV):
    """A mask built with torch.vmap (as transformers builds some): export records the vmap level entered and left
    around the batched ops, calls that nothing uses the value of."""

    def forward(self, x):
        positions = torch.arange(x.shape[1])
        visible = torch.vmap(lambda row: positions <= row)(positions)
        q, k, v = (split_heads(part, HEADS) for part in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return out.transpose(1, 2).reshape(x.shape)


def test_a_mask_built_with_vmap_runs_after_the_rewrite():
    model = VmapMask().eval()
    fast = planner.optimize(model, "32k", "h200", example_inputs=(torch.randn(2, 17, DIM),))
    assert_same(model, fast, (torch.randn(3, 11, DIM),))
    assert not any("the original" in note for note in fast.report.notes), fast.report.notes


class MultiplicativeMask(FusedQKV):
    """OpenAI GPT's mask, w * b + -1e4 * (1 - b), and CPM-Ant's zeroing of masked probabilities after the softmax:
    ops the paths do not model. The site is found and kept, with the reason."""

    def __init__(self, after_softmax: bool):
        super().__init__()
        self.after_softmax = after_softmax
        self.register_buffer("bias", torch.ones(64, 64).tril().view(1, 1, 64, 64))

    def forward(self, x):
        length = x.shape[1]
        q, k, v = (split_heads(part, HEADS) for part in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        visible = self.bias[:, :, :length, :length]
        if self.after_softmax:
            probabilities = torch.softmax(scores.masked_fill(visible == 0, float("-inf")), dim=-1)
            probabilities = probabilities.masked_fill(visible == 0, 0.0)
        else:
            probabilities = torch.softmax(scores * visible + -1e4 * (1 - visible), dim=-1)
        return (probabilities @ v).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("after_softmax", [False, True])
def test_attention_through_unmodeled_ops_is_found_and_kept_with_the_reason(after_softmax):
    model = MultiplicativeMask(after_softmax).eval()
    fast = planner.optimize(model, "32k", "h200", example_inputs=(torch.randn(2, 17, DIM),))
    (decision,) = fast.report.decisions
    assert not decision.rewritten and "the matcher does not model" in decision.site.unsupported
    assert ("masked_fill" if after_softmax else "mul") in decision.site.unsupported
    assert_same(model, fast, (torch.randn(3, 11, DIM),))
