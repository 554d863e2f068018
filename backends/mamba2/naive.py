"""The readable reference for Mamba-2's state-space duality (SSD), in its quadratic ("attention") form.

Per head h, with a_t = dt_t * A_h (log-decay, A_h < 0, dt_t > 0) and the scan state h_t (head_dim x state_dim):

    h_t = exp(a_t) h_{t-1} + (dt_t x_t) B_t^T          y_t = h_t C_t

Unrolled, y_t = sum_{s <= t} exp(a_{s+1} + ... + a_t) (C_t . B_s) dt_s x_s  +  exp(a_1 + ... + a_t) h_0 C_t:
a causal attention with scores C_t . B_s weighted by the segment sums of a. This file computes exactly that, as
Mamba-2's minimal SSD does (`segsum`), in float64: an oracle independent of the chunked kernels and of the linear-
attention reference.

Layout, ours (batch, heads, seq, dim), not Mamba-2's (batch, seq, heads, dim):
    x (batch, heads, seq, head_dim)   dt (batch, heads, seq)   A (heads,)
    B, C (batch, groups, seq, state_dim), groups dividing heads (head h reads group h // (heads // groups))
    states (batch, heads, head_dim, state_dim), as Mamba-2's.
"""
from __future__ import annotations

from typing import Optional

import torch


def segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """(..., seq) -> (..., seq, seq): entry [t, s] = a_{s+1} + ... + a_t for s <= t, -inf above the diagonal.

    Formed as a difference of cumulative sums and masked *before* any exp, so exp never sees a positive number.
    """
    cumulative = log_decay.cumsum(-1)
    differences = cumulative[..., :, None] - cumulative[..., None, :]
    seq_len = log_decay.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=log_decay.device).tril()
    return differences.masked_fill(~causal, float("-inf"))


def ssd_naive(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
              initial_state: Optional[torch.Tensor] = None, return_state: bool = False):
    """Mamba-2 SSD in float64 by its quadratic form. Same arguments and results as `backends.ssd` (no chunk size).

    Returns y (like x, in x's dtype) and, with return_state, the final state (batch, heads, head_dim, state_dim) in
    float64.
    """
    heads = x.shape[1]
    x64, dt64, A64 = x.double(), dt.double(), A.double()
    B64 = B.double().repeat_interleave(heads // B.shape[1], dim=1)
    C64 = C.double().repeat_interleave(heads // C.shape[1], dim=1)
    log_decay = dt64 * A64[None, :, None]  # (batch, heads, seq)
    weights = torch.exp(segment_sums(log_decay)) * (C64 @ B64.transpose(-1, -2))  # (batch, heads, seq, seq)
    y = weights @ (x64 * dt64[..., None])
    total = log_decay.sum(-1)  # (batch, heads)
    decay_to_end = torch.exp(total[..., None] - log_decay.cumsum(-1))  # exp(a_{s+1} + ... + a_T) <= 1
    final = torch.einsum("bhs,bhsp,bhsn->bhpn", decay_to_end * dt64, x64, B64)
    if initial_state is not None:
        h0 = initial_state.double()
        y = y + torch.exp(log_decay.cumsum(-1))[..., None] * torch.einsum("bhpn,bhtn->bhtp", h0, C64)
        final = final + torch.exp(total)[..., None, None] * h0
    return (y.to(x.dtype), final) if return_state else y.to(x.dtype)
