"""Exact attention computed block by block with an online softmax, in plain PyTorch.

This is the flash variant's path where Triton is absent (the CPU) or cannot express the mask (an arbitrary mask
tensor). Extra memory grows linearly with the sequence length: only one (query block × key block) tile of scores
exists at a time, never the full square. Blocks that the causal/window structure hides entirely are skipped.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.flash.naive import visible_keys

QUERY_BLOCK = 256
KEY_BLOCK = 512


def _key_block_range(q_start, q_end, kv_len, causal, window, block):
    """Key blocks that a query block [q_start, q_end) can see; the rest are skipped, not computed and masked."""
    first, last = 0, kv_len
    if causal:
        last = min(kv_len, q_end)
    if window is not None:
        first = max(0, q_start - window + 1)
        if not causal:
            last = min(kv_len, q_end + window - 1)
    return range((first // block) * block, last, block)


def _tile_mask(q_start, q_end, k_start, k_end, *, causal, window, sinks, key_padding_mask, attn_mask, device):
    """Visibility (bool) and additive bias of one tile, each None where the tile needs none."""
    visible = None
    if causal or window is not None:
        visible = visible_keys(
            torch.arange(q_start, q_end, device=device),
            torch.arange(k_start, k_end, device=device),
            causal=causal,
            window=window,
            sinks=sinks,
        )[None, None]
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, k_start:k_end]
        visible = padding if visible is None else visible & padding
    bias = None
    if attn_mask is not None:
        tile = attn_mask[..., q_start:q_end, k_start:k_end]
        if tile.dtype == torch.bool:
            visible = tile if visible is None else visible & tile
        else:
            bias = tile
    return visible, bias


def _broadcast_mask(attn_mask, batch, heads, q_len, kv_len):
    """A view of attn_mask with four dims of size 1 or full, so that tiles can be sliced from it."""
    if attn_mask is None:
        return None
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(
        batch if attn_mask.shape[0] != 1 else 1,
        heads if attn_mask.shape[1] != 1 else 1,
        q_len,
        kv_len,
    )


def _tile_key_values(k, v, k_start, k_end, group):
    # Grouped-query attention: query head h reads kv head h // group. repeat_interleave on one tile only.
    keys = k[:, :, k_start:k_end]
    values = v[:, :, k_start:k_end]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    return keys, values


def _masked_scores(q_tile, keys, scale, visible, bias):
    scores = (q_tile @ keys.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def blockwise_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: Optional[int],
    sinks: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out in q.dtype, lse in float32, or float64 for float64 inputs)."""
    batch, q_heads, q_len, _ = q.shape
    kv_len, value_dim = k.shape[2], v.shape[3]
    group = q_heads // k.shape[1]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    attn_mask = _broadcast_mask(attn_mask, batch, q_heads, q_len, kv_len)
    out = q.new_empty(batch, q_heads, q_len, value_dim)
    lse = torch.empty(batch, q_heads, q_len, dtype=compute_dtype, device=q.device)

    for q_start in range(0, q_len, QUERY_BLOCK):
        q_end = min(q_len, q_start + QUERY_BLOCK)
        q_tile = q[:, :, q_start:q_end].to(compute_dtype)
        # Running max, running sum and unnormalized output, all kept in fp32: the online softmax rescales them.
        running_max = torch.full((batch, q_heads, q_end - q_start, 1), float("-inf"), dtype=compute_dtype, device=q.device)
        running_sum = torch.zeros_like(running_max)
        accumulator = torch.zeros(batch, q_heads, q_end - q_start, value_dim, dtype=compute_dtype, device=q.device)
        key_starts = _key_block_range(q_start, q_end, kv_len, causal, window, KEY_BLOCK)
        if sinks and window is not None:
            key_starts = sorted(set(range(0, min(sinks, kv_len), KEY_BLOCK)) | set(key_starts))
        for k_start in key_starts:
            k_end = min(kv_len, k_start + KEY_BLOCK)
            keys, values = _tile_key_values(k, v, k_start, k_end, group)
            visible, bias = _tile_mask(
                q_start, q_end, k_start, k_end, causal=causal, window=window, sinks=sinks,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, device=q.device,
            )
            scores = _masked_scores(q_tile, keys.to(compute_dtype), scale, visible, bias)
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            # A row that has seen only -inf keeps max -inf; shift by 0 there so exp() gives 0, not NaN.
            shift = torch.where(torch.isinf(new_max), 0.0, new_max)
            probabilities = torch.exp(scores - shift)
            correction = torch.exp(running_max - shift)
            running_sum = running_sum * correction + probabilities.sum(dim=-1, keepdim=True)
            accumulator = accumulator * correction + probabilities @ values.to(compute_dtype)
            running_max = new_max
        empty_rows = running_sum == 0
        out[:, :, q_start:q_end] = torch.where(empty_rows, 0.0, accumulator / running_sum.clamp_min(1e-30)).to(q.dtype)
        tile_lse = torch.where(empty_rows, float("-inf"), running_max + torch.log(running_sum.clamp_min(1e-30)))
        lse[:, :, q_start:q_end] = tile_lse.squeeze(-1)
    return out, lse


