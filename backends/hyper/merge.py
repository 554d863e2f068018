"""Fused log-sum-exp merge for HyperAttention's inference path: one Triton pass per estimator call.

The autograd path (blockwise.py) merges with PyTorch ops: the block part with the sampled part, an unsorting gather,
then into the running causal result with a concatenation; each is a full pass over float32 outputs. Without
gradients this kernel does all of it at once: for every sorted query position p (original row order[p]) it reads the
block part, the sampled part (lse raised by the sample's log-weight) and, when merging into a running result, that
row's current output and lse, and writes the merged row back to the unsorted position in place. Weights are float32
(float64 for float64 inputs). Forward only: the autograd path is the one differentiated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LSE_FLOOR = tl.constexpr(-1e30)  # as blockwise.LSE_FLOOR: an empty part weighs exp(-1e30 - lse) = 0, no NaN


@triton.jit
def _merge_kernel(
    block_out_ptr, block_lse_ptr, sample_out_ptr, sample_lse_ptr, order_ptr, dest_out_ptr, dest_lse_ptr,
    queries, sorted_len, dest_head_rows, dest_row_offset, log_weight,
    D: tl.constexpr, BD: tl.constexpr, BLOCK_P: tl.constexpr, HAS_PRIOR: tl.constexpr, ACC: tl.constexpr,
):
    i_p, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64)
    positions = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    columns = tl.arange(0, BD)
    valid = positions < queries
    mask = valid[:, None] & (columns[None, :] < D)
    source = i_h * sorted_len + positions
    lse_a = tl.maximum(tl.load(block_lse_ptr + source, mask=valid, other=LSE_FLOOR).to(ACC), LSE_FLOOR)
    lse_b = tl.maximum(tl.load(sample_lse_ptr + source, mask=valid, other=LSE_FLOOR).to(ACC) + log_weight,
                       LSE_FLOOR)
    out_a = tl.load(block_out_ptr + source[:, None] * D + columns[None, :], mask=mask, other=0.0).to(ACC)
    out_b = tl.load(sample_out_ptr + source[:, None] * D + columns[None, :], mask=mask, other=0.0).to(ACC)
    rows = tl.load(order_ptr + i_h * queries + positions, mask=valid, other=0)
    dest = i_h * dest_head_rows + dest_row_offset + rows
    top = tl.maximum(lse_a, lse_b)
    if HAS_PRIOR:
        lse_c = tl.maximum(tl.load(dest_lse_ptr + dest, mask=valid, other=LSE_FLOOR).to(ACC), LSE_FLOOR)
        out_c = tl.load(dest_out_ptr + dest[:, None] * D + columns[None, :], mask=mask, other=0.0).to(ACC)
        top = tl.maximum(top, lse_c)
    weight_a = tl.exp(lse_a - top)
    weight_b = tl.exp(lse_b - top)
    total = weight_a + weight_b
    merged = out_a * weight_a[:, None] + out_b * weight_b[:, None]
    if HAS_PRIOR:
        weight_c = tl.exp(lse_c - top)
        total += weight_c
        merged += out_c * weight_c[:, None]
    merged = merged / total[:, None]
    tl.store(dest_out_ptr + dest[:, None] * D + columns[None, :], merged.to(dest_out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dest_lse_ptr + dest, (top + tl.log(total)).to(dest_lse_ptr.dtype.element_ty), mask=valid)


def merge_into(block_out: torch.Tensor, block_lse: torch.Tensor, sample_out: torch.Tensor, sample_lse: torch.Tensor,
               log_weight: float, order: torch.Tensor, dest_out: torch.Tensor, dest_lse: torch.Tensor,
               dest_row_offset: int, has_prior: bool) -> None:
    """Merge the two parts of one estimator call into dest rows, in place.

    block_out, sample_out: (heads, sorted_len, d) contiguous, rows in sorted order (sorted_len >= queries);
    block_lse, sample_lse: (heads, sorted_len); order: (heads, queries), the original row of each sorted position;
    dest_out: (heads, dest_rows, d) contiguous, dest_lse: (heads, dest_rows); row r of the call lands at
    dest_row_offset + r. has_prior: merge with dest's current contents (else overwrite).
    """
    heads, sorted_len, head_dim = block_out.shape
    queries = order.shape[-1]
    accumulator = tl.float64 if dest_out.dtype == torch.float64 else tl.float32
    block_p = 32
    grid = (triton.cdiv(queries, block_p), heads)
    _merge_kernel[grid](
        block_out, block_lse, sample_out, sample_lse, order, dest_out, dest_lse,
        queries, sorted_len, dest_out.shape[1], dest_row_offset, float(log_weight),
        D=head_dim, BD=triton.next_power_of_2(head_dim), BLOCK_P=block_p, HAS_PRIOR=has_prior, ACC=accumulator,
        num_warps=4,
    )
