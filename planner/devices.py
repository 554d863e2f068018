"""Device specs: the ceilings that turn FLOPs and bytes into time, and the memory a plan must fit in.

Built-in figures come from vendors' datasheets (dense matrix rates, no sparsity) and are leads: `planner.calibrate`
measures the real ceilings and kernel efficiencies and saves them (see planner/calibration.py when present).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Union

import torch

from planner.errors import InvalidArgumentError, UnknownDeviceError

TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class DeviceSpec:
    """What the cost model needs to know of a device.

    matrix_flops: peak dense matrix FLOP/s per dtype name ("bfloat16", "float16", "float32").
    memory_bandwidth: bytes/s of device memory. memory_bytes: usable device memory.
    interconnect_bandwidth: bytes/s per direction between two devices (NVLink, PCIe), for ring attention.
    efficiency: achievable fraction of the peaks per kind of work ("matmul", "memory", or a kernel's name),
    replaced by measured values after calibration.
    """

    name: str
    matrix_flops: dict
    memory_bandwidth: float
    memory_bytes: float
    interconnect_bandwidth: float
    launch_overhead_s: float = 5e-6
    efficiency: dict = field(default_factory=lambda: {"matmul": 0.75, "memory": 0.85})
    kind: str = "gpu"
    source: str = "datasheet"

    def peak_flops(self, dtype: str) -> float:
        return self.matrix_flops.get(dtype, self.matrix_flops.get("float32"))

    def efficiency_of(self, work: str) -> float:
        return self.efficiency.get(work, self.efficiency.get("matmul", 0.75))

    def with_memory(self, memory_bytes: float, name: str) -> "DeviceSpec":
        return dataclasses.replace(self, memory_bytes=memory_bytes, name=name, source=self.source + " + measured memory")


def _gpu(name, bf16_tflops, fp32_tflops, memory_gb, bandwidth_tbs, interconnect_gbs) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        matrix_flops={"bfloat16": bf16_tflops * TERA, "float16": bf16_tflops * TERA, "float32": fp32_tflops * TERA},
        memory_bandwidth=bandwidth_tbs * TERA,
        memory_bytes=memory_gb * GIGA,
        interconnect_bandwidth=interconnect_gbs * GIGA,
    )


def _cpu_spec() -> DeviceSpec:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as meminfo:
            memory = int(meminfo.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        memory = 16 * 2**30
    # About 50 GFLOP/s of fp32 per core with AVX2 FMA, and ~10 GB/s of memory bandwidth per core, capped at 100.
    flops = 50 * GIGA * cores
    return DeviceSpec(
        name=f"cpu ({cores} cores)",
        matrix_flops={"bfloat16": flops / 4, "float16": flops / 4, "float32": flops, "float64": flops / 2},
        memory_bandwidth=min(100.0, 10.0 * cores) * GIGA,
        memory_bytes=float(memory),
        interconnect_bandwidth=10 * GIGA,
        launch_overhead_s=20e-6,
        efficiency={"matmul": 0.5, "memory": 0.5},
        kind="cpu",
    )


# Dense (no sparsity) matrix rates with fp32 accumulation; tf32 for float32 on GPUs that have it.
BUILTIN_DEVICES = {
    "h100": _gpu("NVIDIA H100 SXM 80GB", 989, 495, 80, 3.35, 450),
    "h200": _gpu("NVIDIA H200 SXM 141GB", 989, 495, 141, 4.8, 450),
    "a100-80gb": _gpu("NVIDIA A100 SXM 80GB", 312, 156, 80, 2.039, 300),
    "a100-40gb": _gpu("NVIDIA A100 SXM 40GB", 312, 156, 40, 1.555, 300),
    "l4": _gpu("NVIDIA L4 24GB", 121, 60, 24, 0.3, 32),
    "rtx4090": _gpu("NVIDIA GeForce RTX 4090 24GB", 165, 83, 24, 1.008, 32),
}
ALIASES = {"a100": "a100-80gb", "4090": "rtx4090", "rtx-4090": "rtx4090", "h100-80gb": "h100", "h200-141gb": "h200"}
# Words in torch.cuda.get_device_name() that identify a built-in spec, most specific first.
_NAME_MATCHES = (("H200", "h200"), ("H100", "h100"), ("A100", None), ("L4", "l4"), ("4090", "rtx4090"))


def known_devices() -> list[str]:
    return sorted(BUILTIN_DEVICES) + ["cpu", "cuda"]


def device_spec(device: Union[str, torch.device, DeviceSpec] = "cuda") -> DeviceSpec:
    """Resolve a device argument: a built-in name ("h200", "a100-80gb", "cpu", ...), "cuda"/"cuda:N" (the real GPU:
    its name and memory), a torch.device, or a DeviceSpec (returned as is)."""
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise InvalidArgumentError(f"device={device!r} is not a device; accepted: a name among {known_devices()}, "
                                   "'cuda:N', a torch.device or a DeviceSpec")
    key = device.strip().lower()
    key = ALIASES.get(key, key)
    if key in BUILTIN_DEVICES:
        return _with_calibration(BUILTIN_DEVICES[key], key)
    if key == "cpu":
        return _with_calibration(_cpu_spec(), "cpu")
    if key == "cuda" or key.startswith("cuda:"):
        return _real_cuda_spec(key)
    raise UnknownDeviceError(f"unknown device {device!r}; known devices: {', '.join(known_devices())} (or 'cuda:N', "
                             "a torch.device, or a DeviceSpec)")


def _real_cuda_spec(key: str) -> DeviceSpec:
    if not torch.cuda.is_available():
        raise InvalidArgumentError(f"device={key!r} but no CUDA device is visible; name a target to plan for it "
                                   f"without having it: {', '.join(sorted(BUILTIN_DEVICES))}")
    index = int(key.split(":")[1]) if ":" in key else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    base_key = None
    for word, builtin in _NAME_MATCHES:
        if word in properties.name:
            base_key = builtin or ("a100-80gb" if properties.total_memory > 50 * GIGA else "a100-40gb")
            break
    if base_key is None:
        # An unknown GPU: keep its real memory, take an H100's rates as a guess, and say so.
        spec = dataclasses.replace(BUILTIN_DEVICES["h100"], source="unknown GPU: H100 rates assumed")
    else:
        spec = BUILTIN_DEVICES[base_key]
    spec = spec.with_memory(float(properties.total_memory), properties.name)
    return _with_calibration(spec, base_key or properties.name)


def _with_calibration(spec: DeviceSpec, key: str) -> DeviceSpec:
    """Apply saved calibration (measured ceilings and efficiencies) where planner.calibration has some."""
    try:
        from planner.calibration import apply_saved_calibration
    except ImportError:
        return spec
    return apply_saved_calibration(spec, key)
