"""The exceptions that attention-planner raises (defined in passes/errors.py, the bottom layer; re-exported here)."""
from passes.errors import (  # noqa: F401
    BackendError,
    CaptureError,
    InvalidArgumentError,
    PlanError,
    PlannerError,
    UnknownDeviceError,
)
