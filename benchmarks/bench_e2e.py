"""End to end on a long context: real model shapes, random weights, one H200, one device call.

What runs (B=1, bf16, CUDA), in this order, each step skipped with its reason when the time budget is short:
  1. planning llama-3-70b on the CPU with the CLI, in a fresh process (`attention-planner plan llama-3-70b
     --max-len 128k --device h200 --quiet`), in the background while step 2 starts;
  2. forward (prefill) of a Llama-3.2-1B-shaped model and of a Mistral-style model of the same size with a 4096-token
     sliding window, at 8k, 32k, 64k and 128k tokens: transformers' "sdpa" and "eager" attention and
     `planner.optimize(model, max_len="128k", device="cuda")` (the seconds optimize() takes are recorded);
  3. a training step (forward + loss + backward) of the Llama-shaped model at 32k: transformers' sdpa uncompiled,
     `torch.compile(model)` (Inductor alone) and `torch.compile(model, backend=planner.backend(max_len="32k",
     device="cuda"))`;
  4. forward with `torch.compile(model, dynamic=True)` (Inductor alone; one compile serves every length) for both
     models; `--configs` can add "planner-compile" (the compile backend on the forward).
  --paired 8k,32k (optional): after each model's forwards, transformers' sdpa and the planner (optimize() rerun on
     the same model object) at each listed length: one warm-up call each, then --paired-calls pairs of timed calls,
     sdpa first in every other pair and the planner first in the others, so slow drift (clocks, allocator state)
     falls on both alike; recorded: both medians and the per-pair ratios sdpa time / planner time (median, range,
     pairs the planner won). The goals table then uses the paired median ratio at that length (marked "(paired)")
     and adds a line with its range; "met" still takes any ratio under 1.00 as slower.
Logits are computed for the last position only where transformers takes `logits_to_keep` (the LM head over 128k
positions x 128,256 vocabulary entries would be 32 GiB in bf16); the output says whether it did.

Timing: the first call of a configuration at a length is a warm-up (compile, autotune), then 1-3 timed calls
(CUDA events; fewer for long calls), median; eager and sdpa, once warm at a shorter length, are timed in one call
without a warm-up where a call is predicted over 2 s. Peak memory: torch.cuda.max_memory_allocated over the timed
calls (weights included), and above what was allocated before them. Out-of-memory errors are caught and recorded as
"oom" (longer lengths of that configuration then too, unrun). Skip rules, each recorded with its reason and estimate:
transformers' eager and sdpa run only where their estimated peak fits the free memory (eager: H x L^2 scores in
bf16, their fp32 softmax and its bf16 copy, an L^2 mask: ~258 GiB at 32k, so eager runs at 8k only; sdpa with the
sliding window: an L^2 boolean mask and SDPA's bf16 copy, 48 GiB at 128k, which fits); a call predicted (quadratic
extrapolation from the previous length) over --max-call-s, or any step not fitting the time left (training's
reserve kept while the first forwards run), is skipped. A hard alarm 20 s after the budget prints what was measured.

Output: progress on stderr, then the markdown tables last on stdout (ready to paste into benchmarks/RESULTS.md; this
script appends nothing itself); under --out (default $OUT): e2e.jsonl (one JSON object per measurement),
e2e_table.md, e2e.png (benchmarks/plot_e2e.py: time and peak memory against length, log-log), e2e_reports.txt (the
planner's reports).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_e2e.py --out $OUT      # on the H200, < 9 minutes
    PYTHONPATH=. python benchmarks/bench_e2e.py --smoke [--compile] --out /tmp/e2e  # CPU, tiny models, float32
    PYTHONPATH=. python benchmarks/bench_e2e.py --device cpu --lengths 128,256 --train-length 256 \
        --configs sdpa,eager,planner --train-configs sdpa --no-cli                   # CPU dry run of the real shapes

--smoke: the same flow on the CPU with tiny configs (2 layers, hidden 64, lengths 64 and 128, training at 128 with
the loss over the last 32 positions), float32, without torch.compile unless --compile; the planner's compile backend
is forced to the flash variant for the training step there (at 128 tokens the plan would keep SDPA, and the rewrite
path would not run);
the last-position logits of every configuration are saved to logits.pt for the smoke test to compare.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GIB = 1024 ** 3
LENGTHS = (8192, 32768, 65536, 131072)
SMOKE_LENGTHS = (64, 128)
TRAIN_LENGTH, SMOKE_TRAIN_LENGTH = 32768, 128
LOSS_TOKENS, SMOKE_LOSS_TOKENS = 4096, 32
CAPTURE_LENGTH = 67  # optimize()'s example input length (odd, unlike any hidden size; see passes/capture.py)
FORWARD_CONFIGS = ("sdpa", "eager", "planner", "inductor")
OPTIONAL_CONFIGS = ("planner-compile",)
TRAIN_CONFIGS = ("sdpa", "inductor", "planner-backend")
TRANSFORMERS_CONFIGS = ("eager", "sdpa")  # "transformers' own implementations" of the goals
CLI_COMMAND = ("plan", "llama-3-70b", "--max-len", "128k", "--device", "h200", "--quiet")
# What a step is assumed to cost before anything is measured (seconds on the H200; only for the budget's decisions).
GUESS = {"inductor_compile": 75.0, "train_compile": 110.0, "first_call": 1.0, "train_step": 3.0, "optimize": 10.0}
# Figures measured before this script, quoted where this run skips the measurement.
KNOWN_SECONDS = {("llama-3.2-1b", "sdpa", 131072): 3.1, ("mistral-1b-w4096", "sdpa", 131072): 10.8}


ALARM_GRACE_S = 20  # the hard stop comes this long after the budget (a long call may run past the budget's checks)


class BudgetExceeded(BaseException):
    """Raised by the alarm at the end of the time budget (a BaseException: no `except Exception` swallows it)."""


# ---------------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelSpec:
    """A model to build: its name in the tables, the transformers config class and values, and where they come from."""

    name: str
    config_class: str
    values: dict
    description: str


def llama_values() -> dict:
    """Llama-3.2-1B's published config (planner/presets.py holds it)."""
    from planner.presets import PRESETS

    return dict(PRESETS["llama-3.2-1b"].config)


def mistral_values() -> dict:
    """Mistral-7B-v0.1's architecture (vocabulary 32,000, rope theta 10,000, sliding window 4096, untied head) at
    Llama-3.2-1B's size (hidden 2048, 16 layers, 32 heads, 8 kv heads, head dim 64, intermediate 8192): ~1.1B
    parameters. max_position_embeddings 131072 so that 128k is within the config."""
    return {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
            "rope_theta": 10000.0, "sliding_window": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False}


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000}


