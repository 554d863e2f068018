"""Attention implementations. Each variant lives in its own folder beside its naive PyTorch reference.

Public functions are imported lazily so that importing `backends` never pulls Triton or a variant that is not used.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "flash_attention": "backends.flash.op",
    "sliding_window_attention": "backends.sliding_window.op",
    "ring_attention": "backends.ring.op",
    "linear_attention": "backends.linear.op",
    "ssd": "backends.mamba2.op",
    "hyper_attention": "backends.hyper.op",
    "decode_attention": "backends.decode.op",
    "DecodeOptions": "backends.decode.op",
    "append_to_cache": "backends.decode.cache",
    "new_cache": "backends.decode.cache",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'backends' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public functions beside the module's own names, so that they complete in an editor before first use."""
    return sorted(set(globals()) | set(_PUBLIC))
