"""Device specs: the ceilings that turn FLOPs and bytes into time, and the memory a plan must fit in.

Built-in figures come from vendors' datasheets (dense matrix rates, no sparsity) and are leads; kernel efficiencies
are leads too. `resolve_device` gives a device's spec as the datasheet has it; backends/devices.py's `device_spec`
applies what was measured on it (built in for the H200, or saved by `planner.calibrate(device)`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Union

import torch

from backends.registry import default_efficiency
from passes.errors import InvalidArgumentError, UnknownDeviceError

TERA = 1e12
GIGA = 1e9


MEBI = 2**20

# Achievable fractions of the peaks, per kind of work, before measurement: leads, not measurements (except where
# backends/devices.py's built-in measurements replace them). Keys: "matmul" (cuBLAS-class products), "memory"
# (streaming copies), "interconnect" (ring transfers), and one per kernel, which each variant's rule.py gives
# ("sdpa-flash", "flash", "blockwise", "ring", ...). Kernel efficiencies are of the useful FLOPs (skipped blocks are
# not counted).
_CEILINGS = {
    "hopper": {"matmul": 0.75, "memory": 0.85, "interconnect": 0.8},
    "ampere": {"matmul": 0.8, "memory": 0.85, "interconnect": 0.8},
    "cpu": {"matmul": 0.5, "memory": 0.5, "interconnect": 0.5},
}
FAMILY_EFFICIENCY = {family: {**_CEILINGS[family], **default_efficiency(family)} for family in _CEILINGS}
FAMILY_EFFICIENCY["ada"] = FAMILY_EFFICIENCY["ampere"]
HOPPER_EFFICIENCY, AMPERE_EFFICIENCY, CPU_EFFICIENCY = (FAMILY_EFFICIENCY[name] for name in ("hopper", "ampere", "cpu"))


@dataclass(frozen=True)
class DeviceSpec:
    """What the cost model needs to know of a device.

    matrix_flops: peak dense matrix FLOP/s per dtype name ("bfloat16", "float16", "float32", "tfloat32");
        "float32" is the plain (non tensor-core) rate, which PyTorch uses unless TF32 is allowed.
    memory_bandwidth: bytes/s of device memory. memory_bytes: device memory as the driver reports its total.
    reserved_bytes: what the runtime keeps of it (CUDA context, library workspaces): a plan must fit in the rest.
    interconnect_bandwidth: bytes/s per direction between two devices (NVLink, PCIe), for ring attention.
    efficiency: achievable fraction of the peaks per kind of work ("matmul", "memory", or a kernel's name),
        replaced by measured values after calibration. family: "hopper", "ampere", "ada", "cpu" (what runs where).
    source: where the figures come from ("datasheet", "datasheet + measured on ...", "calibrated ...").
    """

    name: str
    matrix_flops: dict
    memory_bandwidth: float
    memory_bytes: float
    interconnect_bandwidth: float
    launch_overhead_s: float = 5e-6
    efficiency: dict = field(default_factory=lambda: dict(HOPPER_EFFICIENCY))
    kind: str = "gpu"
    source: str = "datasheet"
    family: str = "hopper"
    reserved_bytes: float = 0.0
    key: str = ""

    def peak_flops(self, dtype: str) -> float:
        return self.matrix_flops.get(dtype, self.matrix_flops.get("float32"))

    def efficiency_of(self, work: str) -> float:
        """The efficiency for `work`; a qualified key ("flash@d64") falls back to its kernel's ("flash"), then to
        the matrix-product efficiency."""
        if work in self.efficiency:
            return self.efficiency[work]
        kernel = work.split("@")[0]
        return self.efficiency.get(kernel, self.efficiency.get("matmul", 0.75))

    @property
    def usable_bytes(self) -> float:
        """The memory a plan may use: the total less what the runtime reserves."""
        return self.memory_bytes - self.reserved_bytes

    def with_memory(self, memory_bytes: float, name: str) -> "DeviceSpec":
        return dataclasses.replace(self, memory_bytes=memory_bytes, name=name,
                                   source=self.source + " + measured memory")


def _gpu(key, name, family, bf16_tflops, fp32_tflops, tf32_tflops, memory_mib, bandwidth_tbs,
         interconnect_gbs) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        matrix_flops={"bfloat16": bf16_tflops * TERA, "float16": bf16_tflops * TERA, "float32": fp32_tflops * TERA,
                      "tfloat32": tf32_tflops * TERA, "float64": fp32_tflops * TERA / 2},
        memory_bandwidth=bandwidth_tbs * TERA,
        memory_bytes=float(memory_mib * MEBI),
        interconnect_bandwidth=interconnect_gbs * GIGA,
        efficiency=dict(FAMILY_EFFICIENCY[family]),
        family=family,
        reserved_bytes=float(1.5 * 2**30),
        key=key,
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
        matrix_flops={"bfloat16": flops / 4, "float16": flops / 4, "float32": flops, "tfloat32": flops,
                      "float64": flops / 2},
        memory_bandwidth=min(100.0, 10.0 * cores) * GIGA,
        memory_bytes=float(memory),
        interconnect_bandwidth=10 * GIGA,
        launch_overhead_s=20e-6,
        efficiency=dict(CPU_EFFICIENCY),
        kind="cpu",
        family="cpu",
        reserved_bytes=float(min(2 * 2**30, memory / 8)),
        key="cpu",
    )


# Vendors' datasheets: dense matrix rates (no sparsity) with fp32 accumulation, plain fp32 (non tensor-core) and
# TF32 rates; memory as nvidia-smi reports the total (MiB); NVLink/PCIe bandwidth per direction.
BUILTIN_DEVICES = {
    "h100": _gpu("h100", "NVIDIA H100 SXM 80GB", "hopper", 989, 67, 495, 81559, 3.35, 450),
    "h200": _gpu("h200", "NVIDIA H200 SXM 141GB", "hopper", 989, 67, 495, 143771, 4.8, 450),
    "a100-80gb": _gpu("a100-80gb", "NVIDIA A100 SXM 80GB", "ampere", 312, 19.5, 156, 81920, 2.039, 300),
    "a100-40gb": _gpu("a100-40gb", "NVIDIA A100 SXM 40GB", "ampere", 312, 19.5, 156, 40960, 1.555, 300),
    "l4": _gpu("l4", "NVIDIA L4 24GB", "ada", 121, 30.3, 60, 23034, 0.3, 32),
    "rtx4090": _gpu("rtx4090", "NVIDIA GeForce RTX 4090 24GB", "ada", 165, 82.6, 82.6, 24564, 1.008, 32),
}
ALIASES = {"a100": "a100-80gb", "4090": "rtx4090", "rtx-4090": "rtx4090", "h100-80gb": "h100", "h200-141gb": "h200"}
# Words in torch.cuda.get_device_name() that identify a built-in spec, most specific first.
_NAME_MATCHES = (("H200", "h200"), ("H100", "h100"), ("A100", None), ("L4", "l4"), ("4090", "rtx4090"))


def known_devices() -> list[str]:
    return sorted(BUILTIN_DEVICES) + ["cpu", "cuda"]


def resolve_device(device: Union[str, torch.device, DeviceSpec] = "cuda") -> DeviceSpec:
    """The datasheet spec a device argument names: a built-in name ("h200", "a100-80gb", "cpu", ...), "cuda"/"cuda:N"
    (the real GPU: its name and memory), a torch.device, or a DeviceSpec (returned as is). Its `key` names what
    was measured on it (backends/devices.py)."""
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
        return BUILTIN_DEVICES[key]
    if key == "cpu":
        return _cpu_spec()
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
    key = base_key or properties.name.lower().replace(" ", "-")
    return dataclasses.replace(spec, key=key)
