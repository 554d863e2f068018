"""Linear attention ops: `attention_planner::linear_attention` (chunked, with autograd), its backward, and
`attention_planner::linear_attention_recurrent` (step form for decoding, forward only); the public
`linear_attention`.

On CUDA (or on the CPU under TRITON_INTERPRET=1) the ops run the Triton kernels of chunk.py and recurrent.py;
elsewhere they run the float64 recurrence of naive.py (correct, slow: a CPU fallback, not a CPU kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.linear.chunk import accumulator_dtype, chunk_backward, chunk_forward
from backends.linear.naive import (Decay, FeatureMap, apply_feature_map, linear_attention_naive,
                                   linear_attention_naive_backward, log_decay_per_position)
from backends.linear.recurrent import recurrent_forward
from backends.common import check_qkv, contiguous_or_none, triton_usable
from passes.errors import BackendError

CHUNK_SIZE = 64
RECURRENT_MAX_LEN = 16  # without gradients, sequences up to this long (decoding steps) take the recurrent form
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _naive_forward(q, k, v, log_decay, initial_state):
    out, final = linear_attention_naive(q, k, v, decay=log_decay, initial_state=initial_state, return_state=True)
    return out, final.to(accumulator_dtype(q.dtype))


@torch.library.custom_op("attention_planner::linear_attention", mutates_args=())
def linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                        initial_state: Optional[torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention, chunked. Returns (out like v, final state (batch, heads, key_dim, value_dim), float32
    or float64 for float64 inputs). log_decay: None, (batch, heads, seq) or (batch, heads, seq, key_dim)."""
    q, k, v, log_decay, initial_state = map(contiguous_or_none, (q, k, v, log_decay, initial_state))
    if not triton_usable(q):
        return _naive_forward(q, k, v, log_decay, initial_state)
    out, final = chunk_forward(q, k, v, log_decay, initial_state, chunk_size)
    return out, final


@linear_attention_op.register_fake
def _(q, k, v, log_decay, initial_state, chunk_size):
    batch, heads, _, value_dim = v.shape
    final = v.new_empty(batch, heads, q.shape[-1], value_dim, dtype=accumulator_dtype(q.dtype))
    return torch.empty_like(v), final


@torch.library.custom_op("attention_planner::linear_attention_backward", mutates_args=())
def linear_attention_backward_op(
    grad_out: torch.Tensor, grad_final: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    log_decay: Optional[torch.Tensor], initial_state: Optional[torch.Tensor], final_state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, d_log_decay, d_initial_state); the last two are empty when there is no such input."""
    q, k, v, log_decay, initial_state, grad_out, grad_final = map(
        contiguous_or_none, (q, k, v, log_decay, initial_state, grad_out, grad_final))
    if triton_usable(q):
        grads = chunk_backward(grad_out, grad_final, q, k, v, log_decay, initial_state, final_state, chunk_size)
    else:
        grads = linear_attention_naive_backward(grad_out, grad_final, q, k, v, log_decay, initial_state)
    grad_q, grad_k, grad_v, grad_decay, grad_initial = grads
    # A distinct empty tensor for each absent gradient: a custom op's outputs may not alias each other.
    return (grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous(),
            q.new_empty(0) if grad_decay is None else grad_decay.contiguous(),
            q.new_empty(0) if grad_initial is None else grad_initial.contiguous())


@linear_attention_backward_op.register_fake
def _(grad_out, grad_final, q, k, v, log_decay, initial_state, final_state, chunk_size):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(0) if log_decay is None else torch.empty_like(log_decay),
            q.new_empty(0) if initial_state is None else torch.empty_like(initial_state))


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, initial_state, chunk_size = inputs
    ctx.save_for_backward(q, k, v, log_decay, initial_state, output[1])
    ctx.chunk_size = chunk_size


def _backward(ctx, grad_out, grad_final):
    q, k, v, log_decay, initial_state, final_state = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(v)
    grad_q, grad_k, grad_v, grad_decay, grad_initial = linear_attention_backward_op(
        grad_out, grad_final, q, k, v, log_decay, initial_state, final_state, ctx.chunk_size)
    return (grad_q, grad_k, grad_v, grad_decay if log_decay is not None else None,
            grad_initial if initial_state is not None else None, None)


linear_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("attention_planner::linear_attention_recurrent", mutates_args=())
def linear_attention_recurrent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                                  initial_state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step form (recurrent.py): same results as linear_attention_op, no gradients (decoding)."""
    q, k, v, log_decay, initial_state = map(contiguous_or_none, (q, k, v, log_decay, initial_state))
    if not triton_usable(q):
        return _naive_forward(q, k, v, log_decay, initial_state)
    return recurrent_forward(q, k, v, log_decay, initial_state)


