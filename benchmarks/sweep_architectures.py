"""Coverage sweep: every architecture family (model type) of the installed
transformers that has a causal-LM, masked-LM, encoder-decoder, vision (image classification) or audio head, built
from its default config shrunk to 2 small layers, in attn_implementation "eager" and "sdpa", through the planner:

  find       capture + find the sites (planner.find_attention; the graph's softmax/SDPA ops are counted beside)
  optimize   planner.optimize(model, "32k", device="h200", policy exact) on the CPU
  capture    fast vs the original at the capture's batch and length
  new_shape  fast vs the original at a new batch size and length (same length where the model fixes it)
  train      one backward through fast (loss = first output .sum()) vs the original's gradients, dropout off
  mode       fast.eval(); fast.train(); fast.eval(), then compared again
  dtype      fast.to(torch.float64) vs the original in float64

Each case runs in its own subprocess with a time limit. A step's failure is recorded (exception type, first line,
the innermost frame in planner/, passes/ or backends/) and the sweep goes on with the next step that can run.

    PYTHONPATH=. python benchmarks/sweep_architectures.py [--only llama,gpt2] [--limit N] [--jobs 1] [--timeout 60]
    PYTHONPATH=. python benchmarks/sweep_architectures.py --report-only      # re-render SWEEP.md from the results

Results go to a JSON-lines file (--results; --resume skips cases already in it); the table to benchmarks/SWEEP.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = Path(tempfile.gettempdir()) / "attention_planner_sweep.jsonl"
DEFAULT_TABLE = REPO / "benchmarks" / "SWEEP.md"
IMPLEMENTATIONS = ("eager", "sdpa")
STEPS = ("find", "optimize", "capture", "new_shape", "train", "mode", "dtype")
# Heads in order of preference: a family is swept once, with the first head it has.
# An encoder-decoder family is swept whole (seq2seq, speech seq2seq) and an encoder as a masked LM, not as their
# decoder-only heads (WhisperForCausalLM, BertLMHeadModel).
HEADS = (
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq"),
    ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("image-cls", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("audio-cls", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "AutoModelForAudioClassification"),
    ("ctc", "MODEL_FOR_CTC_MAPPING_NAMES", "AutoModelForCTC"),
)
# Run first (the rest follows in model-type order), so that a sweep cut short has covered the families most used.
PRIORITY = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
            "phi", "phi3", "gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "mpt", "starcoder2", "olmo", "olmo2",
            "deepseek_v2", "deepseek_v3", "granite", "stablelm", "cohere", "gpt_bigcode", "jamba", "llama4_text",
            "glm", "glm4", "smollm3", "ministral", "bert", "roberta", "distilbert", "deberta-v2", "electra",
            "xlm-roberta", "modernbert", "longformer", "big_bird", "t5", "mt5", "bart", "mbart", "pegasus", "marian",
            "whisper", "vit", "deit", "swin", "dinov2", "wav2vec2", "hubert")
SEED = 0
CAPTURE_BATCH, CAPTURE_LEN = 2, 19
NEW_BATCH, NEW_LEN = 3, 29
VOCAB = 256
RTOL = 1e-4          # outputs: max |fast - original| / max |original|
GRAD_RTOL = 1e-3     # gradients: max |fast - original| / max(max |original|, 1e-3 x the largest gradient anywhere)
# (a key bias has a zero true gradient, softmax being shift-invariant: both sides are rounding noise there)
PRODUCT_DIRS = ("planner", "passes", "backends")


# ---------------------------------------------------------------------------------------------------------------
# Families and configs

def families() -> list[tuple[str, str, str, str]]:
    """(model_type, head, auto class name, model class name), one per model type, in model-type order."""
    from transformers.models.auto import modeling_auto

    chosen: dict[str, tuple[str, str, str, str]] = {}
    for head, mapping_name, auto_name in HEADS:
        for model_type, class_name in getattr(modeling_auto, mapping_name).items():
            if isinstance(class_name, (list, tuple)):
                class_name = class_name[0]
            chosen.setdefault(model_type, (model_type, head, auto_name, class_name))
    return [chosen[key] for key in sorted(chosen)]


LAYER_FIELDS = re.compile(r"^(num_(hidden_|encoder_|decoder_|text_|vision_|audio_)?layers|n_layers?|"
                          r"(encoder|decoder|text|vision|audio)_layers|num_hidden_groups_layers|depth)$")
HIDDEN_FIELDS = ("hidden_size", "d_model", "n_embd", "dim", "hidden_dim", "model_dim", "d_embed", "word_embed_proj_dim",
                 "embedding_size", "projection_dim", "text_hidden_size", "vision_hidden_size")
HEAD_FIELDS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
               "decoder_attention_heads", "attention_heads")
KV_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
HEAD_DIM_FIELDS = ("head_dim", "kv_channels", "d_kv", "attention_head_dim", "attention_head_size", "v_head_dim",
                   "qk_nope_head_dim")
FFN_FIELDS = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
              "ffn_hidden_size", "inner_hidden_size", "mlp_dim", "dim_feedforward", "ffn_size")
SMALL_FFN_FIELDS = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                    "moe_ffn_hidden_size")
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


def _set(config, name: str, value: Any) -> None:
    try:
        setattr(config, name, value)
    except Exception:
        pass


def shrink(config, depth: int = 0):
    """The config with every size made small: 2 layers, hidden 64, 4 heads (2 kv heads), head dim 16, vocab 256,
    dropout 0, image 32x32, conv front ends 32 channels. Sub-configs are shrunk the same way."""
    from transformers import PretrainedConfig

    names = list(vars(config))
    old_layers = next((getattr(config, name) for name in ("num_hidden_layers", "num_layers", "n_layer")
                       if isinstance(getattr(config, name, None), int)), None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, PretrainedConfig) and depth < 3:
            _set(config, name, shrink(value, depth + 1))
        elif isinstance(value, dict) and name.endswith("_config") and depth < 3:
            pass  # plain dict sub-configs are built by the parent config; left as they are
    hierarchical = isinstance(getattr(config, "depths", None), (list, tuple))
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float) and ("dropout" in name or name.endswith("_pdrop") or "drop_prob" in name
                                         or name in ("layerdrop", "drop_path_rate", "encoder_layerdrop",
                                                     "decoder_layerdrop", "mask_time_prob", "mask_feature_prob")):
            _set(config, name, 0.0)
        elif isinstance(value, int) and LAYER_FIELDS.match(name) and value > 2 \
                and not (hierarchical and name == "num_layers"):  # there: the number of stages
            _set(config, name, 2)
        elif isinstance(value, int) and name in HIDDEN_FIELDS and value > 64:
            _set(config, name, 64)
        elif isinstance(value, int) and name in HEAD_FIELDS and value > 4:
            _set(config, name, 4)
        elif isinstance(value, int) and name in KV_FIELDS and value > 2:
            _set(config, name, 2)
        elif isinstance(value, int) and name in HEAD_DIM_FIELDS and value > 16:
            _set(config, name, 16)
        elif isinstance(value, int) and name in ("qk_rope_head_dim", "rotary_dim") and value > 8:
            _set(config, name, 8)
        elif isinstance(value, int) and name in ("kv_lora_rank", "q_lora_rank") and value > 32:
            _set(config, name, 32)
        elif isinstance(value, int) and name in FFN_FIELDS and value > 128:
            _set(config, name, 128)
        elif isinstance(value, int) and name in SMALL_FFN_FIELDS and value > 32:
            _set(config, name, 32)
        elif isinstance(value, int) and name in EXPERT_FIELDS and value > 4:
            _set(config, name, 4)
        elif isinstance(value, int) and name in ("num_experts_per_tok", "moe_topk", "top_k", "n_group",
                                                  "topk_group") and value > 2:
            _set(config, name, 2 if name != "n_group" else 1)
        elif isinstance(value, int) and name == "vocab_size" and value > VOCAB:
            _set(config, name, VOCAB)
        elif isinstance(value, int) and name in ("sliding_window", "attention_chunk_size", "local_attention",
                                                  "attention_window", "window_size") and value > 16 \
                and not hierarchical:
            _set(config, name, 16)
        elif isinstance(value, int) and name == "image_size" and value > 32:
            _set(config, name, 32)
        elif isinstance(value, (list, tuple)) and name == "image_size":
            _set(config, name, [32] * len(value))
        elif isinstance(value, int) and name == "patch_size" and value > 4:
            _set(config, name, 4 if hierarchical else 8)
        elif isinstance(value, int) and name == "max_source_positions" and value > 64:
            _set(config, name, 16)
        elif isinstance(value, int) and name == "num_conv_pos_embeddings" and value > 16:
            _set(config, name, 16)
        elif isinstance(value, (list, tuple)) and name == "conv_dim":
            _set(config, name, [32] * len(value))
        elif isinstance(value, (list, tuple)) and name == "depths":
            _set(config, name, [1] * len(value))
        elif isinstance(value, (list, tuple)) and name in ("num_heads", "num_attention_heads") and hierarchical \
                and isinstance(getattr(config, "embed_dim", None), int):
            _set(config, name, [2] * len(value))
        elif isinstance(value, int) and name == "window_size" and hierarchical and value > 4:
            _set(config, name, 4)
        elif isinstance(value, int) and name == "embed_dim" and hierarchical and value > 32:
            _set(config, name, 32)
    if isinstance(getattr(config, "qk_rope_head_dim", None), int):  # multi-head latent attention: rotary on rope dims
        if isinstance(getattr(config, "num_key_value_heads", None), int):  # and as many key heads as query heads
            _set(config, "num_key_value_heads", config.num_attention_heads)
        if isinstance(getattr(config, "head_dim", None), int):
            _set(config, "head_dim", config.qk_rope_head_dim)
        if isinstance(getattr(config, "qk_head_dim", None), int) and isinstance(getattr(config, "qk_nope_head_dim",
                                                                                        None), int):
            _set(config, "qk_head_dim", config.qk_nope_head_dim + config.qk_rope_head_dim)
    if getattr(config, "num_experts_per_tok", 0) is None and any(isinstance(getattr(config, name, None), int)
                                                                 for name in EXPERT_FIELDS):
        _set(config, "num_experts_per_tok", 2)  # a default config that leaves it unset (deepseek_v2)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        for index, name in enumerate(sorted(name for name in names if name.endswith("token_id"))):
            value = getattr(config, name, None)
            if isinstance(value, int) and value >= vocab:
                _set(config, name, index % 4)
    new_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(old_layers, int) and isinstance(new_layers, int) and new_layers != old_layers:
        for name in names:  # per-layer lists (layer_types, ...) follow the layer count
            value = getattr(config, name, None)
            if isinstance(value, (list, tuple)) and len(value) == old_layers and name != "depths":
                _set(config, name, type(value)(value[:new_layers]))
    return config


# ---------------------------------------------------------------------------------------------------------------
# One case

class Skip(Exception):
    """The case cannot be run (not a planner failure): the reason goes in the table."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line[:220]}"


