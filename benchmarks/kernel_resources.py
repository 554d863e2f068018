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


def main() -> int:
    flash = worker.flash_triton
    flags = worker.FLAGS
    for config in flash._FORWARD_CONFIGS["small"]:
        block_m, block_n, num_warps, num_stages = config
        constexprs = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, HAS_SINK_LOGITS=False, USE_TMA=True,
                          TENSOR_DESC=False)
        print(f"forward {config}: "
              f"{resources(flash._attn_fwd, worker.FORWARD_POINTERS, constexprs, num_warps, num_stages)}")
    for atomic in (False, True):
        pointers = worker.BACKWARD_POINTERS if atomic else dict(worker.BACKWARD_POINTERS, DQ="*bf16")
        for config in flash._DKDV_CONFIGS["small"]:
            block_m, block_n, num_warps, num_stages = config
            constexprs = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC_DQ=atomic, USE_TMA=True,
                              BULK_DQ=atomic)
            print(f"dK/dV{' + atomic dQ' if atomic else ''} {config}: "
                  f"{resources(flash._attn_bwd_dkdv, pointers, constexprs, num_warps, num_stages)}")
    for config in flash._DQ_CONFIGS["small"]:
        block_m, block_n, num_warps, num_stages = config
        constexprs = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=True)
        pointers = dict(worker.BACKWARD_POINTERS, DQ="*bf16")
        print(f"dQ {config}: {resources(flash._attn_bwd_dq, pointers, constexprs, num_warps, num_stages)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
