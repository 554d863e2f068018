"""Exact attention computed block by block with an online softmax, in plain PyTorch.

This is the flash variant's path where Triton is absent (the CPU) or cannot express the mask (an arbitrary mask
tensor). Extra memory grows linearly with the sequence length: only one (query block × key block) tile of scores
exists at a time, never the full square. Blocks that the causal/window structure hides entirely are skipped.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.flash.naive import visible_keys
from backends.flash.options import AttentionOptions

# Equal query and key blocks keep every causal diagonal tile aligned (k_start == q_start), so it needs no mask tensor.
QUERY_BLOCK = 512
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


def _visible_key_starts(q_start, q_end, kv_len, options: AttentionOptions) -> list:
    """The first key of each key block that a query block [q_start, q_end) sees (the sink keys' blocks included)."""
    window, sinks = options.window, options.sinks
    key_starts = _key_block_range(q_start, q_end, kv_len, options.causal, window, KEY_BLOCK)
    if sinks and window is not None:
        key_starts = sorted(set(range(0, min(sinks, kv_len), KEY_BLOCK)) | set(key_starts))
    return key_starts


def _tile_mask(q_start, q_end, k_start, k_end, options: AttentionOptions, attn_mask, device):
    """Visibility (bool) and additive bias of one tile, each None where the tile needs none (attn_mask: the
    options' mask broadcast to four dims)."""
    causal, window, sinks, key_padding_mask = options.causal, options.window, options.sinks, options.key_padding_mask
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


def _capped_scores(q_tile, keys, scale, softcap):
    """(scores, t): scaled scores, soft-capped to softcap * t with t = tanh(s / softcap) when softcap is set (t is
    what the backward needs: d capped / d s = 1 - t^2); t is None without soft-capping."""
    scores = (q_tile @ keys.transpose(-1, -2)) * scale
    if softcap is None:
        return scores, None
    tanh = torch.tanh(scores / softcap)
    return softcap * tanh, tanh


def _masked_scores(q_tile, keys, scale, visible, bias, softcap=None):
    scores, _ = _capped_scores(q_tile, keys, scale, softcap)
    return _mask_scores(scores, visible, bias)


def _mask_scores(scores, visible, bias):
    if bias is not None:
        scores = scores + bias
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _tile_kind(q_start, q_end, k_start, k_end, *, causal, window, sinks) -> str:
    """'full' when every (query, key) pair of the tile is visible, 'diagonal' when the tile is a causal diagonal with
    top-left alignment (query q_start + i sees key k_start + j iff j <= i) and nothing else, else 'masked'."""
    last_query, last_key = q_end - 1, k_end - 1
    if sinks and window is not None and k_start < sinks:
        return "masked"
    in_window = window is None or (
        (last_query - k_start < window) if causal else max(last_query - k_start, last_key - q_start) < window
    )
    if in_window and (not causal or last_key <= q_start):
        return "full"
    if causal and k_start == q_start and (window is None or q_end - q_start <= window):
        return "diagonal"
    return "masked"


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


def _fused_cpu_tile(q_tile, k, v, k_start, k_end, scale, causal, compute_dtype):
    """(out, lse) of one unmasked or top-left-causal tile through PyTorch's fused CPU flash kernel."""
    batch, q_heads, queries, _ = q_tile.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    # aten's CPU flash kernel reads the head dim as unit-stride without checking: a transposed or broadcast head dim
    # (SqueezeBERT's (batch, heads, head_dim, length) keys, seen transposed) would give wrong numbers silently.
    keys, values = (_unit_stride(k[:, :, k_start:k_end].to(compute_dtype)),
                    _unit_stride(v[:, :, k_start:k_end].to(compute_dtype)))
    q_tile = _unit_stride(q_tile.to(compute_dtype))
    if group > 1 and not causal:
        # Without a mask every query row is alike: fold each kv head's query group into its rows instead of
        # repeating keys and values.
        folded = _unit_stride(q_tile.reshape(batch, kv_heads, group * queries, -1))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(folded, keys, values, scale=scale)
        return out.reshape(batch, q_heads, queries, -1).to(lse.dtype), lse.reshape(batch, q_heads, queries)
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_tile, keys, values, is_causal=causal, scale=scale
    )
    return out.to(lse.dtype), lse


def _torch_tile(q_tile, keys, values, scale, visible, bias, compute_dtype, softcap=None):
    """(out, lse) of one tile in plain PyTorch, in compute_dtype; rows with no visible key give out 0, lse -inf."""
    scores = _masked_scores(q_tile.to(compute_dtype), keys.to(compute_dtype), scale, visible, bias, softcap)
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) is NaN: shift empty rows by 0 instead, which leaves their probabilities at exactly 0.
    probabilities = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return probabilities @ values.to(compute_dtype), lse


