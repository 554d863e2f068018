"""The random choices of HyperAttention, deterministic for a seed and the same on every device.

sortLSH (Han et al., 2023): r random hyperplanes give each vector an r-bit code (which side of each plane it lies
on: angular LSH). The 2^r buckets are ordered as a Gray code, so neighbouring buckets in the order differ in one
hyperplane, and vectors are sorted by bucket. Queries and keys sorted this way put likely-large scores near the
diagonal of the sorted score matrix.

The keys that estimate the rest of each row are a uniform sample without replacement of m of the n sorted positions:
{(a*i + b) mod n : i < m} for a random unit a of Z_n and a random offset b. Over b, every position is included with
probability exactly m/n, which is what the estimator's n/m weight needs; a and b come from Python's random module, so
the sample is a pure function of (seed, n, m), traceable (no torch.Generator) and device-independent. With m = n it
is every position once.
"""
from __future__ import annotations

import math
import random

import torch


def projection_directions(seed: int, head_dim: int, num_projections: int, device, dtype) -> torch.Tensor:
    """(head_dim, num_projections) standard normal directions, a pure function of the seed.

    Rounded to bfloat16-representable values, so that every dtype hashes with the very same directions (only the
    products' rounding differs, which moves a sign only for a projection within rounding of zero).
    """
    generator = random.Random(seed)
    values = [generator.gauss(0.0, 1.0) for _ in range(head_dim * num_projections)]
    directions = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).to(torch.float32)
    return directions.view(head_dim, num_projections).to(device=device, dtype=dtype)


def gray_rank_table(num_projections: int, device) -> torch.Tensor:
    """table[code] = position of the r-bit code in the Gray-code order (the inverse Gray code)."""
    ranks = torch.arange(2 ** num_projections, device=device)
    table = torch.empty_like(ranks)
    table[ranks ^ (ranks >> 1)] = ranks
    return table


def bucket_ranks(vectors: torch.Tensor, directions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (..., n) int64: the Gray-code rank of each vector's hyperplane code."""
    sides = (vectors @ directions) > 0
    weights = 2 ** torch.arange(directions.shape[1], device=vectors.device)
    codes = (sides.long() * weights).sum(-1)
    return table[codes]


def lsh_sort_order(vectors: torch.Tensor, directions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (..., n): positions sorted by bucket rank, ties in sequence order."""
    return torch.sort(bucket_ranks(vectors, directions, table), dim=-1, stable=True).indices


def sample_positions(seed: int, population: int, sample_size: int, device) -> torch.Tensor:
    """min(sample_size, population) distinct positions in [0, population), uniform as described above."""
    population = int(population)  # a symbolic size under tracing must not reach the seed string: specialize it
    generator = random.Random(f"hyper-sample-{seed}-{population}")
    count = min(sample_size, population)
    stride = generator.randrange(1, population) if population > 1 else 1
    while math.gcd(stride, population) != 1:
        stride = generator.randrange(1, population)
    offset = generator.randrange(population)
    return (torch.arange(count, device=device) * stride + offset) % population
