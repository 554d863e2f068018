"""Calibration: time what a device really achieves, so that estimates follow reality.

`calibrate(device)` measures the two ceilings (a large matrix product, a large copy) and, for each attention kernel
that runs there, its time at a couple of lengths; each kernel's efficiency is the fraction of the peak FLOP rate
that makes the roofline estimate equal the measured time. The result is saved as JSON (schema in
backends/devices.py), and `planner.device_spec` applies it from then on.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch

from backends.devices import (  # noqa: F401  (the measured figures and their arithmetic, re-exported)
    BUILTIN_MEASUREMENTS,
    SCHEMA_VERSION,
    DeviceSpec,
    _value,
    apply_saved_calibration,
    builtin_calibration,
    cache_dir,
    calibration_path,
    device_spec,
    kernel_efficiency,
    reference_shape,
)
from backends import registry
from backends.registry import KernelProbe
from passes.errors import InvalidArgumentError


def _bench(function: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of `function()`; triton.testing.do_bench on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(function, warmup=25, rep=100, return_mode="median") / 1e3
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_matmul(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a size³ matrix product on random data."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _bench(lambda: a @ b, device)
    return 2 * size**3 / seconds


def measure_copy(device: torch.device, megabytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = _bench(lambda: target.copy_(source), device)
    return 2 * source.numel() / seconds


def default_probes(device: torch.device) -> list[KernelProbe]:
    """The kernels calibrate() times on `device` (each variant's rule.py names its own)."""
    return registry.probes(device.type == "cuda")


def calibrate(
    device: Union[str, torch.device] = "cuda",
    *,
    lengths: Optional[Sequence[int]] = None,
    heads: int = 32,
    head_dim: int = 128,
    small_head_dim: Optional[int] = 64,
    probes: Optional[Sequence[KernelProbe]] = None,
    save: bool = True,
    verbose: bool = False,
) -> DeviceSpec:
    """Measure `device` ("cuda", "cuda:N" or "cpu"): matmul and copy ceilings, and each kernel's efficiency at
    `lengths` (default 8k and 32k on a GPU, 512 and 1024 with 4 heads of 64 on the CPU); save the result (JSON, see
    the module docstring) and return the calibrated DeviceSpec. A kernel that fails to run is skipped and reported
    in the saved file's "skipped" list (with the error).

    On a GPU each kernel is also timed at `small_head_dim` (None: not), saved under its "@d64" key
    (backends/costs.py work_for_head_dim): kernels rank differently at small head dims."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"calibrating {device!r} needs a visible CUDA device; the CPU is measured with "
                                   "calibrate('cpu') (attention-planner calibrate --device cpu)")
    on_gpu = torch_device.type == "cuda"
    spec = device_spec(str(torch_device) if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dtype_name = str(dtype).replace("torch.", "")
    if lengths is None:
        lengths = (8192, 32768) if on_gpu else (512, 1024)
    if not on_gpu:
        heads, head_dim = min(heads, 4), min(head_dim, 64)
    base = dataclasses.replace(spec, efficiency={key: value for key, value in spec.efficiency.items()})

    matmul = measure_matmul(torch_device, dtype, 8192 if on_gpu else 1024)
    copy = measure_copy(torch_device, 4096 if on_gpu else 256)
    efficiency = dict(base.efficiency)
    efficiency["matmul"] = matmul / base.peak_flops(dtype_name)
    efficiency["memory"] = copy / base.memory_bandwidth
    measured = dataclasses.replace(base, efficiency=efficiency)
    if verbose:
        print(f"matmul {matmul / 1e12:.1f} TFLOP/s, copy {copy / 1e9:.0f} GB/s")

    records, skipped = [], []
    by_work: dict[str, list[float]] = {}
    # (head dim, suffix of the efficiency key): the CPU measures one small head dim under the plain keys
    head_dims = [(head_dim, "")]
    if on_gpu and small_head_dim is not None and small_head_dim < head_dim:
        head_dims.append((small_head_dim, f"@d{small_head_dim}"))
    for probe in probes if probes is not None else default_probes(torch_device):
        for probe_head_dim, suffix in head_dims:
            work = probe.work + suffix
            for length in lengths:
                try:
                    q, k, v = (torch.randn(1, heads, length, probe_head_dim, device=torch_device, dtype=dtype)
                               for _ in range(3))
                    seconds = _bench(probe.call(q, k, v), torch_device)
                except Exception as error:  # a kernel that is missing or fails here is skipped, with the reason
                    message = f"{type(error).__name__}: {error}"[:300]
                    skipped.append({"work": work, "length": length, "error": message})
                    break
                shape = reference_shape(length, probe.implementation, window=probe.window, heads=heads,
                                        head_dim=probe_head_dim, dtype=dtype_name, mask_tensor=probe.mask_tensor)
                costs = probe.costs(shape)
                value = kernel_efficiency(measured, costs, length, seconds, dtype_name)
                by_work.setdefault(work, []).append(value)
                records.append({"work": work, "length": length, "seconds": seconds,
                                "flops": _value(costs.flops, length), "bytes": _value(costs.bytes, length),
                                "efficiency": value})
                if verbose:
                    print(f"{work:>20} L={length:>7}: {seconds * 1e3:9.3f} ms  efficiency {value:.3f}")
    for work, values in by_work.items():
        efficiency[work] = statistics.geometric_mean(values)

    key = spec.key or ("cpu" if not on_gpu else str(torch_device))
    document = {
        "schema_version": SCHEMA_VERSION, "key": key, "device_name": spec.name,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": _triton_version(),
        "matmul_flops": {dtype_name: matmul}, "memory_bandwidth": copy, "efficiency": efficiency,
        "measurements": records, "skipped": skipped,
    }
    if save:
        path = calibration_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        source = f"{base.source} + calibrated {document['date']} ({path})"
    else:
        source = f"{base.source} + calibrated {document['date']} (not saved)"
    return dataclasses.replace(base, efficiency=efficiency, source=source)


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None

