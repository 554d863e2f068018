"""Which device: `device_spec` resolves a device argument to its datasheet spec (backends/hardware.py) with what was
measured on it applied.

Measured efficiencies come from a saved calibration (`planner.calibrate(device)` times the device and saves
calibration-<key>.json under ~/.cache/attention-planner/ or $ATTENTION_PLANNER_CACHE), else, for the H200, from the
built-in measurements below (source "measured"); every other device keeps the leads of backends/hardware.py.

Saved file (calibration-<key>.json), schema 1:
{"schema_version": 1, "key": str, "device_name": str, "date": "YYYY-MM-DD", "torch": str, "triton": str | null,
 "matmul_flops": {dtype: FLOP/s measured}, "memory_bandwidth": bytes/s measured (read + written),
 "efficiency": {work: fraction of the datasheet peak},
 "measurements": [{"work", "length", "seconds", "flops", "bytes", "efficiency"}]}
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import statistics
from pathlib import Path
from typing import Optional, Union

import torch

from backends.costs import SEQUENCE_LENGTH, CostShape, evaluate
from backends.hardware import BUILTIN_DEVICES, DeviceSpec, known_devices, resolve_device

__all__ = ["device_spec", "known_devices", "BUILTIN_DEVICES", "DeviceSpec", "apply_saved_calibration",
           "builtin_calibration", "calibration_path", "cache_dir", "kernel_efficiency", "reference_shape"]

SCHEMA_VERSION = 1

# What was measured on an H200 (torch 2.11, bf16, B=1, H=32, D=128 or the "@d64" key's 64, causal; KINDS.md, the
# project lead's runs and benchmarks/RESULTS.md), per efficiency key:
# work: (cost module, implementation, window, world size, ((length, seconds), ...)). A rate given as ("tflops", R)
# instead of seconds is converted to seconds with the same cost module, so every entry goes through one formula.
H200_MEASURED_DATE = "2026-11"
H200_MATMUL_FLOPS = 788e12  # 8192³ bf16 product, random data
H200_COPY_BANDWIDTH = 4.3e12  # device-to-device copy, bytes read + written
_DENSE, _OURS = "backends.dense.cost", "triton"
H200_KERNELS: dict = {
    # cuDNN: the project lead's runs; RESULTS.md revisions 23e124d (32k) and 68da512 (128k); benchmarks/
    # calibrate_h200.py (RESULTS.md, "Cost model against measurements on the H200", revision 52cb1f7).
    "sdpa-cudnn": (_DENSE, "sdpa-cudnn", None, 1, ((32768, 14.6e-3), (32768, 15.05e-3), (131072, 256e-3),
                                                   (131072, 243.9e-3), (131072, 261.91e-3))),
    "sdpa-flash": (_DENSE, "sdpa-flash", None, 1, ((32768, 25.54e-3),)),  # RESULTS.md, rev. 23e124d
    # Ours (benchmarks/RESULTS.md, "Tiled attention kernels with tensor descriptors", revision 1d84af4): exact
    # causal, and the causal window of 4096. The earlier kernel's figures are gone with it.
    "flash": ("backends.flash.cost", _OURS, None, 1, ((32768, 15.655e-3),)),
    "sliding_window": ("backends.sliding_window.cost", _OURS, 4096, 1, ((32768, 4.045e-3), (131072, 17.87e-3))),
    # Ours (benchmarks/RESULTS.md, "Linear attention, Mamba-2 SSD, HyperAttention", revision 68da512): linear
    # attention without decay (chunk 64), SSD (chunk 256).
    "linear": ("backends.linear.cost", _OURS, None, 1, ((131072, 3.01e-3),)),
    "ssd": ("backends.mamba2.cost", _OURS, None, 1, ((131072, 2.92e-3),)),
    # HyperAttention causal, inference path with Triton gathers and ranks (RESULTS.md, "HyperAttention causal at
    # 128k", revision 5554c1b).
    "hyper": ("backends.hyper.cost", _OURS, None, 1, ((131072, 39.49e-3),)),
    # Head dim 64 (H=32, 8 kv heads): "@d64" keys apply to head dims up to 64 (backends/costs.py work_for_head_dim).
    # Ours and cuDNN in one run (RESULTS.md, "Head dim 64 with tensor descriptors", revision 0811dc3; ours
    # at (128, 64, 8, 3), the tuner's choice): ours 8% slower at 8k, even at 32k, 2% faster at 128k.
    "flash@d64": ("backends.flash.cost", _OURS, None, 1, ((8192, 0.6771e-3), (32768, 9.444e-3), (131072, 148.7e-3))),
    "sdpa-cudnn@d64": (_DENSE, "sdpa-cudnn", None, 1, ((8192, 0.6274e-3), (32768, 9.509e-3), (131072, 151.35e-3))),
    "sdpa-flash@d64": (_DENSE, "sdpa-flash", None, 1, ((8192, 0.999e-3), (32768, 14.216e-3))),
    # Ring of 2 H200s, Triton blocks, causal zigzag at 256k, forward (RESULTS.md, "Ring attention on 2 × H200",
    # revision dc5e8e4): per-rank time.
    "ring": ("backends.ring.cost", _OURS, None, 2, ((262144, 597e-3),)),
}
BUILTIN_MEASUREMENTS = {"h200": (H200_MEASURED_DATE, H200_MATMUL_FLOPS, H200_COPY_BANDWIDTH, H200_KERNELS)}

MIN_EFFICIENCY, MAX_EFFICIENCY = 0.005, 1.0


def cache_dir() -> Path:
    """Where calibrations are saved: $ATTENTION_PLANNER_CACHE, else ~/.cache/attention-planner."""
    return Path(os.environ.get("ATTENTION_PLANNER_CACHE") or Path.home() / ".cache" / "attention-planner")


def calibration_path(key: str) -> Path:
    safe = "".join(character if character.isalnum() or character in "-_." else "-" for character in key.lower())
    return cache_dir() / f"calibration-{safe}.json"


def device_spec(device: Union[str, torch.device, DeviceSpec] = "cuda") -> DeviceSpec:
    """Resolve a device argument: a built-in name ("h200", "a100-80gb", "cpu", ...), "cuda"/"cuda:N" (the real GPU:
    its name and memory), a torch.device, or a DeviceSpec (returned as is). What was measured on the device (a
    saved calibration, else the built-in measurements) replaces the datasheet's leads."""
    if isinstance(device, DeviceSpec):
        return device
    spec = resolve_device(device)
    return apply_saved_calibration(spec, spec.key)


