"""The flash kernels compiled for an H100/H200 (sm_90) on a machine without a GPU, with the ptxas that ships in
Triton's wheel. The CPU interpreter runs the kernels' Python, not Triton's compiler, so code that only the compiler
rejects (a tensor descriptor reaching code after a `return` in a constexpr branch) would
otherwise first fail on the GPU. Each variant must compile, and its PTX must hold the copies it is meant to use (TMA
tile copies; the bulk reduce-add of dQ), and the polynomial exp2 variant must trade ex2 instructions for nothing that
moves data. The compiler runs in a subprocess: this process has TRITON_INTERPRET set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends.flash.triton import EXP2_CHUNKS

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run (tests/test_gpu_kernels.py)"),
    pytest.mark.skipif(not PTXAS.exists(), reason="this Triton wheel carries no ptxas"),
]


@pytest.fixture(scope="module")
def compiled() -> dict:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_sm90_worker.py")], capture_output=True,
                         text=True, env=environment, cwd=ROOT, timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_variant_compiles_for_sm90(compiled):
    failed = {name: result["error"] for name, result in compiled.items() if not result["ok"]}
    assert not failed, failed


def test_descriptor_variants_copy_tiles_with_tma_and_reduce_dq_in_bulk(compiled):
    copies = {name: result.get("tma_copies", 0) for name, result in compiled.items()
              if not name.startswith("decode")}  # the decoding kernels use pointer loads
    assert copies.pop("forward, pointer loads") == 0
    assert all(count > 0 for count in copies.values()), copies
    assert compiled["dK/dV, descriptors, bulk dQ reduce"]["bulk_reduces"] > 0


def test_polynomial_exp2_split_replaces_exponentials_without_moving_data(compiled):
    """2 of EXP2_CHUNKS column chunks of a 128 x 128 score tile on the polynomial: per thread (8 warps) 64 scores,
    64 * 2 / EXP2_CHUNKS of them off the special-function unit, in the one unmasked loop body. The column split (reshape, permute, split, join)
    must cost no shared-memory round trip and no shuffle: the chunk bits are register bits of the MMA layout."""
    exp2 = compiled["forward, per-head descriptors, window"]
    split = compiled["forward, per-head descriptors, window, polynomial exp2 2 chunks"]
    assert exp2["ex2"] - split["ex2"] == 128 * 128 // 256 * 2 // EXP2_CHUNKS, (exp2["ex2"], split["ex2"])
    assert split["shared_accesses"] == exp2["shared_accesses"]
    assert split["shuffles"] == exp2["shuffles"]


def test_hopper_forward_is_warp_specialized_on_the_tensor_cores(compiled):
    """The Gluon forward's partitions are real: wgmma products, per-partition register budgets (setmaxnreg) and
    TMA tile copies in every variant's PTX."""
    hopper = {name: result for name, result in compiled.items() if name.startswith("hopper")}
    assert len(hopper) == 3, sorted(compiled)
    for name, result in hopper.items():
        assert result["wgmma"] > 0 and result["setmaxnreg"] > 0 and result["tma_copies"] > 0, (name, result)