def _merge(out, lse, tile_out, tile_lse):
    """Exact merge of two softmax partial results by their log-sum-exp, in the stable form (fp32 or fp64)."""
    if out is None:
        return tile_out, tile_lse
    # sigmoid(lse_b - lse) is the weight of the new part; both -inf (no key yet) gives NaN, so guard those rows.
    both_empty = torch.isinf(lse) & torch.isinf(tile_lse)
    weight = torch.where(both_empty, 0.0, torch.sigmoid(tile_lse - lse))
    out = out - weight[..., None] * (out - torch.where(torch.isinf(tile_lse)[..., None], 0.0, tile_out))
    lse = torch.where(both_empty, lse, torch.logaddexp(lse, tile_lse))
    return out, lse


def _key_segments(q_start, q_end, key_starts, kv_len, *, causal, window, sinks, fused):
    """Group consecutive key blocks into segments (kind, k_start, k_end); with the fused kernel, adjacent 'full'
    blocks become one call."""
    segments = []
    for k_start in key_starts:
        k_end = min(kv_len, k_start + KEY_BLOCK)
        kind = _tile_kind(q_start, q_end, k_start, k_end, causal=causal, window=window, sinks=sinks)
        if fused and kind == "full" and segments and segments[-1][0] == "full" and segments[-1][2] == k_start:
            segments[-1] = ("full", segments[-1][1], k_end)
        else:
            segments.append((kind, k_start, k_end))
    return segments


