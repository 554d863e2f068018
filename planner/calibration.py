"""Calibration: measure what a device really achieves, so that estimates follow reality.

`calibrate(device)` measures the two ceilings (a large matrix product, a large copy) and, for each attention kernel
that runs there, its time at a couple of lengths; each kernel's efficiency is the fraction of the peak FLOP rate
that makes the roofline estimate equal the measured time. The result is saved as JSON under
~/.cache/attention-planner/ (or $ATTENTION_PLANNER_CACHE), and `planner.device_spec` applies it from then on.

Without a saved calibration, the H200 gets built-in measurements (BUILTIN_MEASUREMENTS, source "measured"); every
other device keeps the leads of planner/devices.py.

Saved file (calibration-<key>.json), schema 1:
{"schema_version": 1, "key": str, "device_name": str, "date": "YYYY-MM-DD", "torch": str, "triton": str | null,
 "matmul_flops": {dtype: FLOP/s measured}, "memory_bandwidth": bytes/s measured (read + written),
 "efficiency": {work: fraction of the datasheet peak},
 "measurements": [{"work", "length", "seconds", "flops", "bytes", "efficiency"}]}
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from planner.devices import DeviceSpec
from planner.errors import InvalidArgumentError

SCHEMA_VERSION = 1

# What was measured on an H200 (torch 2.11, bf16, B=1, H=32, D=128; KINDS.md, the project lead's runs and
# benchmarks/RESULTS.md):
# (work, cost module, implementation, causal, window, length, seconds[, world size]). A rate given as ("tflops", R)
# instead of seconds is converted to seconds with the same cost module, so every entry goes through one formula.
H200_MEASURED_DATE = "2026-11"
H200_MATMUL_FLOPS = 788e12  # 8192³ bf16 product, random data
H200_COPY_BANDWIDTH = 4.3e12  # device-to-device copy, bytes read + written
H200_KERNELS: tuple = (
    ("sdpa-cudnn", "backends.dense.cost", "sdpa-cudnn", True, None, 32768, 14.6e-3),
    ("sdpa-cudnn", "backends.dense.cost", "sdpa-cudnn", True, None, 32768, 15.05e-3),  # RESULTS.md, rev. 23e124d
    ("sdpa-cudnn", "backends.dense.cost", "sdpa-cudnn", True, None, 131072, 256e-3),
    ("sdpa-flash", "backends.dense.cost", "sdpa-flash", True, None, 32768, 25.54e-3),  # RESULTS.md, rev. 23e124d
    # Ours (benchmarks/RESULTS.md, "Tiled attention kernels with tensor descriptors", revision 1d84af4): exact
    # causal, and the causal window of 4096. The earlier kernel's figures are gone with it.
    ("flash", "backends.flash.cost", "triton", True, None, 32768, 15.655e-3),
    ("sliding_window", "backends.sliding_window.cost", "triton", True, 4096, 32768, 4.045e-3),
    ("sliding_window", "backends.sliding_window.cost", "triton", True, 4096, 131072, 17.87e-3),
    ("sdpa-cudnn", "backends.dense.cost", "sdpa-cudnn", True, None, 131072, 243.9e-3),  # RESULTS.md, rev. 68da512
    # Ours (benchmarks/RESULTS.md, "Linear attention, Mamba-2 SSD, HyperAttention", revision 68da512): linear
    # attention without decay (chunk 64), SSD (chunk 256).
    ("linear", "backends.linear.cost", "triton", True, None, 131072, 3.01e-3),
    ("ssd", "backends.ssd.cost", "triton", True, None, 131072, 2.92e-3),
    # HyperAttention causal, inference path with Triton gathers and ranks (RESULTS.md, "HyperAttention causal at
    # 128k", revision 5554c1b).
    ("hyper", "backends.hyper.cost", "triton", True, None, 131072, 39.49e-3),
    # benchmarks/calibrate_h200.py (RESULTS.md, "Cost model against measurements on the H200", revision 52cb1f7).
    ("sdpa-cudnn", "backends.dense.cost", "sdpa-cudnn", True, None, 131072, 261.91e-3),
    # Head dim 64 (H=32, 8 kv heads): "@d64" keys apply to head dims up to 64 (planner/costs.py work_for_head_dim).
    # Ours and cuDNN in one run (RESULTS.md, "Head dim 64 with tensor descriptors", revision 0811dc3; ours
    # at (128, 64, 8, 3), the tuner's choice): ours 8% slower at 8k, even at 32k, 2% faster at 128k.
    ("flash@d64", "backends.flash.cost", "triton", True, None, 8192, 0.6771e-3),
    ("flash@d64", "backends.flash.cost", "triton", True, None, 32768, 9.444e-3),
    ("flash@d64", "backends.flash.cost", "triton", True, None, 131072, 148.7e-3),
    ("sdpa-cudnn@d64", "backends.dense.cost", "sdpa-cudnn", True, None, 8192, 0.6274e-3),
    ("sdpa-cudnn@d64", "backends.dense.cost", "sdpa-cudnn", True, None, 32768, 9.509e-3),
    ("sdpa-cudnn@d64", "backends.dense.cost", "sdpa-cudnn", True, None, 131072, 151.35e-3),
    ("sdpa-flash@d64", "backends.dense.cost", "sdpa-flash", True, None, 8192, 0.999e-3),
    ("sdpa-flash@d64", "backends.dense.cost", "sdpa-flash", True, None, 32768, 14.216e-3),
    # Ring of 2 H200s, Triton blocks, causal zigzag at 256k, forward (RESULTS.md, "Ring attention on 2 × H200",
    # revision dc5e8e4): per-rank time.
    ("ring", "backends.ring.cost", "triton", True, None, 262144, 597e-3, 2),
)
BUILTIN_MEASUREMENTS = {"h200": (H200_MEASURED_DATE, H200_MATMUL_FLOPS, H200_COPY_BANDWIDTH, H200_KERNELS)}

MIN_EFFICIENCY, MAX_EFFICIENCY = 0.005, 1.0


def cache_dir() -> Path:
    """Where calibrations are saved: $ATTENTION_PLANNER_CACHE, else ~/.cache/attention-planner."""
    return Path(os.environ.get("ATTENTION_PLANNER_CACHE") or Path.home() / ".cache" / "attention-planner")


def calibration_path(key: str) -> Path:
    safe = "".join(character if character.isalnum() or character in "-_." else "-" for character in key.lower())
    return cache_dir() / f"calibration-{safe}.json"


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
    by_work: dict[str, list[float]] = {}
    for work, module, implementation, causal, window, length, seconds, *world in kernels:
        head_dim = int(work.split("@d")[1]) if "@d" in work else 128  # "flash@d64": measured at head dim 64
        shape = reference_shape(length, implementation, causal=causal, window=window, head_dim=head_dim,
                                world_size=world[0] if world else 1)
        costs = _cost_module(module).costs(shape)
        if isinstance(seconds, tuple):  # ("tflops", rate): the time that rate gives at this length
            seconds = _value(costs.flops, length) / (seconds[1] * 1e12)
        by_work.setdefault(work, []).append(kernel_efficiency(measured_spec, costs, length, seconds, "bfloat16"))
    for work, values in by_work.items():
        efficiency[work] = statistics.geometric_mean(values)
    return dataclasses.replace(spec, efficiency=efficiency, source=f"{spec.source} + measured on an H200 ({date})")


def reference_shape(length: int, implementation: str, *, causal: bool = True, window: Optional[int] = None,
                    batch: int = 1, heads: int = 32, head_dim: int = 128, dtype: str = "bfloat16",
                    mask_tensor: bool = False, world_size: int = 1):
    """The benchmark shape (B=1, H=32, D=128, bf16 by default) as a CostShape in the sequence length symbol."""
    from planner.costs import SEQUENCE_LENGTH, CostShape

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
    from planner.costs import evaluate

    return evaluate(expression, length)


def _cost_module(name: str):
    import importlib

    return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------------------------
# Measuring


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


@dataclasses.dataclass(frozen=True)
class KernelProbe:
    """One kernel to time: its efficiency key, the cost module and implementation that model it, and a factory
    that returns the call to time for (q, k, v)."""

    work: str
    module: str
    implementation: str
    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Callable[[], Any]]
    window: Optional[int] = None
    gpu_only: bool = True
    mask_tensor: bool = False


def _sdpa_backend_call(backend_name: str):
    def factory(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def call():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return call
    return factory


def _sdpa_masked_call(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    length = q.shape[2]
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()

    def call():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return call


def _backend_call(name: str, **keywords):
    def factory(q, k, v):
        import backends

        function = getattr(backends, name)
        return lambda: function(q, k, v, **keywords)
    return factory


def default_probes(device: torch.device) -> list[KernelProbe]:
    """The kernels calibrate() times on `device`."""
    probes = [
        KernelProbe("sdpa-flash", "backends.dense.cost", "sdpa-flash", _sdpa_backend_call("FLASH_ATTENTION")),
        KernelProbe("sdpa-cudnn", "backends.dense.cost", "sdpa-cudnn", _sdpa_backend_call("CUDNN_ATTENTION")),
        KernelProbe("sdpa-efficient", "backends.dense.cost", "sdpa-efficient", _sdpa_masked_call, mask_tensor=True),
        KernelProbe("flash", "backends.flash.cost", "triton", _backend_call("flash_attention", causal=True)),
        KernelProbe("sliding_window", "backends.sliding_window.cost", "triton",
                    lambda q, k, v: _backend_call("sliding_window_attention", window=4096)(q, k, v), window=4096),
        KernelProbe("linear", "backends.linear.cost", "triton", _backend_call("linear_attention")),
        KernelProbe("hyper", "backends.hyper.cost", "triton", _backend_call("hyper_attention", causal=True)),
        KernelProbe("sdpa-cpu-flash", "backends.dense.cost", "sdpa-cpu-flash",
                    lambda q, k, v: (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                                             is_causal=True)),
                    gpu_only=False),
        KernelProbe("blockwise-sdpa", "backends.flash.cost", "blockwise-sdpa",
                    _backend_call("flash_attention", causal=True, impl="blockwise"), gpu_only=False),
    ]
    on_gpu = device.type == "cuda"
    return [probe for probe in probes if probe.gpu_only == on_gpu]


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
    (planner/costs.py work_for_head_dim): kernels rank differently at small head dims."""
    from planner.devices import device_spec

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
                costs = _cost_module(probe.module).costs(shape)
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

