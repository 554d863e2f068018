"""Generation (decode) benchmark: the planner's caches against transformers' dynamic and static caches, one device
call, every competitor in the same run.

Models: the 1B Llama shape and the 1B Mistral shape with a 4096-token sliding window, built exactly as
benchmarks/bench_e2e.py builds them (`model_specs`, `build_model`: random weights, seed 0, sdpa), bf16, batch 1, with
`use_cache` switched on and no end-of-sequence token (random weights must not stop early). Prompts: random token ids
(one per length, seeded by the length), greedy, --new-tokens new tokens (default 32).

Configurations, each at each length of --lengths (default 8k, 32k, 128k):
  dynamic  transformers `model.generate(ids, max_new_tokens=N, do_sample=False)`, its default dynamic cache;
  static   the same with `cache_implementation="static"` (transformers compiles the decoding step, torch.compile
           mode "reduce-overhead"); a warm-up call at --static-warmup-len tokens first, whose wall time is recorded
           as the compile time; each length's first call (a new cache shape: recompilation) is recorded too;
  planner  `fast = planner.optimize(model, max_len=length + N rounded up to 1024, device=...)`, then
           `fast.generate(ids, max_new_tokens=N, do_sample=False)` (the optimize() and the derivation of the
           prefill/decode graphs are timed separately); one-token steps replay a CUDA graph;
  planner-uncaptured  the same, each step run op by op (no CUDA graph): not in the default --configs.
Every configuration gets one warm-up call at each length (the same N, so a static cache has the timed call's shape),
then one timed call. A streamer timestamps each token as generate emits it (after a device synchronization): time
to first token = prefill (+ the first token's selection), ms per new token = median of the N - 1 gaps between
tokens (the mean too). Peak memory: torch.cuda.max_memory_allocated over the timed call (weights included), and above
what was allocated before it. Tokens are compared with the dynamic cache's at the same length.

Roofline per token: (weight bytes read per token + K/V bytes read per token at that context) / the device-to-device
copy bandwidth measured at the start of the run (bytes read + written). Weights read per token: every parameter once,
except an untied input embedding (a token reads one row). K/V bytes: backends/decode/cost.py's count per layer (the
Mistral shape reads at most its window). The attention part alone: the split-K decoding kernel
(backends.decode.decode_attention) timed by itself on caches of that context (triton.testing.do_bench, median), times
the layers, against the K/V bytes over the copy bandwidth.

Budget: --budget-s seconds for everything; a configuration at a length is skipped (recorded with its reason) when
its prediction (from the same configuration at the previous length: prefill quadratic, decoding linear in the
length) does not fit what is left, and a hard alarm --grace-s after the budget ends the measuring and prints what
was measured. Every configuration runs in try/except: an error is recorded with its first line (and a short
traceback on stderr); out-of-memory is recorded as such. Memory is freed between configurations.

Diagnostics: --check-errors records what the planner's decode check compares (the last position's logits against the
full forward on a 13-token prompt, after prefill and 2 decoded tokens), in the run's dtype and in float32, with
transformers' own cache beside it; --force-cached-decode decodes from the planner's caches even where that check
failed (recorded as forced in the record and the table); --no-kernel skips the decoding kernel timed alone.

Output: progress on stderr; under --out: generate.jsonl (one record per line), generate_table.md, and (if matplotlib
is there) generate.png; the markdown tables last on stdout.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_generate.py --budget-s 330 --out $OUT     # GPU
    PYTHONPATH=. python benchmarks/bench_generate.py --smoke --out /tmp/gen                           # CPU check
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from bench_e2e import build_model, model_specs  # noqa: E402  (the same models as the e2e benchmark)

GIB = 1024 ** 3
CONFIGS = ("dynamic", "static", "planner", "planner-uncaptured", "planner-linear")
MODEL_KEYS = {"llama": "llama-3.2-1b", "mistral": "mistral-1b-w4096"}
# Guesses before anything is measured (seconds on an H100/H200; only for the budget's decisions).
GUESS = {"static_compile": 90.0, "optimize": 15.0, "call_8k": 3.0}


class BudgetExceeded(BaseException):
    """Raised by the alarm after the budget (a BaseException: `except Exception` does not swallow it)."""


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def parse_lengths(text: str) -> list[int]:
    from planner.lengths import parse_length

    return [parse_length(part.strip(), name="--lengths") for part in text.split(",") if part.strip()]


def fmt_len(tokens: int) -> str:
    from planner.lengths import format_length

    return format_length(tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


class TokenClock:
    """A generate streamer that timestamps each put (the prompt, then every new token), after a device sync."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.deadline = START + args.budget_s
        self.records: list[dict] = []
        self.dynamic_tokens: dict = {}
        self.linearized: dict = {}  # model name -> planner.linearize result (planner-linear)
        self.bandwidth: Optional[float] = None
        self.out = Path(args.out) if args.out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "generate.jsonl").write_text("")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def record(self, **fields: Any) -> dict:
        record = {"time_s": round(time.perf_counter() - START, 1), **fields}
        self.records.append(record)
        if self.out:
            with open(self.out / "generate.jsonl", "a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        shown = {k: v for k, v in record.items() if k not in ("tokens",)}
        log(f"record {json.dumps(shown, default=str)}")
        return record

    # -- the copy bandwidth ------------------------------------------------------------------------------------------

    def measure_bandwidth(self) -> float:
        """Device-to-device copy of 2 GiB (CPU: 256 MiB), bytes read + written over the median time of 10."""
        size = (2 * GIB if self.cuda else 256 * 1024 ** 2) // 4
        source = torch.randn(size, device=self.device)
        target = torch.empty_like(source)
        times = []
        for index in range(13):
            self.sync()
            begin = time.perf_counter()
            if self.cuda:
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
                target.copy_(source)
                end_event.record()
                end_event.synchronize()
                seconds = start_event.elapsed_time(end_event) / 1e3
            else:
                target.copy_(source)
                seconds = time.perf_counter() - begin
            if index >= 3:
                times.append(seconds)
        bandwidth = 2 * source.numel() * source.element_size() / statistics.median(times)
        del source, target
        self.free()
        self.record(kind="bandwidth", bytes_per_s=bandwidth, copy_bytes=2 * size * 4)
        self.bandwidth = bandwidth
        return bandwidth

    # -- one generate call -------------------------------------------------------------------------------------------

    def call(self, generate, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> dict:
        """One timed generate call: tokens, time to first token, per-token gaps, wall, peak memory."""
        clock = TokenClock(self.cuda)
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated() if self.cuda else 0
        begin = time.perf_counter()
        with torch.no_grad():
            tokens = generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              streamer=clock, **kwargs)
        self.sync()
        wall = time.perf_counter() - begin
        peak = torch.cuda.max_memory_allocated() if self.cuda else 0
        stamps = clock.times
        new = tokens[0, ids.shape[1]:].tolist()
        result = {"wall_s": wall, "tokens": new, "new_tokens": len(new), "peak_bytes": peak,
                  "peak_above_bytes": peak - allocated}
        if len(stamps) >= 2:
            gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
            result["ttft_s"] = stamps[1] - begin
            result["decode_steps"] = len(gaps)
            if gaps:
                result["ms_per_token"] = 1e3 * statistics.median(gaps)
                result["ms_per_token_mean"] = 1e3 * statistics.fmean(gaps)
                result["ms_per_token_min"] = 1e3 * min(gaps)
        return result

    def compare(self, model_name: str, length: int, tokens: list) -> tuple[Optional[bool], Optional[int]]:
        reference = self.dynamic_tokens.get((model_name, length))
        if reference is None:
            return None, None
        if tokens == reference:
            return True, None
        first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
        return False, first

    # -- roofline ------------------------------------------------------------------------------------------------------

    def roofline(self, model: torch.nn.Module, context: int) -> dict:
        from backends.decode.cost import kv_bytes_read_per_step

        config = model.config
        unique = {id(p): p for p in model.parameters()}.values()
        weights = sum(p.numel() * p.element_size() for p in unique)
        embedding = model.get_input_embeddings().weight
        if not getattr(config, "tie_word_embeddings", False) and embedding is not model.get_output_embeddings().weight:
            weights -= embedding.numel() * embedding.element_size()  # a token reads one row of an untied embedding
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        per_layer = kv_bytes_read_per_step(context, config.num_key_value_heads, head_dim, embedding.element_size(),
                                           window=window, rolling=window is not None and window < context)
        kv = per_layer * config.num_hidden_layers
        bandwidth = self.bandwidth or float("nan")
        return {"weights_read_bytes": weights, "kv_read_bytes": kv,
                "roofline_ms": 1e3 * (weights + kv) / bandwidth, "kv_roofline_ms": 1e3 * kv / bandwidth}

    def decode_kernel(self, spec_name: str, model: torch.nn.Module, lengths: list[int]) -> None:
        """The split-K decoding kernel alone on caches of each context (1 token, batch 1): the attention part."""
        if not self.cuda:
            self.record(kind="kernel", model=spec_name, status="skipped", reason="CPU: the Triton kernel needs CUDA")
            return
        import triton

        from backends.decode.cache import cache_slots
        from backends.decode.op import DecodeOptions, decode_attention

        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        for length in lengths:
            try:
                context = length + self.args.new_tokens
                rolling = window is not None and window < context
                options = DecodeOptions(scale=head_dim ** -0.5, window=window, rolling=rolling)
                slots = cache_slots(context, window=window, rolling=rolling)
                q = torch.randn(1, config.num_attention_heads, 1, head_dim, device=self.device, dtype=self.dtype)
                k = torch.randn(1, config.num_key_value_heads, slots, head_dim, device=self.device, dtype=self.dtype)
                v = torch.randn_like(k)
                cache_len = torch.tensor([length + 1], device=self.device)
                run = lambda: decode_attention(q, k, v, cache_len, options)  # noqa: E731
                run()
                ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
                roof = self.roofline(model, length + 1)
                layers = config.num_hidden_layers
                # As a decode step runs it: one call per layer, replayed from a CUDA graph (no dispatch between).
                graphed = graphed_ms(lambda: [run() for _ in range(layers)])
                self.record(kind="kernel", model=spec_name, length=length, status="ok", ms_per_layer=ms,
                            ms_all_layers=graphed, ms_all_layers_dispatched=ms * layers,
                            kv_roofline_ms=roof["kv_roofline_ms"], ratio=graphed / roof["kv_roofline_ms"],
                            slots=slots)
                if length == max(lengths) and self.args.kernel_sweep:
                    self.sweep_kernel(spec_name, q, k, v, cache_len, options, layers, roof["kv_roofline_ms"])
                del q, k, v
            except Exception as error:  # noqa: BLE001
                traceback.print_exc(limit=4)
                self.record(kind="kernel", model=spec_name, length=length, status="error", reason=first_line(error))
            self.free()

    def sweep_kernel(self, spec_name: str, q, k, v, cache_len, options, layers: int, roofline_ms: float) -> None:
        """Launch settings of the decoding kernel (splits, block, warps, stages) at one context, graphed as above."""
        from backends.decode.triton import decode_forward

        keywords = dict(scale=options.scale, window=options.window, sinks=0, softcap=None, rolling=options.rolling)
        for splits in (0, 66, 132, 264):
            for block_n in (64, 128):
                for warps, stages in ((4, 2), (4, 3), (8, 3), (4, 4)):
                    if self.left() < 20:
                        return
                    try:
                        def run():
                            return decode_forward(q, k, v, cache_len, num_splits=splits or None, block_n=block_n,
                                                  num_warps=warps, num_stages=stages, **keywords)

                        run()
                        ms = graphed_ms(lambda: [run() for _ in range(layers)])
                        self.record(kind="kernel_sweep", model=spec_name, splits=splits, block_n=block_n,
                                    warps=warps, stages=stages, status="ok", ms_all_layers=ms,
                                    ratio=ms / roofline_ms)
                    except Exception as error:  # noqa: BLE001
                        self.record(kind="kernel_sweep", model=spec_name, splits=splits, block_n=block_n,
                                    warps=warps, stages=stages, status="error", reason=first_line(error))

    # -- the configurations --------------------------------------------------------------------------------------------

    def predict(self, history: list[dict], length: int, calls: int) -> Optional[float]:
        """Seconds for `calls` calls at `length`, from the last measured call of the same configuration."""
        if not history:
            return None
        last = history[-1]
        ratio = length / last["length"]
        prefill = last.get("ttft_s", last["wall_s"])
        decode = max(0.0, last["wall_s"] - prefill)
        return calls * (prefill * ratio ** 2 + decode * ratio)

    def run_model(self, spec, lengths: list[int], reserve_static: float) -> float:
        """Every configuration at every length for one model; returns the seconds its dynamic+planner phases took.
        The static phase (compile) keeps `reserve_static` seconds for the models after this one."""
        args = self.args
        log(f"building {spec.name}")
        model = build_model(spec, self.device, self.dtype)
        model.config.use_cache = True
        model.generation_config.use_cache = True
        model.generation_config.eos_token_id = None  # random weights: never stop early
        model.generation_config.pad_token_id = None
        model.generation_config.bos_token_id = None
        vocab = model.config.vocab_size
        weights_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        self.record(kind="model", model=spec.name, description=spec.description, weights_bytes=weights_bytes,
                    parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
        if args.check_errors:
            self.check_errors(spec.name, model, [self.dtype, torch.float32] if self.dtype != torch.float32
                              else [torch.float32])
        if args.kernel:
            self.decode_kernel(spec.name, model, lengths)
        phase_start = time.perf_counter()
        configs = [c for c in args.configs if c != "static"]
        for config in configs:
            history: list[dict] = []
            stop_reason: Optional[str] = None
            for length in lengths:
                common = dict(kind="generate", model=spec.name, config=config, length=length)
                if stop_reason:
                    self.record(**common, status="skipped", reason=stop_reason)
                    continue
                predicted = self.predict(history, length, calls=2)
                overhead = GUESS["optimize"] if config.startswith("planner") else 0.0
                guess = predicted if predicted is not None else GUESS["call_8k"] * 2 * max(1.0, length / 8192) ** 2
                if guess + overhead > self.left():
                    self.record(**common, status="skipped", predicted_s=round(guess + overhead, 1),
                                reason=f"predicted {guess + overhead:.0f} s, {self.left():.0f} s of the budget left")
                    stop_reason = "a shorter length did not fit the budget"
                    continue
                result = self.one(spec.name, model, config, length, vocab)
                if result.get("status") == "ok":
                    history.append(result)
                elif result.get("status") in ("oom", "error"):
                    stop_reason = f"{config} failed at {fmt_len(length)}: {result.get('reason')}"
                if result.get("recompute") and not result.get("forced_cached_decode"):
                    stop_reason = "the planner recomputes the whole sequence per token (see the shorter length)"
        phase = time.perf_counter() - phase_start
        if "static" in args.configs:
            self.run_static(spec.name, model, lengths, vocab, reserve_static)
        del model
        self.free()
        return phase

    def one(self, name: str, model: torch.nn.Module, config: str, length: int, vocab: int) -> dict:
        args = self.args
        common = dict(kind="generate", model=name, config=config, length=length)
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(self.device)
        fast = None
        extra: dict = {}
        try:
            if config.startswith("planner"):
                import planner

                max_len = int(math.ceil((length + args.new_tokens) / 1024) * 1024)
                self.sync()
                begin = time.perf_counter()
                if config == "planner-linear":
                    # Every site linearized with the Hedgehog map untrained (steps=0): speed and memory only.
                    if name not in self.linearized:
                        calibration = [torch.randint(0, vocab, (1, 256), device=self.device)]
                        self.linearized[name] = planner.linearize(model, calibration, steps=0)
                    fast = planner.decoder(self.linearized[name], max_len=max_len,
                                           device=args.planner_device or args.device)
                else:
                    fast = planner.optimize(model, max_len=max_len, device=args.planner_device or args.device)
                self.sync()
                extra["optimize_s"] = time.perf_counter() - begin
                extra["max_len"] = max_len
                begin = time.perf_counter()
                generator = fast._generator()  # derives the prefill/decode graphs and checks them (timed apart)
                self.sync()
                extra["derive_s"] = time.perf_counter() - begin
                extra["recompute"] = generator.recompute_because
                extra["graph_failure"] = generator.graph_failure
                if config == "planner-uncaptured":  # the same steps run op by op: what the CUDA graph saves
                    generator.cuda_graphs = False
                if generator.recompute_because and args.force_cached_decode:
                    # Diagnostic only (--force-cached-decode): decode from the caches although the check failed.
                    extra["forced_cached_decode"] = True
                    generator.recompute_because = None
                extra["cache_bytes"] = int(sum(site.bytes_at_max_len for site in generator.sites))
                extra["cache_kinds"] = sorted({f"{site.kind}:{site.slots}" for site in generator.sites})
                generate = fast.generate
            else:
                generate = model.generate
            warm = self.call(generate, ids, args.new_tokens)
            extra["warmup_wall_s"] = warm["wall_s"]
            extra["warmup_ttft_s"] = warm.get("ttft_s")
            extra["warmup_ms_per_token"] = warm.get("ms_per_token")
            result = self.call(generate, ids, args.new_tokens)
            tokens = result.pop("tokens")
            if config == "dynamic":
                self.dynamic_tokens[(name, length)] = tokens
            equal, first = self.compare(name, length, tokens)
            if fast is not None:
                notes = fast.notes if config == "planner-linear" else fast.report.notes
                notes = [n for n in notes if "generat" in n or "decod" in n]
                extra["notes"] = notes[:6]
            return self.record(**common, status="ok", **result, **extra, tokens_equal_dynamic=equal,
                               first_diff=first, tokens=tokens, **self.roofline(model, length))
        except torch.cuda.OutOfMemoryError as error:
            return self.record(**common, status="oom", reason=first_line(error), **extra)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc(limit=12)
            return self.record(**common, status="error", reason=first_line(error), **extra)
        finally:
            del fast
            self.free()

    def check_errors(self, name: str, model: torch.nn.Module, dtypes: list) -> None:
        """What Generator.check compares, with transformers' own dynamic-cache decoding beside it: the relative max
        error (max |logits - full| / max |full|) of the last position's logits against the model's full forward on
        a 13-token random prompt, after prefill (step 0) and after each of 2 decoded tokens, in each dtype."""
        import planner

        for dtype in dtypes:
            fast = None
            try:
                model.to(dtype)
                fast = planner.optimize(model, max_len=1024, device=self.args.planner_device or self.args.device)
                generator = fast._generator()
                failed = generator.recompute_because
                generator.recompute_because = None
                tokens = torch.randint(0, model.config.vocab_size, (1, 16),
                                       generator=torch.Generator().manual_seed(1)).to(self.device)
                planner_errors, transformers_errors = [], []
                with torch.no_grad():
                    state = generator.prefill(tokens[:, :13])
                    out = model(tokens[:, :13], use_cache=True)
                    cache, cached = out.past_key_values, out.logits[:, -1]
                    for step in range(3):
                        end = 13 + step
                        full = model(tokens[:, :end], use_cache=False).logits[:, -1].float()
                        scale = full.abs().max().clamp_min(1e-6)
                        planner_errors.append(((state.logits.float() - full).abs().max() / scale).item())
                        transformers_errors.append(((cached.float() - full).abs().max() / scale).item())
                        state = generator.decode(state, tokens[:, end])[1]
                        out = model(tokens[:, end:end + 1], past_key_values=cache, use_cache=True)
                        cache, cached = out.past_key_values, out.logits[:, -1]
                self.record(kind="check", model=name, dtype=str(dtype).replace("torch.", ""), status="ok",
                            check_failed=failed, planner_errors=planner_errors,
                            transformers_cache_errors=transformers_errors)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc(limit=12)
                self.record(kind="check", model=name, dtype=str(dtype), status="error", reason=first_line(error))
            finally:
                del fast
                model.to(self.dtype)
                self.free()

    def run_static(self, name: str, model: torch.nn.Module, lengths: list[int], vocab: int,
                   reserve_after: float) -> None:
        args = self.args
        common = dict(kind="generate", model=name, config="static")
        need = GUESS["static_compile"]
        if need > self.left() - reserve_after:
            for length in lengths:
                self.record(**common, length=length, status="skipped",
                            reason=f"the static cache's compile (~{need:.0f} s guessed) does not fit the "
                                   f"{self.left() - reserve_after:.0f} s left for it")
            return
        # Warm-up at a short length: transformers compiles the decoding step here.
        short = args.static_warmup_len
        ids = torch.randint(0, vocab, (1, short), generator=torch.Generator().manual_seed(short)).to(self.device)
        try:
            warm = self.call(model.generate, ids, args.new_tokens, cache_implementation="static")
            self.record(kind="static_compile", model=name, status="ok", length=short, compile_wall_s=warm["wall_s"],
                        ms_per_token=warm.get("ms_per_token"), compiled=self.cuda)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc(limit=12)
            self.record(kind="static_compile", model=name, status="error", reason=first_line(error))
            for length in lengths:
                self.record(**common, length=length, status="skipped", reason="the static warm-up failed")
            return
        finally:
            self.free()
        history: list[dict] = []
        stop_reason: Optional[str] = None
        for length in lengths:
            if stop_reason:
                self.record(**common, length=length, status="skipped", reason=stop_reason)
                continue
            predicted = self.predict(history, length, calls=2)
            # The first call at a new cache shape recompiles (automatic dynamic shapes: once, then CUDA graphs).
            guess = (predicted if predicted is not None else GUESS["call_8k"] * 2 * max(1.0, length / 8192) ** 2)
            guess += 0.5 * GUESS["static_compile"] if not history else 10.0
            if guess > self.left() - reserve_after:
                self.record(**common, length=length, status="skipped", predicted_s=round(guess, 1),
                            reason=f"predicted {guess:.0f} s (recompile included), "
                                   f"{self.left() - reserve_after:.0f} s of the budget left for it")
                stop_reason = "a shorter length did not fit the budget"
                continue
            ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(self.device)
            try:
                first = self.call(model.generate, ids, args.new_tokens, cache_implementation="static")
                result = self.call(model.generate, ids, args.new_tokens, cache_implementation="static")
                tokens = result.pop("tokens")
                equal, diff = self.compare(name, length, tokens)
                record = self.record(**common, length=length, status="ok", **result, first_call_wall_s=first["wall_s"],
                                     warmup_ttft_s=first.get("ttft_s"), warmup_ms_per_token=first.get("ms_per_token"),
                                     tokens_equal_dynamic=equal, first_diff=diff, tokens=tokens,
                                     **self.roofline(model, length))
                history.append(record)
            except torch.cuda.OutOfMemoryError as error:
                self.record(**common, length=length, status="oom", reason=first_line(error))
                stop_reason = f"out of memory at {fmt_len(length)}"
            except Exception as error:  # noqa: BLE001
                traceback.print_exc(limit=12)
                self.record(**common, length=length, status="error", reason=first_line(error))
                stop_reason = f"failed at {fmt_len(length)}"
            finally:
                self.free()


# ---------------------------------------------------------------------------------------------------------------------
# Tables and goals


def graphed_ms(work) -> float:
    """Median milliseconds of `work` replayed from a CUDA graph (captured after a warm-up on a side stream)."""
    import triton

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


def gib(value: Optional[float]) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def number(value: Optional[float], digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def tables(records: list[dict], args: argparse.Namespace) -> str:
    lines = []
    bandwidth = next((r["bytes_per_s"] for r in records if r.get("kind") == "bandwidth"), None)
    if bandwidth:
        lines.append(f"Measured device-to-device copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + written).\n")
    generate = [r for r in records if r.get("kind") == "generate"]
    ok = {(r["model"], r["config"], r["length"]): r for r in generate if r.get("status") == "ok"}
    lines.append(f"Batch 1, {args.new_tokens} new tokens, greedy. TTFT: time to first token (prefill). ms/token: "
                 "median gap between new tokens (mean in brackets). Roofline: (weights + K/V read per token) / copy "
                 "bandwidth. Peak: max_memory_allocated over the timed call (weights included; above the memory "
                 "allocated before it in brackets).\n")
    lines.append("| model | config | context | TTFT (s) | ms/token | roofline ms/token | × roofline | dynamic / this | "
                 "static / this | peak GiB (above) | tokens = dynamic | notes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in generate:
        key = (r["model"], r["config"], r["length"])
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['config']} | {fmt_len(r['length'])} | – | – | – | – | – | – | – | – | "
                         f"**{r.get('status')}**: {str(r.get('reason', '')).replace('|', '/')[:160]} |")
            continue
        ms = r.get("ms_per_token")
        dyn = ok.get((r["model"], "dynamic", r["length"]))
        sta = ok.get((r["model"], "static", r["length"]))
        vs_dyn = dyn["ms_per_token"] / ms if dyn and ms else None
        vs_sta = sta["ms_per_token"] / ms if sta and ms else None
        equal = r.get("tokens_equal_dynamic")
        equal_text = "–" if equal is None else ("yes" if equal else f"no (from token {r.get('first_diff')})")
        notes = []
        if r["config"].startswith("planner"):
            if r.get("graph_failure"):
                notes.append(f"no CUDA graph: {r['graph_failure'][:80]}")
            notes.append(f"optimize {r.get('optimize_s', 0):.1f} s, graphs {r.get('derive_s', 0):.1f} s, "
                         f"cache {gib(r.get('cache_bytes'))} GiB")
            if r.get("recompute"):
                notes.append(("check failed, cached decode FORCED: " if r.get("forced_cached_decode") else
                              "RECOMPUTES: ") + r["recompute"][:100])
        if r["config"] == "static":
            notes.append(f"first call {r.get('first_call_wall_s', 0):.1f} s")
        if r.get("new_tokens") != args.new_tokens:
            notes.append(f"{r.get('new_tokens')} tokens")
        lines.append(
            f"| {r['model']} | {r['config']} | {fmt_len(r['length'])} | {number(r.get('ttft_s'), 3)} | "
            f"{number(ms)} ({number(r.get('ms_per_token_mean'))}) | {number(r.get('roofline_ms'))} | "
            f"{number(ms / r['roofline_ms'] if ms and r.get('roofline_ms') else None)} | {number(vs_dyn)} | "
            f"{number(vs_sta)} | {gib(r.get('peak_bytes'))} ({gib(r.get('peak_above_bytes'))}) | {equal_text} | "
            f"{'; '.join(notes)} |")
    compiles = [r for r in records if r.get("kind") == "static_compile"]
    if compiles:
        lines.append("")
        for r in compiles:
            if r.get("status") == "ok":
                lines.append(f"- static cache warm-up ({r['model']}, {r['length']} tokens, compile included): "
                             f"{r['compile_wall_s']:.1f} s" + ("" if r.get("compiled") else " (CPU: not compiled)"))
            else:
                lines.append(f"- static cache warm-up ({r['model']}): **{r.get('status')}**: {r.get('reason')}")
    checks = [r for r in records if r.get("kind") == "check"]
    if checks:
        lines.append("\nThe decode check (13-token prompt, last position's logits against the full forward, relative "
                     "max error after prefill and after 2 decoded tokens):\n")
        lines.append("| model | dtype | planner's check | planner prefill/decode errors | transformers' cache errors |")
        lines.append("|---|---|---|---|---|")
        for r in checks:
            if r.get("status") != "ok":
                lines.append(f"| {r['model']} | {r.get('dtype')} | **error**: {r.get('reason')} | | |")
                continue
            lines.append(f"| {r['model']} | {r['dtype']} | {'failed' if r.get('check_failed') else 'passed'} | "
                         f"{', '.join(f'{e:.1e}' for e in r['planner_errors'])} | "
                         f"{', '.join(f'{e:.1e}' for e in r['transformers_cache_errors'])} |")
    kernels = [r for r in records if r.get("kind") == "kernel"]
    if kernels:
        lines.append("\nThe attention part alone: the split-K decoding kernel (1 token, batch 1) on a cache of that "
                     "context, one call per layer replayed from a CUDA graph (as a decode step runs it; median of "
                     "do_bench), against K/V bytes / copy bandwidth; op by op (each call dispatched from Python) "
                     "beside it:\n")
        lines.append("| model | context | ms all layers (graph) | K/V roofline ms | × roofline | ms per layer, "
                     "dispatched |")
        lines.append("|---|---|---|---|---|---|")
        for r in kernels:
            if r.get("status") != "ok":
                lines.append(f"| {r['model']} | {fmt_len(r['length']) if r.get('length') else '–'} | "
                             f"**{r.get('status')}**: {r.get('reason')} | | | |")
                continue
            lines.append(f"| {r['model']} | {fmt_len(r['length'])} | {r['ms_all_layers']:.3f} | "
                         f"{r['kv_roofline_ms']:.3f} | {r['ratio']:.2f} | {r['ms_per_layer']:.4f} |")
    sweep = sorted((r for r in records if r.get("kind") == "kernel_sweep" and r.get("status") == "ok"),
                   key=lambda r: r["ms_all_layers"])
    if sweep:
        lines.append("\nDecoding kernel launch settings at the longest context (splits 0: the default), graphed, "
                     "fastest first:\n")
        lines.append("| model | splits | block | warps | stages | ms all layers | × roofline |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in sweep[:12]:
            lines.append(f"| {r['model']} | {r['splits']} | {r['block_n']} | {r['warps']} | {r['stages']} | "
                         f"{r['ms_all_layers']:.3f} | {r['ratio']:.2f} |")
    lines.append("")
    lines.extend(goals(records, args))
    return "\n".join(lines)


def goals(records: list[dict], args: argparse.Namespace) -> list[str]:
    """The generation goals (2x the dynamic cache, parity with the static one, roofline, constant cost per token),
    each met / missed / not run, with the figures."""
    ok = {(r["model"], r["config"], r["length"]): r for r in records
          if r.get("kind") == "generate" and r.get("status") == "ok"}
    kernels = {(r["model"], r["length"]): r for r in records if r.get("kind") == "kernel" and r.get("status") == "ok"}
    llama, mistral = (MODEL_KEYS["llama"], MODEL_KEYS["mistral"]) if not args.smoke else \
        ("llama-3.2-1b", "mistral-1b-w4096")
    lengths = args.lengths
    out = ["Generation goals:"]
    for length in lengths:
        planner_r = ok.get((llama, "planner", length))
        for base, target in (("dynamic", 2.0), ("static", 1.0)):
            other = ok.get((llama, base, length))
            if planner_r and other and planner_r.get("ms_per_token") and other.get("ms_per_token"):
                ratio = other["ms_per_token"] / planner_r["ms_per_token"]
                verdict = "met" if ratio >= target else "missed"
                out.append(f"- Llama {fmt_len(length)}: ≥{target:.1f}x {base}: **{verdict}** ({ratio:.2f}x: "
                           f"{other['ms_per_token']:.2f} vs {planner_r['ms_per_token']:.2f} ms/token)")
            else:
                out.append(f"- Llama {fmt_len(length)}: ≥{target:.1f}x {base}: **not run** "
                           f"(planner {'ok' if planner_r else 'missing'}, {base} {'ok' if other else 'missing'})")
    longest = max(lengths)
    kernel = kernels.get((llama, longest))
    if kernel:
        verdict = "met" if kernel["ratio"] <= 1.25 else "missed"
        out.append(f"- Llama {fmt_len(longest)}: attention part within 1.25x of the cache-read roofline: **{verdict}** "
                   f"(decoding kernel {kernel['ms_all_layers']:.3f} ms over {kernel['kv_roofline_ms']:.3f} ms = "
                   f"{kernel['ratio']:.2f}x, kernel timed alone)")
    else:
        out.append(f"- Llama {fmt_len(longest)}: attention part within 1.25x of the roofline: **not run**")
    short, long_ = min(lengths), max(lengths)
    a, b = ok.get((mistral, "planner", short)), ok.get((mistral, "planner", long_))
    if a and b and a.get("ms_per_token") and b.get("ms_per_token"):
        change = b["ms_per_token"] / a["ms_per_token"] - 1
        verdict = "met" if change <= 0.10 else "missed"
        out.append(f"- Mistral ms/token at {fmt_len(long_)} within 10% of {fmt_len(short)}: **{verdict}** "
                   f"({b['ms_per_token']:.2f} vs {a['ms_per_token']:.2f} ms, {100 * change:+.1f}%)")
        ca, cb = a.get("cache_bytes"), b.get("cache_bytes")
        verdict = "met" if ca is not None and ca == cb else "missed"
        out.append(f"- Mistral cache memory independent of context: **{verdict}** (planner's caches "
                   f"{gib(ca)} GiB at {fmt_len(short)}, {gib(cb)} GiB at {fmt_len(long_)}; peak above the weights "
                   f"{gib(a.get('peak_above_bytes'))} vs {gib(b.get('peak_above_bytes'))} GiB)")
    else:
        out.append(f"- Mistral ms/token {fmt_len(long_)} vs {fmt_len(short)} and cache memory: **not run**")
    linear_rows = sorted((r for key, r in ok.items() if key[1] == "planner-linear"), key=lambda r: r["length"])
    if len(linear_rows) >= 2 and linear_rows[0].get("ms_per_token") and linear_rows[-1].get("ms_per_token"):
        a, b = linear_rows[0], linear_rows[-1]
        change = b["ms_per_token"] / a["ms_per_token"] - 1
        same = a.get("cache_bytes") == b.get("cache_bytes")
        verdict = "met" if change <= 0.10 and same else "missed"
        out.append(f"- {a['model']} linearized, constant time and memory per token: **{verdict}** "
                   f"({b['ms_per_token']:.2f} ms at {fmt_len(b['length'])} vs {a['ms_per_token']:.2f} at "
                   f"{fmt_len(a['length'])}, {100 * change:+.1f}%; state {gib(a.get('cache_bytes'))} vs "
                   f"{gib(b.get('cache_bytes'))} GiB)")
    else:
        out.append("- a linearized model, constant time and memory per token: **not run** (--configs planner-linear)")
    return out


def plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    generate = [r for r in records if r.get("kind") == "generate" and r.get("status") == "ok"]
    models = sorted({r["model"] for r in generate})
    if not models:
        return
    figure, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        for config, marker in (("dynamic", "o"), ("static", "s"), ("planner", "^"), ("planner-uncaptured", "v"), ("planner-linear", "D")):
            rows = sorted((r for r in generate if r["model"] == model and r["config"] == config),
                          key=lambda r: r["length"])
            if not rows:
                continue
            x = [r["length"] for r in rows]
            axes[0][column].plot(x, [r.get("ms_per_token") for r in rows], marker=marker, label=config)
            axes[1][column].plot(x, [r["peak_bytes"] / GIB for r in rows], marker=marker, label=config)
        rows = sorted((r for r in generate if r["model"] == model), key=lambda r: r["length"])
        roof = {r["length"]: r["roofline_ms"] for r in rows}
        axes[0][column].plot(sorted(roof), [roof[k] for k in sorted(roof)], "k--", label="roofline")
        axes[0][column].set_title(f"{model}: ms per new token")
        axes[1][column].set_title(f"{model}: peak memory (GiB)")
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_xlabel("context (tokens)")
            axes[row][column].legend()
            axes[row][column].grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    log(f"plot: {path}")


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=None, help="context lengths, e.g. 8k,32k,128k (smoke: 64,128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per call (default 32; smoke 8)")
    parser.add_argument("--models", default="llama,mistral")
    parser.add_argument("--configs", default="dynamic,static,planner")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--grace-s", type=float, default=20.0)
    parser.add_argument("--static-warmup-len", type=int, default=None, help="the static warm-up's prompt (256)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--planner-device", default=None, help="optimize()'s device (default: --device)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs, float32, lengths 64,128")
    parser.add_argument("--no-kernel", dest="kernel", action="store_false", help="skip the decoding kernel alone")
    parser.add_argument("--kernel-sweep", action="store_true",
                        help="also time the decoding kernel's launch settings at the longest context")
    parser.add_argument("--check-errors", action="store_true",
                        help="diagnostic: the decode check's errors (planner and transformers' cache) per dtype")
    parser.add_argument("--force-cached-decode", action="store_true",
                        help="diagnostic: decode from the planner's caches even where its check failed (recorded)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.lengths = parse_lengths(args.lengths or ("64,128" if args.smoke else "8k,32k,128k"))
    args.new_tokens = args.new_tokens or (8 if args.smoke else 32)
    args.static_warmup_len = args.static_warmup_len or (32 if args.smoke else 256)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for config in args.configs:
        if config not in CONFIGS:
            parser.error(f"--configs: {config!r} is not one of {', '.join(CONFIGS)}")
    for model in args.models:
        if model not in MODEL_KEYS:
            parser.error(f"--models: {model!r} is not one of {', '.join(MODEL_KEYS)}")

    import transformers

    bench = Bench(args)
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if bench.cuda else None, "argv": sys.argv[1:]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    bench.record(kind="info", **info)

    def alarm(signum, frame):
        raise BudgetExceeded(f"the budget of {args.budget_s:.0f} s + {args.grace_s:.0f} s grace ran out")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(1, int(args.budget_s + args.grace_s - (time.perf_counter() - START))))
    specs = {spec.name: spec for spec in model_specs(args.smoke)}
    chosen = [specs[MODEL_KEYS[m]] for m in args.models]
    try:
        bench.measure_bandwidth()
        phase_guess = 60.0
        for index, spec in enumerate(chosen):
            remaining_models = len(chosen) - index - 1
            # Keep time for the next models' dynamic and planner runs (the goals' core) before this one's static.
            reserve = remaining_models * phase_guess
            try:
                phase = bench.run_model(spec, args.lengths, reserve_static=reserve)
                phase_guess = max(phase_guess, 1.5 * phase)
            except BudgetExceeded:
                raise
            except Exception as error:  # noqa: BLE001
                traceback.print_exc(limit=12)
                bench.record(kind="model", model=spec.name, status="error", reason=first_line(error))
                bench.free()
    except BudgetExceeded as error:
        log(str(error))
        bench.record(kind="budget", reason=str(error))
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    text = tables(bench.records, args)
    header = (f"Device: {info.get('gpu') or args.device}; torch {info['torch']}, transformers {info['transformers']}"
              f"{', triton ' + info['triton'] if 'triton' in info else ''}; total {time.perf_counter() - START:.0f} s.\n")
    text = header + "\n" + text
    if bench.out:
        (bench.out / "generate_table.md").write_text(text + "\n")
        plot(bench.records, bench.out / "generate.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
