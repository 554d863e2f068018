"""Tanh soft-capping (Gemma-2) and attention-sink logits (gpt-oss) in the exact tiled attention.

The reference (backends/flash/naive.py) is checked against the models' own formulas (cap, mask, concatenate the sink
logit, softmax, drop it); the blockwise loop (float64) and the Triton kernel (float32/float16, on the CPU under
TRITON_INTERPRET=1) against the reference, forward and gradients of q, k, v and the sink logits; the planner rewrites
the Gemma-2 and gpt-oss models of the corpus and their outputs and gradients stay the same.
"""
from __future__ import annotations

import os

import pytest
import torch

import backends.flash.blockwise as blockwise
from backends import flash_attention, sliding_window_attention
from backends.flash.naive import attention_reference, expand_kv_heads, visible_keys
from backends.flash.op import flash_attention_op, tiled_attention
from backends.registry import VARIANTS, PlanContext
from planner.devices import BUILTIN_DEVICES
from planner.errors import BackendError
from planner.records import AttentionSite, MaskSpec

TRITON_RUNS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, window, sinks (first keys kept), padding, softcap,
# sink logits
CASES = [
    (2, 4, 2, 77, 77, 16, True, None, 0, True, 5.0, True),  # GQA, padding that empties causal rows
    (1, 2, 2, 130, 130, 32, False, None, 0, False, 3.0, False),  # soft-capping alone
    (1, 4, 1, 77, 77, 16, True, 9, 0, False, None, True),  # sink logits alone, causal window
    (2, 2, 1, 45, 77, 16, False, 6, 0, True, 8.0, True),  # band without causality, fewer queries than keys
    (1, 2, 1, 77, 77, 16, True, 8, 2, True, 2.0, True),  # streaming sinks, soft-capping and sink logits together
]


def _inputs(case, dtype, device="cpu"):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, window, sinks, padding, softcap, with_sink = case
    generator = torch.Generator().manual_seed(hash(case) % 2**31)
    make = lambda heads, length: torch.randn(batch, heads, length, head_dim, generator=generator)
    # Scaled queries: scores reach several units, so that the tanh cap bends them.
    q, k, v = make(q_heads, q_len) * 2.5, make(kv_heads, kv_len), make(kv_heads, kv_len)
    key_padding_mask = None
    if padding:
        key_padding_mask = torch.rand(batch, kv_len, generator=generator) > 0.2
        key_padding_mask[-1, :20] = False  # causal rows 0..19 of the last batch see no key at all
    sink_logits = torch.randn(q_heads, generator=generator) * 2 if with_sink else None
    options = dict(causal=causal, window=window, sinks=sinks, scale=head_dim**-0.5, softcap=softcap,
                   key_padding_mask=None if key_padding_mask is None else key_padding_mask.to(device))
    tensors = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    # Sink logits in float32, as models keep them (float64 with float64 inputs: the gradient comes in their dtype).
    sink_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sink_logits = None if sink_logits is None else sink_logits.to(device=device, dtype=sink_dtype)
    return tensors, sink_logits, options


def _loss(out, lse, grad_out, grad_lse):
    finite_lse = torch.where(torch.isinf(lse), 0.0, lse)
    return (out * grad_out).sum() + (finite_lse * grad_lse).sum()


