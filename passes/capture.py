"""Capture: turn a model into an ATen-level torch.fx.GraphModule with the sequence dimension symbolic.

torch.export (non-strict) is the capture: it runs the model's Python as Python, so shape-dependent code works, and
every dimension of every tensor input is marked Dim.AUTO, so the sequence length stays a symbol unless the model's
code specializes it. An already traced GraphModule or an ExportedProgram is accepted as it is.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.export import Dim

from planner.errors import CaptureError, InvalidArgumentError

DEFAULT_EXAMPLE_LENGTH = 67  # odd, and unlike any hidden size, so that export never confuses it with another dim


@dataclass
class Capture:
    """The graph to plan on and how it was obtained."""

    graph_module: torch.fx.GraphModule
    exported: Optional[torch.export.ExportedProgram]
    example_args: tuple
    example_kwargs: dict
    model_name: str


def _auto_dynamic_shapes(example_args: tuple, example_kwargs: dict):
    def dims_of(value: Any):
        if isinstance(value, torch.Tensor):
            return {index: Dim.AUTO for index in range(value.dim())} or None
        if isinstance(value, (list, tuple)):
            return type(value)(dims_of(item) for item in value)
        if isinstance(value, dict):
            return {key: dims_of(item) for key, item in value.items()}
        return None

    return dims_of(tuple(example_args)), dims_of(dict(example_kwargs))


def guess_example_inputs(model: torch.nn.Module) -> tuple[tuple, dict]:
    """Example inputs for a model that did not come with any: token ids when the model embeds tokens."""
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        embeddings = [module for module in model.modules() if isinstance(module, torch.nn.Embedding)]
        vocab_size = embeddings[0].num_embeddings if embeddings else None
    if vocab_size is None:
        raise InvalidArgumentError(
            f"cannot guess example inputs for {type(model).__name__}: it has no token embedding; pass "
            "example_inputs=(tensor, ...) (and example_kwargs=) with a sequence length > 1"
        )
    device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    if device.type == "meta":
        device = torch.device("cpu")
    input_ids = torch.randint(0, vocab_size, (2, DEFAULT_EXAMPLE_LENGTH), device=device)
    keywords = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        keywords["use_cache"] = False  # a KV-cache object in the outputs is not a tensor export can return
    return (input_ids,), keywords


def capture(model: Any, example_args: Optional[tuple] = None, example_kwargs: Optional[dict] = None) -> Capture:
    """Capture `model` (an nn.Module, a GraphModule or an ExportedProgram) as an ATen graph."""
    if isinstance(model, torch.export.ExportedProgram):
        return Capture(model.module(), model, tuple(example_args or ()), dict(example_kwargs or {}), "ExportedProgram")
    if isinstance(model, torch.fx.GraphModule):
        return Capture(model, None, tuple(example_args or ()), dict(example_kwargs or {}), type(model).__name__)
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module, a torch.fx.GraphModule or an ExportedProgram; got "
                                   f"{type(model).__name__}")
    if example_args is None and not example_kwargs:
        example_args, example_kwargs = guess_example_inputs(model)
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    example_kwargs = dict(example_kwargs or {})
    dynamic_args, dynamic_kwargs = _auto_dynamic_shapes(example_args, example_kwargs)
    try:
        exported = torch.export.export(
            model, example_args, example_kwargs,
            dynamic_shapes=_by_parameter(model, dynamic_args, dynamic_kwargs) if example_kwargs else dynamic_args,
            strict=False,
        )
    except Exception as error:  # export raises many types; the user needs the module and the reason
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        hint = ""
        if "Cache" in message and "use_cache" not in example_kwargs:
            hint = "; the model returns a KV cache: pass example_kwargs={'use_cache': False}"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {message}{hint}"
        ) from error
    graph_module = exported.module()
    _default_constant_keywords(graph_module, example_kwargs)
    follow_weights_device(graph_module)
    return Capture(graph_module, exported, example_args, example_kwargs, type(model).__name__)


def _default_constant_keywords(graph_module: torch.fx.GraphModule, example_kwargs: dict) -> None:
    """Non-tensor keyword inputs given at capture (use_cache=False, return_dict=True, ...) are baked into the graph;
    the captured module insists on receiving them. Fill them in when a caller leaves them out, so that the module is
    called like the model it replaces."""
    constants = {name: value for name, value in example_kwargs.items()
                 if not isinstance(value, torch.Tensor) and isinstance(value, (bool, int, float, str, type(None)))}
    if not constants:
        return

    def fill_in_constants(module, args, kwargs):
        return args, {**constants, **kwargs}

    graph_module.register_forward_pre_hook(fill_in_constants, with_kwargs=True, prepend=True)


def follow_weights_device(graph_module: torch.fx.GraphModule) -> None:
    """Tensors the graph creates (arange for positions, masks, zeros) were captured with the capture's device baked
    in. Make each factory call take its device from a weight at run time instead, so that a module optimized on one
    device runs on whatever device its weights are on (after .to(), .cuda(), copies included)."""
    graph = graph_module.graph
    weight = next((node for node in graph.nodes if node.op == "get_attr"
                   and isinstance(_attribute(graph_module, node.target), torch.Tensor)), None)
    if weight is None:
        return
    captured_on = _attribute(graph_module, weight.target).device
    # Only what was made where the weights were: a tensor the model puts on the CPU on purpose stays there.
    factories = [node for node in graph.nodes if node.op == "call_function"
                 and isinstance(node.kwargs.get("device"), (torch.device, str))
                 and torch.device(node.kwargs["device"]) == captured_on]
    if not factories:
        return
    with graph.inserting_after(weight):
        weights_device = graph.call_function(getattr, (weight, "device"))
    for node in factories:
        node.kwargs = {**node.kwargs, "device": weights_device}
    graph_module.recompile()


def _attribute(module: torch.nn.Module, target: str):
    for name in target.split("."):
        module = getattr(module, name, None)
    return module


def _by_parameter(model: torch.nn.Module, dynamic_args: tuple, dynamic_kwargs: dict) -> dict:
    """export wants dynamic_shapes keyed by forward's parameter names when kwargs are present."""
    parameters = [
        name for name, parameter in inspect.signature(model.forward).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    shapes = {}
    for index, dims in enumerate(dynamic_args):
        if index >= len(parameters):
            raise InvalidArgumentError(f"{type(model).__name__}.forward takes {len(parameters)} positional inputs; "
                                       f"example_inputs has {len(dynamic_args)}")
        shapes[parameters[index]] = dims
    shapes.update(dynamic_kwargs)
    return shapes
