"""Point-to-point transfers of the ring, on torch.distributed (`batch_isend_irecv`, so NCCL, Gloo or UCC).

Every transfer is its sends and receives posted together in one batch, so no rank can deadlock waiting for a
partner that is itself waiting; the caller posts the next transfer before computing on the current buffer and waits
afterwards (double buffering). Ranks here are ranks within the group; they are mapped to global ranks for P2POp.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from passes.errors import BackendError


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The process group registered under `group_name` (custom ops carry the group by name)."""
    if not dist.is_available() or not dist.is_initialized():
        raise BackendError("ring_attention needs torch.distributed initialized (torchrun + init_process_group); "
                           "it is not")
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def group_name_of(group: Optional[dist.ProcessGroup]) -> str:
    """The registered name of `group` (the default group when None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise BackendError("ring_attention needs torch.distributed initialized (torchrun + init_process_group); "
                           "it is not")
    return (group if group is not None else dist.group.WORLD).group_name


class PendingTransfer:
    """A posted send/receive pair; `wait()` makes the received buffer safe to read (on NCCL: for the current
    stream) and the sent buffer safe to overwrite."""

    def __init__(self, works: list, buffers: tuple[torch.Tensor, ...] = ()):
        self._works = works
        self._buffers = buffers  # kept alive until the transfer is complete

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._buffers = [], ()


class Ring:
    """The ring of one process group: rank r sends to r + 1 and receives from r − 1, or to/from any peer."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def exchange(self, sends: Sequence[torch.Tensor], send_to: int, receives: Sequence[torch.Tensor],
                 receive_from: int) -> PendingTransfer:
        """Post: send `sends` to group rank `send_to`, receive `receives` (same shapes, same order) from group rank
        `receive_from`. Tensors must be contiguous."""
        if send_to == self.rank and receive_from == self.rank:
            for send, receive in zip(sends, receives):
                receive.copy_(send)
            return PendingTransfer([])
        destination = dist.get_global_rank(self.group, send_to)
        source = dist.get_global_rank(self.group, receive_from)
        operations = [dist.P2POp(dist.isend, send, destination, self.group) for send in sends]
        operations += [dist.P2POp(dist.irecv, receive, source, self.group) for receive in receives]
        return PendingTransfer(dist.batch_isend_irecv(operations), (*sends, *receives))

    def shift(self, sends: Sequence[torch.Tensor], receives: Sequence[torch.Tensor]) -> PendingTransfer:
        """Post one hop along the ring: send to the next rank, receive from the previous one."""
        return self.exchange(sends, (self.rank + 1) % self.size, receives, (self.rank - 1) % self.size)

    def exchange_in_place(self, tensor: torch.Tensor, send_to: int, receive_from: int, chunks: int = 8) -> None:
        """Send `tensor` to `send_to` and overwrite it with the one received from `receive_from` (same shape), a
        chunk at a time through one chunk-sized buffer: a hop then needs 1/chunks of the tensor in extra memory
        instead of a second copy. Blocking: no overlap with compute (the price of the memory)."""
        if send_to == self.rank and receive_from == self.rank:
            return
        flat = tensor.view(-1)
        size = -(-flat.numel() // chunks)
        buffer = flat.new_empty(size)
        for start in range(0, flat.numel(), size):
            piece = flat[start:start + size]
            incoming = buffer[:piece.numel()]
            self.exchange([piece], send_to, [incoming], receive_from).wait()
            piece.copy_(incoming)

    def shift_in_place(self, tensor: torch.Tensor, chunks: int = 8) -> None:
        """One hop along the ring in place (see exchange_in_place)."""
        self.exchange_in_place(tensor, (self.rank + 1) % self.size, (self.rank - 1) % self.size, chunks)
