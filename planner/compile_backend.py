"""The torch.compile backend: the planner's passes on each Dynamo graph, then Inductor for the rest of the model.

    torch.compile(model, backend="attention_planner")                       # registered when `planner` is imported
    torch.compile(model, backend="attention_planner", options={"max_len": "128k", "device": "h200"})
    torch.compile(model, backend=planner.backend(max_len="128k", device="h200", policy="exact"))

How one Dynamo graph is compiled:
  1. Dynamo hands over a torch-level graph and its example inputs. It is re-traced to ATen with
     make_fx(pre_dispatch=True) on fake copies of the inputs that keep Dynamo's symbols, so a dynamic sequence length
     stays a symbol for the cost model. Pre-dispatch tracing sits above autograd: scaled_dot_product_attention stays
     one node and nothing has been differentiated yet.
  2. planner.pipeline.run_passes runs the same passes as optimize(): find_sites -> make_plan -> rewrite, under the
     options the backend validated when it was made (the device, if not given, is the one the inputs are on).
  3. Inductor's compile_fx compiles the rewritten graph. Its aot_autograd derives the backward from our custom op's
     registered autograd, so the backward graph calls attention_planner::flash_attention_backward, never autograd
     through a reference.
If step 1 or 2 raises, or Inductor fails on the rewritten graph, the original Dynamo graph goes to plain Inductor and
the report records why: the backend never fails a model that Inductor compiles.

Caching: the rewrite happens before compile_fx, so Inductor's caches (AOTAutogradCache, FX graph cache) key on the
rewritten graph itself and no custom Inductor pass (with its uuid) is involved; a second process that plans the same
way gets the same graph and hits the cache. The keys of graphs with our ops also carry a fingerprint of the files that
define the ops (torch.compiler.config.cache_key_tag), since a cached graph bakes in their fake strides.

Reports: each backend keeps one record per compiled graph (`graphs`) and a merged `report`, which holds the latest
compile of every Dynamo frame (graph breaks add frames; a recompile, e.g. for a new sequence length, replaces its
frame's entry). `planner.last_report()` is the merged report of the backend that compiled last. Every rewritten site
is logged on the "planner" logger at INFO (quiet unless logging is configured); a fallback is logged at WARNING.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from backends.devices import DeviceSpec, device_spec
from passes.errors import InvalidArgumentError
from passes.records import check_policy
from planner.fidelity import require_samples
from planner.lengths import format_length, parse_length
from planner import pipeline
from planner.report import Report

logger = logging.getLogger("planner")

BACKEND_NAME = "attention_planner"
DEFAULT_MAX_LEN = 32 * 1024  # what a dynamic sequence length is planned for when max_len is not given
PLANNER_OPTIONS = ("max_len", "device", "policy", "variant")  # options= keys for the planner; the others go to Inductor
OP_NAMESPACE = "attention_planner"


@dataclass
class GraphRecord:
    """What the backend did with one Dynamo graph.

    compile_id: Dynamo's "frame/recompile" id ("0/0", "1/0", "0/1"); report: the plan for this graph (with the
    sites left as they were if the graph fell back); fallback: why the graph went to plain Inductor unchanged, or None;
    forward_ops / backward_ops: calls of attention_planner ops in the graphs Inductor compiled (backward_ops stays
    empty for an inference graph); from_cache: Inductor took the compiled graphs from its cache, so neither is filled.
    """

    compile_id: str
    report: Report
    fallback: Optional[str] = None
    forward_ops: Counter = field(default_factory=Counter)
    backward_ops: Counter = field(default_factory=Counter)
    from_cache: bool = False

    @property
    def frame(self) -> str:
        return self.compile_id.split("/")[0]


class AttentionPlannerBackend:
    """A torch.compile backend that plans and rewrites attention, then compiles with Inductor.

    Args:
        max_len: the longest sequence to plan a dynamic sequence length for (int or "32k", "128k", "1M"; default
            32k). A graph that Dynamo specialized to one length is planned at that length, the only one it runs;
            torch.compile(..., dynamic=True) or torch._dynamo.mark_dynamic(tensor, dim) makes the length a symbol.
        device: the target to plan for ("h200", "cpu", "cuda", a torch.device or a DeviceSpec); None plans for the
            device the graph's inputs are on.
        policy: "exact" (default), "approximate" or "any".
        variant: force this variant wherever it applies (e.g. "flash"), as optimize(variant=...); None lets the
            planner choose.
        inductor_options: Inductor config patches, as torch.compile's options= (e.g. {"max_autotune": True}).
        eager_backward: compile a training graph's backward at once rather than at the first backward call, so that
            a failure there falls back too and the backward graph's ops are in the record.
    """

    def __init__(
        self,
        max_len: Union[int, str, None] = None,
        device: Union[str, torch.device, DeviceSpec, None] = None,
        policy: str = "exact",
        *,
        variant: Optional[str] = None,
        inductor_options: Optional[dict] = None,
        eager_backward: bool = True,
    ):
        check_policy(policy)
        self.max_len = parse_length(max_len) if max_len is not None else None
        self.device = device_spec(device) if device is not None else None
        self.policy = policy
        # The backend takes no samples: under a policy that admits approximations every graph goes to plain
        # Inductor, with this reason.
        try:
            require_samples(policy, None, None)
            self._refusal: Optional[InvalidArgumentError] = None
        except InvalidArgumentError as error:
            self._refusal = error
        self.variant = variant
        self.inductor_options = dict(inductor_options or {})
        self.eager_backward = eager_backward
        self.graphs: list[GraphRecord] = []
        self.__name__ = BACKEND_NAME  # torch.compile names backends by __name__

    def __repr__(self) -> str:
        device = self.device.name if self.device else "the inputs' device"
        max_len = format_length(self.max_len) if self.max_len else f"{format_length(DEFAULT_MAX_LEN)} (default)"
        return f"AttentionPlannerBackend(max_len={max_len}, device={device}, policy={self.policy})"

    def reset(self) -> None:
        """Forget the records (torch._dynamo.reset() calls this)."""
        self.graphs.clear()

    @property
    def report(self) -> Optional[Report]:
        """One report over the latest compile of every Dynamo frame this backend compiled (None before any)."""
        latest: dict[str, GraphRecord] = {}
        for record in self.graphs:
            latest[record.frame] = record
        if not latest:
            return None
        return merge_reports([record.report for record in latest.values()],
                             model=f"torch.compile ({len(latest)} graph{'s' if len(latest) != 1 else ''})")

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        global _LAST_BACKEND
        _LAST_BACKEND = self
        compile_id = _current_compile_id()
        options = pipeline.PlanOptions(max_len=self.max_len or DEFAULT_MAX_LEN,
                                       device=self.device or device_spec(_device_of(example_inputs)),
                                       policy=self.policy, train=_is_training(example_inputs), variant=self.variant)
        try:
            rewritten = trace_to_aten(graph_module, example_inputs)
            specialized_before = _specializations(rewritten)
            if self._refusal is not None:
                raise self._refusal
            report = pipeline.run_passes(rewritten, options, model_name=f"graph {compile_id}")
            _note_specializations(report, rewritten, specialized_before)
            _fill_missing_meta(rewritten)
        except Exception as error:  # noqa: BLE001 - any failure of our passes must leave the model to Inductor
            _raise_if_dynamo_control_flow(error)
            reason = f"the planner's passes failed on this graph ({type(error).__name__}: {_first_line(error)})"
            return self._fall_back(graph_module, example_inputs, compile_id, reason, options, None)
        report = _describe_graph(report, self.max_len)
        record = GraphRecord(compile_id, report)
        if not report.rewritten:
            # Nothing to rewrite: Inductor gets Dynamo's own graph, exactly as plain Inductor would.
            compiled = self._inductor(graph_module, example_inputs, record)
            self.graphs.append(record)
            return compiled
        try:
            compiled = self._inductor(rewritten, example_inputs, record)
        except Exception as error:  # noqa: BLE001
            _raise_if_dynamo_control_flow(error)
            reason = f"Inductor failed on the rewritten graph ({type(error).__name__}: {_first_line(error)})"
            return self._fall_back(graph_module, example_inputs, compile_id, reason, options, report)
        self.graphs.append(record)
        _log_rewrites(record)
        return compiled

    def _inductor(self, graph_module: torch.fx.GraphModule, example_inputs: Sequence[Any], record: GraphRecord):
        from torch._inductor.compile_fx import compile_fx

        functorch_config = torch._functorch.config
        patches = {}
        if self.eager_backward and hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            patches["force_non_lazy_backward_lowering"] = True
        hits_before = _cache_hits()
        with functorch_config.patch(patches), _cache_key_tagged(graph_module):
            compiled = compile_fx(graph_module, list(example_inputs), inner_compile=_recording_inner_compile(record),
                                  config_patches=self.inductor_options or None)
        record.from_cache = _cache_hits() > hits_before and not record.forward_ops
        return compiled

    def _fall_back(self, graph_module, example_inputs, compile_id: str, reason: str, options: pipeline.PlanOptions,
                   report: Optional[Report]) -> Callable:
        logger.warning("attention-planner: graph %s compiled by plain Inductor: %s", compile_id, reason)
        if report is None:
            report = pipeline.unchanged_report(options, f"graph {compile_id}")
        record = GraphRecord(compile_id, left_as_is(report, reason), fallback=reason)
        compiled = self._inductor(graph_module, example_inputs, record)
        self.graphs.append(record)
        return compiled


_LAST_BACKEND: Optional[AttentionPlannerBackend] = None
_DEFAULT_BACKENDS: dict[tuple, AttentionPlannerBackend] = {}


def backend(
    max_len: Union[int, str, None] = None,
    device: Union[str, torch.device, DeviceSpec, None] = None,
    policy: str = "exact",
    **options: Any,
) -> AttentionPlannerBackend:
    """A torch.compile backend that plans attention for `max_len` tokens on `device` under `policy`, rewrites it, and
    compiles the graph with Inductor: `torch.compile(model, backend=planner.backend(max_len="128k", device="h200"))`.
    See AttentionPlannerBackend for the arguments; after compiling, its `.report` (or `planner.last_report()`) says
    what was done."""
    return AttentionPlannerBackend(max_len, device, policy, **options)


def last_report() -> Optional[Report]:
    """The merged report of the attention-planner backend that compiled last (None if none has compiled yet)."""
    return _LAST_BACKEND.report if _LAST_BACKEND is not None else None


def attention_planner_backend(graph_module: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                              mode: Optional[str] = None, options: Optional[dict] = None) -> Callable:
    """The backend registered as "attention_planner". torch.compile's options= may hold "max_len", "device",
    "policy" and "variant" for the planner; other keys, and mode=, configure Inductor as for backend="inductor"."""
    options = dict(options or {})
    planner_options = {key: options.pop(key) for key in PLANNER_OPTIONS if key in options}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    key = (repr(sorted(planner_options.items(), key=str)), repr(sorted(options.items(), key=str)))
    if key not in _DEFAULT_BACKENDS:
        _DEFAULT_BACKENDS[key] = AttentionPlannerBackend(**planner_options, inductor_options=options)
    return _DEFAULT_BACKENDS[key](graph_module, example_inputs)


def _reset_default_backends() -> None:
    for instance in _DEFAULT_BACKENDS.values():
        instance.reset()


attention_planner_backend.reset = _reset_default_backends  # type: ignore[attr-defined]


def register() -> None:
    """Make backend="attention_planner" known to torch.compile. Where the package is installed, torch finds it through
    the torch_dynamo_backends entry point (and registers it itself on first use); registering here too would then
    collide, so this only registers a source checkout."""
    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or _has_entry_point():
        return
    registry.register_backend(attention_planner_backend, name=BACKEND_NAME)


def _has_entry_point() -> bool:
    try:
        from importlib.metadata import entry_points

        return BACKEND_NAME in entry_points(group="torch_dynamo_backends").names
    except Exception:  # noqa: BLE001 - broken metadata must not stop the import
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Step 1: Dynamo's torch-level graph -> an ATen graph with fake-tensor metadata


def trace_to_aten(graph_module: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """Re-trace a Dynamo graph to pre-dispatch ATen (above autograd, so nothing is differentiated yet). Nodes keep the
    source's nn_module_stack and stack_trace; placeholders keep Dynamo's metadata (sources, static-input marks)."""
    import torch.fx.traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode, fake_inputs = _fake_inputs(graph_module, example_inputs)
    interpreter_class = _interpreter_class()

    def run_graph(*arguments):
        with fx_traceback.preserve_node_meta():
            return interpreter_class(graph_module).run(*arguments)

    with fake_mode:
        traced = make_fx(run_graph, pre_dispatch=True)(*fake_inputs)
    _carry_dynamo_metadata(graph_module, traced)
    _constants_not_buffers(traced)
    _module_paths_from_model_root(traced)
    return traced


_DYNAMO_ROOT = re.compile(r"^[LG]\['[^']*'\](\[\d+\]|\['[^']*'\])*\.?")
_MODULES_ENTRY = re.compile(r"\._modules\['([^']+)'\]")


def module_path_from_root(path: str) -> str:
    """Dynamo names a module by how the compiled function reached it: "L['self'].layers[0].attn", or
    "L['args'][0].model.layers[0].attn" through a decorated forward. The passes name sites from the model's root, as
    torch.export does: "layers[0].attn", "model.layers[0].attn"."""
    path = _MODULES_ENTRY.sub(r".\1", path)
    return _DYNAMO_ROOT.sub("", path).lstrip(".")


def _module_paths_from_model_root(traced: torch.fx.GraphModule) -> None:
    for node in traced.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            # A new dict: the entries may be shared with Dynamo's graph.
            node.meta["nn_module_stack"] = {
                key: (module_path_from_root(path), *rest) for key, (path, *rest) in stack.items()
            }


def _constants_not_buffers(traced: torch.fx.GraphModule) -> None:
    """Tensors the model creates from Python values (torch.tensor([...])) come out of make_fx as `_tensor_constantN`
    buffers. aot_autograd would lift buffers to inputs and look each up among Dynamo's parameter sources; kept as plain
    attributes they stay constants of the graph, as when aot_autograd traces Dynamo's graph itself."""
    for name in [name for name in traced._buffers if name.startswith("_tensor_constant")]:
        value = traced._buffers.pop(name)
        object.__setattr__(traced, name, value)