def _product_frame(error: BaseException) -> Optional[str]:
    """The innermost traceback frame in planner/, passes/ or backends/ (file:line function)."""
    frames = traceback.extract_tb(error.__traceback__)
    found = None
    for frame in frames:
        path = Path(frame.filename).resolve()
        try:
            relative = path.relative_to(REPO)
        except ValueError:
            continue
        if relative.parts and relative.parts[0] in PRODUCT_DIRS:
            found = f"{relative}:{frame.lineno} {frame.name}"
    if found is None and error.__cause__ is not None and error.__cause__ is not error:
        return _product_frame(error.__cause__)
    return found


def _innermost_frame(error: BaseException) -> Optional[str]:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return None
    frame = frames[-1]
    name = frame.filename
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in name:
            name = name.split(marker, 1)[1]
    return f"{name}:{frame.lineno} {frame.name}"


def first_tensor(output: Any):
    import torch
    from torch.utils import _pytree

    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    for leaf in _pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"no floating-point tensor in the output ({type(output).__name__})")


def _relative_error(fast, reference) -> tuple[float, float]:
    import torch

    if fast.shape != reference.shape:
        raise AssertionError(f"shape {tuple(fast.shape)} != original {tuple(reference.shape)}")
    diff = (fast.detach().double() - reference.detach().double()).abs()
    scale = reference.detach().double().abs().max().item() if reference.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    if not torch.isfinite(diff).all():
        return float("inf"), float("inf")
    return max_abs, max_abs / max(scale, 1e-12)


