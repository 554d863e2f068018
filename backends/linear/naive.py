"""The readable reference for linear attention with decay: the recurrence, one position at a time.

    S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_t^T        o_t = S_t^T q_t        (causal)
    o_t = (S_0 + sum_s k_s v_s^T)^T q_t                                           (non-causal, no decay)

No normalizer (the denominator q_t . sum_s k_s of Katharopoulos et al.) and no 1/sqrt(d) scale: this is the plain
form of flash-linear-attention's chunk_linear_attn(normalize=False, scale=1); scale q yourself if you want one.

Layout (batch, heads, sequence, head_dim). q and k may have fewer heads than v, dividing them (Mamba-2's groups):
value head h reads q/k head h // (heads // qk_heads). Everything is computed in float64.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from passes.errors import BackendError

FeatureMap = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]
Decay = Union[None, float, torch.Tensor]
FEATURE_MAPS = ("elu+1", "relu")


def apply_feature_map(feature_map: FeatureMap, tensor: torch.Tensor) -> torch.Tensor:
    """phi(x): None (identity), "elu+1", "relu", or any callable (a module: a learned map)."""
    if feature_map is None:
        return tensor
    if feature_map == "elu+1":
        return F.elu(tensor) + 1
    if feature_map == "relu":
        return F.relu(tensor)
    if callable(feature_map):
        return feature_map(tensor)
    raise BackendError(f"feature_map={feature_map!r} is not accepted; accepted: None, "
                       f"{', '.join(repr(name) for name in FEATURE_MAPS)}, or a callable such as an nn.Module")


def log_decay_per_position(decay: Decay, batch: int, heads: int, seq_len: int,
                           key_dim: int) -> Optional[torch.Tensor]:
    """The decay argument as a log-decay per position: None, (batch, heads, seq) or (batch, heads, seq, key_dim).

    Accepted forms (natural-log decay factors, <= 0 so that exp(decay) is in (0, 1]):
      None                          no decay (plain linear attention)
      a float                       one constant decay for every head
      (heads,)                      a constant decay per head (RetNet: log(gamma_h))
      (batch, heads, seq)           data-dependent, one per head and position (Mamba-2's dt * A)
      (batch, heads, seq, key_dim)  data-dependent per key channel (GLA, RWKV-6)
    """
    if decay is None:
        return None
    if isinstance(decay, (int, float)):
        return torch.full((batch, heads, seq_len), float(decay), dtype=torch.float32)
    if not isinstance(decay, torch.Tensor):
        raise BackendError(f"decay must be None, a float or a tensor; got {type(decay).__name__}")
    if not decay.is_floating_point():
        raise BackendError(f"decay must be a floating-point tensor; got {decay.dtype}")
    accepted = ((heads,), (batch, heads, seq_len), (batch, heads, seq_len, key_dim))
    if tuple(decay.shape) == (heads,):
        return decay.view(1, heads, 1).expand(batch, heads, seq_len)
    if tuple(decay.shape) in accepted[1:]:
        return decay
    raise BackendError(f"decay of shape {tuple(decay.shape)} is not accepted; accepted: a float, (heads,) = "
                       f"{accepted[0]}, (batch, heads, seq) = {accepted[1]} or (batch, heads, seq, key_dim) = "
                       f"{accepted[2]}")


def _expand_qk_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    return tensor.repeat_interleave(heads // tensor.shape[1], dim=1)


def linear_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: Decay = None,
                           feature_map: FeatureMap = None, causal: bool = True,
                           initial_state: Optional[torch.Tensor] = None, return_state: bool = False):
    """Linear attention by its recurrence, in float64. Same arguments and results as `backends.linear_attention`.

    Returns out (like v, in v's dtype) and, with return_state, the final state (batch, heads, key_dim, value_dim)
    in float64.
    """
    batch, heads, seq_len, value_dim = v.shape
    key_dim = q.shape[-1]
    queries = _expand_qk_heads(apply_feature_map(feature_map, q), heads).double()
    keys = _expand_qk_heads(apply_feature_map(feature_map, k), heads).double()
    values = v.double()
    state = torch.zeros(batch, heads, key_dim, value_dim, dtype=torch.float64, device=v.device)
    if initial_state is not None:
        state = state + initial_state.double()
    log_decay = log_decay_per_position(decay, batch, heads, seq_len, key_dim)

    if not causal:
        if log_decay is not None:
            raise BackendError("non-causal linear attention takes decay=None only (a decay orders the positions)")
        state = state + keys.transpose(-1, -2) @ values
        out = queries @ state
        return (out.to(v.dtype), state) if return_state else out.to(v.dtype)

    outputs = []
    for t in range(seq_len):
        if log_decay is not None:
            factor = log_decay[:, :, t].double().to(v.device).exp()
            state = state * (factor[..., None, None] if factor.dim() == 2 else factor[..., None])
        state = state + keys[:, :, t, :, None] * values[:, :, t, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", queries[:, :, t], state))
    out = torch.stack(outputs, dim=2) if outputs else values.new_zeros(batch, heads, 0, value_dim)
    return (out.to(v.dtype), state) if return_state else out.to(v.dtype)


def linear_attention_naive_backward(grad_out: torch.Tensor, grad_final: Optional[torch.Tensor], q: torch.Tensor,
                                    k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                                    initial_state: Optional[torch.Tensor]):
    """Gradients of the causal recurrence, by the recurrence run backwards (float64; no autograd needed, so it runs
    inside a custom op, where autograd does not record). log_decay: None, (batch, heads, seq) or (..., key_dim).

    With dS the gradient of S_t, going t = T-1 .. 0:
        dS += q_t do_t^T;  dq_t = S_t do_t;  dk_t = dS v_t;  dv_t = dS^T k_t;
        dg_t = sum(dS * exp(g_t) S_{t-1}) (per key channel, or over all for a scalar decay);  dS *= exp(g_t)
    Returns (dq, dk, dv, d_log_decay or None, d_initial_state or None) in the inputs' dtypes.
    """
    batch, heads, seq_len, value_dim = v.shape
    qk_heads, key_dim = q.shape[1], q.shape[-1]
    queries, keys = _expand_qk_heads(q, heads).double(), _expand_qk_heads(k, heads).double()
    values, grad_out = v.double(), grad_out.double()
    state = torch.zeros(batch, heads, key_dim, value_dim, dtype=torch.float64, device=v.device)
    if initial_state is not None:
        state = state + initial_state.double()
    factors = None if log_decay is None else log_decay.double().exp()
    states = [state]  # states[t] = S_{t-1}
    for t in range(seq_len):
        if factors is not None:
            factor = factors[:, :, t]
            state = state * (factor[..., None, None] if factor.dim() == 2 else factor[..., None])
        state = state + keys[:, :, t, :, None] * values[:, :, t, None, :]
        states.append(state)

    grad_state = torch.zeros_like(state) if grad_final is None else grad_final.double().clone()
    grad_q, grad_k, grad_v = torch.zeros_like(queries), torch.zeros_like(keys), torch.zeros_like(values)
    grad_decay = None if log_decay is None else torch.zeros_like(log_decay, dtype=torch.float64)
    for t in reversed(range(seq_len)):
        grad_state = grad_state + queries[:, :, t, :, None] * grad_out[:, :, t, None, :]
        grad_q[:, :, t] = torch.einsum("bhkv,bhv->bhk", states[t + 1], grad_out[:, :, t])
        grad_k[:, :, t] = torch.einsum("bhkv,bhv->bhk", grad_state, values[:, :, t])
        grad_v[:, :, t] = torch.einsum("bhkv,bhk->bhv", grad_state, keys[:, :, t])
        if factors is not None:
            factor = factors[:, :, t]
            if factor.dim() == 2:
                grad_decay[:, :, t] = factor * (grad_state * states[t]).sum((-1, -2))
                grad_state = grad_state * factor[..., None, None]
            else:
                grad_decay[:, :, t] = factor * (grad_state * states[t]).sum(-1)
                grad_state = grad_state * factor[..., None]
    group = heads // qk_heads
    grad_q = grad_q.view(batch, qk_heads, group, seq_len, key_dim).sum(2)
    grad_k = grad_k.view(batch, qk_heads, group, seq_len, key_dim).sum(2)
    return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype),
            None if grad_decay is None else grad_decay.to(log_decay.dtype),
            None if initial_state is None else grad_state.to(initial_state.dtype))
