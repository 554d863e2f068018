"""HyperAttention op: `attention_planner::hyper_attention`, and the public `hyper_attention`.

The op is CompositeImplicitAutograd: it is made of other ops (gathers, sorts, `attention_planner::flash_attention`
with its log-sum-exp, elementwise merges), so autograd, fake tensors and export all see through it, and its
backward is the tiled attention's own backward plus the gathers'. Its random choices (hyperplanes, sampled
positions) are pure functions of `seed` (see lsh.py): no generator state, the same on every device.
"""
from __future__ import annotations

import torch

from backends.common import check_qkv
from backends.hyper.blockwise import hyper_attention_forward
from passes.errors import BackendError

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

torch.library.define(
    "attention_planner::hyper_attention",
    "(Tensor q, Tensor k, Tensor v, bool causal, int block_size, int sample_size, int num_projections, "
    "int min_seq_len, int seed) -> (Tensor, Tensor)",
)


@torch.library.impl("attention_planner::hyper_attention", "CompositeImplicitAutograd")
def _hyper_attention_composite(q, k, v, causal, block_size, sample_size, num_projections, min_seq_len, seed):
    return hyper_attention_forward(q, k, v, causal=causal, block_size=block_size, sample_size=sample_size,
                                   num_projections=num_projections, min_seq_len=min_seq_len, seed=seed)


hyper_attention_op = torch.ops.attention_planner.hyper_attention.default


def validate_hyper_inputs(q, k, v, causal, block_size, sample_size, num_projections, min_seq_len) -> None:
    """Raise BackendError naming the first argument that HyperAttention cannot take."""
    check_qkv(q, k, v, DTYPES)
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3]:
        raise BackendError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit: k and v "
                           "need the same (batch, heads, keys), heads dividing q's, and k the head dim of q")
    if v.shape[3] != q.shape[3]:
        raise BackendError(f"HyperAttention needs v with the head dim of q and k; got q/k {q.shape[3]}, v {v.shape[3]} "
                           "(a value head dim of its own, as in multi-head latent attention, runs exactly with "
                           "backends.flash_attention)")
    if causal and q.shape[2] != k.shape[2]:
        raise BackendError(f"causal HyperAttention needs as many queries as keys; got {q.shape[2]} and {k.shape[2]}")
    for name, value, low in (("block_size", block_size, 1), ("sample_size", sample_size, 1),
                             ("min_seq_len", min_seq_len, 1)):
        if int(value) < low:
            raise BackendError(f"{name} must be an integer >= {low}; got {value}")
    if not 1 <= num_projections <= 16:
        raise BackendError(f"num_projections must be in 1..16 (2^num_projections buckets); got {num_projections}")


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, block_size: int = 256,
                    sample_size: int = 256, num_projections: int = 7, min_seq_len: int = 4096,
                    seed: int = 0) -> torch.Tensor:
    """HyperAttention (Han et al., 2023): approximate softmax attention in near-linear time. Not exact.

    Queries and keys are sorted by sortLSH (num_projections random hyperplanes, buckets in Gray-code order); each
    query attends exactly to its block of block_size sorted keys, and to sample_size keys sampled uniformly from the
    rest, weighted by (keys / sample_size); the two parts merge by log-sum-exp in float32. causal=True halves the
    sequence recursively: exact causal attention on leaves of at most min_seq_len positions, the estimator between
    halves. Scale 1/sqrt(head_dim).

    Args:
        q: (batch, heads, queries, head_dim); k, v: (batch, kv_heads, keys, head_dim), kv_heads dividing heads.
        min_seq_len: with at most this many keys the result is exact tiled attention.
        seed: all random choices are a pure function of it: the same seed gives the same output.

    The error is zero when one block covers the sequence (block_size >= keys) or the sample covers it
    (sample_size >= keys), and shrinks as sample_size grows. It is large where attention is diffuse (random
    inputs) and small where a few keys dominate each row, which is what sortLSH finds.
    """
    validate_hyper_inputs(q, k, v, causal, block_size, sample_size, num_projections, min_seq_len)
    out, _ = hyper_attention_op(q, k, v, causal, int(block_size), int(sample_size), int(num_projections),
                                int(min_seq_len), int(seed))
    return out