def _vision_config(config):
    for name in ("vision_config", "backbone_config"):
        sub = getattr(config, name, None)
        if sub is not None and getattr(sub, "image_size", None) is not None:
            return sub
    return config


def make_inputs(model, config, head: str, batch: int, length: int, generator) -> tuple[tuple, dict]:
    """Positional and keyword inputs for the model's head at this batch and length."""
    import inspect

    import torch

    main = getattr(model, "main_input_name", "input_ids")
    parameters = inspect.signature(model.forward).parameters
    kwargs: dict = {}
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size",
                                                               None) or VOCAB
        first = torch.randint(4, min(vocab, VOCAB), (batch, length), generator=generator)
        if head == "seq2seq" and "decoder_input_ids" in parameters:
            kwargs["decoder_input_ids"] = torch.randint(4, min(vocab, VOCAB), (batch, length + 2),
                                                        generator=generator)
    elif main == "pixel_values":
        vision = _vision_config(config)
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(vision, "num_channels", 3)
        first = torch.randn(batch, channels, *size[:2], generator=generator)
    elif main == "input_values":
        # front ends of (kernel 10, stride 5) then (3, 2) x 6: 320 samples per frame
        if hasattr(config, "max_length") and hasattr(config, "num_mel_bins"):  # AST: a spectrogram
            first = torch.randn(batch, config.max_length, config.num_mel_bins, generator=generator)
        else:
            first = torch.randn(batch, 320 * length + 80, generator=generator)
    elif main == "input_features":
        if hasattr(config, "num_mel_bins") and hasattr(config, "max_source_positions"):  # Whisper-like: fixed
            first = torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
        else:
            features = getattr(config, "input_feat_per_channel", None) or getattr(config, "feature_size", 80)
            channels = getattr(config, "input_channels", 1)
            first = torch.randn(batch, 4 * length, features * channels, generator=generator)
    else:
        raise Skip(f"main input {main!r} is not swept")
    if head in ("speech-seq2seq",) and "decoder_input_ids" in parameters:
        vocab = getattr(config, "vocab_size", VOCAB)
        kwargs["decoder_input_ids"] = torch.randint(4, min(vocab, VOCAB), (batch, length), generator=generator)
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    return (first,), kwargs


def build(model_type: str, auto_name: str, implementation: str):
    import torch
    import transformers

    config_class = transformers.CONFIG_MAPPING[model_type]
    try:
        config = config_class()
    except Exception as error:
        raise Skip(f"default config cannot be built: {_first_line(error)}")
    try:
        config = shrink(config)
    except Exception as error:
        raise Skip(f"config cannot be shrunk: {_first_line(error)}")
    auto = getattr(transformers, auto_name)
    torch.manual_seed(SEED)
    try:
        model = auto.from_config(config, attn_implementation=implementation, dtype=torch.float32)
    except (ValueError, ImportError) as error:
        message = _first_line(error)
        if implementation != "eager" and ("does not support" in message or "attn_implementation" in message
                                          or "sdpa" in message.lower()):
            raise Skip(f"no {implementation}: {message[:120]}")
        raise Skip(f"model cannot be built: {message}")
    except Exception as error:
        raise Skip(f"model cannot be built: {_first_line(error)}")
    actual = getattr(model.config, "_attn_implementation", None)
    if actual is not None and actual != implementation:
        raise Skip(f"asked for {implementation}, the model runs {actual}")
    model.eval()
    return model, model.config


