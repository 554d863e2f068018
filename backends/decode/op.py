"""The decoding op: `attention_planner::decode_attention`, and the public `decode_attention`.

A decoding step of one attention site: T new queries per batch row (T = 1 for one token) attend to the row's KV
cache, which already holds the new tokens' keys and values (`append_to_cache` in backends/decode/cache.py writes
them). Cache forms, positions, left padding, window and sinks are described in backends/decode/naive.py.
Implementations:
  "triton"     the split-K kernel in backends/decode/triton.py (CUDA; on the CPU only under TRITON_INTERPRET=1)
  "reference"  the dense oracle in backends/decode/naive.py (any device; float64 too)
  "auto"       chosen when the op runs: Triton for CUDA tensors (not float64), the reference elsewhere
The op has no backward (decoding does not train) and mutates nothing, so a step that calls it exports and compiles.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from backends.common import triton_usable
from backends.decode.naive import decode_attention_reference
from passes.errors import BackendError

IMPLEMENTATIONS = ("triton", "reference", "auto")
NO_WINDOW = -1  # the op's encoding of "no window"
NO_SPLITS = 0  # the op's encoding of "choose the number of splits from the shapes"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What a site computes, fixed for the whole generation.

    scale: multiplies q·k; None: 1/sqrt(head_dim).
    window: keys with query_position - key_position < window stay visible; None: every earlier key.
    sinks: positions < sinks stay visible whatever the window (attention sinks, StreamingLLM).
    softcap: tanh soft-capping (Gemma-2): the scaled scores s become softcap * tanh(s / softcap) before the masks.
    rolling: the cache is the rolling buffer of sinks + R slots (R >= window + T - 1), not a linear one of max_len.
    """

    scale: Optional[float] = None
    window: Optional[int] = None
    sinks: int = 0
    softcap: Optional[float] = None
    rolling: bool = False

    def __post_init__(self) -> None:
        if self.scale is not None and not (_is_number(self.scale) and math.isfinite(self.scale)):
            raise BackendError(f"scale must be a finite number or None (1/sqrt(head_dim)); got {self.scale!r}")
        if self.window is not None and not (_is_int(self.window) and self.window >= 1):
            raise BackendError(f"window must be an int >= 1 (keys per query) or None (no window); got {self.window!r}")
        if not (_is_int(self.sinks) and self.sinks >= 0):
            raise BackendError(f"sinks must be an int >= 0; got {self.sinks!r}")
        if self.softcap is not None and not (_is_number(self.softcap) and 0 < self.softcap < math.inf):
            raise BackendError("softcap must be a positive finite number (scores become softcap * tanh(s / softcap)) "
                               f"or None; got {self.softcap!r}")
        if self.rolling and self.window is None:
            raise BackendError("rolling=True (a rolling-buffer cache) needs the proved sliding window: window=W; got "
                               "window=None")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _resolve_impl(impl: Optional[str], q: torch.Tensor) -> str:
    if impl is None or impl == "auto":
        return "triton" if q.is_cuda and q.dtype != torch.float64 else "reference"
    if impl not in IMPLEMENTATIONS:
        raise BackendError(f"impl={impl!r} is not an implementation; accepted: {', '.join(IMPLEMENTATIONS)} or None")
    if impl == "triton" and not triton_usable(q):
        raise BackendError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); got tensors on "
                           f"{q.device}")
    if impl == "triton" and q.dtype == torch.float64:
        raise BackendError("impl='triton' takes float16, bfloat16 or float32; got float64 (use impl='reference')")
    return impl


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("attention_planner::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    start: Optional[torch.Tensor],
    sink_logits: Optional[torch.Tensor],
    scale: float,
    window: int,
    sinks: int,
    softcap: Optional[float],
    rolling: bool,
    impl: str,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): out (batch, q_heads, T, value_dim) in q's dtype; lse (batch, q_heads, T), natural log,
    float32 (float64 for float64 inputs), including the sink logits. window = -1: none; num_splits = 0: automatic."""
    options = dict(scale=scale, window=None if window == NO_WINDOW else window, sinks=sinks, softcap=softcap,
                   rolling=rolling, start=start, sink_logits=sink_logits)
    if _resolve_impl(impl, q) == "triton":
        from backends.decode.triton import decode_forward

        out, lse = decode_forward(q, k_cache, v_cache, cache_len, num_splits=num_splits or None, **options)
    else:
        if not rolling and q.device.type == "cpu":
            # Slots past the longest row are masked anyway; on the CPU reading the length costs no synchronization.
            used = max(int(cache_len.max()), 1)
            k_cache, v_cache = k_cache[:, :, :used], v_cache[:, :, :used]
        out, lse = decode_attention_reference(q, k_cache, v_cache, cache_len, return_lse=True, **options)
    return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_len, start, sink_logits, scale, window, sinks, softcap, rolling, impl, num_splits):
    batch, heads, queries, _ = q.shape
    out = q.new_empty(batch, heads, queries, v_cache.shape[-1])
    lse = q.new_empty(batch, heads, queries, dtype=_lse_dtype(q.dtype))
    return out, lse


def validate_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
                           options: DecodeOptions, start: Optional[torch.Tensor] = None,
                           sink_logits: Optional[torch.Tensor] = None) -> None:
    """Raise BackendError naming the first input that the decoding op cannot take (shapes, dtypes and devices only:
    nothing reads tensor data, so a step stays capturable in a CUDA graph)."""
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise BackendError(f"{name} must be a 4-dim tensor (batch, heads, sequence, head_dim); got "
                               f"{tuple(getattr(tensor, 'shape', ())) or type(tensor).__name__}")
        if tensor.device != q.device:
            raise BackendError(f"{name} is on {tensor.device}, q on {q.device}: they must share a device")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in DTYPES:
        raise BackendError(f"q, k_cache, v_cache must share one dtype of float16, bfloat16, float32, float64; got "
                           f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch, heads, queries, head_dim = q.shape
    if k_cache.shape[0] != batch or v_cache.shape[0] != batch:
        raise BackendError(f"batch sizes differ: q {batch}, k_cache {k_cache.shape[0]}, v_cache {v_cache.shape[0]}")
    if k_cache.shape[1] != v_cache.shape[1] or heads % k_cache.shape[1] != 0:
        raise BackendError(f"heads: q has {heads}, k_cache {k_cache.shape[1]}, v_cache {v_cache.shape[1]}; the caches "
                           "must agree and divide q's (grouped-query attention)")
    if k_cache.shape[2] != v_cache.shape[2]:
        raise BackendError(f"k_cache has {k_cache.shape[2]} slots but v_cache has {v_cache.shape[2]}")
    if k_cache.shape[3] != head_dim:
        raise BackendError(f"q and k_cache head dims differ: {head_dim} vs {k_cache.shape[3]}")
    if queries < 1:
        raise BackendError("q must hold at least one new query (T >= 1 in (batch, q_heads, T, head_dim))")
    for name, tensor in (("cache_len", cache_len), ("start", start)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.int64, torch.int32) \
                or tuple(tensor.shape) != (batch,):
            raise BackendError(f"{name} must be an int64 tensor of shape (batch,) = ({batch},); got "
                               f"{getattr(tensor, 'dtype', type(tensor).__name__)} "
                               f"{tuple(getattr(tensor, 'shape', ()))}")
        if tensor.device != q.device:
            raise BackendError(f"{name} is on {tensor.device}, q on {q.device}: they must share a device")
    if sink_logits is not None:
        if not isinstance(sink_logits, torch.Tensor) or not sink_logits.is_floating_point() \
                or tuple(sink_logits.shape) != (heads,) or sink_logits.device != q.device:
            raise BackendError(f"sink_logits must be a floating-point tensor of shape (q_heads,) = ({heads},) on "
                               f"{q.device}; got {getattr(sink_logits, 'dtype', type(sink_logits).__name__)} "
                               f"{tuple(getattr(sink_logits, 'shape', ()))}")
    if options.rolling:
        ring = k_cache.shape[2] - options.sinks
        needed = options.window + queries - 1
        if ring < needed:
            raise BackendError(f"a rolling cache for window {options.window} with {options.sinks} sinks and {queries} "
                               f"queries per step needs sinks + window + T - 1 = {options.sinks + needed} slots; "
                               f"k_cache has {k_cache.shape[2]}")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    options: DecodeOptions = DecodeOptions(),
    *,
    start: Optional[torch.Tensor] = None,
    sink_logits: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    impl: Optional[str] = None,
    num_splits: Optional[int] = None,
):
    """Attention of a few new queries per row to a KV cache (one decoding step), reading each K/V byte once.

    Args:
        q: (batch, q_heads, T, head_dim): the new tokens' queries, at positions cache_len - T .. cache_len - 1;
            T = 1 for one token per step. Causal among themselves.
        k_cache: (batch, kv_heads, slots, head_dim); v_cache: (batch, kv_heads, slots, value_dim); kv_heads divides
            q_heads; value_dim may differ from head_dim. They already hold the new tokens (`append_to_cache`).
            Linear form: slot = position (slots = max_len). Rolling form (options.rolling): sinks + R slots with
            R >= window + T - 1, position p in slot p if p < sinks else sinks + (p - sinks) % R.
        cache_len: (batch,) int64, positions written per row, new tokens included (rows may differ).
        options: scale, window, sinks, softcap and the cache form (`DecodeOptions`).
        start: (batch,) int64, each row's first real position (left padding); keys before it are never visible.
        sink_logits: (q_heads,) float tensor: one learned logit per query head in every softmax, with no value.
        return_lse: also return the natural-log log-sum-exp (batch, q_heads, T), float32 (float64 for float64).
        impl: "triton", "reference", or None (Triton for CUDA tensors, the reference elsewhere).
        num_splits: Triton only: splits of the cache per (row, kv head); None chooses from the shapes.

    Returns out (batch, q_heads, T, value_dim) in q's dtype (and the lse). A query with no visible key gives zeros.
    Only shapes are validated (no tensor data is read), so a step stays capturable in a CUDA graph.
    """
    if not isinstance(options, DecodeOptions):
        raise BackendError(f"options must be a DecodeOptions(scale=, window=, sinks=, softcap=, rolling=); got "
                           f"{type(options).__name__}")
    validate_decode_inputs(q, k_cache, v_cache, cache_len, options, start, sink_logits)
    if num_splits is not None and not (_is_int(num_splits) and num_splits >= 1):
        raise BackendError(f"num_splits must be an int >= 1 or None (chosen from the shapes); got {num_splits!r}")
    impl = _resolve_impl(impl, q)
    scale = q.shape[-1] ** -0.5 if options.scale is None else float(options.scale)
    out, lse = decode_attention_op(
        q, k_cache, v_cache, cache_len, start, sink_logits, scale,
        NO_WINDOW if options.window is None else int(options.window), int(options.sinks),
        None if options.softcap is None else float(options.softcap), bool(options.rolling), impl,
        NO_SPLITS if num_splits is None else int(num_splits),
    )
    return (out, lse) if return_lse else out
