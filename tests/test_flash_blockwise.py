"""The exact tiled op's PyTorch paths (blockwise, reference) against the dense float64 oracle; memory growth."""
import os
import subprocess
import sys

import pytest
import torch

from backends.flash.naive import attention_reference
from backends.flash.op import tiled_attention
from planner.errors import BackendError
from planner.memory import cpu_peak_measurable

CASES = [
    # batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, window, sinks
    (2, 4, 2, 300, 300, 16, True, None, 0),
    (1, 2, 1, 37, 700, 8, False, None, 0),
    (2, 2, 2, 1100, 1100, 8, True, 100, 3),
    (1, 4, 4, 513, 513, 8, False, 50, 0),
    (1, 3, 1, 1, 1, 8, True, None, 0),
    (1, 2, 2, 700, 33, 8, True, None, 0),  # more queries than keys: top-left causal
]


def _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim):
    make = lambda heads, length: torch.randn(batch, heads, length, head_dim, dtype=torch.float64, requires_grad=True)
    return make(q_heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_masks", [False, True])
def test_blockwise_matches_reference_forward_and_gradients(case, with_masks):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, causal, window, sinks = case
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim)
    padding = attn_mask = None
    if with_masks:
        padding = torch.rand(batch, kv_len) > 0.3
        attn_mask = torch.randn(batch, 1, q_len, kv_len, dtype=torch.float64, requires_grad=True)
    options = dict(causal=causal, window=window, sinks=sinks, scale=0.3, key_padding_mask=padding,
                   attn_mask=attn_mask)
    out, lse = tiled_attention(q, k, v, return_lse=True, impl="blockwise", **options)
    expected, expected_lse = attention_reference(q, k, v, return_lse=True, **options)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, expected_lse, atol=1e-10, rtol=1e-10)

    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grad_lse = torch.where(torch.isinf(lse), 0.0, grad_lse)
    inputs = [tensor for tensor in (q, k, v, attn_mask) if tensor is not None]
    loss = lambda o, l: (o * grad_out).sum() + (torch.where(torch.isinf(l), 0.0, l) * grad_lse).sum()
    grads = torch.autograd.grad(loss(out, lse), inputs)
    expected_grads = torch.autograd.grad(loss(expected, expected_lse), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=1e-9)


def test_rows_with_no_visible_key_give_zeros_not_nan():
    q, k, v = _inputs(1, 2, 2, 40, 40, 8)
    padding = torch.zeros(1, 40, dtype=torch.bool)
    padding[0, 30:] = True  # causal rows 0..29 see no real key
    out, lse = tiled_attention(q, k, v, causal=True, key_padding_mask=padding, return_lse=True, impl="blockwise")
    assert torch.isfinite(out).all()
    assert (out[:, :, :30] == 0).all() and torch.isinf(lse[:, :, :30]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("layout", ["head_dim_major", "broadcast_head_dim"])
@pytest.mark.parametrize("causal,q_heads", [(False, 4), (True, 4), (False, 8)])
def test_a_head_dim_that_is_not_unit_stride_gives_the_reference(layout, causal, q_heads):
    # (batch, heads, head_dim, length) storage seen transposed, as SqueezeBERT's convolutions lay out q, k and v;
    # or a head dim broadcast from size 1. CPU float32 takes the fused tiles.
    def make(heads, length):
        if layout == "head_dim_major":
            return torch.randn(2, heads, 16, length).transpose(2, 3)
        return torch.randn(2, heads, length, 1).expand(2, heads, length, 16)

    q, k, v = make(q_heads, 19), make(4, 19), make(4, 19)
    out = tiled_attention(q, k, v, causal=causal, scale=0.25, impl="blockwise")
    expected = attention_reference(q.double(), k.double(), v.double(), causal=causal, scale=0.25)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v = (torch.randn(1, 4, 257, 32).to(dtype) for _ in range(3))
    out = tiled_attention(q, k, v, causal=True, impl="blockwise")
    expected = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_opcheck_flash_op():
    q, k, v = (torch.randn(2, 4, 19, 8, requires_grad=True) for _ in range(3))
    # Transposed views too: the fake outputs must be contiguous like the real ones (compiled backwards check strides).
    q_t, k_t, v_t = (torch.randn(2, 19, 4, 8).transpose(1, 2).requires_grad_() for _ in range(3))
    padding = torch.rand(2, 19) > 0.2
    for args in [(q, k, v, None, None, True, -1, 0, 0.35, "blockwise"),
                 (q, k, v, padding, None, False, 5, 2, 0.35, "blockwise"),
                 (q, k, v, None, torch.randn(19, 19), False, -1, 0, 0.35, "auto"),
                 (q_t, k_t, v_t, None, None, True, -1, 0, 0.35, "blockwise")]:
        torch.library.opcheck(torch.ops.attention_planner.flash_attention.default, args)


@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v: (q[0], k, v), "4 dims"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), "heads"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "values"),
    (lambda q, k, v: (q, k.double(), v), "dtype"),
])
def test_bad_inputs_raise_backend_error(bad, message):
    q, k, v = (torch.randn(1, 4, 7, 8) for _ in range(3))
    with pytest.raises(BackendError, match=message):
        tiled_attention(*bad(q, k, v))


_PEAK_SCRIPT = """
import sys, torch
from backends.flash.op import tiled_attention
from planner.memory import measure_peak
impl, length = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, length, 16) for _ in range(3))
bias = torch.zeros(length, length)  # an explicit mask forces the plain-PyTorch tiles on every path
small = slice(0, 600)
tiled_attention(q[:, :, small], k[:, :, small], v[:, :, small], causal=True, attn_mask=bias[small, small], impl=impl)
_, peak = measure_peak(lambda: tiled_attention(q, k, v, causal=True, attn_mask=bias, impl=impl))
print(peak)
"""


def _peak_bytes(impl: str, length: int) -> int:
    # A fixed mmap threshold makes every large buffer its own mapping, returned to the system when freed, so the
    # resident-set peak measures the call and not what the allocator kept from earlier ones.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "262144", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, impl, str(length)], capture_output=True, text=True,
                            check=True, env=environment)
    return int(result.stdout.strip())


@pytest.mark.long
@pytest.mark.skipif(not cpu_peak_measurable(), reason="needs /proc/self/clear_refs to measure peak memory")
def test_blockwise_extra_memory_grows_linearly_not_quadratically():
    short, long = 1024, 2048
    blockwise = {length: _peak_bytes("blockwise", length) for length in (short, long)}
    reference = {length: _peak_bytes("reference", length) for length in (short, long)}
    print(f"peak extra memory: blockwise {blockwise}, reference {reference}")
    scores_at_long = 4 * long * long * 4
    # The reference materializes the 4 x 2048 x 2048 fp32 scores (64 MiB) and more; the blockwise loop holds one
    # 512 x 512 tile per head plus the output, and doubling the length at most doubles it (plus allocator slack).
    assert reference[long] > scores_at_long
    assert reference[long] > 3.0 * reference[short]
    assert blockwise[long] < scores_at_long / 2
    assert blockwise[long] < 2.5 * blockwise[short] + 8 * 2**20
