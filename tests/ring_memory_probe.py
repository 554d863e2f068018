"""Memory of the ring op's own temporaries, measured on the CPU (a probe, not a test).

The block kernels are replaced by stubs that allocate what the Triton kernels return (out, lse; dq, dk, dv), so
what is measured is the ring: accumulators, K/V buffers in flight, merges. Peak resident memory above the inputs
(q, k, v, grad_out) is printed in units of one (1, H, n, 128) bf16 tensor; out, dq, dk, dv account for 4 of them.

    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=. python -m torch.distributed.run --nproc_per_node=2 \
        tests/ring_memory_probe.py            # env: H (heads, 8), N (local length, 65536), PB (PASS_BYTES, 1)
"""
import os
import resource

import torch
import torch.distributed as dist

import backends.ring.op as ring_op


def forward_stub(q, k, v, block, *, causal, window, scale, impl):
    rows = block.q_end - block.q_start
    return q.new_ones(q.shape[0], q.shape[1], rows, v.shape[-1]), torch.ones(q.shape[0], q.shape[1], rows)


def backward_stub(grad_out, q, k, v, out, lse, block, *, causal, window, scale, impl):
    rows, keys = block.q_end - block.q_start, block.k_end - block.k_start
    return (q.new_ones(q.shape[0], q.shape[1], rows, q.shape[-1]),
            k.new_ones(k.shape[0], k.shape[1], keys, k.shape[-1]), v.new_ones(v.shape[0], v.shape[1], keys, v.shape[-1]))


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def main() -> None:
    ring_op.block_forward, ring_op.block_backward = forward_stub, backward_stub
    dist.init_process_group("gloo")
    heads, local_len, head_dim = int(os.environ.get("H", 8)), int(os.environ.get("N", 65536)), 128
    ring_op.PASS_BYTES = int(os.environ.get("PB", "1"))
    q, k, v, grad_out = (torch.ones(1, heads, local_len, head_dim, dtype=torch.bfloat16).requires_grad_(i < 3)
                         for i in range(4))
    dist.barrier()
    start = resident_bytes()
    out = ring_op.ring_attention(q, k, v, causal=True)
    forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.backward(grad_out)
    total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tensor = heads * local_len * head_dim * 2
    if dist.get_rank() == 0:
        print(f"H={heads} n={local_len} PASS_BYTES={ring_op.PASS_BYTES}: above the inputs, forward "
              f"{(forward - start) / tensor:.2f} tensors, forward+backward {(total - start) / tensor:.2f} tensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
