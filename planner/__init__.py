"""attention-planner: find every softmax attention in a PyTorch model, plan each from a cost model of sequence length
and device memory, and rewrite it into the variant that runs it best.

    import planner
    fast = planner.optimize(model, max_len="128k", device="h200", example_inputs=(input_ids,))
    print(fast.report.summary())
"""
from planner.api import find_attention, optimize
from planner.calibration import calibrate
from planner.devices import DeviceSpec, device_spec, known_devices
from planner.distributed import gather_outputs, shard_inputs
from planner.errors import (
    BackendError,
    CaptureError,
    InvalidArgumentError,
    PlanError,
    PlannerError,
    UnknownDeviceError,
)
from planner.lengths import parse_length
from planner.records import AttentionSite, Candidate, MaskSpec, Plan, SiteDecision
from planner.report import Report
from planner.compile_backend import backend, last_report, register as _register_compile_backend

_register_compile_backend()  # torch.compile(model, backend="attention_planner")

__all__ = [
    "AttentionSite", "BackendError", "Candidate", "CaptureError", "DeviceSpec", "InvalidArgumentError", "MaskSpec",
    "Plan", "PlanError", "PlannerError", "Report", "SiteDecision", "UnknownDeviceError", "backend", "calibrate",
    "device_spec", "find_attention", "gather_outputs", "known_devices", "last_report", "optimize", "parse_length",
    "shard_inputs",
]
__version__ = "0.1.0"