def count_attention_ops(graph_module) -> dict:
    """SDPA-family calls, and softmax calls fed (within a few hops) by a matmul: the graph's attention, as a check
    on what the detector finds."""
    import torch

    sdpa = softmax = 0
    matmuls = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
               torch.ops.aten.einsum.default}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "scaled_dot_product" in name or "flex_attention" in name:
            sdpa += 1
        elif "softmax" in name and "backward" not in name:
            frontier, seen = [node], 0
            found = False
            while frontier and seen < 12 and not found:
                current = frontier.pop(0)
                seen += 1
                for argument in current.all_input_nodes:
                    if argument.op == "call_function" and argument.target in matmuls:
                        found = True
                        break
                    frontier.append(argument)
            softmax += int(found)
    return {"sdpa": sdpa, "softmax": softmax}


def run_case(model_type: str, implementation: str, head: str = None, auto_name: str = None,
             find_from_report: bool = False) -> dict:
    """Every step for one (architecture, implementation); never raises.

    find_from_report: skip the separate capture of step 1 (a third of a case's time): the sites are read from
    optimize's report, which ran the same capture and finder, and the attention ops are counted in fast's graph."""
    started = time.time()
    result: dict = {"arch": model_type, "impl": implementation, "head": head, "status": "ok", "steps": {},
                    "diffs": {}, "frames": {}}
    try:
        _run_case(model_type, implementation, head, auto_name, result, find_from_report)
    except Skip as skip:
        result["status"] = "skip"
        result["reason"] = str(skip)
    except Exception as error:  # a harness error: recorded, not a planner failure
        result["status"] = "harness-error"
        result["reason"] = _first_line(error)
        result["frames"]["harness"] = _innermost_frame(error)
    result["seconds"] = round(time.time() - started, 1)
    result["finished"] = time.strftime("%H:%M:%S", time.gmtime())
    result["revision"] = _revision()
    return result


def _revision() -> str:
    """The git revision the case ran at, marked '+dirty' where product files differed from it."""
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=str(REPO)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *PRODUCT_DIRS], capture_output=True, text=True,
                               cwd=str(REPO)).stdout.strip()
        return revision + ("+dirty" if dirty else "")
    except Exception:
        return "?"


