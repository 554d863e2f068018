"""Capture: turn a model into an ATen-level torch.fx.GraphModule with the sequence dimension symbolic.

torch.export (non-strict) is the capture: it runs the model's Python as Python, so shape-dependent code works, and
every dimension of every tensor input is marked Dim.AUTO, so the sequence length stays a symbol unless the model's
code specializes it. An already traced GraphModule or an ExportedProgram is accepted as it is.
"""
from __future__ import annotations

import contextlib
import enum
import inspect
import keyword
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from passes.errors import CaptureError, InvalidArgumentError

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


@contextlib.contextmanager
def quiet_export_logs():
    """torch.export logs each dim it fixes (a batch of one, a size-1 dim) as a warning: details of our capture
    hints that the user cannot act on. What capture fixes shows in the report instead."""
    loggers = [logging.getLogger(name) for name in ("torch._export.non_strict_utils", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
            "example_inputs=(tensor, ...) (and example_kwargs=) with a sequence length > 1 (on the command line: "
            "have MODEL's function return (model, example_inputs))"
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
        with quiet_export_logs():
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


# ----------------------------------------------------------------------------------------------------------------------
# Capturing one calling convention of a model
# ----------------------------------------------------------------------------------------------------------------------

CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)


@dataclass(frozen=True)
class CallSignature:
    """What a captured graph of one model call is specialized to, besides tensor sizes: the call's structure (which
    arguments, positional or keyword, bound to the forward's parameters with defaults filled in), the value of every
    non-tensor argument, and the dtype, rank and device of every tensor argument. Two calls with equal signatures
    can run the same graph (subject to its size guards); a call with another signature needs another capture.

    `unsupported` names an argument that no graph can take (an object that is neither a tensor nor a constant, such
    as a KV-cache object): such a call runs the original model."""

    spec: pytree.TreeSpec
    constants: tuple
    tensors: tuple
    unsupported: Optional[str] = None

    def rebuild(self, tensors: tuple) -> tuple[tuple, dict]:
        """The model's (args, kwargs) for this signature, its tensors taken from `tensors` in order."""
        leaves, tensor_iter = [], iter(tensors)
        for constant in self.constants:
            leaves.append(next(tensor_iter) if constant is _TENSOR else constant)
        return pytree.tree_unflatten(leaves, self.spec)


class _TensorSlot:
    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _TensorSlot()


def example_call(model: torch.nn.Module, example_args: Optional[tuple],
                 example_kwargs: Optional[dict]) -> inspect.BoundArguments:
    """The call to capture `model` with: the example inputs given, bound to its forward; token ids guessed (for a
    model with a token embedding) when no tensor is given."""
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module, a torch.fx.GraphModule or an ExportedProgram; got "
                                   f"{type(model).__name__}")
    args, kwargs = tuple(example_args or ()), dict(example_kwargs or {})
    if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves((args, kwargs))):
        (guessed,), _ = guess_example_inputs(model)
        if args:
            raise InvalidArgumentError(f"example_inputs of {type(model).__name__} hold no tensor; pass the tensors "
                                       "the model takes (example_inputs=(tensor, ...), example_kwargs={...})")
        args = (guessed,)
    try:
        return bind_call(model, args, kwargs)
    except TypeError as error:
        raise InvalidArgumentError(f"the example inputs are not a call {type(model).__name__}.forward takes: "
                                   f"{error}; its parameters: {inspect.signature(model.forward)}") from None


def _without_cache(model: torch.nn.Module, kwargs: dict) -> dict:
    """use_cache=False for a model that takes it only through **kwargs (its config has use_cache): else it returns
    a KV-cache object, which no graph can output."""
    parameters = inspect.signature(model.forward).parameters
    takes_keywords = any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values())
    if ("use_cache" not in parameters and takes_keywords and "use_cache" not in kwargs
            and _config_has_use_cache(getattr(model, "config", None))):
        return {**kwargs, "use_cache": False}
    return kwargs


def _config_has_use_cache(config: Any) -> bool:
    """The config, or one of its sub-configs (a composite model's text_config: MOSS-Transcribe-Diarize's), sets
    use_cache."""
    if config is None:
        return False
    if getattr(config, "use_cache", None) is not None:
        return True
    return any(getattr(value, "use_cache", None) is not None for value in vars(config).values()
               if hasattr(value, "to_dict") and not isinstance(value, type))


def bind_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """`args`/`kwargs` bound to `model.forward`'s parameters, defaults filled in. Raises TypeError as the model would
    for a call it does not take."""
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **_without_cache(model, kwargs))
    bound.apply_defaults()
    if "use_cache" in bound.arguments and bound.arguments["use_cache"] is None:
        # A KV-cache object in the outputs is not a tensor a graph can return; a forward call that did not ask for
        # the cache gets none (generation keeps its own).
        bound.arguments["use_cache"] = False
    return bound


