"""Calibrate the planner on the H200 and check its estimates against measured times (the goal: where kernels exist,
the estimate at 32k and 128k is within 2x of the time measured on the H200).

One run (a few minutes): `planner.calibrate("cuda")` (matmul and copy ceilings, each kernel's efficiency at 8k and
32k, saved under ~/.cache/attention-planner/ and copied to $OUT), then every kernel timed at 32k and 128k (B=1, H=32,
D=128, bf16, causal; window 4096 for the sliding window) beside the planner's estimate from (a) the datasheet leads
of planner/devices.py, (b) the built-in H200 measurements, (c) the fresh calibration. Prints a short table last and
writes calibrate_h200.json under $OUT (if set).

    PYTHONPATH=. python3 benchmarks/calibrate_h200.py
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch

import planner
from planner import calibration
from planner.costs import evaluate, time_expression
from planner.devices import BUILTIN_DEVICES, device_spec

LENGTHS = (32768, 131072)


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    out = Path(os.environ.get("OUT", "."))
    start = time.perf_counter()
    calibrated = planner.calibrate("cuda", verbose=True)
    saved = calibration.calibration_path(calibrated.key or "h200")
    if saved.is_file() and os.environ.get("OUT"):
        shutil.copy(saved, out / saved.name)
    leads = dataclasses.replace(BUILTIN_DEVICES["h200"])  # datasheet peaks and lead efficiencies, no measurements
    builtin = calibration.builtin_calibration(BUILTIN_DEVICES["h200"], "h200")
    device = torch.device("cuda")
    rows, records = [], []
    for probe in calibration.default_probes(device):
        for length in LENGTHS:
            if probe.mask_tensor and length > 32768:
                continue  # a 128k x 128k mask tensor alone is 16 GiB, and the kernel takes seconds
            window = probe.window
            try:
                q, k, v = (torch.randn(1, 32, length, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
                seconds = calibration._bench(probe.call(q, k, v), device)
            except Exception as error:  # report and go on: one missing kernel must not cost the whole run
                rows.append((probe.work, length, f"failed: {type(error).__name__}: {str(error)[:60]}", "", "", ""))
                continue
            finally:
                torch.cuda.empty_cache()
            shape = calibration.reference_shape(length, probe.implementation, window=window,
                                                mask_tensor=probe.mask_tensor)
            costs = probe.costs(shape)
            estimates = [evaluate(time_expression(costs, spec, "bfloat16"), length)
                         for spec in (leads, builtin, calibrated)]
            flops = evaluate(costs.flops, length)
            records.append({"work": probe.work, "length": length, "measured_s": seconds,
                            "useful_tflops": flops / seconds / 1e12, "estimate_leads_s": estimates[0],
                            "estimate_builtin_s": estimates[1], "estimate_calibrated_s": estimates[2]})
            rows.append((probe.work, length, f"{seconds * 1e3:.2f} ms ({flops / seconds / 1e12:.0f} TFLOP/s)",
                         *(f"{estimate * 1e3:.2f} ms ({estimate / seconds:.2f}x)" for estimate in estimates)))
    document = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "efficiency": calibrated.efficiency, "records": records,
                "seconds": time.perf_counter() - start}
    if os.environ.get("OUT"):
        (out / "calibrate_h200.json").write_text(json.dumps(document, indent=2))
    print(f"\ncalibration saved to {saved}; source: {device_spec('cuda').source}")
    print("efficiencies:", ", ".join(f"{key} {value:.3f}" for key, value in sorted(calibrated.efficiency.items())))
    print("\n| kernel | L | measured | estimate: leads | estimate: built-in | estimate: calibrated |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    within = [record for record in records if 0.5 <= record["estimate_builtin_s"] / record["measured_s"] <= 2.0]
    print(f"\nbuilt-in estimates within 2x of the measurement: {len(within)} of {len(records)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
