"""Small helpers every variant's op uses (one place, so that the rule for "can Triton run here" is one rule)."""
from __future__ import annotations

import os
from typing import Optional

import torch


def interpreting() -> bool:
    """Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1: CI and tests here)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor: a CUDA tensor, or any tensor under the interpreter."""
    return tensor.is_cuda or interpreting()


def contiguous_or_none(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()
