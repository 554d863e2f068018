"""attention-planner: find every softmax attention in a PyTorch model, plan each from a cost model of sequence length
and device memory, and rewrite it into the variant that runs it best.

    import planner
    fast = planner.optimize(model, max_len="128k", device="h200", example_inputs=(input_ids,))
    print(fast.report.summary())

Names are imported on first use, so that `import passes...` or `import backends...` before `planner` works (the
passes import the records, which live here). Importing planner registers backend="attention_planner" with
torch.compile.
"""
from __future__ import annotations

import importlib
from typing import Any

from planner.errors import (
    BackendError,
    CaptureError,
    InvalidArgumentError,
    PlanError,
    PlannerError,
    UnknownDeviceError,
)

_LAZY = {
    "optimize": "planner.api",
    "find_attention": "planner.api",
    "calibrate": "planner.calibration",
    "DeviceSpec": "planner.devices",
    "device_spec": "planner.devices",
    "known_devices": "planner.devices",
    "gather_outputs": "planner.distributed",
    "shard_inputs": "planner.distributed",
    "parse_length": "planner.lengths",
    "AttentionSite": "planner.records",
    "Candidate": "planner.records",
    "MaskSpec": "planner.records",
    "Plan": "planner.records",
    "SiteDecision": "planner.records",
    "Report": "planner.report",
    "backend": "planner.compile_backend",
    "last_report": "planner.compile_backend",
    "linearize": "planner.linearize",
}

__all__ = sorted(list(_LAZY) + ["BackendError", "CaptureError", "InvalidArgumentError", "PlanError", "PlannerError",
                                "UnknownDeviceError"])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'planner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


from planner.compile_backend import register as _register_compile_backend  # noqa: E402

_register_compile_backend()  # torch.compile(model, backend="attention_planner")