def _run_case(model_type, implementation, head, auto_name, result, find_from_report=False):
    import torch

    import planner
    from passes.capture import capture_call, example_call
    from passes.match import find_sites

    if head is None or auto_name is None:
        match = next((family for family in families() if family[0] == model_type), None)
        if match is None:
            raise Skip("no swept head")
        _, head, auto_name, _ = match
        result["head"] = head
    torch.manual_seed(SEED)
    model, config = build(model_type, auto_name, implementation)
    result["class"] = type(model).__name__
    generator = torch.Generator().manual_seed(SEED)
    args, kwargs = make_inputs(model, config, head, CAPTURE_BATCH, CAPTURE_LEN, generator)
    try:
        with torch.no_grad():
            reference = first_tensor(model(*args, **kwargs))
    except Exception as error:
        raise Skip(f"the original model fails on the inputs: {_first_line(error)}")
    new_args, new_kwargs = make_inputs(model, config, head, NEW_BATCH, NEW_LEN, generator)
    try:
        with torch.no_grad():
            model(*new_args, **new_kwargs)
        result["new_shape"] = f"B={NEW_BATCH} L={NEW_LEN}"
    except Exception:
        new_args, new_kwargs = make_inputs(model, config, head, NEW_BATCH, CAPTURE_LEN, generator)
        result["new_shape"] = f"B={NEW_BATCH} (length fixed by the model)"
    timings = result.setdefault("timings", {})
    clock = [time.time()]

    def lap(step: str) -> None:
        now = time.time()
        timings[step] = round(now - clock[0], 1)
        clock[0] = now

    steps, diffs, frames = result["steps"], result["diffs"], result["frames"]

    def fail(step: str, error: BaseException) -> None:
        steps[step] = _first_line(error)
        frames[step] = _product_frame(error) or _innermost_frame(error)

    def compare(step: str, fast_module, reference_module, call_args, call_kwargs, grad=False) -> None:
        with torch.no_grad():
            try:
                expected = first_tensor(reference_module(*call_args, **call_kwargs))
            except Exception as error:  # not ours to run: the original cannot either
                steps[step] = f"n/a: the original fails too: {_first_line(error)[:120]}"
                return
            got = first_tensor(fast_module(*call_args, **call_kwargs))
        max_abs, relative = _relative_error(got, expected)
        diffs[step] = max_abs
        steps[step] = "ok" if relative <= RTOL else f"MISMATCH rel {relative:.2e} (abs {max_abs:.2e})"

    # 1. capture + find
    try:
        if find_from_report:
            raise Skip("find from report")
        # what planner.find_attention(model, args, kwargs) does, keeping the graph to count its attention ops
        captured, _ = capture_call(model, example_call(model, args, kwargs), widen_batch=False)
        sites = find_sites(captured.graph_module)
        result["graph_ops"] = count_attention_ops(captured.graph_module)
        del captured
        result["sites"] = len(sites)
        result["masks"] = sorted({site.mask.describe() for site in sites})
        result["forms"] = sorted({site.form for site in sites})
        steps["find"] = "ok"
    except Skip:
        result["find_from_report"] = True
    except Exception as error:
        fail("find", error)
    lap("find")
    # 2. optimize
    try:
        fast = planner.optimize(model, "32k", device="h200", example_inputs=args, example_kwargs=kwargs)
        steps["optimize"] = "ok"
        result["fast_type"] = type(fast).__name__
    except Exception as error:
        fail("optimize", error)
        return
    lap("optimize")
    report = getattr(fast, "report", None)
    if report is not None:
        decisions = list(report.decisions)
        result["planned"] = len(decisions)
        result["rewritten"] = sum(1 for decision in decisions if decision.rewritten)
        result["choices"] = sorted({f"{d.choice.variant}/{d.choice.implementation}" for d in decisions
                                    if d.rewritten})
        result["kept"] = sorted({f"{d.site.mask.describe()}: {d.site.unsupported or d.reason}"[:160]
                                 for d in decisions if not d.rewritten})
        result["kept_count"] = sum(1 for decision in decisions if not decision.rewritten)
        unchanged = [note for note in report.notes if "the model is returned unchanged:" in note]
        if unchanged:  # not capturable: optimize returned the model itself, with the reason
            result["unchanged"] = unchanged[0].split("the model is returned unchanged: ", 1)[1][:300]
        if "masks" not in result:
            result["masks"] = sorted({d.site.mask.describe() for d in decisions})
        if result.get("find_from_report"):
            result["sites"] = len(decisions)
            result["forms"] = sorted({d.site.form for d in decisions})
            graphs = [module for module in [getattr(fast, "graph_module", None), fast]
                      if isinstance(module, torch.fx.GraphModule)]
            if graphs:  # what is left in the graph is kept sites and missed ones: counted back to the original's
                left = count_attention_ops(graphs[0])
                missed = max(0, left["sdpa"] + left["softmax"] - result["kept_count"])
                result["graph_ops"] = {"sdpa": 0, "softmax": len(decisions) + missed, "counted_after_rewrite": 1}
            steps["find"] = "ok"
        if result.get("find_from_report") and "graph_ops" not in result and not result.get("unchanged"):
            # returned unchanged for want of attention: the graph is captured to count what the detector missed
            try:
                captured, _ = capture_call(model, example_call(model, args, kwargs), widen_batch=False)
                result["graph_ops"] = count_attention_ops(captured.graph_module)
                del captured
            except Exception as error:
                result["graph_ops_error"] = _first_line(error)[:200]

    def events() -> list:
        return list(getattr(fast, "_events", None) or [])

    def watch(step: str, before: int) -> None:
        """A call that the wrapper served with the original model (after a failure of ours) is a fallback."""
        new = events()[before:]
        if new:
            result.setdefault("events", {})[step] = [text[:300] for text in new]
        ran_original = [text for text in new if "the original" in text]
        if ran_original and steps.get(step) == "ok":
            steps[step] = "FALLBACK " + ran_original[0][:200]

    # 3. outputs at the capture's shapes, then at a new batch and length
    for step, call_args, call_kwargs in (("capture", args, kwargs), ("new_shape", new_args, new_kwargs)):
        before = len(events())
        try:
            compare(step, fast, model, call_args, call_kwargs)
        except Exception as error:
            fail(step, error)
        watch(step, before)
    lap("compare")
    # 4. a training step, both in train mode (dropout is 0; batch norms use batch statistics): the first output and
    # the gradient of every parameter against the original's
    before = len(events())
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        expected_output = first_tensor(model(*new_args, **new_kwargs))
        expected_output.sum().backward()
        expected = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
                    if parameter.grad is not None}
        model.zero_grad(set_to_none=True)
        for parameter in fast.parameters():
            parameter.grad = None
        fast.train()
        torch.manual_seed(SEED)
        output = first_tensor(fast(*new_args, **new_kwargs))
        _, output_error = _relative_error(output, expected_output)
        output.sum().backward()
        got = {name: parameter.grad for name, parameter in fast.named_parameters() if parameter.grad is not None}
        worst, worst_name, missing = 0.0, None, []
        overall = max((gradient.abs().max().item() for gradient in expected.values() if gradient.numel()),
                      default=0.0)
        for name, gradient in expected.items():
            mine = got.get(name)
            if mine is None:
                missing.append(name)
                continue
            max_abs, _ = _relative_error(mine, gradient)
            scale = max(gradient.abs().max().item() if gradient.numel() else 0.0, 1e-3 * overall, 1e-12)
            relative = max_abs / scale
            if relative > worst:
                worst, worst_name = relative, name
        diffs["train"] = worst
        if output_error > RTOL:
            steps["train"] = f"MISMATCH train-mode output rel {output_error:.2e}"
        elif not got:
            steps["train"] = "MISMATCH no gradient reached fast's parameters"
        elif missing and len(missing) == len(expected):
            steps["train"] = f"MISMATCH parameter names differ (e.g. {missing[0]})"
        elif worst > GRAD_RTOL:
            steps["train"] = f"MISMATCH grad rel {worst:.2e} at {worst_name}"
        elif missing:
            steps["train"] = f"MISMATCH no gradient for {len(missing)} parameters (e.g. {missing[0]})"
        else:
            steps["train"] = "ok"
        for parameter in list(model.parameters()) + list(fast.parameters()):
            parameter.grad = None
    except Exception as error:
        fail("train", error)
    model.eval()
    try:
        fast.eval()
    except Exception:
        pass  # the mode step records it
    watch("train", before)
    lap("train")
    # 5. mode switch
    before = len(events())
    try:
        fast.eval()
        fast.train()
        fast.eval()
        compare("mode", fast, model, new_args, new_kwargs)
    except Exception as error:
        fail("mode", error)
    watch("mode", before)
    lap("mode")
    # 6. dtype change
    before = len(events())
    try:
        # copied now, before fast.to(): fast shares the model's parameters and buffers (batch-norm statistics
        # updated by the train step included), and its .to() converts them
        reference64 = copy.deepcopy(model)
        fast.to(torch.float64)
        reference64.double()
        args64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in new_args)
        kwargs64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in new_kwargs.items()}
        compare("dtype", fast, reference64, args64, kwargs64)
    except Exception as error:
        fail("dtype", error)
    watch("dtype", before)
    lap("dtype")


