"""Built-in model presets with their real published configurations, planned without allocating a single weight.

Each preset holds the numbers of the model's published config.json. `plan_preset` builds the model with transformers
on the meta device (so parameters have shapes and no storage), with one representative layer per distinct layer
configuration (1 for uniform models, 2 for Gemma-2's alternating local/global layers), captures it with
torch.export on meta inputs, plans, and applies each representative's decision to every layer of its
configuration. Weights are counted for the full model from the representative layers' parameter counts; training
activations scale with the layer count. The report says all this in its notes.

transformers is optional: presets need it, and say so when it is missing.
"""
from __future__ import annotations

import importlib
import re
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from passes.capture import capture, capture_call, example_call
from passes.errors import InvalidArgumentError, PlannerError
from passes.match import find_sites
from planner.pipeline import PlanOptions, plan_report, plan_sites
from planner.plan import _weights_bytes, format_bytes

EXAMPLE_LENGTH = 67  # odd and unlike any hidden size (see passes/capture.py)
NO_ATTENTION_NOTE = "no softmax attention was found in the graph"  # a plan is only shown: nothing is returned


@dataclass(frozen=True)
class Preset:
    """A published model configuration. config: the values of its config.json that define the architecture."""

    name: str
    repository: str  # where the config is published (Hugging Face Hub id)
    module: str  # transformers.models.<module>
    config_class: str
    model_class: str
    config: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])


_LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}

PRESETS: dict[str, Preset] = {
    preset.name: preset for preset in (
        Preset("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "llama", "LlamaConfig", "LlamaForCausalLM", {
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}),
        Preset("llama-3-70b", "meta-llama/Meta-Llama-3-70B", "llama", "LlamaConfig", "LlamaForCausalLM", {
            "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}),
        Preset("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "llama", "LlamaConfig", "LlamaForCausalLM", {
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE_SCALING, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": False}),
        Preset("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "llama", "LlamaConfig", "LlamaForCausalLM", {
            "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE_SCALING, "factor": 32.0},
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True}),
        Preset("mistral-7b", "mistralai/Mistral-7B-v0.1", "mistral", "MistralConfig", "MistralForCausalLM", {
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
            "rope_theta": 10000.0, "sliding_window": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False}),
        Preset("gemma-2-9b", "google/gemma-2-9b", "gemma2", "Gemma2Config", "Gemma2ForCausalLM", {
            "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "max_position_embeddings": 8192,
            "rope_theta": 10000.0, "sliding_window": 4096, "query_pre_attn_scalar": 256,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True}),
        Preset("qwen2-7b", "Qwen/Qwen2-7B", "qwen2", "Qwen2Config", "Qwen2ForCausalLM", {
            "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
            "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
            "max_window_layers": 28, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}),
    )
}


def preset(name: str) -> Preset:
    key = name.strip().lower()
    if key not in PRESETS:
        raise InvalidArgumentError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))} (or "
                                   "'package.module:function' returning a model)")
    return PRESETS[key]


def _transformers_module(path: str):
    try:
        return importlib.import_module(path)
    except ImportError as error:
        raise PlannerError("model presets are built with transformers, which is not installed: "
                           "pip install transformers (or pip install attention-planner[test])") from error


def build_config(chosen: Preset, layers: Optional[int] = None, attention: str = "sdpa"):
    """The transformers config of a preset (with `layers` layers; the representative layer types kept)."""
    module = _transformers_module(f"transformers.models.{chosen.module}.configuration_{chosen.module}")
    values = dict(chosen.config)
    config = getattr(module, chosen.config_class)(**values, use_cache=False)
    if layers is not None:
        types = getattr(config, "layer_types", None)
        config.num_hidden_layers = layers
        if types:
            config.layer_types = list(representative_layers(types)[1])[:layers]
    config._attn_implementation = attention
    return config


def _supported_attention(chosen: Preset, attention: str) -> str:
    """transformers refuses SDPA for some architectures (Gemma-2: logit soft-capping); those run eager."""
    module = _transformers_module(f"transformers.models.{chosen.module}.modeling_{chosen.module}")
    model_class = getattr(module, chosen.model_class)
    if attention == "sdpa" and not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    return attention


def representative_layers(layer_types) -> tuple[list[int], list[str]]:
    """For a per-layer list of layer types: the first layer of each distinct type, and those types."""
    indices, types = [], []
    for index, kind in enumerate(layer_types):
        if kind not in types:
            indices.append(index)
            types.append(kind)
    return indices, types


def build_model(chosen: Preset, layers: Optional[int] = None, dtype: torch.dtype = torch.bfloat16,
                attention: str = "sdpa") -> torch.nn.Module:
    """The preset's model on the meta device (shapes, no storage), in eval mode."""
    config = build_config(chosen, layers, attention)
    module = _transformers_module(f"transformers.models.{chosen.module}.modeling_{chosen.module}")
    with torch.device("meta"):
        model = getattr(module, chosen.model_class)(config)
    return model.to(dtype).eval()


@dataclass(frozen=True)
class Progress:
    """Progress lines on stderr, each with the seconds since the start; silent when quiet."""

    quiet: bool = False
    start: float = field(default_factory=time.perf_counter)

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:5.1f} s] {message}", file=sys.stderr, flush=True)


