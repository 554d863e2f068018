"""Device specs and their resolution (backends/hardware.py, backends/devices.py; re-exported here)."""
from backends.devices import apply_saved_calibration, device_spec  # noqa: F401
from backends.hardware import (  # noqa: F401
    ALIASES,
    AMPERE_EFFICIENCY,
    BUILTIN_DEVICES,
    CPU_EFFICIENCY,
    FAMILY_EFFICIENCY,
    HOPPER_EFFICIENCY,
    DeviceSpec,
    known_devices,
    resolve_device,
)
