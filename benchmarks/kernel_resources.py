"""Registers and spills of the flash kernels' launch configurations for sm_90, on a machine without a GPU.

Compiles each configuration with Triton's compiler (tests/compile_sm90_worker.py) and runs the ptxas that ships in
Triton's wheel with -v. Spilled accumulators are what limited the dK/dV kernel on the H200 (benchmarks/RESULTS.md),
so this prunes candidate configurations before device time is spent. Run without TRITON_INTERPRET:

    PYTHONPATH=. python3 benchmarks/kernel_resources.py
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import compile_sm90_worker as worker  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def ptxas() -> Path:
    """The newest ptxas in the wheel (the plain one may be older than the PTX version Triton emits)."""
    for name in ("ptxas-blackwell", "ptxas"):
        if (BIN / name).exists():
            return BIN / name
    raise SystemExit(f"no ptxas under {BIN}")


def resources(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int) -> str:
    ptx = worker.compile_ptx(kernel, pointers, constexprs, num_warps, num_stages)
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        Path(source).write_text(ptx)
        run = subprocess.run([str(ptxas()), "-v", "--gpu-name=sm_90a", source, "-o", os.devnull],
                             capture_output=True, text=True)
    text = run.stdout + run.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not registers:
        return f"ptxas failed: {text.strip()[-200:]}"
    return f"{registers.group(1)} registers, spills {spills.group(1)}/{spills.group(2)} B (stores/loads)"


def configurations() -> list:
    """(label, kernel, pointer types, constexprs, num_warps, num_stages) for every configuration the tuner tries."""
    flash, flags = worker.flash_triton, worker.FLAGS
    bf16_dq = dict(worker.BACKWARD_POINTERS, DQ="*bf16")
    rows = [(f"forward {config}", flash._attn_fwd, worker.FORWARD_POINTERS,
             dict(flags, HAS_SINK_LOGITS=False, USE_TMA=True, TENSOR_DESC=False), config)
            for config in flash._FORWARD_CONFIGS["small"]]
    rows += [(f"dK/dV{' + atomic dQ' if atomic else ''} {config}", flash._attn_bwd_dkdv,
              worker.BACKWARD_POINTERS if atomic else bf16_dq,
              dict(flags, ATOMIC_DQ=atomic, USE_TMA=True, BULK_DQ=atomic), config)
             for atomic in (False, True) for config in flash._DKDV_CONFIGS["small"]]
    rows += [(f"dQ {config}", flash._attn_bwd_dq, bf16_dq, dict(flags, USE_TMA=True), config)
             for config in flash._DQ_CONFIGS["small"]]
    return rows


def main() -> int:
    for label, kernel, pointers, constexprs, (block_m, block_n, num_warps, num_stages) in configurations():
        constexprs = dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
        print(f"{label}: {resources(kernel, pointers, constexprs, num_warps, num_stages)}")
    return 0

if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