def model_specs(smoke: bool) -> list[ModelSpec]:
    llama, mistral = llama_values(), mistral_values()
    if smoke:
        llama = {**llama, **TINY}
        mistral = {**mistral, **TINY, "sliding_window": 48}
    return [
        ModelSpec("llama-3.2-1b", "LlamaConfig", llama,
                  "Llama-3.2-1B config (meta-llama/Llama-3.2-1B): hidden 2048, 16 layers, 32 heads / 8 kv heads, "
                  "head dim 64, intermediate 8192, vocab 128256, rope theta 500000 (llama3 scaling x32), tied "
                  "embeddings" if not smoke else "tiny Llama-3.2-1B-style config"),
        ModelSpec("mistral-1b-w4096", "MistralConfig", mistral,
                  "Mistral-7B-v0.1 architecture at Llama-3.2-1B's size: hidden 2048, 16 layers, 32 heads / 8 kv "
                  "heads, head dim 64, intermediate 8192, vocab 32000, rope theta 10000, sliding window 4096, "
                  "untied head" if not smoke else "tiny Mistral-style config, sliding window 48"),
    ]


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with random weights (seed 0) on `device` in `dtype`, attention "sdpa", in eval mode."""
    import transformers

    config = getattr(transformers, spec.config_class)(**spec.values, use_cache=False)
    config._attn_implementation = "sdpa"
    model_class = getattr(transformers, spec.config_class.replace("Config", "ForCausalLM"))
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)
    return model.to(dtype).eval()


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch transformers' attention implementation ("eager", "sdpa") of a built model."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation
    if model.config._attn_implementation != implementation:
        raise RuntimeError(f"could not switch attention to {implementation!r}")


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


def weights_bytes(model: torch.nn.Module) -> int:
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(parameter.numel() * parameter.element_size() for parameter in unique)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


class Clock:
    """Times a call on the device it runs on: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, function: Callable[[], Any]) -> tuple[Any, float]:
        if not self.cuda:
            start = time.perf_counter()
            result = function()
            return result, time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        result = function()
        end.record()
        end.synchronize()
        return result, begin.elapsed_time(end) / 1e3

    def wall(self, function: Callable[[], Any]) -> tuple[Any, float]:
        """Wall time with the device synchronized on both sides (for first calls, which compile on the host)."""
        self.sync()
        start = time.perf_counter()
        result = function()
        self.sync()
        return result, time.perf_counter() - start


class PeakMemory:
    """Peak allocated memory over a block: the caching allocator's peak on CUDA, the RSS high-water mark on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_bytes = 0
        self.peak_bytes: Optional[int] = None
        self._rss_start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            from planner.memory import _status_bytes, cpu_peak_measurable

            if cpu_peak_measurable():  # also resets the high-water mark
                self._rss_start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._rss_start:
            from planner.memory import _status_bytes

            self.peak_bytes = _status_bytes("VmHWM")
            self.start_bytes = self._rss_start


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


LONG_CALL_S = 2.0  # a configuration already warm at a shorter length is timed without a warm-up above this


MIN_REPEATS = [3]  # --min-repeats: timed calls of a call up to LONG_CALL_S, for a closer comparison


def timed_repeats(seconds: float) -> int:
    """Timed calls after the warm-up: 3 (or --min-repeats) for short calls, fewer for long ones (the budget is one
    device call)."""
    if seconds <= 0.5:
        return MIN_REPEATS[0]
    return max(2, MIN_REPEATS[0] // 2) if seconds <= LONG_CALL_S else 1


class Budget:
    """Seconds left of the run's budget, counted from the start of the process."""

    def __init__(self, total_s: float):
        self.total_s = total_s

    def elapsed(self) -> float:
        return time.perf_counter() - START

    def left(self) -> float:
        return self.total_s - self.elapsed()


class Recorder:
    """Keeps every record, appends each as one JSON line to the output file at once, and logs it on stderr."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        path.write_text("")

    def add(self, **record: Any) -> dict:
        record = {key: value for key, value in record.items() if value is not None}
        record["at_s"] = round(time.perf_counter() - START, 1)
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        log(describe(record))
        return record


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


def describe(record: dict) -> str:
    where = " ".join(str(record[key]) for key in ("section", "model", "config", "length", "what") if key in record)
    if record.get("status") == "ok" and "tokens_per_s" in record:
        return f"{where}: {cell(record)}"
    if record.get("status") == "ok" and "ratio_median" in record:
        return f"{where}: {paired_cells(record)}"
    return f"{where}: {record.get('status', '')} {record.get('reason', '')} {record.get('seconds', '')}".rstrip()


# ---------------------------------------------------------------------------------------------------------------------
# Configurations: each gives a function of the input ids that returns the logits kept


@dataclass
class Runner:
    config: str
    call: Callable[[torch.Tensor], torch.Tensor]
    setup_s: Optional[float] = None
    report: Any = None  # a planner.Report, or the compile backend (its .report and .graphs)
    notes: list = field(default_factory=list)
    warm_per_length: bool = False  # each new length compiles or autotunes in its first call


@dataclass
class Settings:
    smoke: bool
    device: torch.device
    dtype: torch.dtype
    lengths: tuple
    train_length: int
    loss_tokens: int
    compile: bool
    max_call_s: float
    train_reserve_s: float
    planner_device: str
    train_variant: Optional[str]
    paired_lengths: tuple = ()  # --paired: lengths of the paired sdpa / planner timing
    paired_calls: int = 15  # --paired-calls: pairs of timed calls at each


def keep_kwargs(model: torch.nn.Module, keep: int) -> dict:
    return {"use_cache": False, **({"logits_to_keep": keep} if takes_logits_to_keep(model) else {})}


def make_runner(config: str, model: torch.nn.Module, settings: Settings, keep: int, max_len: str,
                train: bool = False) -> Runner:
    """Prepare `config` on `model` (optimize() runs here and is timed; torch.compile compiles at the first call)."""
    import planner

    kwargs = keep_kwargs(model, keep)
    set_attention(model, "eager" if config == "eager" else "sdpa")
    if config in ("eager", "sdpa"):
        return Runner(config, lambda ids: model(input_ids=ids, **kwargs).logits)
    if config == "planner":
        example = torch.randint(0, model.config.vocab_size, (1, CAPTURE_LENGTH), device=settings.device)
        start = time.perf_counter()
        fast = planner.optimize(model, max_len=max_len, device=settings.planner_device, example_inputs=(example,),
                                example_kwargs=kwargs)
        seconds = time.perf_counter() - start
        return Runner(config, lambda ids: fast(ids, **kwargs).logits, setup_s=seconds, report=fast.report,
                      warm_per_length=True,
                      notes=[f"planner.optimize(model, max_len={max_len!r}, device={settings.planner_device!r}, "
                             f"example_inputs=(ids[1x{CAPTURE_LENGTH}],), example_kwargs={kwargs})"])
    torch._dynamo.reset()
    if config == "inductor":
        compiled = torch.compile(model, dynamic=None if train else True)
        note = "torch.compile(model)" if train else "torch.compile(model, dynamic=True)"
        return Runner(config, lambda ids: compiled(input_ids=ids, **kwargs).logits, warm_per_length=True,
                      notes=[note])
    if config in ("planner-backend", "planner-compile"):
        options = {"variant": settings.train_variant} if settings.train_variant and train else {}
        backend = planner.backend(max_len=max_len, device=settings.planner_device, **options)
        compiled = torch.compile(model, backend=backend, dynamic=None if train else True)
        arguments = ", ".join([f"max_len={max_len!r}", f"device={settings.planner_device!r}",
                               *(f"{key}={value!r}" for key, value in options.items())])
        note = f"torch.compile(model, backend=planner.backend({arguments}){'' if train else ', dynamic=True'})"
        return Runner(config, lambda ids: compiled(input_ids=ids, **kwargs).logits, report=backend,
                      warm_per_length=True, notes=[note])
    raise ValueError(f"unknown configuration {config!r}")


def report_facts(report: Any) -> dict:
    """What the planner did, from a Report or a compile backend: sites, rewritten sites, choices, fallbacks."""
    from collections import Counter

    fallbacks = []
    if hasattr(report, "graphs"):
        fallbacks = [record.fallback for record in report.graphs if record.fallback]
        report = report.report
    if report is None:
        return {"sites": 0, "rewritten": 0, "fallbacks": fallbacks}
    choices = Counter(f"{decision.choice.variant} ({decision.choice.implementation})" if decision.choice else "kept"
                      for decision in report.decisions)
    return {"sites": len(report.decisions), "rewritten": len(report.rewritten), "choices": dict(choices),
            "fallbacks": fallbacks or None, "headline": report.summary().splitlines()[0]}


# ---------------------------------------------------------------------------------------------------------------------
# Skip rules


def eager_attention_bytes(model: torch.nn.Module, length: int) -> int:
    """Peak of transformers' eager attention in one layer at B=1: the H x L^2 scores (bf16), their fp32 softmax and
    its bf16 copy alive together, and the L^2 float mask."""
    heads = model.config.num_attention_heads
    element = next(model.parameters()).element_size()
    return heads * length * length * (element + 4 + element) + length * length * element


def materialized_mask_bytes(model: torch.nn.Module, length: int) -> int:
    """transformers' sdpa path with a sliding window shorter than the sequence builds an L^2 boolean
    mask, and SDPA converts a boolean mask to one of the query's dtype before its kernel: 1 + 2 bytes per pair."""
    window = getattr(model.config, "sliding_window", None)
    return 3 * length * length if window and length > window else 0