def blockwise_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    window: Optional[int],
    sinks: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    mask_needs_grad: bool,
):
    """Gradients (dq, dk, dv, d_attn_mask or None) by recomputing each tile's probabilities from the saved lse."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    original_mask = attn_mask
    attn_mask = _broadcast_mask(attn_mask, batch, q_heads, q_len, kv_len)
    grad_mask = torch.zeros(attn_mask.shape, dtype=compute_dtype, device=q.device) if mask_needs_grad else None

    grad_q = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    grad_k = torch.zeros(batch, q_heads, kv_len, k.shape[3], dtype=compute_dtype, device=q.device)
    grad_v = torch.zeros(batch, q_heads, kv_len, v.shape[3], dtype=compute_dtype, device=q.device)
    # delta_i = sum_d dO_id * O_id is the softmax backward's row term; a gradient on lse enters with opposite sign.
    delta = (grad_out.to(compute_dtype) * out.to(compute_dtype)).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute_dtype)[..., None]
    safe_lse = torch.where(torch.isinf(lse), 0.0, lse).to(compute_dtype)[..., None]

    for q_start in range(0, q_len, QUERY_BLOCK):
        q_end = min(q_len, q_start + QUERY_BLOCK)
        q_tile = q[:, :, q_start:q_end].to(compute_dtype)
        grad_out_tile = grad_out[:, :, q_start:q_end].to(compute_dtype)
        key_starts = _key_block_range(q_start, q_end, kv_len, causal, window, KEY_BLOCK)
        if sinks and window is not None:
            key_starts = sorted(set(range(0, min(sinks, kv_len), KEY_BLOCK)) | set(key_starts))
        for k_start in key_starts:
            k_end = min(kv_len, k_start + KEY_BLOCK)
            keys, values = _tile_key_values(k, v, k_start, k_end, group)
            keys, values = keys.to(compute_dtype), values.to(compute_dtype)
            visible, bias = _tile_mask(
                q_start, q_end, k_start, k_end, causal=causal, window=window, sinks=sinks,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, device=q.device,
            )
            scores = _masked_scores(q_tile, keys, scale, visible, bias)
            probabilities = torch.exp(scores - safe_lse[:, :, q_start:q_end])
            grad_v[:, :, k_start:k_end] += probabilities.transpose(-1, -2) @ grad_out_tile
            grad_probabilities = grad_out_tile @ values.transpose(-1, -2)
            grad_scores = probabilities * (grad_probabilities - delta[:, :, q_start:q_end])
            grad_q[:, :, q_start:q_end] += (grad_scores @ keys) * scale
            grad_k[:, :, k_start:k_end] += (grad_scores.transpose(-1, -2) @ q_tile) * scale
            if grad_mask is not None:
                grad_mask[..., q_start:q_end, k_start:k_end] += _sum_to_shape(grad_scores, grad_mask.shape)

    if group > 1:  # each kv head collects the gradients of its whole query-head group
        grad_k = grad_k.view(batch, kv_heads, group, kv_len, -1).sum(dim=2)
        grad_v = grad_v.view(batch, kv_heads, group, kv_len, -1).sum(dim=2)
    if grad_mask is not None:
        grad_mask = _sum_to_shape(grad_mask, original_mask.shape).to(original_mask.dtype)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_mask


def _sum_to_shape(tensor: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast result back to the shape it was broadcast from (leading dims removed, size-1 dims summed)."""
    while tensor.dim() > len(shape):
        tensor = tensor.sum(dim=0)
    for dim, size in enumerate(shape[-tensor.dim():] if len(shape) else []):
        if size == 1 and tensor.shape[dim] != 1:
            tensor = tensor.sum(dim=dim, keepdim=True)
    return tensor
