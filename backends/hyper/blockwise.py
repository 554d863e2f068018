"""HyperAttention, fast path: sortLSH gathers, tiled exact attention on blocks (`backends.flash_attention`, which
returns the log-sum-exp), merged in float32 by log-sum-exp. No kernel of its own: every quadratic piece is a batched
call of the tiled attention, so it runs on whatever that runs on (Triton on CUDA), and autograd flows through it.

Non-causal, queries and keys sorted by sortLSH and cut into the same number of blocks:
  1. block-diagonal: each query block against its key block, exact (batch * heads * blocks independent problems).
  2. sampled: each query block against m sampled keys (positions in the sorted key order, lsh.sample_positions),
     the ones inside its own block masked out (they are counted by 1.), the log-sum-exp raised by log(n / m).
  3. merge 1. and 2. by log-sum-exp, unsort.
Causal, by recursive halving: exact causal attention on all leaves at once (the sequence viewed as more heads), then
per level one batched non-causal call (second half of every segment against its first half) merged into the second
halves. The sequence is padded at the end to leaf * 2^levels; padded keys are masked wherever they could be seen.
backends/hyper/naive.py forms the same estimator densely; the tests hold the two together.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from backends.flash.op import flash_attention
from backends.hyper.lsh import gray_rank_table, lsh_sort_order, projection_directions, sample_positions
from backends.hyper.naive import block_counts, causal_levels

# Empty parts (a block whose keys are all masked) have lse -inf; merging two of them would give exp(-inf + inf) =
# NaN, also in the gradient of rows that are later dropped. A finite floor keeps every merge finite (an empty part
# still weighs exp(-1e30 - lse) = 0) and clamp_min sends no gradient into the empty part's lse.
LSE_FLOOR = -1e30


def merge_partial_attention(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two disjoint key sets, from each set's normalized output and lse."""
    lse_a, lse_b = lse_a.clamp_min(LSE_FLOOR), lse_b.clamp_min(LSE_FLOOR)
    lse = torch.logaddexp(lse_a, lse_b)
    # out_a * w_a + out_b * w_b with w_a + w_b = 1, in one pass over the outputs.
    return torch.lerp(out_a, out_b, torch.exp(lse_b - lse)[..., None]), lse


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges run in float32 (float64 for float64 inputs, the tests' precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiled_attention(q, k, v, *, causal=False, key_padding_mask=None):
    return flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, return_lse=True)


def _gather_rows(tensor: torch.Tensor, order: torch.Tensor, padded_len: int) -> torch.Tensor:
    """tensor (batch, heads, n, d) rows in `order` (batch, heads, n), zero-padded to padded_len rows."""
    gathered = tensor.gather(2, order[..., None].expand(*order.shape, tensor.shape[-1]))
    missing = padded_len - order.shape[-1]
    return F.pad(gathered, (0, 0, 0, missing)) if missing else gathered


def fused_merge_usable(*tensors: torch.Tensor) -> bool:
    """The in-place Triton merge (merge.py) serves plain tensors that need no gradient, on CUDA or under the
    interpreter; tracing (fake tensors, torch.compile) and autograd take the PyTorch merges."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors):
        return False
    return tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def as_heads(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """(batch, heads, n, d) as (batch * heads, n, d) without a copy where the strides allow, else None."""
    batch, heads = tensor.shape[:2]
    if tensor.stride(-1) != 1 or (batch > 1 and tensor.stride(0) != heads * tensor.stride(1)):
        return None
    return tensor.as_strided((batch * heads, tensor.shape[2], tensor.shape[3]), (tensor.stride(1), tensor.stride(2), 1))


def fast_path_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Inference on CUDA (or the interpreter): Triton gathers and sortLSH ranks (gather.py, lsh_kernel.py) and the
    fused merge, for dtypes whose tl.dot exists and tensors viewable as (batch * heads, n, d) without a copy."""
    return (fused_merge_usable(q, k, v) and q.dtype in FAST_DTYPES
            and all(as_heads(tensor) is not None for tensor in (q, k, v)))


def _sort_order(tensor, directions, table, fast: bool) -> torch.Tensor:
    """(batch, heads, n, d) -> (batch, heads, n) int64 positions in sortLSH order."""
    if not fast:
        return lsh_sort_order(tensor, directions, table)
    from backends.hyper.lsh_kernel import bucket_ranks_fused

    ranks = bucket_ranks_fused(as_heads(tensor), directions, table)
    return torch.sort(ranks, dim=-1, stable=True).indices.view(tensor.shape[:3])