# ---------------------------------------------------------------------------------------------------------------
# The sweep

def _worker(model_type: str, implementations: str, head: str, auto_name: str) -> None:
    find_from_report = os.environ.get("SWEEP_FIND_FROM_REPORT") == "1"
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for implementation in implementations.split(","):
        result = run_case(model_type, implementation, head, auto_name, find_from_report)
        print("SWEEP-RESULT " + json.dumps(result, default=str), flush=True)


def run_in_subprocess(family: tuple, implementations: list[str], timeout: float) -> list[dict]:
    """One subprocess per family (one import of torch and transformers), its implementations one after the other,
    each within `timeout` seconds: a case over time is killed and the next one goes on in a fresh subprocess."""
    model_type, head, auto_name, _ = family
    results: list[dict] = []
    pending = list(implementations)
    while pending:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type, ",".join(pending), head,
                   auto_name]
        environment = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=environment, cwd=str(REPO))
        started = case_started = time.time()
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        buffer = ""
        timed_out = False
        while True:
            remaining = timeout + 15 * (not results and pending == list(implementations)) - (time.time() - case_started)
            if remaining <= 0:
                timed_out = True
                break
            if not selector.select(timeout=min(remaining, 1.0)):
                if process.poll() is not None:
                    break
                continue
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("SWEEP-RESULT "):
                results.append(json.loads(line[len("SWEEP-RESULT "):]))
                pending.pop(0)
                case_started = time.time()
                if not pending:
                    break
        selector.close()
        if timed_out:
            process.kill()
            process.communicate()
            results.append({"arch": model_type, "impl": pending.pop(0), "head": head, "status": "timeout",
                            "reason": f"over {timeout:.0f} s", "steps": {}, "diffs": {}, "frames": {},
                            "seconds": round(time.time() - case_started, 1), "revision": _revision()})
            continue
        try:
            _, errors = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, errors = process.communicate()
        if pending:  # the worker died without a result
            tail = (errors or "").strip().splitlines()[-1:] or [""]
            results.append({"arch": model_type, "impl": pending.pop(0), "head": head, "status": "harness-error",
                            "reason": f"worker exited {process.returncode}: {tail[0][:200]}", "steps": {},
                            "diffs": {}, "frames": {}, "seconds": round(time.time() - started, 1),
                            "revision": _revision()})
    return results


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    latest: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["arch"], record["impl"])] = record
    return list(latest.values())


def classify(record: dict) -> dict:
    """crashes: steps that raised; mismatches: steps whose outputs differ; fallbacks: steps whose call the returned
    module served by running the original model (after a failure of the rewritten graph, or a call it cannot
    take): correct, but not optimized, and hiding the failure."""
    steps = record.get("steps", {})
    crashes = [step for step, value in steps.items()
               if value != "ok" and not value.startswith(("MISMATCH", "FALLBACK", "n/a"))]
    mismatches = [step for step, value in steps.items() if value.startswith("MISMATCH")]
    fallbacks = [step for step, value in steps.items() if value.startswith("FALLBACK")]
    return {"crashes": crashes, "mismatches": mismatches, "fallbacks": fallbacks}


def softmax_attention(record: dict) -> bool:
    ops = record.get("graph_ops") or {}
    return bool(record.get("sites")) or bool(ops.get("sdpa")) or bool(ops.get("softmax"))


