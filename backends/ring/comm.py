"""Point-to-point transfers of the ring, on torch.distributed (`batch_isend_irecv`, so NCCL, Gloo or UCC).

Every transfer is one send and one receive posted together in one batch, so no rank can deadlock waiting for a
partner that is itself waiting; the caller posts the next transfer before computing on the current buffer and waits
afterwards (double buffering). Ranks here are ranks within the group; they are mapped to global ranks for P2POp.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from planner.errors import BackendError


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

    def exchange(self, send: torch.Tensor, send_to: int, receive: torch.Tensor, receive_from: int) -> PendingTransfer:
        """Post: send `send` to group rank `send_to`, receive into `receive` from group rank `receive_from`."""
        if send_to == self.rank and receive_from == self.rank:
            receive.copy_(send)
            return PendingTransfer([])
        operations = [
            dist.P2POp(dist.isend, send, dist.get_global_rank(self.group, send_to), self.group),
            dist.P2POp(dist.irecv, receive, dist.get_global_rank(self.group, receive_from), self.group),
        ]
        return PendingTransfer(dist.batch_isend_irecv(operations), (send, receive))

    def shift(self, send: torch.Tensor, receive: torch.Tensor) -> PendingTransfer:
        """Post one hop along the ring: send to the next rank, receive from the previous one."""
        return self.exchange(send, (self.rank + 1) % self.size, receive, (self.rank - 1) % self.size)