def estimated_forward_bytes(model: torch.nn.Module, config: str, length: int) -> Optional[int]:
    """Peak of a forward of transformers' `config` ("eager" or "sdpa") at B=1: weights, one layer's activations
    (the MLP's three intermediate tensors and a few hidden-sized ones), and what the attention materializes."""
    if config not in TRANSFORMERS_CONFIGS:
        return None
    element = next(model.parameters()).element_size()
    activations = length * (3 * model.config.intermediate_size + 6 * model.config.hidden_size) * element
    attention = eager_attention_bytes(model, length) if config == "eager" else materialized_mask_bytes(model, length)
    return weights_bytes(model) + activations + attention


def memory_skip(config: str, model: torch.nn.Module, length: int, settings: Settings) -> Optional[dict]:
    """Skip a transformers configuration whose estimated peak exceeds the device's memory (free + the weights)."""
    free, estimate = free_bytes(settings.device), estimated_forward_bytes(model, config, length)
    if free is None or estimate is None or estimate <= 0.97 * (free + weights_bytes(model)):
        return None
    what = ("the H x L^2 scores in bf16, their fp32 softmax and its bf16 copy, an L^2 mask" if config == "eager" else
            "an L^2 boolean sliding-window mask and SDPA's bf16 copy of it")
    return {"status": "skipped", "estimated_bytes": estimate,
            "reason": f"estimated OOM: ~{estimate / GIB:.0f} GiB peak ({what}) > "
                      f"{(free + weights_bytes(model)) / GIB:.0f} GiB"}


def predicted_call_s(history: list[tuple[int, float]], length: int) -> Optional[float]:
    """Seconds of one call at `length`, extrapolated quadratically from the longest length measured (attention's
    share grows as L^2, the rest as L, so this over-estimates)."""
    if not history:
        return None
    measured_length, seconds = max(history)
    return seconds * (length / measured_length) ** 2


def time_skip(predicted: float, budget: Budget, reserve_s: float, what: str) -> Optional[dict]:
    """Skip when the predicted cost of the whole measurement does not fit the time left, or one call is too long."""
    available = budget.left() - reserve_s
    if predicted > available:
        return {"status": "skipped", "predicted_s": round(predicted, 1),
                "reason": f"over the time budget: {what} predicted {predicted:.0f} s, {max(available, 0):.0f} s left"}
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Forward


def input_ids(vocab: int, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab, (1, length), generator=generator).to(device)


def measure_forward(runner: Runner, ids: torch.Tensor, clock: Clock, predicted: Optional[float],
                    warm: bool) -> dict:
    """Warm-up call (skipped for long calls of a configuration already warm), then timed calls; peak memory over the
    timed calls. Returns the record's fields and the kept logits (float32, on the CPU)."""
    fields: dict = {}
    kept = None
    with torch.no_grad():
        if not (warm and predicted is not None and predicted > LONG_CALL_S):
            output, first = clock.wall(lambda: runner.call(ids))
            fields["first_call_s"] = round(first, 4)
            kept = output[0, -1].float().cpu()
            del output
        times: list[float] = []
        repeats = 1
        with PeakMemory(clock.device) as peak:
            while len(times) < repeats:
                output, seconds = clock.time(lambda: runner.call(ids))
                times.append(seconds)
                if kept is None:
                    kept = output[0, -1].float().cpu()
                del output
                if len(times) == 1:
                    repeats = timed_repeats(seconds) if "first_call_s" in fields else 1
    median = statistics.median(times)
    fields.update(status="ok", seconds=median, runs=[round(value, 5) for value in times],
                  tokens_per_s=ids.shape[1] / median, peak_bytes=peak.peak_bytes,
                  peak_above_start_bytes=(peak.peak_bytes - peak.start_bytes) if peak.peak_bytes else None)
    if "first_call_s" in fields and runner.setup_s is None and not warm:
        fields["compile_s"] = round(max(fields["first_call_s"] - median, 0.0), 2)
    return {**fields, "_logits": kept}


def run_forward_config(spec: ModelSpec, model: torch.nn.Module, config: str, settings: Settings, budget: Budget,
                       recorder: Recorder, references: dict, reports: list, reserve_s: float,
                       saved_logits: dict) -> None:
    clock = Clock(settings.device)
    if config in ("inductor", "planner-compile") and settings.smoke and not settings.compile:
        for length in settings.lengths:
            recorder.add(section="forward", model=spec.name, config=config, length=length, status="skipped",
                         reason="--smoke without --compile")
        return
    compile_guess = GUESS["inductor_compile"] if config in ("inductor", "planner-compile") else 0.0
    skip = time_skip(compile_guess + 4 * GUESS["first_call"], budget, reserve_s,
                     f"{config} setup + first length")
    if skip:
        for length in settings.lengths:
            recorder.add(section="forward", model=spec.name, config=config, length=length, **skip)
        return
    try:
        runner = make_runner(config, model, settings, keep=1, max_len="128k")
    except BudgetExceeded:
        raise
    except Exception as error:  # noqa: BLE001 - a failed configuration is a result, not the end of the run
        for length in settings.lengths:
            recorder.add(section="forward", model=spec.name, config=config, length=length,
                         status="oom" if is_oom(error) else "error", reason=first_line(error))
        free_memory(settings.device)
        return
    if runner.setup_s is not None:
        recorder.add(section="overhead", what=f"optimize() {spec.name}", model=spec.name, config=config,
                     seconds=round(runner.setup_s, 2), status="ok", notes=runner.notes,
                     **report_facts(runner.report))
        reports.append((f"{spec.name} {config}", runner.report))
    history: list[tuple[int, float]] = []
    stop_reason: Optional[dict] = None
    for length in settings.lengths:
        base = dict(section="forward", model=spec.name, config=config, length=length,
                    estimated_bytes=estimated_forward_bytes(model, config, length))
        if stop_reason:
            recorder.add(**{**base, **stop_reason})
            continue
        skip = memory_skip(config, model, length, settings)
        predicted = predicted_call_s(history, length)
        if skip is None and predicted is not None:
            if predicted > settings.max_call_s:
                skip = {"status": "skipped", "predicted_s": round(predicted, 1),
                        "reason": f"one call predicted {predicted:.0f} s > --max-call-s {settings.max_call_s:.0f}"}
            else:
                calls = 1 if predicted > LONG_CALL_S and not runner.warm_per_length else 1 + timed_repeats(predicted)
                skip = time_skip(predicted * calls, budget, reserve_s, f"{calls} call(s)")
        if skip:
            recorder.add(**{**base, **skip})
            if skip["reason"].startswith("over the time budget") or "max-call-s" in skip["reason"]:
                stop_reason = {**skip, "reason": skip["reason"] + " (at a shorter length)"}
            continue
        ids = input_ids(model.config.vocab_size, length, settings.device)
        try:
            fields = measure_forward(runner, ids, clock, predicted, warm=bool(history) and not runner.warm_per_length)
        except BudgetExceeded:
            raise
        except Exception as error:  # noqa: BLE001
            fields = {"status": "oom" if is_oom(error) else "error", "reason": first_line(error)}
            if fields["status"] == "oom":
                # longer sequences need more: recorded as out of memory without trying (a late OOM costs a forward)
                stop_reason = {"status": "oom", "reason": f"not run: out of memory at {fmt_length(length)} already"}
        finally:
            del ids
            free_memory(settings.device)
        logits = fields.pop("_logits", None)
        if logits is not None:
            saved_logits[(spec.name, config, length)] = logits
            reference_config = "eager" if (spec.name, "eager", length) in references else "sdpa"
            reference = references.get((spec.name, reference_config, length))
            if config in TRANSFORMERS_CONFIGS:
                references[(spec.name, config, length)] = logits
            if reference is not None and config != reference_config:
                fields.update(diff_vs=reference_config, max_abs_diff=float((logits - reference).abs().max()),
                              max_abs_reference=float(reference.abs().max()))
            history.append((length, fields["seconds"]))
        recorder.add(**base, **fields)
    if hasattr(runner.report, "graphs"):
        recorder.add(section="overhead", what=f"{config} {spec.name} report", model=spec.name, config=config,
                     status="ok", notes=runner.notes, **report_facts(runner.report))
        reports.append((f"{spec.name} {config}", runner.report.report))
    del runner
    torch._dynamo.reset()
    free_memory(settings.device)


