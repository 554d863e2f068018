"""The exact tiled attention op: `attention_planner::flash_attention`, and the public `flash_attention`.

One custom op serves every exact tiled variant (full, causal, sliding window, sinks, padding, arbitrary mask, tanh
soft-capping, attention-sink logits): the window is a parameter of the tiling, not another kernel. Implementations:
  "triton"     the fused kernel in backends/flash/triton.py (CUDA; on the CPU only under TRITON_INTERPRET=1)
  "blockwise"  the online-softmax PyTorch loop in backends/flash/blockwise.py (any device, linear extra memory)
  "reference"  the dense oracle in backends/flash/naive.py (quadratic memory; for tests)
  "auto"       chosen when the op runs, from the tensors' device: what rewritten graphs use, so that a module
               planned for one device runs on whatever device its weights are on
The backward is a custom op too, so aot_autograd and torch.export see our backward, not autograd through a loop.
"""
from __future__ import annotations

from typing import Optional

import torch

from backends.common import triton_usable
from backends.flash.blockwise import blockwise_attention_backward, blockwise_attention_forward, sink_logits_gradient
from backends.flash.naive import attention_reference
from backends.flash.options import (  # noqa: F401  (validate_*: re-exported)
    NO_WINDOW,
    AttentionOptions,
    validate_attention_inputs,
    validate_score_modifiers,
)
from passes.errors import BackendError

IMPLEMENTATIONS = ("triton", "blockwise", "reference", "auto")


def _resolve_impl(impl: Optional[str], q: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> str:
    if impl is None or impl == "auto":
        # The Triton kernel takes structured masks only; a mask tensor keeps its exact semantics in the loop.
        # float64 (a reference precision) also stays in the loop: the kernel accumulates in fp32.
        return "triton" if q.is_cuda and attn_mask is None and q.dtype != torch.float64 else "blockwise"
    if impl not in IMPLEMENTATIONS:
        raise BackendError(f"impl={impl!r} is not an implementation; accepted: {', '.join(IMPLEMENTATIONS)} or None")
    if impl == "triton" and not triton_usable(q):
        raise BackendError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); got tensors on "
                           f"{q.device}")
    if impl == "triton" and attn_mask is not None:
        raise BackendError("impl='triton' does not take an attn_mask tensor; use impl='blockwise' or None")
    return impl


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32, except for float64 inputs (the tests' precision), where it stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("attention_planner::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                       attn_mask: Optional[torch.Tensor], causal: bool, window: int, sinks: int, scale: float,
                       impl: str, softcap: Optional[float] = None,
                       sink_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): out like q with v's head dim; lse (batch, q_heads, queries), natural log, float32 (it
    includes the sink logits). softcap and sink_logits come last, with defaults, so that older callers keep working."""
    options = AttentionOptions.from_op(key_padding_mask, attn_mask, causal, window, sinks, scale, softcap, sink_logits)
    impl = _resolve_impl(impl, q, attn_mask)
    if impl == "triton":
        from backends.flash.triton import flash_forward

        out, lse = flash_forward(q, k, v, options)
    elif impl == "blockwise":
        out, lse = blockwise_attention_forward(q, k, v, options)
    else:
        out, lse = attention_reference(q, k, v, options, return_lse=True)
    return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


@flash_attention_op.register_fake
def _(q, k, v, key_padding_mask, attn_mask, causal, window, sinks, scale, impl, softcap=None, sink_logits=None):
    batch, heads, queries, _ = q.shape
    out = q.new_empty(batch, heads, queries, v.shape[-1])
    lse = q.new_empty(batch, heads, queries, dtype=lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("attention_planner::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
    causal: bool, window: int, sinks: int, scale: float, impl: str, mask_needs_grad: bool,
    softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, d_attn_mask, d_sink_logits); d_attn_mask is an empty tensor unless mask_needs_grad,
    d_sink_logits (q_heads,) float32 (float64 for float64 inputs) is empty without sink logits."""
    # The sink logits' own gradient is computed below; the kernels' backward needs only the lse that includes them.
    options = AttentionOptions.from_op(key_padding_mask, attn_mask, causal, window, sinks, scale, softcap)
    impl = _resolve_impl(impl, q, attn_mask)
    if impl == "triton":
        from backends.flash.triton import flash_backward

        grad_q, grad_k, grad_v = flash_backward(grad_out, q, k, v, out, lse, options, grad_lse=grad_lse)
        grad_mask = None
    else:
        # The reference has no backward of its own: the blockwise backward is exact, and is tested against autograd
        # through the reference.
        grad_q, grad_k, grad_v, grad_mask = blockwise_attention_backward(grad_out, grad_lse, q, k, v, out, lse, options,
                                                                         mask_needs_grad)
    if grad_mask is None:
        grad_mask = q.new_empty(0)
    if sink_logits is None:
        grad_sink = q.new_empty(0, dtype=lse_dtype(q.dtype))
    else:  # an O(rows) reduction from the saved lse and delta, the same for every implementation
        grad_sink = sink_logits_gradient(grad_out, grad_lse, out, lse, sink_logits)
    return grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous(), grad_mask, grad_sink


