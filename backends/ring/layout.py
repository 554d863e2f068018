"""How a sequence is split across the ranks of a ring: pure functions, no communication.

Two layouts:
  "contiguous"  rank r holds positions [r·n, (r+1)·n) of a sequence of P·n positions.
  "zigzag"      the sequence is cut into 2P chunks of c positions; rank r holds chunk r then chunk 2P−1−r. Under a
                causal mask every rank then does the same work (an early chunk, which sees few keys, paired with a
                late one, which sees many). This is the "head-tail" order of torch's context parallelism.

Within a rank, local positions always increase with the local index, in both layouts: that is what lets the ring
run a causal kernel on its own shard with local indices.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from passes.errors import InvalidArgumentError

LAYOUTS = ("zigzag", "contiguous")


class LocalChunk(NamedTuple):
    """A run of consecutive global positions held by one rank."""

    local_start: int  # first local index of the run
    global_start: int  # global position of that index
    length: int


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout={layout!r} is not a ring layout; accepted: {', '.join(LAYOUTS)}")


def chunks_per_rank(layout: str) -> int:
    """How many runs of consecutive positions each rank holds: 2 in zigzag, 1 in contiguous."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def local_chunks(local_len: int, rank: int, world_size: int, layout: str) -> list[LocalChunk]:
    """The runs of consecutive global positions that `rank` holds, in local order."""
    _check_rank(rank, world_size)
    count = chunks_per_rank(layout)
    if local_len % count:
        raise InvalidArgumentError(f"layout {layout!r} needs a local length divisible by {count}; got {local_len}")
    if layout == "contiguous":
        return [LocalChunk(0, rank * local_len, local_len)]
    chunk = local_len // 2
    return [
        LocalChunk(0, rank * chunk, chunk),
        LocalChunk(chunk, (2 * world_size - 1 - rank) * chunk, chunk),
    ]


def global_positions(local_len: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """Global position (int64) of each of the `local_len` local indices of `rank`."""
    pieces = [torch.arange(c.global_start, c.global_start + c.length) for c in local_chunks(local_len, rank,
                                                                                            world_size, layout)]
    return torch.cat(pieces)


def shard(tensor: torch.Tensor, dim: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """The part of `tensor` (the whole sequence along `dim`) that `rank` holds, as a contiguous tensor."""
    _check_rank(rank, world_size)
    sequence_length = tensor.shape[dim]
    pieces_total = world_size * chunks_per_rank(layout)
    if sequence_length % pieces_total:
        raise InvalidArgumentError(
            f"layout {layout!r} on {world_size} ranks cuts the sequence into {pieces_total} equal chunks; the length "
            f"{sequence_length} along dim {dim} is not divisible by {pieces_total}"
        )
    local_len = sequence_length // world_size
    pieces = [tensor.narrow(dim, c.global_start, c.length) for c in local_chunks(local_len, rank, world_size, layout)]
    return torch.cat(pieces, dim=dim).contiguous()


def unshard(shards: Sequence[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """The whole sequence from every rank's shard (`shards[r]` is rank r's), the inverse of `shard`."""
    world_size = len(shards)
    if world_size == 0:
        raise InvalidArgumentError("unshard needs at least one shard")
    local_len = shards[0].shape[dim]
    if any(s.shape[dim] != local_len for s in shards):
        raise InvalidArgumentError(f"shards differ in length along dim {dim}: {[s.shape[dim] for s in shards]}")
    placed = []  # (global_start, piece)
    for rank, local in enumerate(shards):
        for c in local_chunks(local_len, rank, world_size, layout):
            placed.append((c.global_start, local.narrow(dim, c.local_start, c.length)))
    placed.sort(key=lambda item: item[0])
    return torch.cat([piece for _, piece in placed], dim=dim)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank {rank} is not in a world of size {world_size}")