# ---------------------------------------------------------------------------------------------------------------------
# Paired timing: transformers' sdpa and the planner called in turn at one length


PAIRED_RIVAL = "sdpa"  # the fastest transformers implementation wherever both ran (eager: 10x slower at 8k)


def paired_runners(model: torch.nn.Module, settings: Settings) -> tuple[Runner, Runner]:
    """The planner's runner, then transformers' sdpa runner, on the same model. optimize() captures the model into a
    graph that no longer reads `config._attn_implementation`; transformers reads it at every call, so it is set to
    "sdpa" last and checked before each timing (see `check_sdpa_attention`)."""
    planner_runner = make_runner("planner", model, settings, keep=1, max_len="128k")
    sdpa_runner = make_runner(PAIRED_RIVAL, model, settings, keep=1, max_len="128k")
    check_sdpa_attention(model)
    return sdpa_runner, planner_runner


def check_sdpa_attention(model: torch.nn.Module) -> None:
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"the sdpa runner would run {model.config._attn_implementation!r} attention")


def paired_call_s(records: list[dict], model: str, config: str, length: int) -> tuple[float, float]:
    """(first call, later call) seconds of `config` at `length`, from this run's forward records: measured at that
    length, else extrapolated quadratically from a shorter one, else the a-priori guess."""
    rows = [r for r in records if r.get("section") == "forward" and r.get("model") == model
            and r.get("config") == config and r.get("status") == "ok"]
    same = next((r for r in rows if r["length"] == length), None)
    if same is not None:
        return max(same.get("first_call_s", same["seconds"]), same["seconds"]), same["seconds"]
    predicted = predicted_call_s([(r["length"], r["seconds"]) for r in rows], length)
    if predicted is None:
        return GUESS["first_call"], GUESS["first_call"]
    return predicted, predicted


def measure_paired(sdpa: Runner, planner_runner: Runner, model: torch.nn.Module, ids: torch.Tensor, clock: Clock,
                   pairs: int) -> dict:
    """One warm-up call each, then `pairs` pairs of timed calls, sdpa first in even pairs and the planner first in odd
    ones (slow drift of clocks or allocator state then falls on both alike). Returns the record's fields."""
    runners = {PAIRED_RIVAL: sdpa, "planner": planner_runner}
    times: dict[str, list[float]] = {name: [] for name in runners}
    fields: dict = {}
    kept: dict = {}
    with torch.no_grad():
        for name, runner in runners.items():
            check_sdpa_attention(model)
            output, first = clock.wall(lambda: runner.call(ids))
            fields[f"{name}_first_call_s"] = round(first, 4)
            kept[name] = output[0, -1].float().cpu()
            del output
        check_sdpa_attention(model)
        for pair in range(pairs):
            order = (PAIRED_RIVAL, "planner") if pair % 2 == 0 else ("planner", PAIRED_RIVAL)
            for name in order:
                output, seconds = clock.time(lambda: runners[name].call(ids))
                times[name].append(seconds)
                del output
    pair_ratios = [rival / mine for rival, mine in zip(times[PAIRED_RIVAL], times["planner"])]
    difference = (kept["planner"] - kept[PAIRED_RIVAL]).abs().max()
    fields.update(
        status="ok", sdpa_attention=model.config._attn_implementation,
        sdpa_seconds=statistics.median(times[PAIRED_RIVAL]), planner_seconds=statistics.median(times["planner"]),
        ratio_median=statistics.median(pair_ratios), ratio_min=min(pair_ratios), ratio_max=max(pair_ratios),
        planner_faster=sum(ratio > 1.0 for ratio in pair_ratios),
        sdpa_runs=[round(value, 5) for value in times[PAIRED_RIVAL]],
        planner_runs=[round(value, 5) for value in times["planner"]],
        pair_ratios=[round(value, 4) for value in pair_ratios],
        first_in_pair=[PAIRED_RIVAL if pair % 2 == 0 else "planner" for pair in range(pairs)],
        diff_vs=PAIRED_RIVAL, max_abs_diff=float(difference), max_abs_reference=float(kept[PAIRED_RIVAL].abs().max()))
    return fields


