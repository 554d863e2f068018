"""sliding_window_attention (backends/sliding_window/op.py) against its float64 reference, forward and gradients.

The Triton path runs through TRITON_INTERPRET=1 on the CPU (conftest.py); the blockwise path is checked too, since
it is what `impl=None` picks on the CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from backends.flash.op import flash_attention_op
from backends.sliding_window.naive import sliding_window_reference
from backends.sliding_window.op import sliding_window_attention
from planner.errors import BackendError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _check(impl, batch, heads, kv_heads, q_len, kv_len, head_dim, window, causal, sinks, padding):
    q = torch.randn(batch, heads, q_len, head_dim, device=DEVICE)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=DEVICE)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, device=DEVICE)
    key_padding_mask = (torch.rand(batch, kv_len, device=DEVICE) > 0.25) if padding else None
    options = dict(causal=causal, sinks=sinks, key_padding_mask=key_padding_mask)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sliding_window_attention(*leaves, window, return_lse=True, impl=impl, **options)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum(), leaves)

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = sliding_window_reference(*ref_leaves, window, return_lse=True, **options)
    ref_grads = torch.autograd.grad((ref_out * grad_out.double()).sum(), ref_leaves)

    assert torch.isfinite(out).all()
    assert (out.double() - ref_out).abs().max() < 2e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = ~torch.isinf(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 2e-5
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, ref_grads):
        error = (actual.double() - expected).abs().max().item()
        assert error < 5e-5, f"{name}: max abs error {error:.2e}"


# batch, heads, kv_heads, q_len, kv_len, head_dim, window, causal, sinks, padding
CASES = [
    (1, 2, 1, 64, 64, 16, 7, True, 0, False),
    (2, 4, 2, 70, 70, 16, 33, True, 4, True),
    (1, 2, 2, 17, 40, 16, 5, False, 0, False),
    (1, 2, 1, 60, 20, 16, 9, False, 2, True),  # queries 28.. see nothing but the 2 sinks
    (1, 2, 2, 45, 45, 64, 1, True, 0, False),  # window 1: each query sees itself only
]


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_matches_reference(case):
    _check("triton", *case)


@pytest.mark.parametrize("case", CASES[:3], ids=[f"case{i}" for i in range(3)])
def test_blockwise_matches_reference(case):
    _check("blockwise", *case)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
def test_rows_outside_every_window_are_zero():
    q = torch.randn(1, 2, 50, 16, device=DEVICE)
    k = torch.randn(1, 2, 10, 16, device=DEVICE)
    v = torch.randn(1, 2, 10, 16, device=DEVICE)
    # Not causal, window 4: query i sees keys with |i - j| < 4, so queries 13.. see none of the 10 keys.
    out, lse = sliding_window_attention(q, k, v, 4, causal=False, return_lse=True, impl="triton")
    assert torch.equal(out[:, :, 13:], torch.zeros_like(out[:, :, 13:]))
    assert torch.isneginf(lse[:, :, 13:]).all() and torch.isfinite(lse[:, :, :13]).all()


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
def test_opcheck_with_window_and_sinks():
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    torch.library.opcheck(flash_attention_op, (q, k, v, None, None, False, 5, 2, 0.25, "triton"))


def test_bad_window_raises():
    q = torch.randn(1, 1, 4, 16)
    for window in (0, -3, 2.5, True):
        with pytest.raises(BackendError, match="window"):
            sliding_window_attention(q, q, q, window)
