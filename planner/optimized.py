"""What `planner.optimize` returns: the user's model, with its attention rewritten.

`OptimizedModel` behaves as the model it wraps. It shares the model's submodules, parameters and buffers (the same
objects, under the same names), so `state_dict()`, `parameters()`, `.to()`, `.half()`, `.eval()`/`.train()`,
`load_state_dict`, optimizers and `save_pretrained` all act on the user's own weights; any other attribute
(`config`, `generation_config`, `generate`, ...) is the model's.

Calls are served by captured graphs, one per *call signature* (the call's arguments bound to the model's forward,
the value of each non-tensor argument, each tensor's dtype and rank, the modules' train/eval flags and the weights'
dtypes and devices). A call whose signature has no graph yet is captured and planned for it, as torch.compile
recompiles on a failed guard; so is a call that a graph's size guards reject (a size the model's code had fixed).
A call that cannot be captured, or whose graph fails where the original runs, runs the original model, and the
report says which and why. Pickling and deepcopy keep the model and the report and drop the graphs, which are
captured again on the next call.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from passes.capture import CUSTOM_BACKWARDS, CallSignature, bind_call, call_signature, capture_call
from planner.errors import InvalidArgumentError, PlannerError
from planner.fidelity import as_batches
from planner.pipeline import PlanOptions, run_passes
from planner.report import Report
from planner.token_loop import generate_with

MAX_CAPTURES_PER_SIGNATURE = 8  # past this many size specializations of one signature, calls run the original


@dataclass
class _Graph:
    module: torch.fx.GraphModule
    report: Report


@dataclass
class _Signature:
    """The graphs captured for one call signature, or why calls of that signature run the original."""

    graphs: list[_Graph] = field(default_factory=list)
    original_because: Optional[str] = None


def _is_guard_failure(error: Exception) -> bool:
    """Raised by a captured graph's input checks (before any of it runs): the call's sizes are outside what the
    capture covers."""
    text = str(error)
    return "Guard failed" in text or text.startswith("Expected input at")


class OptimizedModel(torch.nn.Module):
    """The user's model with its attention sites rewritten by the planner (see the module docstring).

    Attributes:
        report: the planner.Report of the graph that served the latest call (at first, of the capture made by
            optimize); its notes list every re-capture and every call that ran the original, with the reason.
        graph_module: the rewritten torch.fx.GraphModule that served the latest call (None after unpickling, until
            the next call captures again).
    """

    def __init__(self, model: torch.nn.Module, options: PlanOptions, bound: inspect.BoundArguments):
        super().__init__()
        # Shared, not copied: the wrapper's parameters, buffers and submodules are the model's own.
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.training = model.training
        object.__setattr__(self, "_original", model)
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_signatures", {})
        object.__setattr__(self, "_events", [])
        object.__setattr__(self, "report", None)
        object.__setattr__(self, "graph_module", None)
        self._capture(bound, reason=None)

    # ------------------------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = bind_call(self._original, args, kwargs)
        except TypeError:
            return self._original(*args, **kwargs)  # a call the model does not take fails as the model fails
        signature, tensors = call_signature(bound)
        key = (signature, self._state())
        entry = self._signatures.get(key)
        if entry is None:
            same_call = any(known == signature for known, _ in self._signatures)
            reason = "a new mode, dtype or device of the weights" if same_call else "a new call signature"
            entry = self._capture(bound, reason=reason, signature=signature, key=key)
        if entry.original_because is not None:
            return self._original(*args, **kwargs)
        for graph in entry.graphs:
            custom = graph.module.meta.get(CUSTOM_BACKWARDS)
            if custom and torch.is_grad_enabled() and (any(tensor.requires_grad for tensor in tensors) or any(
                    parameter.requires_grad for parameter in self._original.parameters())):
                self._note(f"a call that needs gradients runs the original: the graph traced {', '.join(custom)}, "
                           "a torch.autograd.Function whose own backward a captured graph does not keep")
                return self._original(*args, **kwargs)
            try:
                output = graph.module(*tensors)
            except Exception as error:  # any failure of ours must leave the user where the original leaves them
                if _is_guard_failure(error):
                    continue
                return self._run_original_after(error, entry, args, kwargs)
            object.__setattr__(self, "report", graph.report)
            object.__setattr__(self, "graph_module", graph.module)
            return output
        if len(entry.graphs) >= MAX_CAPTURES_PER_SIGNATURE:
            entry.original_because = (f"{MAX_CAPTURES_PER_SIGNATURE} captures of one call signature did not cover "
                                      "its sizes")
            self._note(f"calls of this signature run the original: {entry.original_because}")
            return self._original(*args, **kwargs)
        self._capture(bound, reason="sizes outside the captured graphs' guards", signature=signature, key=key)
        return self.forward(*args, **kwargs)

    def _run_original_after(self, error: Exception, entry: _Signature, args: tuple, kwargs: dict) -> Any:
        output = self._original(*args, **kwargs)  # if the original fails too, its error is the user's error
        entry.original_because = f"the rewritten graph raised {type(error).__name__}: {_first_line(error)}"
        self._note(f"calls of this signature run the original: {entry.original_because}")
        return output

    def _state(self) -> tuple:
        """What a graph is specialized to besides its inputs: the modules' modes and the weights' dtypes/devices."""
        modes = tuple(module.training for module in self._original.modules())
        tensors = {(tensor.dtype, tensor.device) for tensor in self._original.parameters()}
        tensors |= {(tensor.dtype, tensor.device) for tensor in self._original.buffers()}
        return modes, tuple(sorted(tensors, key=str))

    def _capture(self, bound: inspect.BoundArguments, reason: Optional[str],
                 signature: Optional[CallSignature] = None, key: Optional[tuple] = None) -> _Signature:
        if signature is None:
            signature, _ = call_signature(bound)
        key = key if key is not None else (signature, self._state())
        entry = self._signatures.setdefault(key, _Signature())
        if signature.unsupported:
            entry.original_because = f"{signature.unsupported}, which a graph cannot take"
            self._note(f"a call runs the original: {entry.original_because}")
            return entry
        try:
            captured, _ = capture_call(self._original, bound, widen_batch=not entry.graphs)
            report = run_passes(captured.graph_module, self._options_for(signature), captured.model_name)
        except PlannerError as error:
            if self.report is None:
                raise  # optimize() itself: the user learns at once why nothing could be planned
            entry.original_because = str(error)
            self._note(f"a call runs the original: {error}")
            return entry
        entry.graphs.append(_Graph(captured.graph_module, report))
        if reason is not None:
            self._note(f"captured and planned again ({reason}): {_describe_call(bound)}; "
                       f"{len(report.rewritten)} of {len(report.decisions)} sites rewritten")
        report.notes[:0] = [note for note in self._events if note not in report.notes]
        object.__setattr__(self, "report", report)
        object.__setattr__(self, "graph_module", captured.graph_module)
        return entry

    def _options_for(self, signature: CallSignature) -> PlanOptions:
        """The plan options for a graph of `signature`: approximate choices are measured on the calibration batches
        of that signature (in the graph's calling convention); without any, the graph is planned exact."""
        options = self._options
        if options.policy == "exact":
            return options
        batches = []
        for args, kwargs in as_batches(options.calibration):
            try:
                batch_signature, tensors = call_signature(bind_call(self._original, args, kwargs))
            except TypeError as error:
                raise InvalidArgumentError(f"a calibration batch is not a call {type(self._original).__name__} "
                                           f"takes: {error}") from None
            if batch_signature == signature:
                batches.append(tensors)
        if batches:
            return dataclasses.replace(options, calibration=batches)
        if self.report is None:
            raise InvalidArgumentError(
                "no calibration batch is called like the model is captured (same arguments, dtypes and constants): "
                "give calibration batches as the example inputs are given")
        self._note("a call signature without calibration batches is planned under policy 'exact'")
        return dataclasses.replace(options, policy="exact", calibration=None, tolerance=None)

    def _note(self, text: str) -> None:
        if text not in self._events:
            self._events.append(text)
            if self.report is not None and text not in self.report.notes:
                self.report.notes.append(text)

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------------

    def _generator(self):
        """The prefill/decode graphs for the model's current mode, dtype and device (derived once for each)."""
        from planner.generation import Generator

        state = self._state()
        generators = self.__dict__.setdefault("_generators", {})
        if state not in generators:
            inexact = self._inexact_sites()
            # Recomputing through the rewritten model: called with the token ids alone, as samples usually are, so
            # that the call is planned as the samples measured it (another signature would be planned exact).
            generator = Generator(self._original, self._options.max_len, self._options.device.memory_bandwidth,
                                  forward=self, recompute_because=inexact,
                                  reference=(lambda ids: self(ids)) if inexact else None)
            generator.check()
            generators[state] = generator
            for line in generator.plan_lines():
                self._note(line)
        return generators[state]

    def _inexact_sites(self) -> Optional[str]:
        """Why the caches cannot decode this model: sites rewritten into another function (approximate or retrain
        variants), which a cache of the original attention would not follow. None when every rewrite is exact."""
        decisions = self.report.plan.decisions if self.report is not None else ()
        inexact = [f"{decision.site.name} ({decision.choice.variant}, {decision.choice.exactness})"
                   for decision in decisions if decision.rewritten and decision.choice.exactness != "exact"]
        if not inexact:
            return None
        return (f"{', '.join(inexact)} compute another function than the original's attention, which its cache "
                "would not follow: each step runs the rewritten model over the whole sequence")

    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """Run the prompt and fill every site's cache: returns a planner.generation.GenerationState whose `logits`
        are the (batch, vocab) logits at the last position. `attention_mask` may pad rows on the left."""
        return self._generator().prefill(input_ids, attention_mask)

    def decode(self, state, next_ids: torch.Tensor):
        """One step: `next_ids` (batch,) or (batch, T) appended; returns (logits at the last position, state)."""
        return self._generator().decode(state, next_ids)

    def generate(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, *,
                 generation_config: Any = None, streamer: Any = None, **kwargs: Any) -> torch.Tensor:
        """transformers' `generate` for its common cases (greedy; sampling with temperature, top-k, top-p under a
        seed; max_new_tokens/max_length; eos and pad tokens; left-padded batches; streamers), decoding through the
        planner's caches; returns the same tokens. Other options go to the model's own generate (report notes)."""
        return generate_with(self._generator, getattr(self._original, "generate", None), self._note,
                             getattr(self._original, "generation_config", None), input_ids, attention_mask,
                             generation_config, streamer, kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # The user's model
    # ------------------------------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        original = self.__dict__.get("_original")
        if original is None:
            raise AttributeError(name)
        return getattr(original, name)

    def train(self, mode: bool = True) -> "OptimizedModel":
        """Sets train or eval mode on the model (dropout follows it); calls in the new mode use graphs captured in
        that mode."""
        self._original.train(mode)
        self.training = mode
        return self

    @property
    def original(self) -> torch.nn.Module:
        """The model as the user gave it (sharing its weights with this one)."""
        return self._original

    def __getstate__(self) -> dict:
        # Graphs hold generated code and hooks that do not pickle; they are captured again on the next call.
        state = dict(self.__dict__)
        state["_signatures"] = {}
        state["graph_module"] = None
        state.pop("_generators", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict) -> "OptimizedModel":
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    def __repr__(self) -> str:
        rewritten = len(self.report.rewritten) if self.report is not None else 0
        sites = len(self.report.decisions) if self.report is not None else 0
        return f"OptimizedModel({type(self._original).__name__}, {rewritten} of {sites} attention sites rewritten)"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _describe_call(bound: inspect.BoundArguments) -> str:
    parts = []
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}={tuple(value.shape)} {str(value.dtype).replace('torch.', '')}")
    return ", ".join(parts) or "no tensor inputs"
