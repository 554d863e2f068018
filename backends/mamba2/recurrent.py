"""Mamba-2 SSD, step form for decoding: the linear-attention recurrent kernel under SSD's names.

q = C, k = B, v = x * dt (formed here: a decoding step is a few positions), log-decay = dt * A; the state is
transposed to Mamba-2's (head_dim, state_dim) on the way in and out.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.linear.chunk import accumulator_dtype
from backends.linear.recurrent import recurrent_forward
from backends.mamba2.chunk import ssd_log_decay


def ssd_recurrent_forward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          initial_state: Optional[torch.Tensor]):
    """Returns (y like x, final state (batch, heads, head_dim, state_dim), float32; float64 for float64 x)."""
    accumulator = accumulator_dtype(x.dtype)
    values = (x.to(accumulator) * dt.to(accumulator)[..., None]).to(x.dtype).contiguous()
    initial = None if initial_state is None else initial_state.transpose(-1, -2).to(accumulator).contiguous()
    out, final = recurrent_forward(C.contiguous(), B.contiguous(), values, ssd_log_decay(dt, A, x.dtype), initial)
    return out, final.transpose(-1, -2)
