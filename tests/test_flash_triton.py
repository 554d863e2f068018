"""The Triton tiled attention kernels (backends/flash/triton.py) against the float64 dense reference.

On the CPU these run through TRITON_INTERPRET=1 (set in conftest.py) with 16x16 tiles, so lengths of 17..100 cross
several blocks, partial last blocks, window edges and sink blocks. Inputs are fp32 (exact fp32 products): errors
against float64 are ~1e-6, so a wrong mask or a wrong range shows as an O(1) error.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from backends.flash.naive import attention_reference
from backends.flash.op import flash_attention, flash_attention_op, tiled_attention
from backends.flash.triton import EXP2_CHUNKS, _exp2_poly, _exp2_split, flash_backward, flash_forward
from planner.errors import BackendError

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 2e-5


def _inputs(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype=torch.float32, value_dim=None):
    q = torch.randn(batch, heads, q_len, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(batch, kv_heads, kv_len, value_dim or head_dim, dtype=dtype, device=DEVICE)
    return q, k, v


def _reference_with_grads(q, k, v, grad_out, grad_lse, **options):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, return_lse=True, **options)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out * grad_out.double()).sum()
    if grad_lse is not None:
        loss = loss + (finite_lse * grad_lse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out, lse, grads


def _assert_close(name, actual, expected, tolerance=TOLERANCE):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tolerance, f"{name}: max abs error {error:.3e} > {tolerance:.1e}"


def _assert_lse(actual, expected):
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "lse: -inf rows differ"
    assert (actual[torch.isinf(actual)] < 0).all()
    finite = ~torch.isinf(expected)
    _assert_close("lse", actual[finite], expected[finite])


# batch, heads, kv_heads, q_len, kv_len, head_dim, causal, window, sinks, padding, config
CASES = [
    (1, 2, 1, 17, 17, 16, True, None, 0, False, None),  # MQA, odd length, one partial block
    (2, 2, 1, 70, 50, 16, False, None, 0, True, None),  # full attention, q_len != kv_len, padding
    (1, 4, 2, 64, 100, 16, True, 8, 2, True, None),  # GQA, window + sinks + padding, kv_len > q_len
    (1, 2, 1, 100, 100, 64, False, 20, 3, False, None),  # non-causal window with sinks, head dim 64
    (1, 2, 2, 33, 70, 16, True, 5, 0, False, (32, 16, 4, 1)),  # BLOCK_M != BLOCK_N
    (1, 2, 2, 70, 33, 16, False, 5, 0, True, (16, 32, 4, 1)),  # rows past kv_len + window see nothing
    (1, 2, 1, 50, 50, 20, True, None, 0, False, None),  # head dim 20 padded to 32
    (1, 1, 1, 1, 1, 16, True, None, 0, False, None),  # a single query and key
    (1, 3, 1, 45, 45, 16, True, 16, 20, False, None),  # more sinks than one block
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_and_backward_match_float64_reference(case):
    batch, heads, kv_heads, q_len, kv_len, head_dim, causal, window, sinks, padding, config = case
    q, k, v = _inputs(batch, heads, kv_heads, q_len, kv_len, head_dim)
    key_padding_mask = (torch.rand(batch, kv_len, device=DEVICE) > 0.3) if padding else None
    options = dict(causal=causal, window=window, sinks=sinks, scale=head_dim**-0.5, key_padding_mask=key_padding_mask)
    grad_out = torch.randn(batch, heads, q_len, head_dim, device=DEVICE)
    grad_lse = torch.randn(batch, heads, q_len, device=DEVICE)
    ref_out, ref_lse, ref_grads = _reference_with_grads(q, k, v, grad_out, grad_lse, **options)
    grad_lse = torch.where(torch.isinf(ref_lse), torch.zeros_like(grad_lse), grad_lse)

    out, lse = flash_forward(q, k, v, config=config, **options)
    _assert_close("out", out, ref_out)
    _assert_lse(lse, ref_lse)
    grads = flash_backward(grad_out, q, k, v, out, lse, grad_lse=grad_lse, config=config, **options)
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, actual, expected, tolerance=5e-5)


def test_value_head_dim_may_differ_and_atomic_dq_matches():
    q, k, v = _inputs(1, 4, 2, 40, 37, 16, value_dim=32)
    options = dict(causal=True, window=12, sinks=1, scale=0.3, key_padding_mask=None)
    grad_out = torch.randn(1, 4, 40, 32, device=DEVICE)
    ref_out, _, ref_grads = _reference_with_grads(q, k, v, grad_out, None, **options)
    out, lse = flash_forward(q, k, v, **options)
    _assert_close("out", out, ref_out)
    grads = flash_backward(grad_out, q, k, v, out, lse, dq_mode="atomic", **options)
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, actual, expected, tolerance=5e-5)


def test_rows_without_visible_keys_give_zero_and_zero_gradients():
    q, k, v = _inputs(1, 2, 2, 30, 30, 16)
    key_padding_mask = torch.ones(1, 30, dtype=torch.bool, device=DEVICE)
    key_padding_mask[:, :20] = False  # causal rows 0..19 see only padding
    out, lse = flash_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, return_lse=True,
                               impl="triton")
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    q.requires_grad_()
    flash_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, impl="triton").sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :20], torch.zeros_like(q.grad[:, :, :20]))
    assert q.grad[:, :, 20:].abs().sum() > 0


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_outside_the_band_are_skipped_not_masked(causal):
    """Poison keys/values that no query of a block can see with NaN: a computed-and-masked tile would give
    0 * NaN = NaN; a skipped tile leaves the rows finite and equal to the reference on clean inputs."""
    q, k, v = _inputs(1, 1, 1, 96, 96, 16)
    window, config = 16, (16, 16, 4, 1)
    options = dict(causal=causal, window=window, sinks=0, scale=0.25, key_padding_mask=None)
    reference = attention_reference(q.double(), k.double(), v.double(), **options)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, :32] = float("nan")
    v_poisoned[:, :, :32] = float("nan")
    out, _ = flash_forward(q, k_poisoned, v_poisoned, config=config, **options)
    # Query block [48, 64) starts its band at key 33 -> block 32: keys 0..31 are outside every such block's range.
    _assert_close("rows >= 48", out[:, :, 48:], reference[:, :, 48:])
    if causal:  # and causality skips whole key blocks above the diagonal
        k_future, v_future = k.clone(), v.clone()
        k_future[:, :, 64:] = float("nan")
        v_future[:, :, 64:] = float("nan")
        out, _ = flash_forward(q, k_future, v_future, config=config, **options)
        _assert_close("rows < 64", out[:, :, :64], reference[:, :, :64])


def test_half_precision_inputs_accumulate_in_fp32():
    # Triton's interpreter computes bfloat16 dot products wrongly (3.9): bfloat16 is checked on the GPU only.
    dtypes = (torch.float16, torch.bfloat16) if torch.cuda.is_available() else (torch.float16,)
    for dtype in dtypes:
        q, k, v = _inputs(1, 2, 1, 40, 40, 16, dtype=dtype)
        out = flash_attention(q, k, v, causal=True, impl="triton")
        reference = attention_reference(q.double(), k.double(), v.double(), causal=True)
        assert out.dtype == dtype
        relative = ((out.double() - reference).norm() / reference.norm()).item()
        assert relative < 1e-2, f"{dtype}: relative error {relative:.2e}"


def test_public_function_gradients_through_the_op():
    q, k, v = _inputs(2, 4, 2, 23, 31, 16)
    key_padding_mask = torch.rand(2, 31, device=DEVICE) > 0.2
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves, causal=True, scale=0.2, key_padding_mask=key_padding_mask, return_lse=True,
                               impl="triton")
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grad_lse = torch.where(torch.isinf(lse), torch.zeros_like(grad_lse), grad_lse)
    grads = torch.autograd.grad((out * grad_out).sum() + (torch.nan_to_num(lse, neginf=0.0) * grad_lse).sum(), leaves)
    _, _, ref_grads = _reference_with_grads(q, k, v, grad_out, grad_lse, causal=True, scale=0.2,
                                            key_padding_mask=key_padding_mask)
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, actual, expected, tolerance=5e-5)


def test_opcheck_triton_implementation():
    q, k, v = _inputs(1, 2, 1, 20, 20, 16)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    key_padding_mask = torch.rand(1, 20, device=DEVICE) > 0.2
    torch.library.opcheck(flash_attention_op, (q, k, v, key_padding_mask, None, True, 6, 1, 0.25, "triton"))


def test_bad_inputs_raise_backend_error():
    q, k, v = _inputs(1, 3, 2, 8, 8, 16)
    with pytest.raises(BackendError, match="kv heads"):
        flash_forward(q, k, v, causal=False, window=None, sinks=0, scale=1.0, key_padding_mask=None)
    q, k, v = _inputs(1, 2, 1, 8, 8, 16, dtype=torch.float64)
    with pytest.raises(BackendError, match="float16, bfloat16 or float32"):
        flash_forward(q, k, v, causal=False, window=None, sinks=0, scale=1.0, key_padding_mask=None)
    q, k, v = _inputs(1, 2, 1, 8, 8, 16)
    with pytest.raises(BackendError, match="window"):
        flash_forward(q, k, v, causal=True, window=0, sinks=0, scale=1.0, key_padding_mask=None)
    with pytest.raises(BackendError, match="dq_mode"):
        flash_backward(q, q, k, v, q, q[..., 0], causal=True, window=None, sinks=0, scale=1.0,
                       key_padding_mask=None, dq_mode="fast")


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = _inputs(1, 2, 2, 12, 12, 16)
    out = tiled_attention(q, k, v, causal=True, impl="triton")
    reference = attention_reference(q.double(), k.double(), v.double(), causal=True, scale=1 / math.sqrt(16))
    _assert_close("out", out, reference)


LAYOUTS = ["pointer loads", "transposed (batch, seq, heads, dim) views", "tensor-wide descriptors, transposed",
           "tensor-wide descriptors, heads with inf past their end"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the inf rows (then masked)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_without_tensor_descriptors_and_on_strided_views(layout, monkeypatch):
    """The pointer-load path (pre-Hopper GPUs, unaligned layouts), per-head descriptors over strided views and
    tensor-wide descriptors agree with float64, forward and backward; a negative scale (the forward scales after the
    row max, so it negates q) too. Tensor-wide descriptors read past a head's end into other memory: inf there must
    not reach the output."""
    import backends.flash.triton as flash_triton

    if layout == "pointer loads":
        monkeypatch.setattr(flash_triton, "_tma_usable", lambda *tensors: False)
        q, k, v = _inputs(1, 4, 2, 45, 45, 16)
    elif layout.startswith("tensor-wide descriptors, heads with inf"):
        monkeypatch.setattr(flash_triton, "_DESCRIPTOR_SCOPE", "tensor")
        storage = [torch.full((2, heads, 61, 16), float("inf"), device=DEVICE) for heads in (4, 2, 2)]
        for tensor in storage:
            tensor[:, :, :45] = torch.randn(2, tensor.shape[1], 45, 16, device=DEVICE)
        q, k, v = (tensor[:, :, :45] for tensor in storage)
    else:  # what a model's q.view(b, s, h, d).transpose(1, 2) hands over
        if layout.startswith("tensor-wide"):
            monkeypatch.setattr(flash_triton, "_DESCRIPTOR_SCOPE", "tensor")
        q, k, v = (torch.randn(2, 45, heads, 16, device=DEVICE).transpose(1, 2) for heads in (4, 2, 2))
    if layout.startswith("tensor-wide"):  # the layout qualifies: the tensor-wide path is the one tested
        assert None not in [flash_triton._whole_tensor_rows(tensor) for tensor in (q, k, v)]
    # scale -8: scores span hundreds, so a row max taken on the wrong side would overflow exp2
    for causal, window, scale in ((True, None, 0.25), (True, 9, -8.0), (False, None, -8.0)):
        options = dict(causal=causal, window=window, sinks=0, scale=scale, key_padding_mask=None)
        ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True, **options)
        out, lse = flash_forward(q, k, v, **options)
        _assert_close(f"out {causal} {window} {scale}", out, ref_out)
        # lse reaches ~100 at scale 8: fp32 resolves it to ~1e-5, so relative there
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=TOLERANCE)
        grad_out = torch.randn_like(out)
        _, _, ref_grads = _reference_with_grads(q, k, v, grad_out, None, **options)
        grads = flash_backward(grad_out, q, k, v, out, lse, **options)
        for name, actual, expected in zip(("dq", "dk", "dv"), grads, ref_grads):
            # gradients grow with |scale|: so does their fp32 rounding
            torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=5e-5 * max(1.0, abs(scale)),
                                       msg=lambda m, name=name: f"{name}: {m}")


@triton.jit
def _poly_exp2_kernel(X, Y, N: tl.constexpr, DEGREE: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(Y + offsets, _exp2_poly(tl.load(X + offsets), DEGREE))


@triton.jit
def _split_exp2_kernel(X, Y, M: tl.constexpr, N: tl.constexpr, POLY: tl.constexpr, CHUNKS: tl.constexpr):
    offsets = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(Y + offsets, _exp2_split(tl.load(X + offsets), POLY, CHUNKS, 3))


# Max relative error of the fp32 polynomial with its fp32 evaluation, for x >= -125 (normal results): degree 3
# 1.02e-4 (minimax 1.01e-4), degree 5 1.8e-7 (minimax 1.1e-7 plus rounding): under the rounding of the formats they
# serve (bf16/fp16 P: half-ulp 2^-9 = 2.0e-3 and 2^-12 = 2.4e-4; fp32: a few ulp).
POLY_EXP2_BOUNDS = {3: 1.1e-4, 5: 3e-7}


@pytest.mark.parametrize("degree", [3, 5])
def test_polynomial_exp2_relative_error_against_torch(degree):
    x = torch.cat([torch.rand(40000) * -126.0,  # what the kernel passes: scores minus the row maximum, <= 0
                   torch.rand(20000) * 20.0 - 10.0,
                   torch.arange(-126, 11).float(),  # integers and half-integers: the rounding's edges
                   torch.arange(-126, 11).float() + 0.5, torch.arange(-126, 11).float() - 0.5,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-7, -125.99, 127.4])])
    n = 1 << (x.numel() - 1).bit_length()
    x = torch.nn.functional.pad(x, (0, n - x.numel()), value=-1.0).to(DEVICE)
    y = torch.empty_like(x)
    _poly_exp2_kernel[(1,)](x, y, n, degree)
    expected = torch.exp2(x.double())
    normal = x >= -125.0  # results of normal fp32 numbers; below, 2^x is within 2^-125 of 0 (checked next)
    relative = ((y.double() - expected) / expected).abs()[normal]
    assert relative.max().item() <= POLY_EXP2_BOUNDS[degree], relative.max().item()
    assert (y[x == 0] == 1.0).all()  # a row's maximum gets exactly 1
    assert ((y[~normal] >= 0) & (y[~normal] <= 2.0**-124)).all()
    # below -126 the clamp gives 2^-126 at most: zero next to a row maximum of 1, never garbage from the exponent bits
    far = torch.tensor([-126.5, -127.0, -200.0, -1e4, -3e38], device=DEVICE)
    n = 8
    x_far = torch.nn.functional.pad(far, (0, n - far.numel()), value=-1000.0)
    y_far = torch.empty_like(x_far)
    _poly_exp2_kernel[(1,)](x_far, y_far, n, degree)
    assert ((y_far >= 0) & (y_far <= 2.0**-126)).all(), y_far


@pytest.mark.parametrize("poly_chunks", [0, 1, 3, 8, 13, 16])
def test_exponential_split_puts_exactly_the_leading_chunks_on_the_polynomial(poly_chunks):
    x = (torch.randn(16, 64) * 6.0 - 6.0).to(DEVICE)
    y = torch.empty_like(x)
    _split_exp2_kernel[(1,)](x, y, 16, 64, poly_chunks, EXP2_CHUNKS)
    expected = torch.exp2(x.double())
    relative = ((y.double() - expected) / expected).abs()
    assert relative.max().item() <= POLY_EXP2_BOUNDS[3]
    # the polynomial's error shows in every column it computes (exp2 is good to ~1e-7): its columns are the first
    on_polynomial = (relative > 1e-6).any(0)
    assert on_polynomial.tolist() == [column < poly_chunks * 64 // EXP2_CHUNKS for column in range(64)]


# batch, heads, kv_heads, q_len, kv_len, head_dim, causal, window, config with the polynomial's chunk count
POLY_CASES = [
    (1, 2, 1, 77, 77, 16, True, None, (16, 32, 4, 1, 3)),  # causal, GQA, odd length, 3/16
    (2, 2, 2, 45, 93, 32, False, None, (16, 16, 4, 1, 16)),  # every interior exponential on the polynomial
    (1, 2, 2, 90, 90, 16, True, 50, (16, 16, 4, 1, 8)),  # sliding window: unmasked tiles between masked edges
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", POLY_CASES, ids=[f"poly{i}" for i in range(len(POLY_CASES))])
def test_forward_with_polynomial_exponentials_matches_float64(case, dtype):
    """fp32 inputs take the degree-5 polynomial (fp32-exact: the usual tolerance); fp16 inputs the degree-3 one,
    whose 1e-4 relative error in P must stay under fp16's own rounding of P and of the output. Scores are spread
    (x3 gain) so that exponents reach far below each row's maximum."""
    batch, heads, kv_heads, q_len, kv_len, head_dim, causal, window, config = case
    q, k, v = _inputs(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype=dtype)
    q = q * 3
    options = dict(causal=causal, window=window, sinks=0, scale=head_dim**-0.5, key_padding_mask=None)
    reference, reference_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True, **options)
    out, lse = flash_forward(q, k, v, config=config, **options)
    today, _ = flash_forward(q, k, v, config=config[:4], **options)
    if dtype == torch.float32:
        _assert_close("out", out, reference)
    else:
        # no worse than 1.5x today's kernel (all exponentials exp2) against the same float64 reference
        error, today_error = ((t.double() - reference).abs().max().item() for t in (out, today))
        assert error <= 1.5 * today_error + 1e-4, (error, today_error)
        assert (out.double() - today.double()).abs().max().item() <= 5e-3
    _assert_close("lse", lse.double(), reference_lse, tolerance=1e-4 if dtype == torch.float16 else TOLERANCE)


