"""attention-planner: find every softmax attention in a PyTorch model, plan each from a cost model of sequence length
and device memory, and rewrite it into the variant that runs it best.

    import planner
    fast = planner.optimize(model, max_len="128k", device="h200", example_inputs=(input_ids,))
    print(fast.report.summary())

The layers point one way: passes (graph IR, records, errors, generic rewrite) <- backends (variants, costs, devices)
<- planner (plans, policies, fidelity, report, API, CLI). Names are imported on first use. Importing planner
registers backend="attention_planner" with torch.compile.
"""
from __future__ import annotations

import importlib
from typing import Any

from planner.errors import BackendError, CaptureError, InvalidArgumentError, PlanError, PlannerError, UnknownDeviceError

_LAZY = {
    "optimize": "planner.api",
    "find_attention": "planner.api",
    "calibrate": "planner.calibration",
    "DeviceSpec": "backends.hardware",
    "device_spec": "backends.devices",
    "known_devices": "backends.hardware",
    "gather_outputs": "planner.distributed",
    "shard_inputs": "planner.distributed",
    "parse_length": "planner.lengths",
    "AttentionSite": "passes.records",
    "Candidate": "passes.records",
    "MaskSpec": "passes.records",
    "Plan": "passes.records",
    "SiteDecision": "passes.records",
    "Report": "planner.report",
    "backend": "planner.compile_backend",
    "last_report": "planner.compile_backend",
    "linearize": "planner.linearization",
    "decoder": "planner.generation",
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