def covered(record: dict) -> bool:
    """Every site found and rewritten or kept with a reason: the graph's attention ops are all sites, and the plan
    rewrote each or says why not."""
    ops = record.get("graph_ops") or {}
    sites = record.get("sites") or 0
    if record.get("steps", {}).get("find") != "ok" or record.get("steps", {}).get("optimize") != "ok":
        return False
    if sites < ops.get("sdpa", 0) + ops.get("softmax", 0):
        return False
    return (record.get("rewritten", 0) + record.get("kept_count", 0)) == sites


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(records: list[dict], command: str, table: Path, expected: Optional[list[str]] = None,
           note: Optional[str] = None) -> str:
    """The Markdown table and summary; `expected`: the model types the sweep was asked for (those without a record
    are listed as not reached)."""
    import torch
    import transformers

    records = sorted(records, key=lambda record: (record["arch"], IMPLEMENTATIONS.index(record["impl"])
                                                  if record["impl"] in IMPLEMENTATIONS else 9))
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=str(REPO)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *PRODUCT_DIRS], capture_output=True, text=True,
                               cwd=str(REPO)).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except Exception:
        revision, dirty = "?", []
    fast_types = sorted({record.get("fast_type") for record in records if record.get("fast_type")})
    lines = [
        "# Architecture sweep: every transformers family through the planner",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, float32, seed {SEED}, "
        f"git revision {revision}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        + (f"; product files changed in the working tree while it ran: {', '.join(dirty)}" if dirty else "") + ".",
        f"`optimize` returned: {', '.join(fast_types) or '-'}.",
    ]
    by_revision: dict = {}
    for record in records:
        by_revision.setdefault(record.get("revision") or "?", []).append(record)
    if len(by_revision) > 1:
        lines.append("Rows by the revision they ran at: " + "; ".join(
            f"{revision}: {len(group)} cases"
            + (f" ({', '.join(sorted({r['arch'] for r in group}))})" if len(group) <= 40 else "")
            for revision, group in sorted(by_revision.items(), key=lambda item: -len(item[1]))) + ".")
    if note:
        lines.append(note)
    lines += [
        f"Command: `{command}`",
        "",
        f"Each family is built from its default config shrunk to 2 layers (hidden 64, 4 heads, 2 kv heads, head dim 16,"
        f" vocab {VOCAB}, dropout 0, sliding windows 16, images 32x32), with the first head it has of: causal LM, "
        "masked LM, seq2seq, speech seq2seq, image classification, audio classification, CTC. Captured at batch "
        f"{CAPTURE_BATCH} length {CAPTURE_LEN}; `optimize(model, \"32k\", device=\"h200\")` (policy exact). "
        f"Steps: find, optimize, capture (outputs at the capture's shapes), new_shape (batch {NEW_BATCH} length "
        f"{NEW_LEN}), train (model.train() and fast.train(): the first output, then the gradients of every parameter "
        "after first-output.sum().backward()), mode "
        "(eval/train/eval then compare), dtype (`.to(torch.float64)` against the original in float64). "
        f"Mismatch: max |fast - original| / max |original| > {RTOL:g} ({GRAD_RTOL:g} for gradients).",
        "",
        "`graph` is the count of SDPA calls + softmax-over-matmul calls in the captured graph (a check on `sites`); "
        "a step cell shows `ok`, `MISMATCH ...`, `FALLBACK ...` (the returned module ran the original model for that "
        "call, and why), or the exception; `-` did not run.",
        "",
        "| arch | impl | head | status | graph | sites | rewritten | masks | kept (reason) | find | optimize | "
        "capture | new_shape | train | mode | dtype | max abs diff | s |",
        "|" + "---|" * 18,
    ]
    for record in records:
        steps = record.get("steps", {})
        ops = record.get("graph_ops") or {}
        graph = f"{ops.get('sdpa', 0)}+{ops.get('softmax', 0)}" if ops else "-"
        status = record["status"] if record["status"] == "ok" else f"{record['status']}: {record.get('reason', '')}"
        diffs = [value for value in (record.get("diffs") or {}).values() if isinstance(value, (int, float))]
        cells = [record["arch"], record["impl"], record.get("head") or "-", status[:140], graph,
                 record.get("sites", "-"), record.get("rewritten", "-"), ", ".join(record.get("masks", [])) or "-",
                 "; ".join(record.get("kept", [])) or (f"whole model returned unchanged: {record['unchanged'][:120]}"
                                                       if record.get("unchanged") else "-")]
        cells += [steps.get(step, "-")[:90] for step in STEPS]
        cells += [f"{max(diffs):.1e}" if diffs else "-", record.get("seconds", "-")]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    ran = [record for record in records if record["status"] == "ok"]
    crashes = [record for record in ran if classify(record)["crashes"]]
    mismatches = [record for record in ran if classify(record)["mismatches"]]
    fallbacks = [record for record in ran if classify(record)["fallbacks"]]
    fallback_by_step = {step: sum(1 for record in ran if step in classify(record)["fallbacks"]) for step in STEPS}
    by_step = {step: sum(1 for record in ran if step in classify(record)["crashes"]) for step in STEPS}
    mismatch_by_step = {step: sum(1 for record in ran if step in classify(record)["mismatches"]) for step in STEPS}
    skipped = [record for record in records if record["status"] == "skip"]
    timeouts = [record for record in records if record["status"] == "timeout"]
    harness = [record for record in records if record["status"] == "harness-error"]
    attention = [record for record in ran if softmax_attention(record)]
    good = [record for record in attention if covered(record)]
    arch_attention = sorted({record["arch"] for record in attention})
    arch_good = sorted({record["arch"] for record in attention
                        if all(covered(other) for other in attention if other["arch"] == record["arch"])})
    clean = [record for record in ran if not any(classify(record).values())]
    percent = 100.0 * len(good) / len(attention) if attention else 0.0
    arch_percent = 100.0 * len(arch_good) / len(arch_attention) if arch_attention else 0.0
    lines += [
        "",
        "## Summary",
        "",
        f"- cases: {len(records)} ({len({r['arch'] for r in records})} families); ran: {len(ran)}; skipped: "
        f"{len(skipped)}; timed out: {len(timeouts)}; harness errors: {len(harness)}",
        f"- cases with a crash (a step raised): {len(crashes)}; by step: "
        + (", ".join(f"{step} {count}" for step, count in by_step.items() if count) or "none"),
        f"- cases with a mismatch: {len(mismatches)}; by step: "
        + (", ".join(f"{step} {count}" for step, count in mismatch_by_step.items() if count) or "none"),
        f"- cases where fast ran the original model instead of its graph (FALLBACK): {len(fallbacks)}; by step: "
        + (", ".join(f"{step} {count}" for step, count in fallback_by_step.items() if count) or "none"),
        f"- cases with every step ok: {len(clean)} of {len(ran)}",
        f"- softmax-attention cases (sites found, or SDPA/softmax-over-matmul in the graph): {len(attention)}; every "
        f"site found and rewritten or kept with a reason: {len(good)} ({percent:.1f}%); by architecture (both "
        f"implementations): {len(arch_good)} of {len(arch_attention)} ({arch_percent:.1f}%)",
    ]
    unchanged = [record for record in ran if record.get("unchanged")]
    if unchanged:
        lines.append(f"- returned unchanged, torch.export cannot capture them (the report says why; not counted above, "
                     f"their attention unseen): {len(unchanged)}: "
                     + ", ".join(f"{r['arch']}/{r['impl']}" for r in unchanged))
    missed = [record for record in attention if not covered(record)]
    if missed:
        lines.append("- not covered: " + ", ".join(
            f"{r['arch']}/{r['impl']} ({_why_not_covered(r)})" for r in missed))
    reasons: dict = {}
    for record in skipped + timeouts + harness:
        key = re.sub(r"\d+", "N", record.get("reason", ""))[:100]
        reasons.setdefault(key, []).append(f"{record['arch']}/{record['impl']}")
    unreached = sorted(set(expected or ()) - {record["arch"] for record in records})
    if unreached:
        reasons[f"not reached: the sweep was stopped before these families (finish with --resume)"] = unreached
    if reasons:
        lines += ["", "## Not run, by reason", ""]
        for key, cases in sorted(reasons.items(), key=lambda item: -len(item[1])):
            shown = cases if key.startswith("not reached") else cases[:12]
            lines.append(f"- {len(cases)} x {key}: {', '.join(shown)}{' ...' if len(cases) > len(shown) else ''}")
    text = "\n".join(lines) + "\n"
    table.write_text(text)
    return text


