"""Mamba-2 SSD ops: `attention_planner::ssd` (chunked, with autograd), its backward, and
`attention_planner::ssd_recurrent` (step form for decoding, forward only); the public `ssd`.

On CUDA (or on the CPU under TRITON_INTERPRET=1) the ops run the linear-attention Triton kernels through chunk.py and
recurrent.py; elsewhere they run the float64 quadratic form of naive.py (a correct CPU fallback, not a CPU kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.linear.chunk import accumulator_dtype
from backends.linear.naive import linear_attention_naive_backward
from backends.mamba2.chunk import ssd_chunk_backward, ssd_chunk_forward
from backends.mamba2.naive import ssd_naive
from backends.mamba2.recurrent import ssd_recurrent_forward
from backends.common import contiguous_or_none, triton_usable
from passes.errors import BackendError

RECURRENT_MAX_LEN = 16  # without gradients, sequences up to this long (decoding steps) take the recurrent form
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _naive_forward(x, dt, A, B, C, initial_state):
    y, final = ssd_naive(x, dt, A, B, C, initial_state=initial_state, return_state=True)
    return y, final.to(accumulator_dtype(x.dtype))


@torch.library.custom_op("attention_planner::ssd", mutates_args=())
def ssd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           initial_state: Optional[torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y like x, final state (batch, heads, head_dim, state_dim), float32; float64 for float64 x)."""
    x, dt, A, B, C, initial_state = map(contiguous_or_none, (x, dt, A, B, C, initial_state))
    if not triton_usable(x):
        return _naive_forward(x, dt, A, B, C, initial_state)
    y, final = ssd_chunk_forward(x, dt, A, B, C, initial_state, chunk_size)
    return y, final.contiguous()


@ssd_op.register_fake
def _(x, dt, A, B, C, initial_state, chunk_size):
    batch, heads, _, head_dim = x.shape
    final = x.new_empty(batch, heads, head_dim, B.shape[-1], dtype=accumulator_dtype(x.dtype))
    return torch.empty_like(x), final


@torch.library.custom_op("attention_planner::ssd_backward", mutates_args=())
def ssd_backward_op(
    grad_y: torch.Tensor, grad_final: Optional[torch.Tensor], x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, initial_state: Optional[torch.Tensor], final_state: torch.Tensor, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, d_dt, dA, dB, dC, d_initial_state); the last is empty without an initial state."""
    x, dt, A, B, C, initial_state, grad_y, grad_final = map(
        contiguous_or_none, (x, dt, A, B, C, initial_state, grad_y, grad_final))
    if triton_usable(x):
        grads = ssd_chunk_backward(grad_y, grad_final, x, dt, A, B, C, initial_state, final_state, chunk_size)
    else:
        grads = _naive_backward(grad_y, grad_final, x, dt, A, B, C, initial_state)
    *grads, grad_initial = grads
    grad_initial = x.new_empty(0) if grad_initial is None else grad_initial.contiguous()
    return (*(grad.contiguous() for grad in grads), grad_initial)


def _naive_backward(grad_y, grad_final, x, dt, A, B, C, initial_state):
    """The CPU fallback's backward: the linear-attention recurrence's explicit backward under SSD's names (autograd
    does not record inside a custom op), then the chain rule through v = x * dt and a = dt * A, in float64."""
    x64, dt64, A64 = x.double(), dt.double(), A.double()
    transpose = lambda state: None if state is None else state.double().transpose(-1, -2)  # noqa: E731
    grad_C, grad_B, grad_values, grad_decay, grad_initial = linear_attention_naive_backward(
        grad_y, transpose(grad_final), C.double(), B.double(), x64 * dt64[..., None], dt64 * A64[None, :, None],
        transpose(initial_state))
    grad_x = grad_values * dt64[..., None]
    grad_dt = (grad_values * x64).sum(-1) + grad_decay * A64[None, :, None]
    grad_A = (grad_decay * dt64).sum((0, 2))
    return (grad_x.to(x.dtype), grad_dt.to(dt.dtype), grad_A.to(A.dtype), grad_B.to(B.dtype), grad_C.to(C.dtype),
            None if initial_state is None else transpose(grad_initial).to(initial_state.dtype))


@ssd_backward_op.register_fake
def _(grad_y, grad_final, x, dt, A, B, C, initial_state, final_state, chunk_size):
    grad_initial = x.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), grad_initial)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, initial_state, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C, initial_state, output[1])
    ctx.chunk_size = chunk_size


def _backward(ctx, grad_y, grad_final):
    x, dt, A, B, C, initial_state, final_state = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    grad_x, grad_dt, grad_A, grad_B, grad_C, grad_initial = ssd_backward_op(
        grad_y, grad_final, x, dt, A, B, C, initial_state, final_state, ctx.chunk_size)
    return grad_x, grad_dt, grad_A, grad_B, grad_C, (grad_initial if initial_state is not None else None), None


ssd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("attention_planner::ssd_recurrent", mutates_args=())
def ssd_recurrent_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     initial_state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step form (recurrent.py): same results as ssd_op, no gradients (decoding)."""
    x, dt, A, B, C, initial_state = map(contiguous_or_none, (x, dt, A, B, C, initial_state))
    if not triton_usable(x):
        return _naive_forward(x, dt, A, B, C, initial_state)
    y, final = ssd_recurrent_forward(x, dt, A, B, C, initial_state)
    return y, final.contiguous()