@linear_attention_recurrent_op.register_fake
def _(q, k, v, log_decay, initial_state):
    batch, heads, _, value_dim = v.shape
    return torch.empty_like(v), v.new_empty(batch, heads, q.shape[-1], value_dim, dtype=accumulator_dtype(q.dtype))


def validate_linear_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           initial_state: Optional[torch.Tensor]) -> None:
    """Raise BackendError naming the first input that linear attention cannot take."""
    check_qkv(q, k, v, DTYPES)
    if q.shape != k.shape:
        raise BackendError(f"q and k must have the same shape; got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, seq_len, value_dim = v.shape
    if q.shape[0] != batch or q.shape[2] != seq_len:
        raise BackendError(f"q/k (batch, seq) = {(q.shape[0], q.shape[2])} differ from v's {(batch, seq_len)}")
    if heads % q.shape[1]:
        raise BackendError(f"q/k heads ({q.shape[1]}) must divide v heads ({heads})")
    expected_state = (batch, heads, q.shape[-1], value_dim)
    if initial_state is not None and tuple(initial_state.shape) != expected_state:
        raise BackendError(f"initial_state must have shape (batch, heads, key_dim, value_dim) = {expected_state}; "
                           f"got {tuple(initial_state.shape)}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: Decay = None,
                     feature_map: FeatureMap = None, causal: bool = True, initial_state: Optional[torch.Tensor] = None,
                     return_state: bool = False):
    """Linear attention with optional decay: o_t = S_t^T phi(q_t), S_t = exp(g_t) S_{t-1} + phi(k_t) v_t^T.

    Plain (un-normalized, unscaled) linear attention, like flash-linear-attention's chunk_linear_attn with
    normalize=False and scale=1: there is no denominator phi(q_t) . sum_s phi(k_s); scale q yourself if you want one.

    Args:
        q, k: (batch, qk_heads, seq, key_dim); v: (batch, heads, seq, value_dim); qk_heads divides heads.
        decay: natural-log decay factors (<= 0): None; a float or a (heads,) tensor (constant per head, RetNet);
            (batch, heads, seq) (data-dependent per head and position); or (batch, heads, seq, key_dim)
            (data-dependent per key channel, GLA / RWKV-6). Gradients flow into tensor decays.
        feature_map: None, "elu+1", "relu", or a callable (e.g. an nn.Module, a learned map) applied to q and k in
            PyTorch before the kernel, so autograd reaches its parameters.
        causal: False gives o_t = (S_0 + sum_s phi(k_s) v_s^T)^T phi(q_t) (two matrix products, decay=None only).
        initial_state: (batch, heads, key_dim, value_dim), the state before the first position.
        return_state: also return the state after the last position (float32; float64 for float64 inputs), to be
            passed as the next call's initial_state: two calls on the halves of a sequence equal one call.

    Causal inputs run the chunked kernel (chunk 64); without gradients, sequences of at most 16 positions (decoding)
    run the recurrent kernel, which gives the same results.
    """
    validate_linear_inputs(q, k, v, initial_state)
    batch, heads, seq_len, value_dim = v.shape
    q = apply_feature_map(feature_map, q)
    k = apply_feature_map(feature_map, k)
    log_decay = log_decay_per_position(decay, batch, heads, seq_len, q.shape[-1])
    if log_decay is not None:
        log_decay = log_decay.to(q.device)
        if log_decay.dtype not in (torch.float32, torch.float64):
            log_decay = log_decay.float()  # cumulative sums in half precision would drift

    if not causal:
        if log_decay is not None:
            raise BackendError("causal=False takes decay=None only: a decay needs an order of positions")
        out, final = _non_causal(q, k, v, initial_state)
    elif seq_len <= RECURRENT_MAX_LEN and not _needs_grad(q, k, v, log_decay, initial_state):
        out, final = linear_attention_recurrent_op(q, k, v, log_decay, initial_state)
    else:
        out, final = linear_attention_op(q, k, v, log_decay, initial_state, CHUNK_SIZE)
    return (out, final) if return_state else out


def _non_causal(q, k, v, initial_state):
    """Every query reads the whole sequence's state: two matrix products, which cuBLAS already does best."""
    heads = v.shape[1]
    accumulator = accumulator_dtype(q.dtype)
    keys = k.repeat_interleave(heads // k.shape[1], dim=1)
    queries = q.repeat_interleave(heads // q.shape[1], dim=1)
    state = (keys.transpose(-1, -2) @ v).to(accumulator)
    if initial_state is not None:
        state = state + initial_state.to(accumulator)
    out = (queries.to(accumulator) @ state).to(v.dtype)
    return out, state