def _gather_sorted(tensor, order, padded_len: int, fast: bool) -> torch.Tensor:
    """tensor's rows in order, zero-padded to padded_len rows: (batch, heads, padded_len, d)."""
    if not fast:
        return _gather_rows(tensor, order, padded_len)
    from backends.hyper.gather import gather_rows

    batch, heads, _, head_dim = tensor.shape
    rows = gather_rows(as_heads(tensor), order.reshape(batch * heads, -1), padded_len, batch * heads)
    return rows.view(batch, heads, padded_len, head_dim)


def _gather_sample(tensor, key_order, sampled, blocks: int, fast: bool) -> torch.Tensor:
    """The sampled keys (positions `sampled` of the sorted order) repeated for every query block:
    (batch * heads * blocks, 1, count, d)."""
    batch, heads, _, head_dim = tensor.shape
    count = sampled.numel()
    index = key_order[:, :, sampled]
    if fast:  # straight from the unsorted rows, every block's copy written once
        from backends.hyper.gather import gather_rows

        rows = gather_rows(as_heads(tensor), index.reshape(batch * heads, count), count, batch * heads * blocks)
        return rows.view(batch * heads * blocks, 1, count, head_dim)
    rows = tensor.gather(2, index[..., None].expand(batch, heads, count, head_dim))
    return rows[:, :, None].expand(batch, heads, blocks, count, head_dim).reshape(
        batch * heads * blocks, 1, count, head_dim)