@ssd_recurrent_op.register_fake
def _(x, dt, A, B, C, initial_state):
    batch, heads, _, head_dim = x.shape
    return torch.empty_like(x), x.new_empty(batch, heads, head_dim, B.shape[-1], dtype=accumulator_dtype(x.dtype))


def validate_ssd_inputs(x, dt, A, B, C, initial_state, chunk_size) -> None:
    """Raise BackendError naming the first input that SSD cannot take."""
    if x.dim() != 4:
        raise BackendError(f"x must be (batch, heads, seq, head_dim); got shape {tuple(x.shape)}")
    batch, heads, seq_len, head_dim = x.shape
    expected = {"dt": (batch, heads, seq_len), "A": (heads,)}
    for name, tensor in (("dt", dt), ("A", A)):
        if tuple(tensor.shape) != expected[name]:
            raise BackendError(f"{name} must have shape {expected[name]}; got {tuple(tensor.shape)}")
    for name, tensor in (("B", B), ("C", C)):
        if tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[2] != seq_len or heads % tensor.shape[1]:
            raise BackendError(f"{name} must be (batch, groups, seq, state_dim) with groups dividing heads={heads}, "
                               f"batch={batch}, seq={seq_len}; got {tuple(tensor.shape)}")
    if B.shape != C.shape:
        raise BackendError(f"B and C must have the same shape; got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, tensor in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if tensor.dtype not in DTYPES:
            raise BackendError(f"{name} has dtype {tensor.dtype}; accepted: float16, bfloat16, float32, float64")
    if not (x.dtype == B.dtype == C.dtype):
        raise BackendError(f"x, B, C must share a dtype; got {x.dtype}, {B.dtype}, {C.dtype}")
    expected_state = (batch, heads, head_dim, B.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected_state:
        raise BackendError(f"initial_state must be (batch, heads, head_dim, state_dim) = {expected_state}; got "
                           f"{tuple(initial_state.shape)}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise BackendError(f"chunk_size must be a power of two >= 16; got {chunk_size}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *, chunk_size: int = 256,
        initial_state: Optional[torch.Tensor] = None, return_state: bool = False):
    """Mamba-2's state-space duality: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t (per head).

    Layout (batch, heads, seq, dim) like every public function here; Mamba-2's kernels take (batch, seq, heads,
    dim): pass x.transpose(1, 2) and get y.transpose(1, 2) back.

    Args:
        x: (batch, heads, seq, head_dim).
        dt: (batch, heads, seq), the step sizes after softplus (> 0).
        A: (heads,), negative (Mamba-2's -exp(A_log)).
        B, C: (batch, groups, seq, state_dim), groups dividing heads (head h reads group h // (heads // groups)).
        chunk_size: positions per chunk of the chunked kernel (a power of two >= 16; 256 as Mamba-2). Results do
            not depend on it beyond rounding.
        initial_state: (batch, heads, head_dim, state_dim), Mamba-2's state layout.
        return_state: also return the final state (float32; float64 for float64 x), for the next call.

    No D skip term, no gating: the mixer (backends/mamba2/mixer.py) adds those around this op. Without gradients,
    sequences of at most 16 positions run the recurrent (decoding) kernel, which gives the same results.
    """
    validate_ssd_inputs(x, dt, A, B, C, initial_state, chunk_size)
    if x.shape[2] <= RECURRENT_MAX_LEN and not _needs_grad(x, dt, A, B, C, initial_state):
        y, final = ssd_recurrent_op(x, dt, A, B, C, initial_state)
    else:
        y, final = ssd_op(x, dt, A, B, C, initial_state, chunk_size)
    return (y, final) if return_state else y
