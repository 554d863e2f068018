"""Ring attention on several GPUs (NCCL): correctness in bf16, ring efficiency, longest sequence, beside torch's
context parallelism. One process per GPU:

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python3 -m torch.distributed.run --nproc_per_node=2 benchmarks/bench_ring.py

Sections (each skipped once --deadline seconds have passed, so a run always ends with its table):
  1. correctness: ring (B=1, H=16, L=16k, D=128, bf16) against a float32 single-GPU reference, by the FlashAttention
     rule: max |ring − ref| <= 2 · max |SDPA bf16 − ref|, for out, dq, dk, dv; torch's context_parallel likewise.
  2. timings at --length (default 256k) causal, B=1, H=32, D=128, bf16, zigzag: single GPU (SDPA flash kernel, and the
     project's Triton kernel), the ring with each as block kernel, context_parallel (allgather and alltoall rotation),
     forward and forward+backward. Ring efficiency = single-GPU time / (P · per-rank ring time).
  3. longest causal sequence: peak memory (forward, forward+backward) measured at two lengths, extrapolated linearly
     to this GPU's free memory, single GPU against the ring on P GPUs. Extrapolated, not run at that length.
Rank 0 prints a table last and writes JSON lines to --out/ring_bench.jsonl.

--smoke runs the same flow on the CPU with gloo at tiny sizes (blockwise kernels, no context_parallel): a check of
the script itself before spending device time.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import zlib
from datetime import timedelta

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)  # NVLink multicast stays off (device README)

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backends.ring.op as ring_op  # noqa: E402
from backends import flash_attention, ring_attention  # noqa: E402
from backends.flash.naive import visible_keys  # noqa: E402
from backends.ring.layout import shard, unshard  # noqa: E402

START = time.perf_counter()


class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = not args.smoke
        if self.cuda:
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            dist.init_process_group("nccl", device_id=self.device, timeout=timedelta(seconds=300))
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.free_at_start = torch.cuda.mem_get_info()[0] if self.cuda else 0
        self.records = []
        os.makedirs(args.out, exist_ok=True)
        self.mesh = None

    # ---- plumbing -------------------------------------------------------------------------------------------
    def late(self) -> bool:
        """Past the deadline on any rank (collective: every rank must call it at the same points)."""
        return self.max_over_ranks(float(time.perf_counter() - START > self.args.deadline)) > 0

    def record(self, **fields) -> None:
        fields["elapsed_s"] = round(time.perf_counter() - START, 1)
        self.records.append(fields)
        if self.rank == 0:
            print(json.dumps(fields), flush=True)
            with open(os.path.join(self.args.out, "ring_bench.jsonl"), "a") as handle:
                handle.write(json.dumps(fields) + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def randn(self, shape, name: str, dtype=torch.bfloat16) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32).to(dtype)

    def gather(self, tensor: torch.Tensor, layout: str) -> torch.Tensor:
        shards = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(shards, tensor.contiguous())
        return unshard(shards, 2, layout)

    def max_over_ranks(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def all_values(self, value) -> list:
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def time_ms(self, run, repeats: int, warmup: int = 1) -> float:
        """Median wall time of `run` on this rank (device-synchronized), after warm-up."""
        for _ in range(warmup):
            run()
        self.sync()
        times = []
        for _ in range(repeats):
            self.sync()
            begin = time.perf_counter()
            run()
            self.sync()
            times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def reset_memory(self) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    # ---- kernels ----------------------------------------------------------------------------------------------
    def impls(self) -> dict:
        """Block kernel name -> impl argument: torch's SDPA flash kernels, and the project's Triton kernel."""
        if self.cuda:
            return {"sdpa": "sdpa", "triton": "triton"}
        return {"sdpa": "blockwise", "triton": "reference"}

    def single(self, kernel: str, q, k, v, causal=True):
        """Whole-sequence attention on one device, the ring's block kernel on its own."""
        if kernel == "sdpa" and self.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return flash_attention(q, k, v, causal=causal, impl=self.impls()[kernel])

    def reference_fp32(self, q, k, v, grad_out, causal, window):
        """Dense float32 attention and gradients (TF32 off), one head at a time so that the scores fit."""
        torch.backends.cuda.matmul.allow_tf32 = False
        group = q.shape[1] // k.shape[1]
        positions = torch.arange(q.shape[2], device=q.device)
        visible = visible_keys(positions, positions, causal=causal, window=window, sinks=0)
        scale = q.shape[-1] ** -0.5
        results = [torch.empty(q.shape, device=q.device), torch.empty(q.shape, device=q.device),
                   torch.zeros(k.shape, device=q.device), torch.zeros(v.shape, device=q.device)]
        for head in range(q.shape[1]):
            query = q[0, head].float().requires_grad_()
            key = k[0, head // group].float().requires_grad_()
            value = v[0, head // group].float().requires_grad_()
            scores = (query @ key.T * scale).masked_fill(~visible, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ value
            out.backward(grad_out[0, head].float())
            results[0][0, head], results[1][0, head] = out.detach(), query.grad
            results[2][0, head // group] += key.grad
            results[3][0, head // group] += value.grad
            del scores, out
        return results

    def baseline_bf16(self, q, k, v, grad_out, causal, window):
        """SDPA in bf16 on one GPU: the FlashAttention rule's yardstick."""
        group = q.shape[1] // k.shape[1]
        tensors = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        keys, values = (t.repeat_interleave(group, 1) if group > 1 else t for t in tensors[1:])
        if window is None:
            out = F.scaled_dot_product_attention(tensors[0], keys, values, is_causal=causal)
        else:
            positions = torch.arange(q.shape[2], device=q.device)
            mask = visible_keys(positions, positions, causal=causal, window=window, sinks=0)
            out = F.scaled_dot_product_attention(tensors[0], keys, values, attn_mask=mask)
        out.backward(grad_out)
        return [out.detach()] + [t.grad for t in tensors]

    @contextlib.contextmanager
    def context_parallel(self, buffers, rotate: str):
        """torch's context parallelism on `buffers` (sharded in place, head-tail order = our zigzag)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self.mesh is None:
            self.mesh = init_device_mesh("cuda", (self.size,))
        set_rotate_method(rotate)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            with context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[2] * len(buffers),
                                  no_restore_buffers=set(buffers)):
                yield

    # ---- 1. correctness -----------------------------------------------------------------------------------------
    def correctness(self, kernels: tuple) -> None:
        a = self.args
        length, heads, dim = a.check_length, a.check_heads, a.dim
        cases = [
            ("zigzag causal", "sdpa", heads, "zigzag", True, None),
            ("contiguous full", "sdpa", heads, "contiguous", False, None),
            ("zigzag causal GQA 4:1", "triton", heads // 4, "zigzag", True, None),
            ("contiguous causal window", "triton", heads, "contiguous", True, length // 5),
        ]
        for name, kernel, kv_heads, layout, causal, window in cases:
            if kernel not in kernels:
                continue
            if self.late():
                self.record(section="correctness", case=name, kernel=kernel, skipped="deadline")
                continue
            try:
                self.correctness_case(name, kernel, kv_heads, layout, causal, window, length, heads, dim)
            except Exception as error:  # noqa: BLE001 - one failing case must not end the run
                self.record(section="correctness", case=name, kernel=kernel, error=repr(error)[:400])
        if self.cuda and "sdpa" in kernels and not self.late():
            try:
                self.correctness_context_parallel(length, heads, dim)
            except Exception as error:  # noqa: BLE001
                self.record(section="correctness", case="context_parallel", error=repr(error)[:400])

    def _inputs(self, name, heads, kv_heads, length, dim):
        return (self.randn((1, heads, length, dim), name + "q"), self.randn((1, kv_heads, length, dim), name + "k"),
                self.randn((1, kv_heads, length, dim), name + "v"), self.randn((1, heads, length, dim), name + "o"))

    def _judge(self, name, kernel, got, reference, baseline, **extra):
        errors, rule = {}, True
        relative = {}
        for label, mine, ref, base in zip(("out", "dq", "dk", "dv"), got, reference, baseline):
            mine_error = float((mine.float() - ref).abs().max())
            base_error = float((base.float() - ref).abs().max())
            errors[label] = (mine_error, base_error)
            relative[label] = (float((mine.float() - ref).norm() / ref.norm()), float((base.float() - ref).norm()
                                                                                      / ref.norm()))
            rule = rule and mine_error <= 2 * base_error and mine_error == mine_error
        self.record(section="correctness", case=name, kernel=kernel, errors=errors, relative_l2=relative,
                    flash_rule=rule, **extra)

    def correctness_case(self, name, kernel, kv_heads, layout, causal, window, length, heads, dim):
        q, k, v, grad_out = self._inputs(name, heads, kv_heads, length, dim)
        local = [shard(t, 2, self.rank, self.size, layout).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, causal=causal, window=window, layout=layout, impl=self.impls()[kernel])
        out.backward(shard(grad_out, 2, self.rank, self.size, layout))
        got = [self.gather(t, layout) for t in (out.detach(), *(x.grad for x in local))]
        if self.rank == 0:
            try:  # rank 0 alone: an error here must still reach the barrier below
                reference = self.reference_fp32(q, k, v, grad_out, causal, window)
                baseline = self.baseline_bf16(q, k, v, grad_out, causal, window)
                self._judge(name, kernel, got, reference, baseline, layout=layout, window=window, length=length,
                            heads=heads, kv_heads=kv_heads)
            except Exception as error:  # noqa: BLE001
                self.record(section="correctness", case=name, kernel=kernel, error="reference: " + repr(error)[:400])
        dist.barrier()

    def correctness_context_parallel(self, length, heads, dim):
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard

        name = "zigzag causal"
        q, k, v, grad_out = self._inputs(name, heads, heads, length, dim)
        buffers = [q.clone(), k.clone(), v.clone(), grad_out.clone()]
        with self.context_parallel(buffers, "allgather"):
            local = [b.detach().clone().requires_grad_() for b in buffers[:3]]
            out = F.scaled_dot_product_attention(*local, is_causal=True)
            out.backward(buffers[3])
            shards = [out.detach(), *(x.grad for x in local)]
            got = context_parallel_unshard(self.mesh, shards, [2] * 4)
        same_layout = bool(torch.equal(self.gather(shards[0], "zigzag"), got[0]))
        if self.rank == 0:
            try:
                reference = self.reference_fp32(q, k, v, grad_out, True, None)
                baseline = self.baseline_bf16(q, k, v, grad_out, True, None)
                self._judge(name, "context_parallel(allgather)", got, reference, baseline, length=length,
                            heads=heads, cp_shards_are_zigzag=same_layout)
            except Exception as error:  # noqa: BLE001
                self.record(section="correctness", case="context_parallel", error="reference: " + repr(error)[:400])
        dist.barrier()

    # ---- 2. timings ---------------------------------------------------------------------------------------------
    def timings(self, kernels: tuple, single: bool, context_parallel: str | None) -> None:
        a = self.args
        length, heads, dim = a.length, a.heads, a.dim
        for mode in ("forward", "forward+backward"):
            # forward: 1 warm-up + `repeats`; forward+backward: its kernels are warm by then, 0 + (repeats − 1), or
            # --backward-repeats (1 at 1M tokens, where one single-GPU forward+backward takes ~100 s).
            backward_repeats = a.backward_repeats or max(2, a.repeats - 1)
            repeats, warmup = (a.repeats, 1) if mode == "forward" else (backward_repeats, 0)
            if single:
                self.time_single(mode, length, heads, dim, repeats, warmup)
            for kernel in kernels:
                self.time_ring(mode, kernel, length, heads, dim, repeats, warmup)
            if self.cuda and context_parallel:
                self.time_context_parallel(mode, context_parallel, length, heads, dim, repeats, warmup)

    def seed_triton_tuning(self, heads, dim):
        """The Triton kernel tunes its launch per power-of-two length by timing every candidate; at 256k that alone
        would take minutes of device time. Tune at a short length and reuse the choice for the long buckets."""
        if not self.cuda:
            return
        try:
            from backends.flash import triton as flash_triton

            short = 8192
            q = self.randn((1, heads, short, dim), "tune").requires_grad_()
            for causal in (True, False):
                out = flash_attention(q, q, q, causal=causal, impl="triton")
                out.backward(torch.ones_like(out))
                half = flash_attention(q, q[:, :, :short // 2], q[:, :, :short // 2], causal=causal, impl="triton")
                half.backward(torch.ones_like(half))
            for key, config in list(flash_triton._TUNED.items()):
                for bucket in (2 ** p for p in range(14, 23)):
                    long_key = key[:-1] + (bucket,)
                    flash_triton._TUNED.setdefault(long_key, config)
            self.sync()
        except Exception as error:  # noqa: BLE001
            self.record(section="timing", case="triton tuning seed", error=repr(error)[:400])

    def _fresh(self, name, heads, length, dim, grad: bool):
        tensors = [self.randn((1, heads, length, dim), name + part) for part in "qkv"]
        return [t.requires_grad_(grad) for t in tensors], self.randn((1, heads, length, dim), name + "o")

    def _step(self, attention, tensors, grad_out, mode):
        def run():
            for t in tensors:
                t.grad = None
            if mode == "forward":
                with torch.no_grad():
                    attention(*tensors)
            else:
                attention(*tensors).backward(grad_out)
        return run

    def time_single(self, mode, length, heads, dim, repeats, warmup):
        """Rank 0 times the SDPA kernel, rank 1 the Triton kernel, at the same time on their own GPUs."""
        kernel = ("sdpa", "triton")[self.rank % 2]
        result = {"kernel": kernel, "skipped": "deadline"}
        if not self.late():
            try:
                if kernel == "triton":
                    self.seed_triton_tuning(heads, dim)
                tensors, grad_out = self._fresh("single", heads, length, dim, mode != "forward")
                self.reset_memory()
                run = self._step(lambda q, k, v: self.single(kernel, q, k, v), tensors, grad_out, mode)
                result = {"kernel": kernel, "ms": self.time_ms(run, repeats, warmup),
                          "peak_gib": self.peak_bytes() / 2**30}
                del tensors, grad_out, run
            except Exception as error:  # noqa: BLE001
                result = {"kernel": kernel, "error": repr(error)[:400]}
        for entry in self.all_values(result)[:2]:
            self.record(section="timing", case="single GPU", mode=mode, length=length, heads=heads, **entry)
        self.reset_memory()

    def single_ms(self, mode, kernel):
        for entry in self.records:
            if entry.get("case") == "single GPU" and entry.get("mode") == mode and entry.get("kernel") == kernel:
                return entry.get("ms")
        return None

    def time_ring(self, mode, kernel, length, heads, dim, repeats, warmup):
        if self.late():
            self.record(section="timing", case="ring", mode=mode, kernel=kernel, skipped="deadline")
            return
        try:
            local_len = length // self.size
            tensors, grad_out = self._fresh(f"ring{self.rank}", heads, local_len, dim, mode != "forward")
            self.reset_memory()

            def attention(q, k, v):
                return ring_attention(q, k, v, causal=True, layout="zigzag", impl=self.impls()[kernel])

            ms = self.max_over_ranks(self.time_ms(self._step(attention, tensors, grad_out, mode), repeats, warmup))
            peak = self.max_over_ranks(self.peak_bytes()) / 2**30
            single = self.single_ms(mode, kernel)
            efficiency = single / (self.size * ms) if single else None
            self.record(section="timing", case="ring", mode=mode, kernel=kernel, length=length, heads=heads,
                        ranks=self.size, ms=ms, single_ms=single, efficiency=efficiency, peak_gib=peak,
                        head_passes=len(ring_op.head_passes(1, heads, 1, local_len, dim)))
            del tensors, grad_out
        except Exception as error:  # noqa: BLE001
            self.record(section="timing", case="ring", mode=mode, kernel=kernel, error=repr(error)[:400])
        self.reset_memory()

    def time_context_parallel(self, mode, rotate, length, heads, dim, repeats, warmup=1):
        if self.late():
            self.record(section="timing", case="context_parallel", rotate=rotate, mode=mode, skipped="deadline")
            return
        try:
            buffers = [self.randn((1, heads, length, dim), "cp" + part) for part in "qkvo"]
            self.reset_memory()
            with self.context_parallel(buffers, rotate):
                tensors = [b.detach().requires_grad_(mode != "forward") for b in buffers[:3]]

                def attention(q, k, v):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                ms = self.max_over_ranks(self.time_ms(self._step(attention, tensors, buffers[3], mode), repeats,
                                                      warmup))
            peak = self.max_over_ranks(self.peak_bytes()) / 2**30
            single = self.single_ms(mode, "sdpa")
            self.record(section="timing", case="context_parallel", rotate=rotate, mode=mode, kernel="sdpa",
                        length=length, heads=heads, ranks=self.size, ms=ms, single_ms=single,
                        efficiency=single / (self.size * ms) if single else None, peak_gib=peak)
            del buffers, tensors
        except Exception as error:  # noqa: BLE001
            self.record(section="timing", case="context_parallel", rotate=rotate, mode=mode, error=repr(error)[:400])
        self.reset_memory()

    # ---- 3. longest sequence ------------------------------------------------------------------------------------
    def longest(self, kernels: tuple, single: bool) -> None:
        if not self.cuda:
            return
        lengths = self.args.memory_lengths
        heads, dim = self.args.heads, self.args.dim
        capacity = -self.max_over_ranks(-(self.free_at_start - 2**30))  # the smaller free memory, less 1 GiB
        if single:  # rank 0 the SDPA kernel, rank 1 the Triton kernel, concurrently
            kernel = ("sdpa", "triton")[self.rank % 2]
            points = self._footprints(lambda length: self._single_footprint(kernel, length, heads, dim), lengths)
            for entry_kernel, entry_points in zip(("sdpa", "triton"), self.all_values(points)[:2]):
                self._record_longest("single GPU", entry_kernel, lengths, entry_points, capacity, 1)
        for kernel in kernels:
            points = self._footprints(lambda length: self._ring_footprint(kernel, length, heads, dim), lengths)
            points = [[self.max_over_ranks(value) for value in point] if point else None for point in points]
            self._record_longest("ring", kernel, lengths, points, capacity, self.size)

    def _footprints(self, measure, lengths):
        points = []
        for length in lengths:
            if self.late():
                points.append(None)
                continue
            try:
                points.append(measure(length))
            except Exception as error:  # noqa: BLE001
                self.record(section="longest", case="measure", length=length, error=repr(error)[:400])
                points.append(None)
            self.reset_memory()
        # every rank must take part in the collectives of the ring measurements: agree on what was measured
        return points

    def _single_footprint(self, kernel, length, heads, dim):
        base = self.reset_memory()
        (q, k, v), grad_out = self._fresh("mem", heads, length, dim, True)
        out = self.single(kernel, q, k, v)
        forward = self.peak_bytes() - base
        out.backward(grad_out)
        self.sync()
        return [forward, self.peak_bytes() - base]

    def _ring_footprint(self, kernel, length, heads, dim):
        base = self.reset_memory()
        saved, ring_op.PASS_BYTES = ring_op.PASS_BYTES, 1  # one kv head per pass: every term grows with length
        try:
            (q, k, v), grad_out = self._fresh("mem", heads, length // self.size, dim, True)
            out = ring_attention(q, k, v, causal=True, layout="zigzag", impl=self.impls()[kernel])
            forward = self.peak_bytes() - base
            out.backward(grad_out)
            self.sync()
            return [forward, self.peak_bytes() - base]
        finally:
            ring_op.PASS_BYTES = saved

    def _record_longest(self, case, kernel, lengths, points, capacity, ranks):
        if any(p is None for p in points):
            self.record(section="longest", case=case, kernel=kernel, skipped="not measured")
            return
        (short, long_), (first, second) = lengths, points
        estimate = {}
        for index, mode in enumerate(("forward", "forward+backward")):
            slope = (second[index] - first[index]) / (long_ - short)
            estimate[mode] = int(short + (capacity - first[index]) / slope)
        self.record(section="longest", case=case, kernel=kernel, ranks=ranks, lengths=lengths,
                    peak_gib=[[round(value / 2**30, 3) for value in point] for point in points],
                    capacity_gib=round(capacity / 2**30, 2), longest_tokens=estimate)

    # ---- summary ------------------------------------------------------------------------------------------------
    def summary(self) -> None:
        if self.rank != 0:
            return
        print("\n== ring attention benchmark summary ==")
        for entry in self.records:
            section = entry["section"]
            if "error" in entry or "skipped" in entry:
                print(f"{section:11} {entry.get('case')} {entry.get('kernel', '')} {entry.get('mode', '')}: "
                      f"{entry.get('error') or entry.get('skipped')}")
            elif section == "correctness":
                errors = " ".join(f"{k}={mine:.2e}/{base:.2e}" for k, (mine, base) in entry["errors"].items())
                print(f"correctness {entry['case']:26} {entry['kernel']:28} rule={entry['flash_rule']} {errors}")
            elif section == "timing":
                efficiency = entry.get("efficiency")
                print(f"timing      {entry['case']:16} {entry.get('rotate', ''):9} {entry['kernel']:7} "
                      f"{entry['mode']:16} {entry['ms']:9.1f} ms  peak {entry['peak_gib']:6.1f} GiB"
                      + (f"  efficiency {efficiency:.3f}" if efficiency else ""))
            elif section == "longest":
                print(f"longest     {entry['case']:10} {entry['kernel']:7} x{entry['ranks']} "
                      f"{entry['longest_tokens']} (capacity {entry['capacity_gib']} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--deadline", type=float, default=200.0, help="seconds after which sections are skipped")
    parser.add_argument("--length", type=int, default=262144)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward-repeats", type=int, default=0,
                        help="timed forward+backward calls (no warm-up); 0: max(2, repeats - 1)")
    parser.add_argument("--check-length", type=int, default=16384)
    parser.add_argument("--check-heads", type=int, default=16)
    parser.add_argument("--memory-lengths", type=int, nargs=2, default=[65536, 131072])
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny sizes: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.length, args.heads, args.dim, args.check_length, args.check_heads = 512, 4, 16, 240, 4
        args.repeats = 2
    bench = Bench(args)
    bench.record(section="info", torch=torch.__version__, ranks=bench.size, revision=os.environ.get("REVISION"),
                 device=torch.cuda.get_device_name() if bench.cuda else "cpu",
                 free_gib=round(bench.free_at_start / 2**30, 1))
    # SDPA kernels first (the headline while the Triton kernel is young), then the Triton kernel, then extras.
    bench.correctness(("sdpa",))
    bench.timings(("sdpa",), single=True, context_parallel="allgather")
    bench.longest(("sdpa",), single=True)
    if not bench.late():
        bench.seed_triton_tuning(args.heads, args.dim)
    bench.correctness(("triton",))
    bench.timings(("triton",), single=False, context_parallel=None)
    bench.longest(("triton",), single=False)
    if bench.cuda:
        for mode in ("forward", "forward+backward"):
            bench.time_context_parallel(mode, "alltoall", args.length, args.heads, args.dim, 2, 1)
    bench.summary()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