def blockwise_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out in q.dtype, lse in float32, or float64 for float64 inputs).

    On the CPU, tiles that need no mask (or only a top-left causal diagonal) run through PyTorch's fused flash
    kernel, which returns the lse we merge with; masked tiles run in plain PyTorch. softcap: scores become
    softcap * tanh(s / softcap) before the masks. sink_logits (q_heads,): merged last as one more partial result
    with out 0 and lse = the sink logit (a logit with no value); the returned lse includes it.
    """
    causal, window, sinks, scale, softcap = options.causal, options.window, options.sinks, options.scale_for(q), \
        options.softcap
    key_padding_mask, sink_logits = options.key_padding_mask, options.sink_logits
    batch, q_heads, q_len, _ = q.shape
    kv_len, value_dim = k.shape[2], v.shape[3]
    group = q_heads // k.shape[1]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    attn_mask = _broadcast_mask(options.attn_mask, batch, q_heads, q_len, kv_len)
    # SDPA's fused kernel has no soft-capping and needs one head dim for q, k and v (a value head dim of its own, as
    # multi-head latent attention has, takes the PyTorch tiles); the sink logits are merged after the tiles, so they
    # do not matter here.
    fused = (q.device.type == "cpu" and key_padding_mask is None and attn_mask is None and softcap is None
             and v.shape[-1] == q.shape[-1])
    sink = None
    if sink_logits is not None:
        sink = sink_logits.to(device=q.device, dtype=compute_dtype)[None, :, None].expand(batch, q_heads, QUERY_BLOCK)
    out = q.new_empty(batch, q_heads, q_len, value_dim)
    lse = torch.empty(batch, q_heads, q_len, dtype=compute_dtype, device=q.device)

    for q_start in range(0, q_len, QUERY_BLOCK):
        q_end = min(q_len, q_start + QUERY_BLOCK)
        q_tile = q[:, :, q_start:q_end]
        key_starts = _visible_key_starts(q_start, q_end, kv_len, options)
        tile_out = tile_lse = None
        for kind, k_start, k_end in _key_segments(q_start, q_end, key_starts, kv_len, causal=causal, window=window,
                                                  sinks=sinks, fused=fused):
            if fused and kind != "masked":
                part = _fused_cpu_tile(q_tile, k, v, k_start, k_end, scale, kind == "diagonal", compute_dtype)
            else:
                keys, values = _tile_key_values(k, v, k_start, k_end, group)
                visible, bias = _tile_mask(q_start, q_end, k_start, k_end, options, attn_mask, q.device)
                part = _torch_tile(q_tile, keys, values, scale, visible, bias, compute_dtype, softcap)
            tile_out, tile_lse = _merge(tile_out, tile_lse, *part)
        if tile_out is None:  # no key block is visible from this query block
            tile_out = torch.zeros(batch, q_heads, q_end - q_start, value_dim, dtype=compute_dtype, device=q.device)
            tile_lse = torch.full(tile_out.shape[:-1], float("-inf"), dtype=compute_dtype, device=q.device)
        tile_out = torch.where(torch.isinf(tile_lse)[..., None], 0.0, tile_out)
        if sink is not None:
            row_sink = sink[..., : q_end - q_start]
            tile_out, tile_lse = _merge(tile_out, tile_lse, torch.zeros_like(tile_out), row_sink)
        out[:, :, q_start:q_end] = tile_out.to(q.dtype)
        lse[:, :, q_start:q_end] = tile_lse
    return out, lse


def blockwise_attention_backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
                                 k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 options: AttentionOptions, mask_needs_grad: bool):
    """Gradients (dq, dk, dv, d_attn_mask or None) by recomputing each tile's probabilities from the saved lse.

    With sink logits the saved lse includes them, and the key probabilities need no other change; their own
    gradient is `sink_logits_gradient`."""
    scale, softcap, attn_mask = options.scale_for(q), options.softcap, options.attn_mask
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
        for k_start in _visible_key_starts(q_start, q_end, kv_len, options):
            k_end = min(kv_len, k_start + KEY_BLOCK)
            keys, values = _tile_key_values(k, v, k_start, k_end, group)
            keys, values = keys.to(compute_dtype), values.to(compute_dtype)
            visible, bias = _tile_mask(q_start, q_end, k_start, k_end, options, attn_mask, q.device)
            scores, tanh = _capped_scores(q_tile, keys, scale, softcap)
            scores = _mask_scores(scores, visible, bias)
            probabilities = torch.exp(scores - safe_lse[:, :, q_start:q_end])
            grad_v[:, :, k_start:k_end] += probabilities.transpose(-1, -2) @ grad_out_tile
            grad_probabilities = grad_out_tile @ values.transpose(-1, -2)
            grad_scores = probabilities * (grad_probabilities - delta[:, :, q_start:q_end])
            if grad_mask is not None:  # an additive mask joins the scores after the cap: no tanh factor for it
                grad_mask[..., q_start:q_end, k_start:k_end] += _sum_to_shape(grad_scores, grad_mask.shape)
            if tanh is not None:  # through the cap: d (c * tanh(s / c)) / ds = 1 - tanh^2
                grad_scores = grad_scores * (1 - tanh * tanh)
            grad_q[:, :, q_start:q_end] += (grad_scores @ keys) * scale
            grad_k[:, :, k_start:k_end] += (grad_scores.transpose(-1, -2) @ q_tile) * scale

    if group > 1:  # each kv head collects the gradients of its whole query-head group
        grad_k = grad_k.view(batch, kv_heads, group, kv_len, -1).sum(dim=2)
        grad_v = grad_v.view(batch, kv_heads, group, kv_len, -1).sum(dim=2)
    if grad_mask is not None:
        grad_mask = _sum_to_shape(grad_mask, original_mask.shape).to(original_mask.dtype)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_mask


def sink_logits_gradient(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                         sink_logits: torch.Tensor) -> torch.Tensor:
    """d loss / d sink_logits, (q_heads,) in float32 (float64 for float64 inputs), for every implementation.

    The sink logit of head h is one more score of each row, with no value (dP = 0), so its score gradient is
    p_sink * (0 - delta) with p_sink = exp(sink_h - lse_i) (lse includes the sink) and delta_i = rowsum(dO_i * O_i)
    - dlse_i; the logit is shared by every row and batch: d sink_h = -sum_(b, i) p_sink * delta."""
    compute_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    delta = (grad_out.to(compute_dtype) * out.to(compute_dtype)).sum(dim=-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute_dtype)
    lse = lse.to(compute_dtype)
    sink = sink_logits.to(device=out.device, dtype=compute_dtype)[None, :, None]
    # lse = -inf only where the sink itself is -inf: its probability is 0 there (not exp(-inf + inf) = NaN).
    sink_probabilities = torch.where(torch.isinf(lse), 0.0, torch.exp(sink - lse))
    return -(sink_probabilities * delta).sum(dim=(0, 2))


def _sum_to_shape(tensor: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast result back to the shape it was broadcast from (leading dims removed, size-1 dims summed)."""
    while tensor.dim() > len(shape):
        tensor = tensor.sum(dim=0)
    for dim, size in enumerate(shape[-tensor.dim():] if len(shape) else []):
        if size == 1 and tensor.shape[dim] != 1:
            tensor = tensor.sum(dim=dim, keepdim=True)
    return tensor