def canonical_call(bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    """A bound call as (args, kwargs) in one form however the caller wrote it: every parameter by keyword except
    positional-only ones and *args (forwards wrapped by decorators that edit **kwargs take this form too)."""
    args, kwargs = [], {}
    for name, parameter in bound.signature.parameters.items():
        if name not in bound.arguments:
            continue
        value = bound.arguments[name]
        if parameter.kind == parameter.POSITIONAL_ONLY:
            args.append(value)
        elif parameter.kind == parameter.VAR_POSITIONAL:
            args.extend(value)
        elif parameter.kind == parameter.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def call_signature(bound: inspect.BoundArguments) -> tuple[CallSignature, tuple]:
    """The signature of a bound call and its tensors, in order."""
    call = canonical_call(bound)
    flat, spec = pytree.tree_flatten_with_path(call)
    constants, tensors, described, unsupported = [], [], [], None
    for path, leaf in flat:
        if isinstance(leaf, torch.Tensor):
            constants.append(_TENSOR)
            tensors.append(leaf)
            described.append((leaf.dtype, leaf.dim(), leaf.device.type))
        elif isinstance(leaf, CONSTANT_TYPES):
            constants.append(leaf)
        else:
            constants.append(None)
            unsupported = unsupported or f"argument {_readable_path(pytree.keystr(path))} is a {type(leaf).__name__}"
    return CallSignature(spec, tuple(constants), tuple(described), unsupported), tuple(tensors)


def _readable_path(path: str) -> str:
    """A canonical call's pytree path as an argument name: "[1]['attention_mask']" -> 'attention_mask',
    "[1]['kwargs'][0]" -> 'kwargs.0', '[0][0]' -> 'input_0'."""
    parts = [part.strip("[]'\"") for part in path.replace("][", "]|[").split("|")]
    if parts and parts[0] == "0":
        parts = [f"input_{parts[1]}"] + parts[2:] if len(parts) > 1 else ["input"]
    else:
        parts = parts[1:]
    return ".".join(parts) or "input"


def tensor_input_names(bound: inspect.BoundArguments) -> list[str]:
    """Readable names of a bound call's tensor arguments, in flattening order (for graph placeholders)."""
    names = []
    for path, leaf in pytree.tree_flatten_with_path(canonical_call(bound))[0]:
        if isinstance(leaf, torch.Tensor):
            name = "".join(char if char.isalnum() else "_" for char in _readable_path(pytree.keystr(path)))
            name = name.strip("_") or "input"
            if name[0].isdigit() or name in names or not name.isidentifier() or keyword.iskeyword(name):
                name = f"input_{len(names)}"
            names.append(name)
    return names


class _CallAdapter(torch.nn.Module):
    """The model, called with one signature's tensors as positional inputs: what torch.export captures. It shares
    the model's submodules, parameters and buffers (same dicts), so the captured graph's parameter names and module
    paths are the model's own and its weights are the model's weights, not copies. Its forward's signature names
    each input after the argument it carries, so graph placeholders read 'attention_mask', not 'tensors_1'."""

    def __init__(self, model: torch.nn.Module, signature: CallSignature, names: list[str]):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_signature", signature)

        def forward(adapter, *tensors):
            args, kwargs = adapter._signature.rebuild(tensors)
            return adapter._model(*args, **kwargs)

        positional = inspect.Parameter.POSITIONAL_ONLY
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter("self", positional)] + [inspect.Parameter(name, positional) for name in names])
        object.__setattr__(self, "forward", types.MethodType(forward, self))


# GraphModule.meta key: the torch.autograd.Functions that the capture traced through (their own backward is lost)
CUSTOM_BACKWARDS = "attention_planner_custom_backwards"


@contextlib.contextmanager
def _recording_custom_backwards(found: list):
    """Appends to `found` the name of every torch.autograd.Function (outside torch) applied, while it runs, to a
    tensor that requires grad. Export records a Function's forward ops only: gradients taken through the graph
    follow those ops, not the Function's own backward (a straight-through estimator, a router's custom gradient)."""
    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if (torch.is_grad_enabled() and not cls.__module__.startswith("torch.")
                and any(isinstance(leaf, torch.Tensor) and leaf.requires_grad
                        for leaf in pytree.tree_leaves((args, kwargs)))):
            found.append(cls.__qualname__)
        return original.__func__(cls, *args, **kwargs)

    function.apply = classmethod(apply)
    try:
        yield found
    finally:
        function.apply = original


def capture_call(model: torch.nn.Module, bound: inspect.BoundArguments,
                 widen_batch: bool = True) -> tuple[Capture, CallSignature]:
    """Capture `model` for one bound call: a graph that takes the call's tensors positionally (in flattening order),
    every dimension symbolic unless the model's code fixes it.

    widen_batch: when every tensor has a leading dim of 1 (a batch of one), capture with the batch doubled instead:
    export fixes dims of size 1, and a graph captured at batch 2 serves batch 1 too (the caller re-captures with
    widen_batch=False if the model's code fixes the batch)."""
    signature, tensors = call_signature(bound)
    if widen_batch and tensors and all(tensor.dim() >= 1 and tensor.shape[0] == 1 for tensor in tensors):
        tensors = tuple(torch.cat([tensor, tensor]) for tensor in tensors)
    if signature.unsupported:
        raise CaptureError(f"cannot capture {type(model).__name__} for this call: {signature.unsupported}, which a "
                           "graph cannot take as an input")
    adapter = _CallAdapter(model, signature, tensor_input_names(bound))
    dynamic = tuple({index: Dim.AUTO for index in range(tensor.dim())} or None for tensor in tensors)
    custom_backwards: list[str] = []
    try:
        with quiet_export_logs(), _recording_custom_backwards(custom_backwards):
            exported = torch.export.export(adapter, tensors, dynamic_shapes=dynamic, strict=False)
    except Exception as error:  # export raises many types; the user needs the module and the reason
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {message}"
        ) from error
    graph_module = exported.module()
    if custom_backwards:
        # The forward is exact; gradients through the graph would not be: a call that needs them runs the original
        # (OptimizedModel reads this).
        graph_module.meta[CUSTOM_BACKWARDS] = tuple(sorted(set(custom_backwards)))
    follow_weights_device(graph_module)
    args, kwargs = signature.rebuild(tensors)
    return Capture(graph_module, exported, args, kwargs, type(model).__name__), signature