def plan_preset(name: str, options: PlanOptions, *, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                attention: str = "sdpa", progress: Optional[Callable[[str], None]] = None):
    """Plan a preset for options.max_len tokens on options.device (options validated by the door, the CLI: see
    PlanOptions.create); returns a planner.Report. No weight memory is allocated."""
    progress = progress or (lambda message: None)
    chosen = preset(name)
    max_len, spec = options.max_len, options.device
    progress(f"building {chosen.name} ({chosen.repository}) on the meta device")
    attention = _supported_attention(chosen, attention)
    full_config = build_config(chosen, None, attention)
    layer_types = list(getattr(full_config, "layer_types", None) or ["decoder"] * chosen.layers)
    representatives, types = representative_layers(layer_types)
    model = build_model(chosen, len(representatives), dtype, attention)
    weights = _full_weights(model, len(representatives), chosen.layers)
    progress(f"capturing {len(representatives)} representative layer(s) of {chosen.layers} with torch.export "
             "(meta tensors)")
    input_ids = torch.zeros((batch, EXAMPLE_LENGTH), dtype=torch.long, device="meta")
    captured = capture(model, (input_ids,), {"logits_to_keep": 1})
    sites = find_sites(captured.graph_module)
    full_sites = _replicate_sites(sites, layer_types, types)
    progress(f"planning {len(full_sites)} attention sites ({len(sites)} captured) for {max_len:,} tokens on "
             f"{spec.name}")
    _, plan = plan_sites(captured.graph_module, options, full_sites, weights_bytes=weights,
                         layer_repeat=chosen.layers / len(representatives), progress=progress)
    report = plan_report(plan, chosen.name, no_attention=NO_ATTENTION_NOTE)
    report.notes.append(
        f"{chosen.name}: config of {chosen.repository}; built on the meta device (no weights allocated); captured "
        f"{len(representatives)} representative layer(s) ({', '.join(types)}) of {chosen.layers}, which hold "
        f"{len(sites)} attention site(s), and applied "
        f"each one's sites and decisions to every layer of its type; weights ({_gigabytes(weights)}) counted for "
        f"all {chosen.layers} layers from the representatives' parameters; logits computed for the last position "
        f"only (logits_to_keep=1); attention as transformers' {attention!r} implementation")
    limit = chosen.config.get("max_position_embeddings")
    if limit and max_len > limit:
        report.notes.append(f"max_len {max_len:,} exceeds {chosen.name}'s max_position_embeddings ({limit:,}): the "
                            "model was not trained for it (the plan is still computed)")
    return report


def _full_weights(model: torch.nn.Module, captured_layers: int, total_layers: int) -> float:
    """Bytes of the full model's parameters: shared ones once, the captured layers' scaled to all layers."""
    everything = _weights_bytes(model)
    layers = _decoder_layers(model)
    per_layers = sum(_weights_bytes(layer) for layer in layers) if layers is not None else 0.0
    return everything - per_layers + per_layers * total_layers / max(captured_layers, 1)


def _decoder_layers(model: torch.nn.Module) -> Optional[torch.nn.ModuleList]:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and "DecoderLayer" in type(module[0]).__name__:
            return module
    return None


_LAYER_INDEX = re.compile(r"(^|\.)layers\.(\d+)(\.|$)")


def _replicate_sites(sites: list, layer_types: list[str], types: list[str]) -> list:
    """Every layer's sites: layer i gets the sites of the captured representative of its type, renamed."""
    by_representative: dict[int, list] = {}
    others = []
    for site in sites:
        match = _LAYER_INDEX.search(site.name)
        if match:
            by_representative.setdefault(int(match.group(2)), []).append(site)
        else:
            others.append(site)
    replicated = []
    for index, kind in enumerate(layer_types):
        representative = types.index(kind)
        for site in by_representative.get(representative, []):
            name = _LAYER_INDEX.sub(lambda match: f"{match.group(1)}layers.{index}{match.group(3)}", site.name,
                                    count=1)
            replicated.append(replace(site, name=name))
    return others + replicated


def _gigabytes(count: float) -> str:
    return format_bytes(count)


def load_model_function(spec: str):
    """'package.module:function' -> what function() returns: a model, or (model, example_inputs)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise InvalidArgumentError(f"model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor "
                                   "'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InvalidArgumentError(f"cannot import {module_name!r} for model {spec!r}: {error}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InvalidArgumentError(f"{module_name} has no function {function_name!r} (model {spec!r})")
    try:
        result = function()
    except Exception as error:  # the user's code: say what failed and what MODEL must be
        raise InvalidArgumentError(f"calling {spec}() to build the model failed with {type(error).__name__}: "
                                   f"{error}; MODEL must be a preset or a function that takes no arguments and "
                                   "returns a model, or (model, example_inputs)") from error
    model = result[0] if isinstance(result, tuple) and len(result) == 2 else result
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"{spec}() returned a {type(model).__name__}; MODEL must return an nn.Module, "
                                   "or (model, example_inputs)")
    return result


def plan_callable(spec: str, options: PlanOptions, *, progress: Optional[Callable[[str], None]] = None):
    """Plan the model that 'package.module:function' returns (a model, or (model, example_inputs)) under `options`
    (validated by the door, the CLI)."""
    progress = progress or (lambda message: None)
    progress(f"calling {spec}")
    result = load_model_function(spec)
    model, example_inputs = (result if isinstance(result, tuple) and len(result) == 2 else (result, None))
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    progress(f"capturing {type(model).__name__} with torch.export")
    captured, _ = capture_call(model, example_call(model, example_inputs, None))
    sites = find_sites(captured.graph_module)
    progress(f"planning {len(sites)} attention sites for {options.max_len:,} tokens on {options.device.name}")
    _, plan = plan_sites(captured.graph_module, options, sites, progress=progress)
    return plan_report(plan, captured.model_name, no_attention=NO_ATTENTION_NOTE)