def _reference(tensors, sink_logits, options, grad_out, grad_lse):
    """Out, lse and the gradients of (q, k, v, sink_logits) in float64 through the dense reference."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in tensors]
    sink = None if sink_logits is None else sink_logits.detach().cpu().double().requires_grad_()
    padding = options["key_padding_mask"]
    out, lse = attention_reference(*leaves, return_lse=True, sink_logits=sink,
                                   **{**options, "key_padding_mask": None if padding is None else padding.cpu()})
    inputs = leaves + ([sink] if sink is not None else [])
    grads = torch.autograd.grad(_loss(out, lse, grad_out.cpu().double(), grad_lse.cpu().double()), inputs)
    return out, lse, grads


def _run(tensors, sink_logits, options, impl):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    sink = None if sink_logits is None else sink_logits.detach().clone().requires_grad_()
    out, lse = tiled_attention(*leaves, return_lse=True, impl=impl, sink_logits=sink, **options)
    return leaves, sink, out, lse


def _assert_close(name, actual, expected, tolerance):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual.detach().cpu().double() - expected.double()).abs().max().item()
    assert error <= tolerance, f"{name}: max abs error {error:.3e} > {tolerance:.1e}"


def _check_against_reference(case, dtype, impl, tolerance, device="cpu"):
    tensors, sink_logits, options = _inputs(case, dtype, device)
    leaves, sink, out, lse = _run(tensors, sink_logits, options, impl)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    expected_out, expected_lse, expected_grads = _reference(tensors, sink_logits, options, grad_out, grad_lse)
    empty_rows = ~_visible(case, options).any(-1)
    if case[9]:
        assert empty_rows.any()  # the case does exercise rows with no visible key
    assert (out.detach().cpu()[empty_rows.expand_as(out[..., 0])] == 0).all()
    _assert_close("out", out, expected_out, tolerance)
    if sink_logits is not None:  # no -inf row: the sink logit is always in the denominator
        assert torch.isfinite(lse).all()
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(expected_lse))
    finite = ~torch.isinf(expected_lse)
    _assert_close("lse", lse.cpu()[finite], expected_lse[finite], tolerance)
    inputs = leaves + ([sink] if sink is not None else [])
    grads = torch.autograd.grad(_loss(out, lse, grad_out, grad_lse), inputs)
    for name, grad, expected in zip(("dq", "dk", "dv", "d_sink_logits"), grads, expected_grads):
        # The sink gradient sums over every row of every batch: its error grows with them.
        scale = 1.0 if name != "d_sink_logits" else max(1.0, expected.abs().max().item())
        _assert_close(name, grad, expected, tolerance * 4 * scale)


def _visible(case, options):
    """(batch, 1, queries, keys) visibility, independently of the kernels (for the empty-row check)."""
    batch, _, _, q_len, kv_len = case[:5]
    visible = visible_keys(torch.arange(q_len), torch.arange(kv_len), causal=options["causal"],
                           window=options["window"], sinks=options["sinks"])[None, None]
    if options["key_padding_mask"] is not None:
        visible = visible & options["key_padding_mask"].cpu()[:, None, None, :]
    return visible


def test_reference_is_the_models_formula():
    """Gemma-2 caps the scaled scores then masks; gpt-oss concatenates the sink logit, softmaxes, drops it."""
    case = CASES[0]
    (q, k, v), sink_logits, options = _inputs(case, torch.float64)
    softcap, scale = options["softcap"], options["scale"]
    scores = q @ expand_kv_heads(k, q.shape[1]).transpose(-1, -2) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_visible(case, options), float("-inf"))
    sinks = sink_logits.double().reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1)
    logits = torch.cat([scores, sinks], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probabilities = torch.softmax(logits, dim=-1)[..., :-1]
    expected = probabilities @ expand_kv_heads(v, q.shape[1])
    out, lse = attention_reference(q, k, v, sink_logits=sink_logits, return_lse=True, **options)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(torch.cat([scores, sinks], dim=-1), dim=-1), atol=1e-12,
                               rtol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=[f"case{index}" for index in range(len(CASES))])
def test_blockwise_matches_reference(case, monkeypatch):
    # Small blocks so that the lengths cross several tiles and the merge (with the sink last) is exercised.
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 32)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 32)
    _check_against_reference(case, torch.float64, "blockwise", 1e-10)


def test_blockwise_fused_tiles_with_sink_logits_and_additive_mask(monkeypatch):
    """Sink logits over the fused CPU tiles (no padding, no cap), and soft-capping with an additive mask tensor."""
    monkeypatch.setattr(blockwise, "QUERY_BLOCK", 32)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 32)
    q, k, v = (torch.randn(2, 4, 70, 16) for _ in range(3))
    sink_logits = torch.randn(4)
    out = flash_attention(q, k, v, causal=True, sink_logits=sink_logits, impl="blockwise")
    expected = attention_reference(q.double(), k.double(), v.double(), causal=True, sink_logits=sink_logits)
    _assert_close("out fused", out, expected, 1e-5)
    bias = torch.randn(2, 1, 70, 70, dtype=torch.float64)
    q, k, v = (t.double() for t in (q, k, v))
    out = flash_attention(q, k, v, attn_mask=bias, softcap=2.0, sink_logits=sink_logits, impl="blockwise")
    expected = attention_reference(q, k, v, attn_mask=bias, softcap=2.0, sink_logits=sink_logits)
    _assert_close("out additive mask", out, expected, 1e-10)


@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CASES, ids=[f"case{index}" for index in range(len(CASES))])
def test_triton_float32_matches_reference(case):
    _check_against_reference(case, torch.float32, "triton", 2e-5, DEVICE)


@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_float16_matches_reference():
    # The interpreter mishandles bf16 products; bf16 is checked on the GPU (benchmarks/gpu_check_flash.py).
    _check_against_reference(CASES[4], torch.float16, "triton", 2e-2, DEVICE)


def test_rows_with_no_visible_key_give_zero_and_the_sink_lse():
    q, k, v = (torch.randn(1, 2, 10, 16, requires_grad=True) for _ in range(3))
    sink_logits = torch.tensor([0.5, -1.0], requires_grad=True)
    padding = torch.zeros(1, 10, dtype=torch.bool)
    impls = ["blockwise", "reference"] + (["triton"] if TRITON_RUNS and DEVICE == "cpu" else [])
    for impl in impls:
        out, lse = flash_attention(q, k, v, key_padding_mask=padding, softcap=3.0, sink_logits=sink_logits,
                                   return_lse=True, impl=impl)
        assert torch.equal(out, torch.zeros_like(out)), impl
        torch.testing.assert_close(lse, sink_logits.detach()[None, :, None].expand_as(lse))
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, sink_logits))
        assert all(torch.isfinite(grad).all() for grad in grads), impl
        # d lse / d sink = p_sink = 1 in every row (10 rows per head); q, k, v get nothing.
        torch.testing.assert_close(grads[3], torch.full((2,), 10.0))
        assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads[:3]), impl


def test_sliding_window_attention_takes_softcap_and_sink_logits():
    q, k, v = (torch.randn(1, 2, 33, 16, dtype=torch.float64) for _ in range(3))
    sink_logits = torch.randn(2, dtype=torch.float64)
    out = sliding_window_attention(q, k, v, 5, sinks=1, softcap=2.0, sink_logits=sink_logits)
    expected = attention_reference(q, k, v, causal=True, window=5, sinks=1, softcap=2.0, sink_logits=sink_logits)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_opcheck_with_softcap_and_sink_logits():
    q, k, v = (torch.randn(2, 4, 19, 16, requires_grad=True) for _ in range(3))
    k2, v2 = (torch.randn(2, 2, 19, 16, requires_grad=True) for _ in range(2))
    sink_logits = torch.randn(4, requires_grad=True)
    padding = torch.rand(2, 19) > 0.2
    op = torch.ops.attention_planner.flash_attention.default
    cases = [(q, k, v, padding, None, True, 6, 1, 0.25, "blockwise", 4.0, sink_logits),
             (q, k2, v2, None, None, False, -1, 0, 0.25, "blockwise", None, sink_logits),
             (q, k, v, None, torch.randn(19, 19), True, -1, 0, 0.25, "auto", 3.0, None)]
    if TRITON_RUNS:
        cases.append((q.to(DEVICE), k2.to(DEVICE), v2.to(DEVICE), padding.to(DEVICE), None, True, -1, 0, 0.25,
                       "triton", 4.0, sink_logits.to(DEVICE)))
    for args in cases:
        torch.library.opcheck(op, args)
    # Old callers (ten arguments) still reach the op unchanged.
    out, _ = flash_attention_op(q, k, v, None, None, True, -1, 0, 0.25, "blockwise")
    _assert_close("ten arguments", out, attention_reference(q.double(), k.double(), v.double(), causal=True,
                                                            scale=0.25), 1e-5)


@pytest.mark.parametrize("softcap, sink_shape, message", [
    (0.0, None, "softcap must be a positive finite number"),
    (float("inf"), None, "softcap must be a positive finite number"),
    (None, (3,), r"sink_logits must have shape \(q_heads,\)"),
    (None, (1, 4), r"sink_logits must have shape \(q_heads,\)"),
])
def test_bad_softcap_or_sink_logits_raise(softcap, sink_shape, message):
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    sink_logits = None if sink_shape is None else torch.randn(sink_shape)
    with pytest.raises(BackendError, match=message):
        flash_attention(q, k, v, softcap=softcap, sink_logits=sink_logits)
    with pytest.raises(BackendError, match="floating-point"):
        flash_attention(q, k, v, sink_logits=torch.ones(4, dtype=torch.long))


def _site(softcap=None, sinks=None):
    return AttentionSite(name="layers.0.attn", source="model.py:10", form="manual", node="bmm", query="q", key="k",
                         value="v", batch=1, heads=8, kv_heads=2, q_len=4096, kv_len=4096, head_dim=128,
                         value_dim=128, scale=None, mask=MaskSpec("causal", proof="test"), dtype="bfloat16",
                         softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("softcap, sinks", [(50.0, None), (None, "sinks")])
def test_tiled_variants_offer_soft_capped_and_sink_sites_and_the_others_refuse(softcap, sinks):
    site = _site(softcap, sinks)
    context = PlanContext(device=BUILTIN_DEVICES["h200"], max_len=4096, world_size=2)
    assert VARIANTS["flash"].offer(site, context).not_applicable is None
    windowed = PlanContext(device=BUILTIN_DEVICES["h200"], policy="approximate", max_len=4096, window=512)
    assert VARIANTS["sliding_window"].offer(site, windowed).not_applicable is None
    for name, kernel in (("sdpa_cudnn", "SDPA"), ("ring", "ring attention"), ("hyper", "HyperAttention")):
        reason = VARIANTS[name].offer(site, context).not_applicable
        assert reason is not None and f"not in {kernel}" in reason, (name, reason)
    assert VARIANTS["sdpa_cudnn"].offer(_site(), context).not_applicable is None  # the site itself is fine for cuDNN


# -- end to end: the corpus models with soft-capping and sink logits ---------------------------------------------------

def _gemma2():
    transformers = pytest.importorskip("transformers")
    # A cap of 1.0 bends every score: a rewrite that dropped the cap would be far off.
    config = transformers.Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                       attn_logit_softcapping=1.0, max_position_embeddings=256)
    return transformers.Gemma2Model, config


def _gpt_oss():
    transformers = pytest.importorskip("transformers")
    config = transformers.GptOssConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=5, max_position_embeddings=256,
                                       layer_types=["sliding_attention", "full_attention"])
    return transformers.GptOssModel, config


def _hidden(output):
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output


@pytest.mark.parametrize("build", [_gemma2, _gpt_oss], ids=["gemma2", "gpt_oss"])
def test_planner_rewrites_soft_capped_and_sink_models_exactly(build):
    import planner

    model_class, config = build()
    config._attn_implementation = "eager"
    config.use_cache = False
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("sinks"):
                parameter.normal_(0.0, 2.0)  # sink logits that weigh in the softmax (their init is near zero)
    ids = torch.randint(3, 100, (2, 17))
    capture_mask = torch.ones(2, 17, dtype=torch.long)
    capture_mask[-1, 14:] = 0
    optimized = planner.optimize(model, "32k", "cpu", example_inputs=(ids,),
                                 example_kwargs={"attention_mask": capture_mask},
                                 output=lambda output: output.last_hidden_state)
    decisions = optimized.report.plan.decisions if hasattr(optimized.report, "plan") else None
    flash_calls = [node for node in optimized.graph_module.graph.nodes if "attention_planner.flash_attention" in str(node.target)]
    assert len(flash_calls) == 2, decisions
    assert all(len(node.args) == 12 for node in flash_calls)  # softcap / sink logits passed

    ids = torch.randint(3, 100, (3, 23))
    mask = torch.ones(3, 23, dtype=torch.long)
    mask[-1, 19:] = 0
    real = mask.bool()
    expected = model(ids, attention_mask=mask).last_hidden_state
    actual = _hidden(optimized(ids, attention_mask=mask))
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-4)

    # Training: the gradients of every attention weight (sink logits included) are the model's.
    names = [name for name, _ in model.named_parameters() if "self_attn" in name]
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * grad_out)[real].sum(), [model.get_parameter(n) for n in names])
    actual_grads = torch.autograd.grad((actual * grad_out)[real].sum(), [optimized.get_parameter(n) for n in names])
    for name, actual_grad, expected_grad in zip(names, actual_grads, expected_grads):
        # Relative to the largest entry: Gemma-2's v/o gradients reach ~1e2, where the model's own fp32 error
        # (against float64) is ~1e-6 of it; a wrong gradient is off by O(1) of it.
        error = (actual_grad - expected_grad).abs().max().item()
        assert error <= 1e-5 * expected_grad.abs().max().item(), (name, error)