def apply_saved_calibration(spec: DeviceSpec, key: str) -> DeviceSpec:
    """The spec with measured efficiencies: a saved calibration for `key` if there is one, else the built-in
    measurements for that device, else the spec unchanged."""
    path = calibration_path(key)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return spec
        efficiency = {**spec.efficiency, **saved.get("efficiency", {})}
        return dataclasses.replace(spec, efficiency=efficiency,
                                   source=f"{spec.source} + calibrated {saved.get('date', '')} ({path})")
    if key in BUILTIN_MEASUREMENTS:
        return builtin_calibration(spec, key)
    return spec


def builtin_calibration(spec: DeviceSpec, key: str) -> DeviceSpec:
    """Apply BUILTIN_MEASUREMENTS[key] to the spec."""
    date, matmul_flops, copy_bandwidth, kernels = BUILTIN_MEASUREMENTS[key]
    efficiency = dict(spec.efficiency)
    efficiency["matmul"] = matmul_flops / spec.peak_flops("bfloat16")
    efficiency["memory"] = copy_bandwidth / spec.memory_bandwidth
    measured_spec = dataclasses.replace(spec, efficiency=efficiency)
    for work, (module, implementation, window, world_size, timings) in kernels.items():
        head_dim = int(work.split("@d")[1]) if "@d" in work else 128  # "flash@d64": measured at head dim 64
        values = []
        for length, seconds in timings:
            shape = reference_shape(length, implementation, window=window, head_dim=head_dim, world_size=world_size)
            costs = _cost_module(module).costs(shape)
            if isinstance(seconds, tuple):  # ("tflops", rate): the time that rate gives at this length
                seconds = _value(costs.flops, length) / (seconds[1] * 1e12)
            values.append(kernel_efficiency(measured_spec, costs, length, seconds, "bfloat16"))
        efficiency[work] = statistics.geometric_mean(values)
    return dataclasses.replace(spec, efficiency=efficiency, source=f"{spec.source} + measured on an H200 ({date})")


def reference_shape(length: int, implementation: str, *, causal: bool = True, window: Optional[int] = None,
                    batch: int = 1, heads: int = 32, head_dim: int = 128, dtype: str = "bfloat16",
                    mask_tensor: bool = False, world_size: int = 1) -> CostShape:
    """The benchmark shape (B=1, H=32, D=128, bf16 by default) as a CostShape in the sequence length symbol."""
    return CostShape(batch=batch, heads=heads, kv_heads=heads, head_dim=head_dim, value_dim=head_dim,
                     q_len=SEQUENCE_LENGTH, kv_len=SEQUENCE_LENGTH, dtype=dtype, causal=causal, window=window,
                     implementation=implementation, mask_tensor=mask_tensor, world_size=world_size)


def kernel_efficiency(spec: DeviceSpec, costs, length: int, seconds: float, dtype: str) -> float:
    """The efficiency for costs.work that makes the roofline time at `length` equal `seconds`.

    The compute term is the one an efficiency scales; where the memory term alone already exceeds the measurement
    (the kernel beat our byte count), the compute term cannot explain it and the efficiency is capped at 1."""
    flops = _value(costs.flops, length)
    launches = _value(costs.launches, length) * spec.launch_overhead_s
    compute_seconds = max(seconds - launches, seconds * 0.05)
    efficiency = flops / (spec.peak_flops(dtype) * compute_seconds)
    return min(MAX_EFFICIENCY, max(MIN_EFFICIENCY, efficiency))


def _value(expression, length: int) -> float:
    return evaluate(expression, length)


def _cost_module(name: str):
    return importlib.import_module(name)