def run_paired(spec: ModelSpec, model: torch.nn.Module, settings: Settings, budget: Budget, recorder: Recorder,
               reserve_s: float) -> None:
    """Paired timing of sdpa and the planner at each of settings.paired_lengths: one record per length, "ok" with
    both medians and the per-pair ratios, or skipped / error / oom with the reason."""
    lengths, pairs = settings.paired_lengths, settings.paired_calls
    clock = Clock(settings.device)
    base = dict(section="paired", model=spec.name, config="planner", rival=PAIRED_RIVAL, pairs=pairs)

    def predicted_s(length: int) -> tuple[float, float]:
        """(one call of the slower of the two, the whole measurement at `length`) in seconds."""
        sdpa_first, sdpa_call = paired_call_s(recorder.records, spec.name, PAIRED_RIVAL, length)
        planner_first, planner_call = paired_call_s(recorder.records, spec.name, "planner", length)
        return max(sdpa_call, planner_call), sdpa_first + planner_first + pairs * (sdpa_call + planner_call)

    optimize_s = next((r["seconds"] for r in recorder.records if r.get("section") == "overhead"
                       and r.get("model") == spec.name and r.get("config") == "planner"), GUESS["optimize"])
    skip = time_skip(optimize_s + predicted_s(min(lengths))[1], budget, reserve_s,
                     f"optimize() + {2 + 2 * pairs} calls at {fmt_length(min(lengths))}")
    if skip:
        for length in lengths:
            recorder.add(**base, length=length, **skip)
        return
    try:
        sdpa, planner_runner = paired_runners(model, settings)
    except BudgetExceeded:
        raise
    except Exception as error:  # noqa: BLE001 - a failed configuration is a result, not the end of the run
        for length in lengths:
            recorder.add(**base, length=length, status="oom" if is_oom(error) else "error", reason=first_line(error))
        free_memory(settings.device)
        return
    base["planner_setup_s"] = round(planner_runner.setup_s, 2)
    for length in lengths:
        one_call, total = predicted_s(length)
        skip = memory_skip(PAIRED_RIVAL, model, length, settings)
        if skip is None and one_call > settings.max_call_s:
            skip = {"status": "skipped", "predicted_s": round(one_call, 1),
                    "reason": f"one call predicted {one_call:.0f} s > --max-call-s {settings.max_call_s:.0f}"}
        skip = skip or time_skip(total, budget, reserve_s, f"{2 + 2 * pairs} calls")
        if skip:
            recorder.add(**base, length=length, **skip)
            continue
        ids = input_ids(model.config.vocab_size, length, settings.device)
        try:
            fields = measure_paired(sdpa, planner_runner, model, ids, clock, pairs)
        except BudgetExceeded:
            raise
        except Exception as error:  # noqa: BLE001
            fields = {"status": "oom" if is_oom(error) else "error", "reason": first_line(error)}
        finally:
            del ids
            free_memory(settings.device)
        recorder.add(**base, length=length, predicted_s=round(total, 1), **fields)
    del sdpa, planner_runner
    free_memory(settings.device)


# ---------------------------------------------------------------------------------------------------------------------
# Training step


