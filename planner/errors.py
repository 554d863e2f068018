"""The exceptions that attention-planner raises (defined in passes/errors.py, the bottom layer; re-exported here)."""
from passes.errors import BackendError, CaptureError, InvalidArgumentError, PlanError, PlannerError, UnknownDeviceError

__all__ = ["BackendError", "CaptureError", "InvalidArgumentError", "PlanError", "PlannerError", "UnknownDeviceError"]
