"""The exceptions that attention-planner raises. Every error names what is wrong and what would be accepted."""


class PlannerError(Exception):
    """Base class of every error raised by attention-planner."""


class InvalidArgumentError(PlannerError, ValueError):
    """An argument has a value that is not accepted (the message lists what is)."""


class UnknownDeviceError(InvalidArgumentError):
    """A device name that is not in the built-in table."""


class CaptureError(PlannerError):
    """The model could not be captured with torch.export."""


class BackendError(PlannerError, RuntimeError):
    """An attention implementation was called with inputs it cannot handle."""


class PlanError(PlannerError):
    """No plan fits the device, or the plan is otherwise impossible."""
