"""Worker for tests/test_kernels_compile_sm90.py: compiles flash kernel variants for sm_90 with Triton's compiler
(not its interpreter, so run it without TRITON_INTERPRET) and prints one JSON object: per variant, whether it
compiled, and how many TMA tile copies, bulk reduce-adds, ex2 instructions, shared-memory accesses and shuffles its
PTX holds."""
from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import backends.decode.triton as decode_triton
import backends.flash.triton as flash_triton

FLAGS = dict(CAUSAL=True, HAS_WINDOW=False, HAS_SINKS=False, HAS_PAD=False, HAS_SOFTCAP=False,
             INPUT_PRECISION="tf32", D_QK=128, D_V=128)
FORWARD_POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", LSE="*fp32", Bias="*fp32",
                        SinkLogits="*fp32")
BACKWARD_POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", LSE="*fp32", Delta="*fp32", Bias="*fp32",
                         DK="*bf16", DV="*bf16", DQ="*fp32")


def forward(use_tma: bool, tensor_desc: bool = False, window: bool = False, poly_exp2: int = 0):
    return flash_triton._attn_fwd, FORWARD_POINTERS, dict(
        FLAGS, BLOCK_M=128, BLOCK_N=128, HAS_SINK_LOGITS=False, USE_TMA=use_tma, TENSOR_DESC=tensor_desc,
        HAS_WINDOW=window, POLY_EXP2=poly_exp2, POLY_DEGREE=3), 8, 3


VARIANTS = {
    "forward, per-head descriptors, window": forward(True, window=True),
    # 2 column chunks of each unmasked tile through the polynomial exp2: the same kernel as the one above but for
    # the exponentials, so the two PTX texts differ in ex2 instructions and in nothing that moves data
    "forward, per-head descriptors, window, polynomial exp2 2 chunks": forward(True, window=True, poly_exp2=2),
    "forward, tensor-wide descriptors": forward(True, tensor_desc=True),
    "forward, pointer loads": forward(False),
    "dK/dV, descriptors, bulk dQ reduce": (flash_triton._attn_bwd_dkdv, BACKWARD_POINTERS, dict(
        FLAGS, BLOCK_M=64, BLOCK_N=64, ATOMIC_DQ=True, USE_TMA=True, BULK_DQ=True), 4, 2),
    "dQ, descriptors": (flash_triton._attn_bwd_dq, dict(BACKWARD_POINTERS, DQ="*bf16"), dict(
        FLAGS, BLOCK_M=128, BLOCK_N=64, USE_TMA=True), 8, 3),
}

# The decoding kernels (backends/decode/triton.py): pointer loads only, so the TMA check skips names "decode, ...".
DECODE_SPLIT_POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", CacheLen="*i64", Start="*i64", PartOut="*fp32",
                             PartLse="*fp32")
DECODE_SPLIT_FLAGS = dict(head_dim=128, value_dim=128, ROWS=16, BLOCK_N=64, D_QK=128, D_V=128, HAS_START=True,
                          HAS_WINDOW=True, HAS_SINKS=True, HAS_SOFTCAP=True, INPUT_PRECISION="tf32")
VARIANTS.update({
    "decode, split, linear cache": (decode_triton._decode_split, DECODE_SPLIT_POINTERS,
                                    dict(DECODE_SPLIT_FLAGS, ROLLING=False), 4, 2),
    "decode, split, rolling buffer": (decode_triton._decode_split, DECODE_SPLIT_POINTERS,
                                      dict(DECODE_SPLIT_FLAGS, ROLLING=True), 4, 2),
    "decode, combine": (decode_triton._decode_combine, dict(PartOut="*fp32", PartLse="*fp32", SinkLogits="*fp32",
                                                            Out="*bf16", Lse="*fp32"),
                        dict(value_dim=128, SPLITS=16, D_V=128, HAS_SINK_LOGITS=True), 4, 1),
})


def compile_ptx(kernel, pointers: dict, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """PTX for sm_90; every argument neither a pointer nor a constexpr is an i32 (the scales fp32)."""
    signature = {name: "constexpr" if name in constexprs else pointers.get(name) or (
        "fp32" if name in ("qk_scale", "softcap_log2", "sm_scale") else "i32") for name in kernel.arg_names}
    source = ASTSource(kernel, signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.asm["ptx"]


def compile_hopper_ptx(block_n: int, stages: int, pingpong: bool, overlap: bool, head_dim: int, causal: bool,
                       window: bool) -> str:
    """PTX of the warp-specialized Gluon forward (backends/flash/hopper.py), bf16, as its wrapper launches it."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from backends.flash import hopper

    def descriptor(rows: int) -> str:
        layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], gl.bfloat16)
        return f"tensordesc<bf16[1, 1, {rows}, {head_dim}],{layout!r}>"

    kernel = hopper._attn_fwd_hopper
    constexprs = dict(BLOCK_N=block_n, HEAD_D=head_dim, STAGES=stages, CAUSAL=causal, HAS_WINDOW=window,
                      PINGPONG=pingpong, OVERLAP=overlap)
    signature = dict(q_desc=descriptor(hopper.HALF_M), k_desc=descriptor(block_n), v_desc=descriptor(block_n),
                     out_ptr="*bf16", lse_ptr="*fp32", heads="i32", group="i32", q_len="i32", kv_len="i32",
                     window="i32", qk_scale="fp32", **{name: "constexpr" for name in constexprs})
    source = GluonASTSource(kernel, signature,
                            constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=hopper.NUM_WARPS, maxnreg=hopper.MAX_REGISTERS))
    return compiled.asm["ptx"]


# The Gluon forward, name "hopper, ...": (BLOCK_N, STAGES, PINGPONG, OVERLAP, head dim, causal, window)
HOPPER_VARIANTS = {
    "hopper, causal, ping-pong, overlap, head dim 128": (128, 2, True, True, 128, True, False),
    "hopper, window not causal, no ping-pong, head dim 64": (128, 2, False, True, 64, False, True),
    "hopper, 64-key tiles, 3 stages, causal window, no overlap": (64, 3, True, False, 128, True, True),
}


def main() -> None:
    results = {}
    compilers = {name: (lambda variant=variant: compile_ptx(*variant)) for name, variant in VARIANTS.items()}
    compilers.update({name: (lambda variant=variant: compile_hopper_ptx(*variant))
                      for name, variant in HOPPER_VARIANTS.items()})
    for name, compile_variant in compilers.items():
        try:
            ptx = compile_variant()
            results[name] = {"ok": True, "tma_copies": ptx.count("cp.async.bulk.tensor"),
                             "bulk_reduces": ptx.count("cp.reduce.async.bulk"), "ex2": ptx.count("ex2.approx"),
                             "shared_accesses": ptx.count("st.shared") + ptx.count("ld.shared"),
                             "shuffles": ptx.count("shfl.sync"), "wgmma": ptx.count("wgmma.mma_async"),
                             "setmaxnreg": ptx.count("setmaxnreg")}
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
