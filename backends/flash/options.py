"""The options of one tiled attention call, as one frozen value carried through every layer (the public functions,
the op, the blockwise loop, the Triton wrappers and the dense reference), as FlexAttention carries a block mask and a
score function. The custom ops keep flat arguments (their schemas); `op_arguments` and `from_op` convert."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from passes.errors import BackendError

NO_WINDOW = -1  # the op's encoding of "no window" (custom ops take no Optional[int] defaults cleanly across versions)


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    """What a tiled attention call computes besides q, k, v.

    causal: query i sees key j iff j <= i (top-left aligned, as SDPA's is_causal). window W: with causal,
        i - W < j; without, |i - j| < W. sinks n: keys j < n stay visible whatever the window.
    scale: multiplies q·k (None: 1/sqrt(head_dim)). softcap c: the scaled scores become c * tanh(s / c) before the
        masks. key_padding_mask: (batch, keys) bool, True where a key is real. attn_mask: broadcastable to
        (batch, q_heads, queries, keys), bool (True = attend) or additive. sink_logits: (q_heads,) one logit per
        query head in every row's softmax, with no value.
    """

    causal: bool = False
    window: Optional[int] = None
    sinks: int = 0
    scale: Optional[float] = None
    softcap: Optional[float] = None
    key_padding_mask: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None
    sink_logits: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, options: Optional["AttentionOptions"] = None, **keywords) -> "AttentionOptions":
        """`options` with `keywords` replacing its fields; from the keywords alone without options."""
        if options is None:
            return cls(**keywords)
        return dataclasses.replace(options, **keywords) if keywords else options

    @classmethod
    def from_op(cls, key_padding_mask, attn_mask, causal, window, sinks, scale, softcap=None,
                sink_logits=None) -> "AttentionOptions":
        """The options from a custom op's flat arguments (window NO_WINDOW: none)."""
        return cls(causal=causal, window=None if window == NO_WINDOW else window, sinks=sinks, scale=scale,
                   softcap=softcap, key_padding_mask=key_padding_mask, attn_mask=attn_mask, sink_logits=sink_logits)

    def scale_for(self, q: torch.Tensor) -> float:
        return q.shape[-1] ** -0.5 if self.scale is None else float(self.scale)

    def op_arguments(self, q: torch.Tensor, impl: str) -> tuple:
        """attention_planner::flash_attention's arguments after q, k, v."""
        return (self.key_padding_mask, self.attn_mask, self.causal, NO_WINDOW if self.window is None
                else int(self.window), self.sinks, self.scale_for(q), impl,
                None if self.softcap is None else float(self.softcap), self.sink_logits)

    def validate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise BackendError naming the first input or option that the tiled attention cannot take."""
        validate_attention_inputs(q, k, v, self.key_padding_mask, self.attn_mask)
        validate_score_modifiers(q, self.softcap, self.sink_logits)
        if self.window is not None and self.window < 1:
            raise BackendError(f"window must be a positive number of keys; got {self.window}")
        if self.sinks < 0:
            raise BackendError(f"sinks must be >= 0; got {self.sinks}")


def validate_score_modifiers(q: torch.Tensor, softcap: Optional[float], sink_logits: Optional[torch.Tensor]) -> None:
    """Raise BackendError for a soft-cap that is not a positive finite number or sink logits that are not one float
    per query head."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and 0 < float(softcap) < float("inf")):
        raise BackendError(f"softcap must be a positive finite number (scores become softcap * tanh(s / softcap)) or "
                           f"None; got {softcap!r}")
    if sink_logits is not None:
        if not isinstance(sink_logits, torch.Tensor) or not sink_logits.is_floating_point():
            raise BackendError("sink_logits must be a floating-point tensor of shape (q_heads,); got "
                               f"{type(sink_logits).__name__} {getattr(sink_logits, 'dtype', '')}")
        if tuple(sink_logits.shape) != (q.shape[1],):
            raise BackendError(f"sink_logits must have shape (q_heads,) = ({q.shape[1]},); got "
                               f"{tuple(sink_logits.shape)}")
        if sink_logits.device != q.device:
            raise BackendError(f"sink_logits are on {sink_logits.device}, q on {q.device}: they must share a device")


def validate_attention_inputs(q, k, v, key_padding_mask=None, attn_mask=None) -> None:
    """Raise BackendError naming the first input that the tiled attention cannot take."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise BackendError(f"{name} must have 4 dims (batch, heads, sequence, head_dim); got shape "
                               f"{tuple(tensor.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise BackendError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise BackendError(f"dtype {q.dtype} is not supported; accepted: float16, bfloat16, float32, float64")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise BackendError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] != 0:
        raise BackendError(f"heads: q has {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}; k and v must agree and divide "
                           "q's (grouped-query attention)")
    if k.shape[2] != v.shape[2]:
        raise BackendError(f"k has {k.shape[2]} keys but v has {v.shape[2]} values")
    if k.shape[3] != q.shape[3]:
        raise BackendError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2])):
        raise BackendError(f"key_padding_mask must be a bool tensor of shape (batch, keys) = {(q.shape[0], k.shape[2])}"
                           f"; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        try:
            torch.broadcast_shapes(attn_mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            raise BackendError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, q_heads, "
                               f"queries, keys) = {(q.shape[0], q.shape[1], q.shape[2], k.shape[2])}") from None