def _interpreter_class():
    # PropagateUnbackedSymInts is what aot_autograd runs Dynamo graphs with (it binds data-dependent sizes).
    try:
        from torch.fx.experimental.symbolic_shapes import PropagateUnbackedSymInts

        return PropagateUnbackedSymInts
    except ImportError:
        return torch.fx.Interpreter


def _fake_inputs(graph_module: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """Fake copies of the example inputs in the backend's fake mode, with the symbolic sizes Dynamo chose for them."""
    from torch._guards import TracingContext, detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise RuntimeError(f"the graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs came")
    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode()
    tracing_context = TracingContext.try_get()
    fakes = []
    with fake_mode:
        for value, placeholder in zip(example_inputs, placeholders):
            if isinstance(value, FakeTensor):
                fakes.append(value if value.fake_mode is fake_mode else fake_mode.from_tensor(value))
            elif isinstance(value, torch.Tensor):
                context = tracing_context.tensor_to_context.get(value) if tracing_context is not None else None
                fakes.append(fake_mode.from_tensor(
                    value, symbolic_context=context, source=getattr(context, "tensor_source", None)))
            else:
                # Sizes Dynamo made graph inputs: the SymInt it traced with keeps the tensor sizes' symbol.
                fakes.append(placeholder.meta.get("example_value", value))
    return fake_mode, fakes


def _carry_dynamo_metadata(source: torch.fx.GraphModule, traced: torch.fx.GraphModule) -> None:
    """aot_autograd reads Dynamo's marks (compile id, parameter sources, static inputs) off the graph it is given."""
    traced.meta.update({key: value for key, value in source.meta.items() if key not in traced.meta})
    if hasattr(source, "_param_name_to_source"):
        traced._param_name_to_source = source._param_name_to_source
    source_placeholders = [node for node in source.graph.nodes if node.op == "placeholder"]
    traced_placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    for old, new in zip(source_placeholders, traced_placeholders):
        for key, value in old.meta.items():
            new.meta.setdefault(key, value)
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source


def _shape_env_of(graph_module: torch.fx.GraphModule):
    from torch._guards import detect_fake_mode

    values = [node.meta.get("val") for node in graph_module.graph.nodes if node.op == "placeholder"]
    fake_mode = detect_fake_mode([value for value in values if isinstance(value, torch.Tensor)])
    return getattr(fake_mode, "shape_env", None)


def _specializations(graph_module: torch.fx.GraphModule) -> dict:
    shape_env = _shape_env_of(graph_module)
    return dict(shape_env.replacements) if shape_env is not None else {}


def _note_specializations(report: Report, graph_module: torch.fx.GraphModule, before: dict) -> None:
    """A pass that computes with symbolic sizes as numbers makes Dynamo's shape environment specialize them: the
    compiled graph then guards on those values and recompiles for others. Say so where it happened."""
    new = {symbol: value for symbol, value in _specializations(graph_module).items() if symbol not in before}
    if new:
        fixed = ", ".join(f"{symbol} = {value}" for symbol, value in sorted(new.items(), key=str))
        report.notes.append(f"the planner's passes specialized {fixed} in Dynamo's shape environment: this graph "
                            "now guards on it (a pass evaluated a symbolic size as a number)")


def _fill_missing_meta(graph_module: torch.fx.GraphModule) -> None:
    """Give nodes the rewrite emitted a meta["val"] (the fake result of their call), as the rest of the graph has."""
    from torch._guards import detect_fake_mode

    values = [node.meta.get("val") for node in graph_module.graph.nodes if node.op == "placeholder"]
    fake_mode = detect_fake_mode([value for value in values if isinstance(value, torch.Tensor)])
    if fake_mode is None:
        return
    with fake_mode:
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or "val" in node.meta:
                continue
            arguments, keywords = torch.fx.node.map_arg((node.args, node.kwargs), lambda used: used.meta.get("val"))
            node.meta["val"] = node.target(*arguments, **keywords)


# ---------------------------------------------------------------------------------------------------------------------
# Step 3 helpers: Inductor, and what it compiled


def _recording_inner_compile(record: GraphRecord):
    """compile_fx_inner, noting which attention_planner ops the forward and backward graphs call."""

    def inner_compile(graph_module: torch.fx.GraphModule, example_inputs, **kwargs):
        from torch._inductor.compile_fx import compile_fx_inner

        ops = record.backward_ops if kwargs.get("is_backward") else record.forward_ops
        ops.update(planner_ops(graph_module))
        return compile_fx_inner(graph_module, example_inputs, **kwargs)

    return inner_compile


def _cache_key_tagged(graph_module: torch.fx.GraphModule):
    """Inductor's cache keys hold the graph, not the Python behind a custom op. A graph with our ops compiles their
    fake (shape and stride) functions and their autograd into the result, so the key gets a fingerprint of the files
    that define our ops: a changed op recompiles instead of reusing stale strides. Other graphs keep plain keys."""
    compiler_config = getattr(torch.compiler, "config", None)
    if not planner_ops(graph_module) or not hasattr(compiler_config, "cache_key_tag"):
        return contextlib.nullcontext()
    tag = "+".join(part for part in (compiler_config.cache_key_tag, ops_fingerprint(graph_module)) if part)
    return compiler_config.patch(cache_key_tag=tag)


def ops_fingerprint(graph_module: torch.fx.GraphModule) -> str:
    """A digest of the source files that define the attention_planner ops called in the graph (implementation, fake,
    autograd; a backward op lives beside its forward)."""
    import hashlib
    import inspect

    from torch._library.custom_ops import OPDEFS

    files = set()
    for name in planner_ops(graph_module):
        definition = OPDEFS.get(name)
        for function in (getattr(definition, attribute, None) for attribute in
                         ("_init_fn", "_abstract_fn", "_setup_context_fn", "_backward_fn")):
            try:
                files.add(inspect.getsourcefile(function))
            except TypeError:  # None, or a builtin
                continue
    digest = hashlib.sha256()
    for path in sorted(path for path in files if path):
        with open(path, "rb") as source:
            digest.update(source.read())
    return f"{OP_NAMESPACE}-ops-{digest.hexdigest()[:16]}"


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]