def train_step(runner: Runner, model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """zero_grad, forward with logits for the last len(targets) positions, mean cross-entropy in fp32, backward."""
    model.zero_grad(set_to_none=True)
    logits = runner.call(ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.detach()


def gradient_norm(model: torch.nn.Module) -> float:
    squares = [parameter.grad.float().pow(2).sum() for parameter in model.parameters() if parameter.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else float("nan")


def run_train_config(spec: ModelSpec, model: torch.nn.Module, config: str, settings: Settings, budget: Budget,
                     recorder: Recorder, reports: list) -> None:
    clock = Clock(settings.device)
    length, keep = settings.train_length, settings.loss_tokens
    base = dict(section="train", model=spec.name, config=config, length=length, loss_tokens=keep)
    compiled = config != "sdpa"
    if compiled and settings.smoke and not settings.compile:
        recorder.add(**base, status="skipped", reason="--smoke without --compile")
        return
    guess = (GUESS["train_compile"] if compiled else 0.0) + 4 * GUESS["train_step"]
    skip = time_skip(guess, budget, 0.0, "compile + 4 steps")
    if skip:
        recorder.add(**base, **skip)
        return
    model.train()
    ids = input_ids(model.config.vocab_size, length, settings.device, seed=1)
    targets = input_ids(model.config.vocab_size, keep, settings.device, seed=2)
    max_len = "32k" if length == TRAIN_LENGTH else length
    try:
        runner = make_runner(config, model, settings, keep=keep, max_len=max_len, train=True)
        _, first = clock.wall(lambda: train_step(runner, model, ids, targets))
        loss = float(train_step(runner, model, ids, targets))
        norm = gradient_norm(model)
        times = []
        with PeakMemory(settings.device) as peak:
            for _ in range(3):
                _, seconds = clock.time(lambda: train_step(runner, model, ids, targets))
                times.append(seconds)
        median = statistics.median(times)
        fields = dict(status="ok", seconds=median, runs=[round(value, 4) for value in times],
                      tokens_per_s=length / median, peak_bytes=peak.peak_bytes,
                      peak_above_start_bytes=(peak.peak_bytes - peak.start_bytes) if peak.peak_bytes else None,
                      first_call_s=round(first, 2), compile_s=round(max(first - median, 0.0), 2) if compiled else None,
                      loss=loss, grad_norm=norm, notes=runner.notes or None)
        if runner.report is not None:
            fields.update(report_facts(runner.report))
            reports.append((f"{spec.name} train {config}", runner.report.report))
    except BudgetExceeded:
        raise
    except Exception as error:  # noqa: BLE001
        fields = {"status": "oom" if is_oom(error) else "error", "reason": first_line(error)}
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        runner = None
        torch._dynamo.reset()
        free_memory(settings.device)
    recorder.add(**base, **fields)


# ---------------------------------------------------------------------------------------------------------------------
# The planner's own overhead on the CPU: the CLI in a fresh process


class CliTiming(threading.Thread):
    """`attention-planner plan llama-3-70b --max-len 128k --device h200 --quiet` in a fresh process, CPU only."""

    SCRIPT = ("import resource, sys\nfrom planner.cli import main\ncode = main(sys.argv[1:])\n"
              "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
              "print('RUSAGE', usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr)\nsys.exit(code)\n")

    def __init__(self):
        super().__init__(daemon=True)
        self.result: dict = {}

    def run(self) -> None:
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", self.SCRIPT, *CLI_COMMAND], capture_output=True, text=True,
                                  cwd=ROOT, env=environment, timeout=240)
        except subprocess.TimeoutExpired:
            self.result = {"status": "error", "reason": "timed out after 240 s"}
            return
        seconds = time.perf_counter() - start
        usage = next((line.split() for line in done.stderr.splitlines() if line.startswith("RUSAGE")), None)
        if done.returncode != 0 or usage is None:
            self.result = {"status": "error", "reason": done.stderr.strip()[-500:]}
            return
        self.result = {"status": "ok", "seconds": round(seconds, 2), "cpu_s": round(float(usage[2]), 2),
                       "peak_rss_bytes": int(usage[1]) * 1024,
                       "headline": done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""}


def record_cli(cli: Optional[CliTiming], recorder: Recorder) -> None:
    if cli is None:
        return
    cli.join()
    recorder.add(section="overhead", what="cli plan llama-3-70b",
                 command="attention-planner " + " ".join(CLI_COMMAND), **cli.result)


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


def fmt_count(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e3:.0f}k"


def fmt_length(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def cell(record: Optional[dict]) -> str:
    if record is None:
        return "not run"
    status = record.get("status")
    if status == "ok":
        peak = f", {record['peak_bytes'] / GIB:.1f} GiB" if record.get("peak_bytes") else ""
        return f"{fmt_seconds(record['seconds'])}, {fmt_rate(record['tokens_per_s'])} tok/s{peak}"
    if status == "oom":
        return "OOM"
    if status == "skipped":
        reason = record.get("reason", "")
        if reason.startswith("estimated OOM"):
            return f"OOM (est. {record['estimated_bytes'] / GIB:.0f} GiB, skipped)"
        if "predicted_s" in record:
            return f"skipped (time: ~{record['predicted_s']:.0f} s predicted)"
        return f"skipped ({reason})"
    return f"error ({record.get('reason', '')[:60]})"


def index(records: list[dict], section: str) -> dict:
    return {(r["model"], r["config"], r["length"]): r for r in records if r.get("section") == section}


def forward_table(records: list[dict], lengths: tuple) -> list[str]:
    forward = index(records, "forward")
    models = list(dict.fromkeys(key[0] for key in forward))
    configs = [c for c in FORWARD_CONFIGS + OPTIONAL_CONFIGS if any(key[1] == c for key in forward)]
    lines = ["| model | configuration | " + " | ".join(fmt_length(length) for length in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for model in models:
        for config in configs:
            if not any((model, config, length) in forward for length in lengths):
                continue
            cells = [cell(forward.get((model, config, length))) for length in lengths]
            lines.append(f"| {model} | {config} | " + " | ".join(cells) + " |")
    return lines


def ok_rate(record: Optional[dict]) -> Optional[float]:
    return record["tokens_per_s"] if record and record.get("status") == "ok" else None


def memory_failure(record: Optional[dict]) -> bool:
    return bool(record) and (record.get("status") == "oom" or record.get("reason", "").startswith("estimated OOM"))


def ratios(forward: dict, model: str, lengths: tuple, rivals: tuple) -> list[tuple[int, Optional[float], str]]:
    """(length, planner's tokens/s over the fastest of `rivals` that ran, that rival) at each length."""
    result = []
    for length in lengths:
        planner_rate = ok_rate(forward.get((model, "planner", length)))
        rates = {config: ok_rate(forward.get((model, config, length))) for config in rivals}
        rates = {config: rate for config, rate in rates.items() if rate}
        if planner_rate and rates:
            best = max(rates, key=rates.get)
            result.append((length, planner_rate / rates[best], best))
        elif rates:
            result.append((length, None, "planner not measured"))
    return result


def paired_index(records: list[dict]) -> dict:
    """(model, length) -> the paired record that measured both (status "ok")."""
    return {(r["model"], r["length"]): r for r in records if r.get("section") == "paired" and r.get("status") == "ok"}


def paired_cells(record: dict) -> str:
    return (f"sdpa {fmt_seconds(record['sdpa_seconds'])}, planner {fmt_seconds(record['planner_seconds'])}, "
            f"ratio {record['ratio_median']:.3f}x ({record['ratio_min']:.3f}-{record['ratio_max']:.3f}), planner "
            f"faster in {record['planner_faster']}/{record['pairs']}")


def paired_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("section") == "paired"]
    if not rows:
        return []
    pairs = sorted({r["pairs"] for r in rows})
    lines = [f"**Paired timing** (calls alternated, {'/'.join(map(str, pairs))} pairs): after one warm-up call each "
             "(optimize() rerun on the same model object), transformers' sdpa and the planner are called in turn, "
             "sdpa first in the 1st, 3rd, ... pair and the planner first in the others, each call timed alone; "
             "ratio = sdpa's time / the planner's in the same pair (> 1: the planner is faster), median and range "
             "over the pairs.", "",
             "| model | length | sdpa median | planner median | median pair ratio | range | planner faster in | "
             "logits max \\|diff\\| |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {fmt_length(r['length'])} | {cell(r)} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {fmt_length(r['length'])} | {fmt_seconds(r['sdpa_seconds'])} | "
                     f"{fmt_seconds(r['planner_seconds'])} | {r['ratio_median']:.3f}x | {r['ratio_min']:.3f}-"
                     f"{r['ratio_max']:.3f} | {r['planner_faster']} of {r['pairs']} pairs | "
                     f"{r['max_abs_diff']:.1e} ({r['max_abs_reference']:.2f}) |")
    return lines


def with_paired(found: list[tuple[int, Optional[float], str]], paired: dict,
                model: str) -> list[tuple[int, Optional[float], str]]:
    """The ratios of `ratios`, with the paired median ratio in place of the sequential one wherever the paired timing
    measured that length and sdpa was the fastest transformers implementation there (or the only one measured)."""
    result = []
    for length, ratio, best in found:
        record = paired.get((model, length))
        if record is not None and best in (PAIRED_RIVAL, "planner not measured"):
            result.append((length, record["ratio_median"], f"{PAIRED_RIVAL} (paired)"))
        else:
            result.append((length, ratio, best))
    measured = {length for length, _, _ in found}
    result += [(length, record["ratio_median"], f"{PAIRED_RIVAL} (paired)")
               for (name, length), record in paired.items() if name == model and length not in measured]
    return sorted(result)


def sign_test_p(wins: int, pairs: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven between two equally fast sides."""
    fewer = min(wins, pairs - wins)
    tail = sum(math.comb(pairs, k) for k in range(fewer + 1)) / 2 ** pairs
    return min(1.0, 2 * tail)


def measurably_slower(record: dict) -> bool:
    """The planner lost most pairs and a sign test over them says it was not chance (p < 0.05)."""
    wins, pairs = record["planner_faster"], record["pairs"]
    return 2 * wins < pairs and sign_test_p(wins, pairs) < 0.05


def goals(records: list[dict], lengths: tuple) -> list[str]:
    """The end-to-end goals, each with its figures and a verdict; and, for reference, the planner against Inductor."""
    forward, paired = index(records, "forward"), paired_index(records)
    models = list(dict.fromkeys([key[0] for key in forward] + [key[0] for key in paired]))
    speed, against_inductor, beyond, missing, noise = [], [], [], [], []
    speed_met = bool(models)
    for model in models:
        found = with_paired(ratios(forward, model, lengths, TRANSFORMERS_CONFIGS), paired, model)
        noise += [f"{model} {fmt_length(length)}: {record['ratio_median']:.3f}x (pairs {record['ratio_min']:.3f}-"
                  f"{record['ratio_max']:.3f}), faster in {record['planner_faster']}/{record['pairs']} "
                  f"(sign test p = {sign_test_p(record['planner_faster'], record['pairs']):.2f})"
                  for (name, length), record in sorted(paired.items()) if name == model]
        speed_met &= bool(found) and all(ratio is not None and ratio >= 1.0 for _, ratio, _ in found)
        speed.append(f"{model}: " + ", ".join(f"{fmt_length(length)} " + (f"{ratio:.2f}x {best}" if ratio else best)
                                             for length, ratio, best in found))
        versus = [(length, ratio) for length, ratio, _ in ratios(forward, model, lengths, ("inductor",)) if ratio]
        if versus:
            against_inductor.append(f"{model}: " + ", ".join(f"{fmt_length(length)} {ratio:.2f}x"
                                                             for length, ratio in versus))
        failed_lengths = []
        for length in lengths:
            failed = [("" if forward[(model, c, length)].get("status") == "oom" else "est. ") + f"{c} OOM"
                      for c in TRANSFORMERS_CONFIGS if memory_failure(forward.get((model, c, length)))]
            if failed and ok_rate(forward.get((model, "planner", length))):
                failed_lengths.append(f"{fmt_length(length)} ({', '.join(failed)})")
            elif failed:
                missing.append(f"{model} {fmt_length(length)}: planner did not run either")
        if failed_lengths:
            beyond.append(f"{model}: {', '.join(failed_lengths)}")
    lines = ["| goal | result | met |", "|---|---|---|",
             "| planner's tokens/s ≥ the fastest transformers implementation (eager, sdpa) at every length | "
             f"{'; '.join(speed) or 'nothing measured'} | {'yes' if speed_met else 'no'} |",
             "| the planner runs where transformers runs out of memory | "
             f"{'; '.join(beyond + missing) or 'transformers ran out of memory at no length'} | "
             f"{'yes' if beyond and not missing else 'no' if missing else '-'} |"]
    window_model = next((model for model in models if "mistral" in model), None)
    if window_model and lengths:
        longest = max(lengths)
        planner_rate = ok_rate(forward.get((window_model, "planner", longest)))
        sdpa_rate = ok_rate(forward.get((window_model, "sdpa", longest)))
        source = "this run"
        if sdpa_rate is None and (window_model, "sdpa", longest) in KNOWN_SECONDS:
            sdpa_rate = longest / KNOWN_SECONDS[(window_model, "sdpa", longest)]
            source = f"a prior run's {KNOWN_SECONDS[(window_model, 'sdpa', longest)]} s figure"
        verdict = (f"{planner_rate / sdpa_rate:.1f}x (sdpa from {source})", planner_rate / sdpa_rate >= 5) \
            if planner_rate and sdpa_rate else ("not measured", False)
        lines.append(f"| sliding-window model at {fmt_length(longest)}: planner ≥ 5x sdpa's tokens/s | "
                     f"{verdict[0]} | {'yes' if verdict[1] else 'no'} |")
    if noise:
        slower = [f"{name} {fmt_length(length)}" for (name, length), record in sorted(paired.items())
                  if measurably_slower(record)]
        lines.append("| (paired) planner's speed over sdpa's with calls alternated: median pair ratio, its range, "
                     f"pairs the planner won | {'; '.join(noise)} | \"met\" above takes a ratio under 1.00 as slower, "
                     "with no tolerance; the range is the noise |")
        lines.append("| (paired) no length where the planner is measurably slower than sdpa (lost most pairs, sign "
                     f"test p < 0.05) | {'slower at ' + ', '.join(slower) if slower else 'none slower'} | "
                     f"{'no' if slower else 'yes'} |")
    if against_inductor:
        lines.append(f"| (not a goal) planner's tokens/s over Inductor alone's | {'; '.join(against_inductor)} | |")
    known = [f"{model} {config} {fmt_length(length)}: {seconds} s known, "
             + (fmt_seconds(forward[(model, config, length)]["seconds"]) + " here"
                if ok_rate(forward.get((model, config, length))) else "not measured here")
             for (model, config, length), seconds in KNOWN_SECONDS.items() if model in models and length in lengths]
    if known:
        lines.append(f"| (check) transformers' sdpa against the known H200 figures | {'; '.join(known)} | |")
    return lines


def agreement(records: list[dict]) -> list[str]:
    """Last-position logits of each configuration against transformers' at each length (same weights, same inputs);
    eager against sdpa gives the scale of the dtype's rounding."""
    rows = [r for r in records if r.get("section") == "forward" and "max_abs_diff" in r]
    if not rows:
        return []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["config"]), []).append(r)
    return ["Last-position logits against transformers' (max |difference|, with max |logit|): " + "; ".join(
        f"{model} {config}: " + ", ".join(f"{fmt_length(r['length'])} {r['max_abs_diff']:.1e} vs {r['diff_vs']} "
                                          f"({r['max_abs_reference']:.2f})" for r in group)
        for (model, config), group in groups.items()) + "."]


def train_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("section") == "train"]
    if not rows:
        return []
    reference = next((r for r in rows if r["config"] == "inductor" and r.get("status") == "ok"), None)
    lines = ["| model | configuration | length | step time | tokens/s | peak memory | first step (compile) | loss | "
             "vs Inductor | attention sites rewritten |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['config']} | {fmt_length(r['length'])} | {cell(r)} | | | | | | |")
            continue
        ratio = f"{reference['seconds'] / r['seconds']:.2f}x speed, {r['peak_bytes'] / reference['peak_bytes']:.2f}x " \
                f"memory" if reference and r.get("peak_bytes") and reference.get("peak_bytes") else ""
        peak = f"{r['peak_bytes'] / GIB:.1f} GiB" if r.get("peak_bytes") else "-"
        rewritten = f"{r['rewritten']}/{r['sites']}" if "sites" in r else "-"
        lines.append(f"| {r['model']} | {r['config']} | {fmt_length(r['length'])} | {fmt_seconds(r['seconds'])} | "
                     f"{fmt_rate(r['tokens_per_s'])} | {peak} | {r.get('first_call_s', 0):.1f} s | {r['loss']:.4f} | "
                     f"{ratio} | {rewritten} |")
    return lines


def overhead_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("section") == "overhead" and "seconds" in r]
    if not rows:
        return []
    lines = ["| what | seconds | detail |", "|---|---|---|"]
    for r in rows:
        if r["what"].startswith("cli"):
            detail = f"`{r.get('command')}` in a fresh process on the CPU (imports included); CPU time " \
                     f"{r.get('cpu_s')} s, peak RSS {r.get('peak_rss_bytes', 0) / GIB:.2f} GiB; {r.get('headline', '')}"
        else:
            detail = f"{r.get('rewritten', 0)}/{r.get('sites', 0)} sites rewritten: {r.get('choices', {})}"
        lines.append(f"| {r['what']} | {r['seconds']:.2f} | {detail} |")
    return lines


def git_revision() -> str:
    """The checkout's revision, "+modified" when tracked files differ; "unknown" where there is no git (the device
    machine gets a copy of the working tree, not always its .git)."""
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                  timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if revision.returncode != 0:
        return "unknown"
    return revision.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")


def environment(settings: Settings, specs: list[ModelSpec], models: dict) -> dict:
    import transformers
    import triton

    device = torch.cuda.get_device_name(settings.device) if settings.device.type == "cuda" else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "revision": git_revision(), "command": " ".join(["python3", *sys.argv]),
            "dtype": str(settings.dtype).replace("torch.", ""), "smoke": settings.smoke,
            "models": {spec.name: {"description": spec.description, **models.get(spec.name, {})} for spec in specs}}


