"""Peak memory of a call, on the device it runs on: what the demo, the tests and the benchmarks report.

CUDA: the caching allocator's peak. CPU: the process's resident-set high-water mark (VmHWM), reset before the call
through /proc/self/clear_refs, so the figure covers every allocation the call made, not only torch's.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _return_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_measurable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


def measure_peak(function: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run `function()` and return (its result, the peak memory in bytes it added above what was in use before)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = function()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    _return_free_memory()  # else the call's allocations reuse freed, still-resident pages and the growth reads 0
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    result = function()
    return result, max(0, _status_bytes("VmHWM") - before)