@pytest.mark.parametrize("causal, window, head_dim, length, dtype, expected", [
    (False, None, 128, 20000, torch.bfloat16, True),  # the one measured win: non-causal, head dim 128, 16k-32k keys
    (False, None, 128, 32768, torch.float16, True),
    (True, None, 128, 32768, torch.bfloat16, False),  # causal measured slower
    (False, 4096, 128, 32768, torch.bfloat16, False),  # windowed too
    (False, None, 64, 32768, torch.bfloat16, False),  # head dim 64 too
    (False, None, 128, 16384, torch.bfloat16, False),  # no gain at 16k
    (False, None, 128, 65536, torch.bfloat16, False),  # unmeasured: today's kernel
    (False, None, 128, 32768, torch.float32, False),
])
def test_polynomial_exponentials_are_tuned_in_only_where_they_measured_faster(monkeypatch, causal, window, head_dim,
                                                                                length, dtype, expected):
    """Which forward candidates the tuner gets on a GPU (the interpreter always takes one small tile): the
    polynomial share only for the shape where it won (benchmarks/RESULTS.md, "Exponentials on the FMA units")."""
    import backends.flash.triton as flash_triton

    offered = []
    monkeypatch.setattr(flash_triton, "_interpreting", lambda: False)
    monkeypatch.setattr(flash_triton, "_launch_tuned", lambda name, key, configs, launch, prepare=None:
                        offered.extend(configs))
    q = torch.empty(1, 1, length, head_dim, dtype=dtype)  # never reaches a kernel: only shape and dtype count
    flash_forward(q, q, q, causal=causal, window=window, sinks=0, scale=0.1, key_padding_mask=None)
    assert offered and any(len(config) > 4 and config[4] > 0 for config in offered) == expected, offered


