"""sortLSH bucket ranks in one Triton pass: projection, signs, code and Gray-code rank per row.

The PyTorch form (lsh.bucket_ranks) runs a (n, d) x (d, r) matmul with r = 7 columns (a tensor-core kernel that
reads the rows at a fraction of the bandwidth), then four elementwise passes over int64 codes. Here each program
loads BLOCK rows once, projects them with one tl.dot against the directions padded to 16 columns (zero columns
project to 0, which is not > 0: they never set a bit), and writes an int32 rank, the smaller key for the sort.
Forward only, no gradients (ranks are integers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PADDED_PROJECTIONS = 16  # tl.dot needs at least 16 columns


@triton.jit
def _bucket_rank_kernel(
    vectors_ptr, directions_ptr, table_ptr, ranks_ptr, rows, head_stride, row_stride,
    D: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
):
    i_r, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offsets = i_r * BLOCK + tl.arange(0, BLOCK)
    columns = tl.arange(0, BD)
    valid = offsets < rows
    vectors = tl.load(vectors_ptr + i_h * head_stride + offsets[:, None] * row_stride + columns[None, :],
                      mask=valid[:, None] & (columns[None, :] < D), other=0.0)
    projections = tl.arange(0, RP)
    directions = tl.load(directions_ptr + columns[:, None] * RP + projections[None, :],
                         mask=columns[:, None] < D, other=0.0)
    # float32 inputs project in full precision (TF32 would move signs of small projections).
    if IEEE:
        projected = tl.dot(vectors, directions, input_precision="ieee")
    else:
        projected = tl.dot(vectors, directions)
    bits = tl.where(projected > 0, 1 << projections[None, :], 0)
    codes = tl.sum(bits, axis=1)
    ranks = tl.load(table_ptr + codes)
    tl.store(ranks_ptr + i_h * rows + offsets, ranks, mask=valid)


def bucket_ranks_fused(vectors: torch.Tensor, directions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(heads, n, d) vectors with unit stride on d -> (heads, n) int32 Gray-code ranks, as lsh.bucket_ranks."""
    heads, rows, head_dim = vectors.shape
    projections = directions.shape[1]
    padded = torch.zeros(head_dim, PADDED_PROJECTIONS, device=vectors.device, dtype=vectors.dtype)
    padded[:, :projections] = directions
    ranks = torch.empty(heads, rows, device=vectors.device, dtype=torch.int32)
    block = 64
    grid = (triton.cdiv(rows, block), heads)
    _bucket_rank_kernel[grid](
        vectors, padded, table.to(torch.int32), ranks, rows, vectors.stride(0), vectors.stride(1),
        D=head_dim, BD=max(16, triton.next_power_of_2(head_dim)), RP=PADDED_PROJECTIONS, BLOCK=block,
        IEEE=vectors.dtype == torch.float32, num_warps=4,
    )
    return ranks
