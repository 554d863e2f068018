"""Ring attention: the sequence sharded across the ranks of a torch.distributed group, K/V passed around a ring.

layout.py    how a sequence is split (zigzag, contiguous): shard, unshard, global_positions
schedule.py  which blocks each rank computes at each step, and the per-rank work (pure functions)
comm.py      the point-to-point transfers (batch_isend_irecv)
local.py     one block's forward / backward on the flash kernels
op.py        the custom ops and the public `ring_attention`
naive.py     the references: dense attention on the whole sequence, and a one-process simulation of the ring
"""