def tables(records: list[dict], settings: Settings) -> str:
    env = next((r for r in records if r.get("section") == "env"), {})
    keep = env.get("logits_to_keep")
    lines = [f"## End to end on a long context: 1B models on {env.get('device', '?')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
             f"revision `{env.get('revision')}`; B=1, {env.get('dtype')}, random weights; command: "
             f"`PYTHONPATH=. {env.get('command')}`.",
             "Models: " + "; ".join(f"**{name}**: {facts['description']} ({fmt_count(facts.get('parameters', 0))} "
                                     f"parameters)" for name, facts in env.get("models", {}).items()) + ".",
             "", "**Forward (prefill)**: logits of the last position only ("
             + ("`logits_to_keep=1`: " if keep else "NOT: this transformers has no `logits_to_keep`, so all ")
             + "the LM head over 128k positions would be 32 GiB in bf16). Median of 1-3 timed calls after a "
             "warm-up; peak = torch.cuda.max_memory_allocated during the timed calls, weights included. "
             "Inductor: `torch.compile(model, dynamic=True)`, compiled once for all lengths. planner: "
             "`planner.optimize(model, max_len=\"128k\", device=\"cuda\")` with a 1x67 example input.", ""]
    lines += forward_table(records, settings.lengths)
    lines += ["", "OOM (est. …, skipped): not run, the estimated peak exceeds the free memory; skipped (time): the "
              "predicted cost did not fit the run's time budget.", ""] + agreement(records)
    paired = paired_table(records)
    if paired:
        lines += [""] + paired
    lines += ["", "**Goals**", ""] + goals(records, settings.lengths)
    train = train_table(records)
    if train:
        lines += ["", f"**Training step** at {fmt_length(settings.train_length)} tokens: zero_grad, forward, mean "
                  f"cross-entropy (fp32) over the last {settings.loss_tokens} positions (`logits_to_keep="
                  f"{settings.loss_tokens}`) against random targets, backward; no optimizer step; gradient "
                  "checkpointing off; median of 3 steps after 2 (the first compiles).", ""] + train
    overhead = overhead_table(records)
    if overhead:
        lines += ["", "**The planner's own overhead**", ""] + overhead
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Main


