"""A small reference Mamba-2 mixer (one block's sequence mixing) built on `backends.ssd`.

    u --in_proj--> z, xBC, dt
    xBC --causal depthwise conv1d, SiLU--> x, B, C
    y = ssd(x, softplus(dt + dt_bias), -exp(A_log), B, C) + D * x
    out = out_proj(RMSNorm(y * SiLU(z)))

The same computation as Mamba-2's Mamba2 module without its fused kernels, inference cache or tensor parallelism;
parameters have Mamba-2's names and shapes so that its weights load. Input and output (batch, seq, d_model).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from backends.mamba2.op import ssd


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * weight, normalized over groups of channels (Mamba-2's RMSNormGated, norm_before_gate
    False)."""

    def __init__(self, channels: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        precision = torch.promote_types(y.dtype, torch.float32)  # float32 at least, as Mamba-2's norm
        gated = (y * F.silu(z)).to(precision)
        grouped = gated.unflatten(-1, (-1, self.group_size))
        normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.to(precision)).to(y.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2's mixer: in_proj, causal conv1d, SSD, gate and norm, out_proj.

    Args:
        d_model: model width. d_state: SSD state size N. d_conv: conv1d width. expand: inner width / d_model.
        head_dim: SSD head size P (heads = expand * d_model / head_dim). n_groups: groups sharing B and C.
        chunk_size: SSD chunk size. ssd_function: the SSD to call (default `backends.ssd`; tests pass the
            reference), with signature ssd(x, dt, A, B, C, chunk_size=...) in layout (batch, heads, seq, dim).
    """

    def __init__(self, d_model: int, *, d_state: int = 64, d_conv: int = 4, expand: int = 2, head_dim: int = 64,
                 n_groups: int = 1, chunk_size: int = 256, dt_min: float = 0.001, dt_max: float = 0.1,
                 ssd_function: Optional[Callable] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(f"expand * d_model = {self.d_inner} must be a multiple of head_dim = {head_dim}")
        self.heads = self.d_inner // head_dim
        if self.heads % n_groups:
            raise ValueError(f"n_groups = {n_groups} must divide the number of heads = {self.heads}")
        self.head_dim, self.d_state, self.n_groups, self.chunk_size = head_dim, d_state, n_groups, chunk_size
        self.ssd_function = ssd_function if ssd_function is not None else ssd
        conv_channels = self.d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_channels + self.heads, bias=False, **factory)
        self.conv1d = nn.Conv1d(conv_channels, conv_channels, d_conv, groups=conv_channels, padding=d_conv - 1,
                                **factory)
        # dt's bias is the inverse softplus of step sizes drawn log-uniformly in [dt_min, dt_max], as Mamba-2's.
        dt = torch.exp(torch.rand(self.heads, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads, **factory).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.heads, **factory))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // n_groups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = u.shape
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.n_groups * self.d_state,
                                                   self.heads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :seq_len].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        # (batch, seq, heads * dim) -> (batch, heads, seq, dim): our public layout.
        x = x.view(batch, seq_len, self.heads, self.head_dim).transpose(1, 2)
        B = B.view(batch, seq_len, self.n_groups, self.d_state).transpose(1, 2)
        C = C.view(batch, seq_len, self.n_groups, self.d_state).transpose(1, 2)
        # dt and A in float32 at least, as Mamba-2 computes them (float64 stays float64).
        precision = torch.promote_types(u.dtype, torch.float32)
        dt = F.softplus(dt.to(precision) + self.dt_bias.to(precision)).transpose(1, 2)
        A = -torch.exp(self.A_log.to(precision))
        y = self.ssd_function(x, dt, A, B, C, chunk_size=self.chunk_size)
        y = y + self.D.to(y.dtype)[None, :, None, None] * x
        y = y.transpose(1, 2).reshape(batch, seq_len, self.d_inner)
        return self.out_proj(self.norm(y, z))
