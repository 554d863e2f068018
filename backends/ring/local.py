"""The attention of one block of the ring (this rank's queries × the visiting K/V shard), forward and backward.

Forward returns (out, lse) for the block alone; the ring merges blocks by log-sum-exp. Backward takes the *merged*
out and lse of the whole row: with them, a block's probabilities exp(s − lse) are already the global softmax, and
delta = rowsum(dO · O) is the global one, so each block's dQ, dK, dV are exact contributions that simply add up.

Kernels, by `impl`:
  None / "auto" / "triton" / "blockwise" / "reference"
             the project's exact tiled op (backends/flash/op.py) with that implementation;
  "sdpa"     torch's fused FlashAttention-2 kernels (aten::_scaled_dot_product_flash_attention and its backward,
             CUDA only): the fallback while the Triton kernel is not there, and the kernels that torch's own context
             parallelism uses, so a like-for-like comparison.
"masked" blocks (a sliding window cutting between two different runs of positions) need an explicit mask: the
flash op's kernels take no position offsets, so those blocks run the flash op's blockwise path with a bool mask.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from backends.flash.naive import visible_keys
from backends.flash.op import NO_WINDOW, flash_attention_backward_op, flash_attention_op
from backends.ring.schedule import Block
from passes.errors import BackendError

IMPLEMENTATIONS = ("auto", "triton", "blockwise", "reference", "sdpa")


def check_impl(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise BackendError(f"impl={impl!r} is not a ring block implementation; accepted: {', '.join(IMPLEMENTATIONS)}"
                           " or None")


def _block_mask(block: Block, causal: bool, window: Optional[int], device) -> tuple[Optional[torch.Tensor], bool,
                                                                                     Optional[int]]:
    """(attn_mask, causal, window) to hand the kernel for this block."""
    if block.kind == "full":
        return None, False, None
    if block.kind == "diagonal":
        return None, causal, window
    query_positions = torch.arange(block.q_position, block.q_position + block.q_end - block.q_start, device=device)
    key_positions = torch.arange(block.k_position, block.k_position + block.k_end - block.k_start, device=device)
    mask = visible_keys(query_positions, key_positions, causal=causal, window=window, sinks=0)
    return mask[None, None], False, None


def _flash_impl(impl: str, mask: Optional[torch.Tensor]) -> str:
    if mask is not None and impl != "reference":
        return "blockwise"  # the only kernel that takes a mask tensor
    return impl


def _uses_sdpa(impl: str, mask: Optional[torch.Tensor], window: Optional[int]) -> bool:
    return impl == "sdpa" and mask is None and window is None


def block_forward(q, k, v, block: Block, *, causal: bool, window: Optional[int], scale: float, impl: str):
    """(out, lse) of `block`; q, k, v are the whole local shard and the whole visiting shard."""
    q = q[:, :, block.q_start:block.q_end]
    k = k[:, :, block.k_start:block.k_end]
    v = v[:, :, block.k_start:block.k_end]
    mask, block_causal, block_window = _block_mask(block, causal, window, q.device)
    if _uses_sdpa(impl, mask, block_window):
        return _sdpa_forward(q, k, v, block_causal, scale)
    flash_impl = "auto" if impl == "sdpa" else _flash_impl(impl, mask)
    return flash_attention_op(q, k, v, None, mask, block_causal, NO_WINDOW if block_window is None else block_window,
                              0, scale, flash_impl)


def block_backward(grad_out, q, k, v, out, lse, block: Block, *, causal: bool, window: Optional[int], scale: float,
                   impl: str):
    """(dq, dk, dv) of `block`, given the merged out and lse of the local rows (see the module docstring)."""
    rows = slice(block.q_start, block.q_end)
    keys = slice(block.k_start, block.k_end)
    q, grad_out, out, lse = q[:, :, rows], grad_out[:, :, rows], out[:, :, rows], lse[:, :, rows]
    k, v = k[:, :, keys], v[:, :, keys]
    mask, block_causal, block_window = _block_mask(block, causal, window, q.device)
    if _uses_sdpa(impl, mask, block_window):
        return _sdpa_backward(grad_out, q, k, v, out, lse, block_causal, scale)
    flash_impl = "auto" if impl == "sdpa" else _flash_impl(impl, mask)
    if flash_impl == "reference":
        flash_impl = "blockwise"  # the reference has no backward; the blockwise one is exact
    # The op also returns the gradients of an attention mask and of sink logits, which ring blocks never have.
    grad_q, grad_k, grad_v = flash_attention_backward_op(
        grad_out.contiguous(), None, q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.contiguous(), None, mask, block_causal, NO_WINDOW if block_window is None else block_window, 0, scale,
        flash_impl, False,
    )[:3]
    return grad_q, grad_k, grad_v


# ---- torch's fused SDPA kernels (CUDA) --------------------------------------------------------------------------

def _expand_kv_heads(tensor: torch.Tensor, q_heads: int) -> torch.Tensor:
    # aten's flash kernel wants equal head counts; only the local copy is expanded, the ring still sends kv heads.
    kv_heads = tensor.shape[1]
    return tensor if kv_heads == q_heads else tensor.repeat_interleave(q_heads // kv_heads, dim=1)


def _reduce_kv_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, q_heads, length, dim = grad.shape
    if q_heads == kv_heads:
        return grad
    return grad.view(batch, kv_heads, q_heads // kv_heads, length, dim).sum(dim=2)


def _sdpa_forward(q, k, v, causal: bool, scale: float):
    if not q.is_cuda:
        raise BackendError(f"impl='sdpa' runs torch's CUDA flash kernels; got tensors on {q.device}")
    result = torch.ops.aten._scaled_dot_product_flash_attention(
        q, _expand_kv_heads(k, q.shape[1]), _expand_kv_heads(v, q.shape[1]), 0.0, causal, False, scale=scale)
    return result[0], result[1]


@functools.lru_cache(maxsize=8)
def _sdpa_forward_metadata(device: torch.device, dtype: torch.dtype, head_dim: int):
    """The (cum_seq_q, cum_seq_k, rng_state, unused) that aten's flash forward returns for dense inputs without
    dropout, as its backward expects them back (it reads none of them then; they are taken from a real call so
    that their kind, None or tensor, is whatever this torch build produces)."""
    probe = torch.randn(1, 1, 16, head_dim, device=device, dtype=dtype)
    result = torch.ops.aten._scaled_dot_product_flash_attention(probe, probe, probe, 0.0, False, False)
    return result[2], result[3], result[6], result[7]


def _sdpa_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    kv_heads = k.shape[1]
    keys, values = _expand_kv_heads(k, q.shape[1]), _expand_kv_heads(v, q.shape[1])
    cum_seq_q, cum_seq_k, rng_state, unused = _sdpa_forward_metadata(q.device, q.dtype, q.shape[-1])
    grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out.contiguous(), q, keys, values, out.contiguous(), lse.to(torch.float32).contiguous(), cum_seq_q,
        cum_seq_k, q.shape[2], k.shape[2], 0.0, causal, rng_state, unused, scale=scale)
    return grad_q, _reduce_kv_heads(grad_k, kv_heads), _reduce_kv_heads(grad_v, kv_heads)