def non_causal_hyper(q, k, v, key_valid: Optional[torch.Tensor], *, block_size: int, sample_size: int,
                     num_projections: int, seed: int, destination=None):
    """The non-causal estimator. q (batch, heads, nq, d), k/v (batch, heads, nk, d); key_valid None or bool
    (heads, nk) marking real keys. Returns out (like q in shape) and lse (batch, heads, nq), both in merge_dtype.

    destination = (out (batch*heads, rows, d), lse (batch*heads, rows), row_offset, has_prior): merge the result
    into those rows in place with the fused kernel instead (no gradients), and return None.
    """
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    blocks, query_block, key_block = block_counts(queries, keys, block_size)
    fast = fast_path_usable(q, k, v)
    directions = projection_directions(seed, head_dim, num_projections, q.device, q.dtype)
    table = gray_rank_table(num_projections, q.device)
    query_order = _sort_order(q, directions, table, fast)
    key_order = _sort_order(k, directions, table, fast)
    folded = batch * heads * blocks

    q_blocks = _gather_sorted(q, query_order, blocks * query_block, fast).view(folded, 1, query_block, head_dim)
    k_sorted = _gather_sorted(k, key_order, blocks * key_block, fast)
    v_sorted = _gather_sorted(v, key_order, blocks * key_block, fast)
    # Which sorted key positions hold a real key: not the padding to whole blocks, not a padded sequence position.
    key_real = (torch.arange(blocks * key_block, device=q.device) < keys).expand(batch, heads, -1)
    if key_valid is not None:
        key_real = key_real & F.pad(key_valid.expand(batch, heads, keys).gather(2, key_order),
                                    (0, blocks * key_block - keys), value=False)
    padding_needed = blocks * key_block > keys or key_valid is not None
    out_block, lse_block = _tiled_attention(
        q_blocks, k_sorted.view(folded, 1, key_block, head_dim), v_sorted.view(folded, 1, key_block, head_dim),
        key_padding_mask=key_real.reshape(folded, key_block) if padding_needed else None)
    del k_sorted, v_sorted

    sampled = sample_positions(seed, keys, sample_size, q.device)
    count = sampled.numel()
    outside_own_block = (sampled // key_block)[None, :] != torch.arange(blocks, device=q.device)[:, None]
    sample_mask = outside_own_block & key_real[:, :, None, sampled]  # (batch, heads, blocks, m)
    k_sample = _gather_sample(k, key_order, sampled, blocks, fast)
    v_sample = _gather_sample(v, key_order, sampled, blocks, fast)
    out_sample, lse_sample = _tiled_attention(q_blocks, k_sample, v_sample,
                                              key_padding_mask=sample_mask.reshape(folded, count))
    # Each sampled key stands for keys / count keys of the row: its weight, added in log space.
    log_weight = math.log(keys / count)
    if destination is not None:
        from backends.hyper.merge import merge_into

        dest_out, dest_lse, row_offset, has_prior = destination
        sorted_len = blocks * query_block
        merge_into(out_block.view(batch * heads, sorted_len, head_dim), lse_block.view(batch * heads, sorted_len),
                   out_sample.view(batch * heads, sorted_len, head_dim), lse_sample.view(batch * heads, sorted_len),
                   log_weight, query_order.reshape(batch * heads, queries).contiguous(), dest_out, dest_lse,
                   row_offset, has_prior)
        return None
    lse_sample = lse_sample + log_weight

    compute = merge_dtype(q.dtype)
    out, lse = merge_partial_attention(out_block.to(compute), lse_block.to(compute), out_sample.to(compute),
                                       lse_sample.to(compute))
    out = out.view(batch, heads, blocks * query_block, head_dim)[:, :, :queries]
    lse = lse.view(batch, heads, blocks * query_block)[:, :, :queries]
    inverse = _inverse_permutation(query_order)
    return out.gather(2, inverse[..., None].expand(batch, heads, queries, head_dim)), lse.gather(2, inverse)


def causal_hyper(q, k, v, *, block_size: int, sample_size: int, num_projections: int, min_seq_len: int, seed: int):
    """The causal estimator by recursive halving. Returns out and lse in merge_dtype, both unpadded."""
    batch, heads, seq_len, head_dim = q.shape
    # The halving below folds segments into the heads dim with views: a transposed q (the usual (B, L, H, D) model
    # layout seen as (B, H, L, D)) must be made contiguous first.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    levels, leaf = causal_levels(seq_len, min_seq_len)
    padded = leaf * 2 ** levels
    if padded > seq_len:
        pad = (0, 0, 0, padded - seq_len)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    # Padded keys sit at the end: in the causal leaves only padded queries see them.
    leaf_view = (batch, heads * 2 ** levels, leaf, head_dim)
    out, lse = _tiled_attention(q.view(leaf_view), k.view(leaf_view), v.view(leaf_view), causal=True)
    compute = merge_dtype(q.dtype)
    out, lse = out.to(compute).view(batch, heads, padded, head_dim), lse.to(compute).view(batch, heads, padded)
    fused = fused_merge_usable(q, k, v)
    for level in reversed(range(levels)):
        segments = 2 ** level
        segment = padded // segments
        half = segment // 2
        view = (batch, heads * segments, segment, head_dim)
        first_positions = (torch.arange(segments, device=q.device)[:, None] * segment
                           + torch.arange(half, device=q.device)[None, :])
        key_valid = (first_positions < seq_len).repeat(heads, 1) if padded - seq_len > half else None
        options = dict(block_size=block_size, sample_size=sample_size, num_projections=num_projections,
                       seed=seed + level + 1)
        if fused:  # merge straight into the second halves of the running result, in place
            destination = (out.view(batch * heads * segments, segment, head_dim),
                           lse.view(batch * heads * segments, segment), half, True)
            non_causal_hyper(q.view(view)[:, :, half:], k.view(view)[:, :, :half], v.view(view)[:, :, :half],
                             key_valid, destination=destination, **options)
            continue
        out_off, lse_off = non_causal_hyper(
            q.view(view)[:, :, half:], k.view(view)[:, :, :half], v.view(view)[:, :, :half], key_valid, **options)
        out_segments = out.view(view)
        lse_segments = lse.view(batch, heads * segments, segment)
        merged_out, merged_lse = merge_partial_attention(out_segments[:, :, half:], lse_segments[:, :, half:],
                                                         out_off, lse_off)
        out = torch.cat([out_segments[:, :, :half], merged_out], dim=2).view(batch, heads, padded, head_dim)
        lse = torch.cat([lse_segments[:, :, :half], merged_lse], dim=2).view(batch, heads, padded)
    return out[:, :, :seq_len], lse[:, :, :seq_len]


def hyper_attention_forward(q, k, v, *, causal: bool, block_size: int, sample_size: int, num_projections: int,
                            min_seq_len: int, seed: int):
    """(out like q, lse in merge_dtype): exact tiled attention when keys <= min_seq_len, else the estimator."""
    heads = q.shape[1]
    if k.shape[1] != heads:  # grouped-query attention: the sorted gathers are per head
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if k.shape[2] <= min_seq_len:
        out, lse = _tiled_attention(q, k, v, causal=causal)
        return out, lse.to(merge_dtype(q.dtype))
    options = dict(block_size=block_size, sample_size=sample_size, num_projections=num_projections, seed=seed)
    if causal:
        out, lse = causal_hyper(q, k, v, min_seq_len=min_seq_len, **options)
    elif fused_merge_usable(q, k, v):
        batch, heads, queries, head_dim = q.shape
        out = q.new_empty(batch, heads, queries, head_dim)
        lse = torch.empty(batch, heads, queries, dtype=merge_dtype(q.dtype), device=q.device)
        non_causal_hyper(q, k, v, None, destination=(out.view(batch * heads, queries, head_dim),
                                                     lse.view(batch * heads, queries), 0, False), **options)
    else:
        out, lse = non_causal_hyper(q, k, v, None, **options)
    return out.to(q.dtype), lse
