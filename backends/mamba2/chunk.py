"""Mamba-2 SSD on the linear-attention chunk kernels: no second kernel, only a change of names.

SSD is causal linear attention with a decay per head and position:  q = C, k = B, v = x * dt, log-decay = dt * A,
state = h^T (ours key_dim x value_dim = state_dim x head_dim; Mamba-2's head_dim x state_dim). The kernels of
backends/linear/chunk.py take v * dt as a per-position value scale (never materialized) and B, C with fewer heads
(groups). This file holds only the mapping and the chain rule for dt, A and x.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.linear.chunk import accumulator_dtype, chunk_backward, chunk_forward


def _transpose_state(state: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if state is None else state.transpose(-1, -2).to(dtype).contiguous()


def ssd_log_decay(dt: torch.Tensor, A: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """a_t = dt_t * A_h, in float32 at least, float64 for float64 x (its cumulative sums decide every decay)."""
    dtype = torch.promote_types(accumulator_dtype(value_dtype), dt.dtype)
    return (dt.to(dtype) * A.to(dtype)[None, :, None]).contiguous()


def ssd_chunk_forward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      initial_state: Optional[torch.Tensor], chunk_size: int):
    """Returns (y like x, final state (batch, heads, head_dim, state_dim), float32; float64 for float64 x)."""
    accumulator = accumulator_dtype(x.dtype)
    out, final = chunk_forward(C, B, x, ssd_log_decay(dt, A, x.dtype), _transpose_state(initial_state, accumulator),
                               chunk_size, value_scale=dt.contiguous())
    return out, final.transpose(-1, -2)


def ssd_chunk_backward(grad_y: torch.Tensor, grad_final: Optional[torch.Tensor], x: torch.Tensor, dt: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, initial_state: Optional[torch.Tensor],
                       final_state: torch.Tensor, chunk_size: int):
    """Returns (dx, d_dt, dA, dB, dC, d_initial_state or None)."""
    accumulator = accumulator_dtype(x.dtype)
    grad_C, grad_B, grad_values, grad_log_decay, grad_initial = chunk_backward(
        grad_y, _transpose_state(grad_final, accumulator), C, B, x, ssd_log_decay(dt, A, x.dtype),
        _transpose_state(initial_state, accumulator), _transpose_state(final_state, accumulator), chunk_size,
        value_scale=dt.contiguous())
    # grad_values is the gradient of v = x * dt; the decay's gradient reaches dt and A through a = dt * A.
    grad_values = grad_values.to(accumulator)
    grad_x = (grad_values * dt.to(accumulator)[..., None]).to(x.dtype)
    grad_log_decay = grad_log_decay.to(accumulator)
    grad_dt = (grad_values * x.to(accumulator)).sum(-1) + grad_log_decay * A.to(accumulator)[None, :, None]
    grad_A = (grad_log_decay * dt.to(accumulator)).sum((0, 2))
    return (grad_x, grad_dt.to(dt.dtype), grad_A.to(A.dtype), grad_B, grad_C,
            None if grad_initial is None else grad_initial.transpose(-1, -2))