def parse_arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs, float32, lengths 64/128")
    parser.add_argument("--compile", action="store_true", help="with --smoke: run the torch.compile configurations")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/bench_e2e", help="output folder ($OUT)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run from process start (default 520, hard stop 20 s "
                             "later; smoke 600)")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed calls of a call under 0.5 s (half that "
                        "up to 2 s)")
    parser.add_argument("--max-call-s", type=float, default=20.0, help="skip a call predicted longer than this")
    parser.add_argument("--train-reserve-s", type=float, default=240.0,
                        help="seconds kept for the training step while the first forward configurations run")
    parser.add_argument("--lengths", default=None, help="comma-separated forward lengths (default 8k,32k,64k,128k)")
    parser.add_argument("--models", default="llama,mistral", help="comma-separated: llama, mistral")
    parser.add_argument("--configs", default=",".join(FORWARD_CONFIGS),
                        help=f"forward configurations: {', '.join(FORWARD_CONFIGS + OPTIONAL_CONFIGS)}")
    parser.add_argument("--train-configs", default=",".join(TRAIN_CONFIGS), help="'' for none")
    parser.add_argument("--no-cli", action="store_true", help="skip planning llama-3-70b with the CLI")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke: cpu); the real shapes on the "
                                                        "CPU, with short --lengths, are a dry run of the GPU flow")
    parser.add_argument("--train-length", default=None, help="training step length (default 32k; smoke 128)")
    parser.add_argument("--paired", default="", help="comma-separated lengths (e.g. 8k,32k) at which sdpa and the "
                        "planner are also timed in alternation, after each model's forward configurations")
    parser.add_argument("--paired-calls", type=int, default=15, help="pairs of timed calls at each --paired length")
    return parser.parse_args(argv)


def settings_from(arguments: argparse.Namespace) -> Settings:
    from planner.lengths import parse_length

    smoke = arguments.smoke
    device = torch.device(arguments.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_e2e.py needs CUDA (or --smoke, or --device cpu)")
    lengths = tuple(parse_length(text) for text in arguments.lengths.split(",")) if arguments.lengths else \
        (SMOKE_LENGTHS if smoke else LENGTHS)
    train_length = parse_length(arguments.train_length) if arguments.train_length else \
        (SMOKE_TRAIN_LENGTH if smoke else TRAIN_LENGTH)
    return Settings(smoke=smoke, device=device, dtype=torch.float32 if smoke else torch.bfloat16, lengths=lengths,
                    train_length=train_length, loss_tokens=min(SMOKE_LOSS_TOKENS if smoke else LOSS_TOKENS,
                                                               train_length),
                    compile=arguments.compile or not smoke, max_call_s=arguments.max_call_s,
                    train_reserve_s=arguments.train_reserve_s if not smoke else 0.0,
                    planner_device=device.type, train_variant="flash" if smoke else None,
                    paired_lengths=tuple(parse_length(text) for text in arguments.paired.split(",") if text),
                    paired_calls=arguments.paired_calls)


def plan_of_work(arguments: argparse.Namespace, settings: Settings, specs: list[ModelSpec]) -> list[tuple]:
    """(section, model spec, configuration) in the order they run: the planner and transformers' forwards first,
    then training, then the compiled forwards (the longest compiles) with what time is left."""
    configs = [c for c in arguments.configs.split(",") if c]
    unknown = set(configs) - set(FORWARD_CONFIGS + OPTIONAL_CONFIGS)
    if unknown:
        raise SystemExit(f"unknown --configs {sorted(unknown)}")
    first = [c for c in configs if c not in ("inductor", "planner-compile")]
    last = [c for c in configs if c in ("inductor", "planner-compile")]
    if arguments.paired_calls < 1:
        raise SystemExit("--paired-calls must be at least 1")
    paired = [("paired", "planner")] if arguments.paired else []
    # each model's paired timing right after its forwards, on the same model object (no rebuild)
    work = [(section, spec, config) for spec in specs
            for section, config in [("forward", config) for config in first] + paired]
    llama = next((spec for spec in specs if spec.name.startswith("llama")), None)
    if llama:
        work += [("train", llama, config) for config in arguments.train_configs.split(",") if config]
    work += [("forward", spec, config) for spec in specs for config in last]
    return work


def main(argv: Optional[list[str]] = None) -> int:
    arguments = parse_arguments(argv)
    settings = settings_from(arguments)
    MIN_REPEATS[0] = arguments.min_repeats
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(arguments.budget_s or (600.0 if settings.smoke else 520.0))
    recorder = Recorder(out / "e2e.jsonl")
    wanted = set(arguments.models.split(","))
    specs = [spec for spec in model_specs(settings.smoke) if spec.name.split("-")[0] in wanted]
    work = plan_of_work(arguments, settings, specs)
    cli = None if arguments.no_cli else CliTiming()
    if cli:
        cli.start()

    def on_alarm(signum, frame):
        raise BudgetExceeded()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(int(budget.left()) + ALARM_GRACE_S, 1))
    reports: list = []
    saved_logits: dict = {}
    references: dict = {}
    model_facts: dict = {}
    model, model_name = None, None
    try:
        for position, (section, spec, config) in enumerate(work):
            if model_name != spec.name:
                model, model_name = None, None
                free_memory(settings.device)
                model, model_name = build_model(spec, settings.device, settings.dtype), spec.name
                model_facts[spec.name] = {"parameters": parameter_count(model), "weights_bytes": weights_bytes(model),
                                          "logits_to_keep": takes_logits_to_keep(model)}
                if not any(r.get("section") == "env" for r in recorder.records):
                    recorder.add(section="env", logits_to_keep=takes_logits_to_keep(model),
                                 **environment(settings, specs, {}))
            if config in ("planner", "planner-backend") and cli is not None:
                record_cli(cli, recorder)  # the CLI's CPU work must not overlap the planner's own timings
                cli = None
            training_ahead = any(item[0] == "train" for item in work[position + 1:])
            reserve_s = settings.train_reserve_s if training_ahead else 0.0
            if section == "forward":
                run_forward_config(spec, model, config, settings, budget, recorder, references, reports,
                                   reserve_s, saved_logits)
            elif section == "paired":
                run_paired(spec, model, settings, budget, recorder, reserve_s)
            else:
                run_train_config(spec, model, config, settings, budget, recorder, reports)
        if cli is not None:
            record_cli(cli, recorder)
            cli = None
    except BudgetExceeded:
        recorder.add(section="note", status="stopped", reason=f"time budget ({budget.total_s:.0f} s) exhausted")
    finally:
        signal.alarm(0)
    env = next(r for r in recorder.records if r.get("section") == "env") if recorder.records else None
    if env is not None:
        for name, facts in model_facts.items():
            env["models"].setdefault(name, {}).update(facts)
        recorder.add(section="models", models=env["models"])
    write_outputs(out, recorder.records, settings, reports, saved_logits)
    return 0


def write_outputs(out: Path, records: list[dict], settings: Settings, reports: list, saved_logits: dict) -> None:
    text = tables(records, settings)
    (out / "e2e_table.md").write_text(text + "\n")
    with (out / "e2e_reports.txt").open("w") as handle:
        for title, report in reports:
            if report is not None:
                handle.write(f"===== {title}\n{report.summary()}\n\n")
    if settings.smoke:
        torch.save({"|".join(map(str, key)): value for key, value in saved_logits.items()}, out / "logits.pt")
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot_e2e import plot

        plot(records, out / "e2e.png")
    except Exception as error:  # noqa: BLE001 - the figures matter more than the picture
        log(f"plot failed: {first_line(error)}")
    print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
