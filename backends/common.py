"""Small helpers every variant's op uses (one place, so that the rule for "can Triton run here" is one rule)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from passes.errors import BackendError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1: CI and tests here)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor: a CUDA tensor, or any tensor under the interpreter."""
    return tensor.is_cuda or interpreting()


def contiguous_or_none(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtypes: tuple = FLOAT_DTYPES) -> None:
    """Raise BackendError unless q, k, v are 4-dim (batch, heads, sequence, head_dim) tensors of one dtype in `dtypes`;
    the shapes' agreement is each variant's own rule."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise BackendError(f"{name} must have 4 dims (batch, heads, sequence, head_dim); got shape "
                               f"{tuple(tensor.shape)}")
        if tensor.dtype not in dtypes:
            accepted = ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
            raise BackendError(f"{name} has dtype {tensor.dtype}; accepted: {accepted}")
    if not (q.dtype == k.dtype == v.dtype):
        raise BackendError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