def planner_ops(graph_module: torch.fx.GraphModule) -> Counter:
    """How often each attention_planner op ("attention_planner::flash_attention_backward", ...) is called."""
    found: Counter = Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace == OP_NAMESPACE:
            found[node.target._schema.name] += 1
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def left_as_is(report: Report, reason: str) -> Report:
    """The report of a graph compiled unchanged: every site kept as the model wrote it, with `reason`."""
    decisions = tuple(dataclasses.replace(decision, choice=None, reason=f"left as it is: {reason}")
                      for decision in report.plan.decisions)
    plan = dataclasses.replace(report.plan, decisions=decisions)
    return Report(plan=plan, model=report.model, notes=list(report.notes) + [f"graph compiled unchanged: {reason}"])


def merge_reports(reports: list[Report], model: str) -> Report:
    """One report over several graphs (graph breaks): their decisions in order, their notes without repeats."""
    first = reports[0].plan
    decisions = tuple(decision for report in reports for decision in report.plan.decisions)
    plan_notes = _unique(note for report in reports for note in report.plan.notes)
    notes = _unique(note for report in reports for note in report.notes)
    changes = dict(decisions=decisions, notes=tuple(plan_notes), max_len=max(report.plan.max_len for report in reports))
    if len(reports) > 1 and getattr(first, "memory", None) is not None:
        # Each graph's memory fit counts its own part of the model; they do not add up to the model's.
        changes["memory"] = None
        notes.append("the whole-model memory fit is per graph when Dynamo splits the model: see each record's report")
    plan = dataclasses.replace(first, **changes)
    return Report(plan=plan, model=model, notes=notes)