def _why_not_covered(record: dict) -> str:
    steps = record.get("steps", {})
    if steps.get("find") != "ok":
        return "find failed"
    if steps.get("optimize") != "ok":
        return "optimize failed"
    ops = record.get("graph_ops") or {}
    if (record.get("sites") or 0) < ops.get("sdpa", 0) + ops.get("softmax", 0):
        return f"{record.get('sites')} sites for {ops.get('sdpa', 0) + ops.get('softmax', 0)} attention ops"
    return "sites not all planned"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--limit", type=int, help="the first N families only")
    parser.add_argument("--jobs", type=int, default=1, help="parallel subprocesses (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case (default 60)")
    parser.add_argument("--impl", default=",".join(IMPLEMENTATIONS), help="attn implementations (eager,sdpa)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON-lines results file")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="Markdown table to write")
    parser.add_argument("--resume", action="store_true", help="skip cases already in --results")
    parser.add_argument("--find-from-report", action="store_true",
                        help="step 1 from optimize's report instead of a separate capture (a third faster)")
    parser.add_argument("--report-only", action="store_true", help="only re-render the table from --results")
    parser.add_argument("--note", help="a line for the table's header (how the results were assembled)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        _worker(*options.worker)
        return 0
    arguments = list(argv if argv is not None else sys.argv[1:])
    if "--note" in arguments:  # the note is in the header already
        del arguments[arguments.index("--note"):arguments.index("--note") + 2]
    command = "PYTHONPATH=. python benchmarks/sweep_architectures.py " + " ".join(
        argument for argument in arguments if not argument.startswith("--note="))
    if options.report_only:
        print(render(load_results(options.results), command.replace(" --report-only", ""), options.table,
                     [family[0] for family in families()], options.note))
        return 0
    selected = families()
    if options.only:
        wanted = [name.strip() for name in options.only.split(",") if name.strip()]
        unknown = set(wanted) - {family[0] for family in selected}
        for name in sorted(unknown):
            print(f"{name}: no swept head in this transformers", file=sys.stderr)
        selected = [family for family in selected if family[0] in wanted]
    if options.limit:
        selected = selected[:options.limit]
    implementations = [name for name in options.impl.split(",") if name]
    if options.find_from_report:
        os.environ["SWEEP_FIND_FROM_REPORT"] = "1"
    if not options.resume and options.results.exists():
        options.results.unlink()
    done = {(record["arch"], record["impl"]) for record in load_results(options.results)} if options.resume else set()
    work = [(family, [name for name in implementations if (family[0], name) not in done]) for family in selected]
    work = [(family, names) for family, names in work if names]
    work.sort(key=lambda item: PRIORITY.index(item[0][0]) if item[0][0] in PRIORITY else len(PRIORITY))
    total = sum(len(names) for _, names in work)
    print(f"{total} cases ({len(work)} families), {options.jobs} at a time, {options.timeout:.0f} s each at most; "
          f"results in {options.results}", flush=True)
    index = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        futures = [pool.submit(run_in_subprocess, family, names, options.timeout) for family, names in work]
        for future in concurrent.futures.as_completed(futures):
            for record in future.result():
                index += 1
                with options.results.open("a") as handle:
                    handle.write(json.dumps(record, default=str) + "\n")
                flags = classify(record)
                print(f"[{index}/{total}] {record['arch']}/{record['impl']}: {record['status']} "
                      f"{record.get('reason', '')[:80]} sites={record.get('sites', '-')} "
                      f"rewritten={record.get('rewritten', '-')} crashes={flags['crashes']} "
                      f"mismatches={flags['mismatches']} fallbacks={flags['fallbacks']} ({record.get('seconds')} s)",
                      flush=True)
    records = load_results(options.results)
    if options.only or options.limit:
        keep = {family[0] for family in selected}
        records = [record for record in records if record["arch"] in keep]
    render(records, command, options.table, [family[0] for family in selected], options.note)
    print(f"wrote {options.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