@flash_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, attn_mask, causal, window, sinks, scale, impl,
      mask_needs_grad, softcap=None, sink_logits=None):
    grad_mask = attn_mask.new_empty(attn_mask.shape) if (mask_needs_grad and attn_mask is not None) else q.new_empty(0)
    heads = 0 if sink_logits is None else sink_logits.shape[0]
    grad_sink = q.new_empty(heads, dtype=lse_dtype(q.dtype))
    # Contiguous, as the real outputs are (empty_like would copy a transposed input's strides and fail Inductor's
    # stride checks in compiled backwards).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_mask, grad_sink


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_mask, causal, window, sinks, scale, impl, softcap, sink_logits = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, attn_mask, sink_logits)
    ctx.options = (causal, window, sinks, scale, impl, softcap)
    ctx.mask_needs_grad = attn_mask is not None and attn_mask.requires_grad


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, attn_mask, sink_logits = ctx.saved_tensors
    causal, window, sinks, scale, impl, softcap = ctx.options
    backward_impl = "blockwise" if impl == "reference" else impl
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v, grad_mask, grad_sink = flash_attention_backward_op(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, attn_mask, causal, window, sinks, scale,
        backward_impl, ctx.mask_needs_grad, softcap, sink_logits,
    )
    grad_sink = grad_sink.to(sink_logits.dtype) if sink_logits is not None else None
    return (grad_q, grad_k, grad_v, None, (grad_mask if ctx.mask_needs_grad else None), None, None, None, None, None,
            None, grad_sink)


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Optional[AttentionOptions] = None, *,
                    return_lse: bool = False, impl: Optional[str] = None, **keywords):
    """The one entry to the op, shared by `flash_attention` and `sliding_window_attention`: `options` (an
    AttentionOptions), or its fields as keywords (causal=, window=, sinks=, scale=, key_padding_mask=, attn_mask=,
    softcap=, sink_logits=), which replace those of `options`."""
    options = AttentionOptions.of(options, **keywords)
    options.validate(q, k, v)
    impl = _resolve_impl(impl, q, options.attn_mask)
    out, lse = flash_attention_op(q, k, v, *options.op_arguments(q, impl))
    return (out, lse) if return_lse else out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, key_padding_mask: Optional[torch.Tensor] = None,
                    attn_mask: Optional[torch.Tensor] = None, return_lse: bool = False, impl: Optional[str] = None,
                    softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None):
    """Exact softmax attention, tiled: the scores are never materialized.

    Args:
        q: (batch, q_heads, queries, head_dim). k, v: (batch, kv_heads, keys, head_dim); kv_heads divides q_heads.
        causal: query i sees key j iff j <= i (top-left aligned, as SDPA's is_causal).
        scale: multiplies q·k; default 1/sqrt(head_dim).
        key_padding_mask: (batch, keys) bool, True where a key is real.
        attn_mask: optional tensor broadcastable to (batch, q_heads, queries, keys), bool (True = attend) or
            additive; kept exactly (runs the blockwise implementation).
        return_lse: also return the natural-log log-sum-exp per query, float32 (batch, q_heads, queries).
        impl: "triton", "blockwise", "reference", or None (Triton on CUDA, blockwise elsewhere).
        softcap: tanh soft-capping (Gemma-2): the scaled scores s become softcap * tanh(s / softcap) before the
            masks.
        sink_logits: (q_heads,) float tensor, one learned logit per query head (gpt-oss) in every row's softmax,
            with no value: it enlarges the denominator only. Differentiable (the gradient is float32 math); the lse
            includes it.

    Rows with no visible key give zeros (lse = -inf, or the sink logit with sink_logits), not NaN.
    """
    options = AttentionOptions(causal=causal, scale=scale, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                               softcap=softcap, sink_logits=sink_logits)
    return tiled_attention(q, k, v, options, return_lse=return_lse, impl=impl)