def test_hopper_forward_scope_is_what_the_kernel_computes():
    """The Gluon forward takes 16-bit, head dim 64/128, unpadded exact attention with descriptor-friendly layouts;
    every other call stays on the Triton kernel, and nothing reaches it off a Hopper GPU."""
    _hopper = pytest.importorskip("backends.flash.hopper", reason="this Triton has no Gluon for Hopper")
    plain = dict(has_sinks=False, key_padding_mask=None, softcap=None, sink_logits=None, scale=0.1)
    q = torch.randn(1, 4, 33, 128, dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 45, 128, dtype=torch.bfloat16)
    assert _hopper.supports(q, kv, kv, **plain)
    assert not _hopper.applies(q, kv, kv, **plain)  # a CPU tensor
    assert _hopper.supports(q[..., :64].contiguous(), kv[..., :64].contiguous(), kv[..., :64].contiguous(), **plain)
    assert _hopper.supports(q.transpose(1, 2).contiguous().transpose(1, 2), kv, kv, **plain)  # a model's view
    refused = [
        (q.float(), kv.float(), kv.float(), plain),
        (q, kv.half(), kv.half(), plain),
        (q[..., :96].contiguous(), kv[..., :96].contiguous(), kv[..., :96].contiguous(), plain),
        (q, kv, kv[..., :64].contiguous(), plain),
        (q, kv, kv, dict(plain, has_sinks=True)),
        (q, kv, kv, dict(plain, key_padding_mask=torch.ones(1, 45, dtype=torch.bool))),
        (q, kv, kv, dict(plain, softcap=30.0)),
        (q, kv, kv, dict(plain, sink_logits=torch.zeros(4))),
        (q, kv, kv, dict(plain, scale=-0.1)),
        (q[:, :, :0], kv, kv, plain),
        (torch.randn(1, 4, 33, 130, dtype=torch.bfloat16)[..., 1:129], kv, kv, plain),  # 2-byte offset base
    ]
    for q_, k_, v_, flags in refused:
        assert not _hopper.supports(q_, k_, v_, **flags), (q_.shape, q_.dtype, flags)


def test_gluon_forward_is_offered_only_when_turned_on(monkeypatch):
    from backends.flash import triton as flash_triton

    for value, expected_on in ((None, False), ("0", False), ("1", True)):
        if value is None:
            monkeypatch.delenv("ATTENTION_PLANNER_GLUON", raising=False)
        else:
            monkeypatch.setenv("ATTENTION_PLANNER_GLUON", value)
        flash_triton.gluon_forward.cache_clear()
        try:
            module = flash_triton.gluon_forward()
        finally:
            flash_triton.gluon_forward.cache_clear()
        if expected_on:
            pytest.importorskip("backends.flash.hopper", reason="this Triton has no Gluon for Hopper")
            assert module is not None and hasattr(module, "hopper_forward")
        else:
            assert module is None