def _describe_graph(report: Report, max_len: Optional[int]) -> Report:
    """Replace the plan's "fixed by the model's code" note, which is not what a static Dynamo graph means."""
    plan = report.plan
    fixed = [decision.site.name for decision in plan.decisions if not decision.site.sequence_symbols]
    notes = [note for note in plan.notes if not note.startswith("the sequence length is fixed by the model's code")]
    if fixed:
        notes.append(
            f"Dynamo compiled {', '.join(fixed)} for the one sequence length it has seen, so costs there are at that "
            "length; a new length recompiles with a symbolic length, planned for max_len (torch.compile(..., "
            "dynamic=True) plans for max_len from the start)")
    if max_len is None and any(decision.site.sequence_symbols for decision in plan.decisions):
        notes.append(f"max_len was not given: a symbolic sequence length is planned for "
                     f"{format_length(DEFAULT_MAX_LEN)} tokens")
    report.plan = dataclasses.replace(plan, notes=tuple(notes))
    return report


def _log_rewrites(record: GraphRecord) -> None:
    for decision in record.report.plan.decisions:
        if decision.rewritten:
            logger.info("attention-planner: graph %s: %s -> %s: %s", record.compile_id, decision.site.name,
                        decision.choice.variant, decision.reason)


def _unique(items) -> list:
    seen, unique = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


def _current_compile_id() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None:
        return "?"
    return f"{compile_id.frame_id}/{compile_id.frame_compile_id}"


def _is_training(example_inputs: Sequence[Any]) -> bool:
    """Dynamo traced with gradients on and some input (a parameter, usually) needs them: aot_autograd will make a
    backward graph."""
    return torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in example_inputs)


def _device_of(example_inputs: Sequence[Any]) -> Union[str, DeviceSpec]:
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return f"cuda:{value.device.index or 0}"
    return "cpu"


def _raise_if_dynamo_control_flow(error: Exception) -> None:
    """Some exceptions are Dynamo's control flow, not failures: RestartAnalysis (e.g. aot_autograd's
    TensorifyScalarRestartAnalysis, which makes Dynamo trace again with a float specialized) must reach Dynamo, which
    then calls the backend again with the new graph."""
    restart = getattr(getattr(torch._dynamo, "exc", None), "RestartAnalysis", None)
    if restart is not None and isinstance(error, restart):
        raise error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
