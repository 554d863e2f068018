"""The Triton kernels on a real GPU (skipped without CUDA): the FlashAttention rule at small sizes for the tiled and
sliding-window kernels (benchmarks/gpu_check_flash.py's check, which compares ours and SDPA in the same dtype with a
float32 reference), the fused HyperAttention merge against the autograd path, and the chunked linear attention and
SSD kernels against float64 references."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import backends

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.gpu

FLASH_CASES = {
    "causal 1000 bf16": dict(batch=1, heads=4, kv_heads=4, length=1000),
    "causal 777 fp16 GQA 4/1": dict(batch=1, heads=4, kv_heads=1, length=777, dtype=torch.float16),
    "window 300 + sinks 3 + padding, B=2, 1500": dict(batch=2, heads=4, kv_heads=2, length=1500, window=300, sinks=3,
                                                     padding=True),
    "non-causal window 129, 1031, head dim 64": dict(batch=1, heads=2, kv_heads=2, length=1031, causal=False,
                                                     window=129, head_dim=64),
    # Gemma-2 and gpt-oss: the baseline is their eager attention in the same dtype (SDPA has neither feature).
    "causal 1000 soft-capped at 50, GQA 4/2": dict(batch=1, heads=4, kv_heads=2, length=1000, softcap=50.0),
    "window 257 + sink logits, 999": dict(batch=1, heads=4, kv_heads=4, length=999, window=257, sink_logits=True),
}


@pytest.mark.parametrize("name", list(FLASH_CASES))
def test_flash_kernels_meet_the_flash_attention_rule(name):
    import gpu_check_flash

    rows = gpu_check_flash.check(name, **FLASH_CASES[name])
    failed = [row for row in rows if not row["ok"]]
    assert not failed, failed


def test_fused_hyper_merge_equals_the_autograd_path():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 4, 9000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        fused = backends.hyper_attention(q, k, v, causal=True, min_seq_len=1024, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    composed = backends.hyper_attention(*leaves, causal=True, min_seq_len=1024, seed=5)
    assert (fused.float() - composed.detach().float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("decay", [None, "per_head"])
def test_chunked_linear_attention_on_gpu_against_float64(decay):
    from backends.linear.naive import linear_attention_naive

    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 333, 64, device="cuda") * 0.3 for _ in range(3))
    decay_tensor = None if decay is None else -torch.rand(2, device="cuda") * 0.1
    ours = backends.linear_attention(q, k, v, decay=decay_tensor)
    reference = linear_attention_naive(q.double(), k.double(), v.double(),
                                       decay=None if decay_tensor is None else decay_tensor.double())
    error = (ours.double() - reference).norm() / reference.norm()
    assert error < 1e-2


@pytest.mark.parametrize("layout", ["contiguous", "transposed views"])
def test_atomic_dq_backward_matches_the_separate_dq_kernel(layout):
    """dq_mode="atomic" (dQ reduced into fp32 by the dK/dV kernel: a bulk TMA reduce-add on Hopper) against the
    deterministic separate dQ kernel and a float64 reference, bf16, causal with GQA and an odd length."""
    from backends.flash.naive import attention_reference
    from backends.flash.triton import flash_backward, flash_forward

    torch.manual_seed(6)
    if layout == "contiguous":
        q, k, v = (torch.randn(1, heads, 1999, 128, device="cuda", dtype=torch.bfloat16) for heads in (8, 2, 2))
    else:
        q, k, v = (torch.randn(1, 1999, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   for heads in (8, 2, 2))
    options = dict(causal=True, window=None, sinks=0, scale=128 ** -0.5, key_padding_mask=None)
    out, lse = flash_forward(q, k, v, **options)
    grad_out = torch.randn_like(out)
    separate = flash_backward(grad_out, q, k, v, out, lse, dq_mode="separate", **options)
    atomic = flash_backward(grad_out, q, k, v, out, lse, dq_mode="atomic", **options)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference = torch.autograd.grad((attention_reference(*leaves, **options) * grad_out.double()).sum(), leaves)
    for name, ours, theirs, exact in zip(("dq", "dk", "dv"), atomic, separate, reference):
        error, baseline = ((t.double() - exact).abs().max().item() for t in (ours, theirs))
        assert error <= 2 * baseline + 1e-3, f"{name}: atomic {error:.2e} vs separate {baseline:.2e}"


def test_warp_specialized_hopper_forward_meets_the_flash_attention_rule():
    """Every launch configuration of the Gluon kernel (backends/flash/hopper.py) at odd sizes of each case kind it
    takes: causal, full with more keys than queries, sliding window causal and not, head dims 64 and 128, grouped
    heads, bf16 and fp16; output poisoned first, lse checked too (benchmarks/bench_flash_hopper.py's check)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized forward needs a Hopper GPU")
    hopper = pytest.importorskip("backends.flash.hopper", reason="this Triton has no Gluon for Hopper")
    import bench_flash_hopper

    rows: list = []
    bench_flash_hopper.check(hopper.CONFIGS, rows)
    failed = [row for row in rows if not row["ok"]]
    assert rows and not failed, failed
