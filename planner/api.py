"""The public front door: `optimize` and `find_attention`. The torch.compile backend runs the same passes."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional, Union

import torch

from backends.hardware import DeviceSpec
from passes.capture import capture, capture_call, example_call
from passes.errors import CaptureError, InvalidArgumentError
from passes.match import find_sites
from passes.records import AttentionSite
from planner.distributed import partition_model
from planner.optimized import OptimizedModel
from planner.pipeline import PlanOptions, capture_sites, example_tuple, run_passes, unchanged_report
from planner.report import Report


def find_attention(
    model: Any,
    example_inputs: Optional[tuple] = None,
    example_kwargs: Optional[dict] = None,
) -> list[AttentionSite]:
    """Capture `model` with torch.export and return the attention sites in its graph.

    Args:
        model: an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram.
        example_inputs: positional inputs for capture (a tuple; a single tensor is accepted); guessed as token ids
            when omitted for a model with a token embedding.
        example_kwargs: keyword inputs for capture.
    """
    if isinstance(model, (torch.fx.GraphModule, torch.export.ExportedProgram)):
        return capture_sites(model, example_inputs, example_kwargs)[1]
    captured, _ = capture_call(model, example_call(model, example_tuple(example_inputs), example_kwargs),
                               widen_batch=False)
    return find_sites(captured.graph_module)


def optimize(
    model: Any,
    max_len: Union[int, str],
    device: Union[str, torch.device, DeviceSpec] = "cuda",
    *,
    example_inputs: Optional[tuple] = None,
    example_kwargs: Optional[dict] = None,
    policy: str = "exact",
    train: bool = False,
    variant: Optional[str] = None,
    world_size: int = 1,
    group: Optional[Any] = None,
    layout: str = "zigzag",
    window: Optional[int] = None,
    sinks: int = 0,
    tolerance: Optional[Mapping[str, float]] = None,
    samples: Any = None,
    output: Optional[Callable[[Any], torch.Tensor]] = None,
    calibration: Any = None,
) -> torch.nn.Module:
    """Find every softmax attention in `model`, plan each for `max_len` tokens on `device`, and rewrite it.

    Args:
        model: an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram.
        max_len: the longest sequence to plan for: an int or a string such as "32k", "128k", "1M".
        device: "cuda" (the real GPU), a named target to plan for without having it ("h100", "h200",
            "a100-80gb", "a100-40gb", "l4", "rtx4090", "cpu"), a torch.device, or a DeviceSpec.
        example_inputs / example_kwargs: inputs for capture (see find_attention).
        policy: "exact" (default: only rewrites that keep the function up to floating point), "approximate",
            or "any".
        train: the model will be trained: the memory fit counts what autograd keeps, and under policy "any" the
            retrain variants (linear attention, SSD) become candidates.
        variant: force this variant ("flash", "sliding_window", ...) at every site where it applies, whatever the
            costs say (the report still shows the estimates). For debugging and benchmarks.
        world_size: devices the sequence is sharded over. With world_size > 1 (under torchrun, or any initialized
            process group), every site becomes ring attention and positions become global: the returned module
            takes this rank's shard of the inputs (planner.shard_inputs) and returns its shard of the outputs
            (planner.gather_outputs reassembles them).
        group: the process group of the ring (default: the whole world). layout: "zigzag" (balanced causal work)
            or "contiguous".
        window, sinks: a sliding window (keys per query, plus sink tokens kept visible) to offer at sites without
            one: exact where it covers max_len, else approximate (needs policy="approximate").
        tolerance, samples: required by policy "approximate" and "any": nothing approximate is used unmeasured.
            samples is a list of input batches (a tensor, tuple or dict each) at the deployment length, on which
            approximations are measured (`calibration=` is an alias of `samples=`; timing a device is
            planner.calibrate, a different thing);
            tolerance bounds the measured change, e.g. {"kl_mean": 0.01, "top1": 0.99} for logits or
            {"cosine_mean": 0.99} for embeddings (planner/fidelity.py lists the keys). Each approximate site is
            measured alone, switched greedily (least sensitive first), and the combination verified end to end;
            a site that breaks the tolerance keeps exact attention, and report.fidelity has the numbers.
        output: picks the tensor to compare from the model's output (default: its first tensor).

    Returns:
        An nn.Module computing the same outputs, with `.report` (a planner.Report). It runs on whatever device its
        weights are on. A model with no attention comes back unchanged, with a report that says so.
    """
    # Arguments are checked before the (slow) capture, so a typo fails at once.
    if samples is not None and calibration is not None:
        raise InvalidArgumentError("samples= and calibration= name the same batches (calibration is the alias); "
                                   "give one")
    options = PlanOptions.create(max_len, device, policy, train=train, variant=variant, window=window, sinks=sinks,
                                 tolerance=tolerance, calibration=samples if samples is not None else calibration,
                                 output=output, world_size=world_size, layout=layout)
    if options.world_size != 1:
        if variant not in (None, "ring"):
            raise InvalidArgumentError(f"variant={variant!r} with world_size={world_size}: a sharded sequence runs "
                                       "ring attention at every site")
        return partition_model(model, options, group=group, example_inputs=example_inputs,
                               example_kwargs=example_kwargs)
    if isinstance(model, (torch.fx.GraphModule, torch.export.ExportedProgram)):
        captured = capture(model, example_tuple(example_inputs), example_kwargs)
        report = run_passes(captured.graph_module, options, captured.model_name)
        _attach_report(captured.graph_module, report)
        return captured.graph_module
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module, a torch.fx.GraphModule or an ExportedProgram; got "
                                   f"{type(model).__name__}")
    bound = example_call(model, example_tuple(example_inputs), example_kwargs)
    try:
        optimized = OptimizedModel(model, options, bound)
    except CaptureError as error:
        # What torch.export cannot capture runs as the user wrote it; the report says why nothing was planned.
        report = unchanged_report(options, type(model).__name__, f"the model is returned unchanged: {error}")
        warnings.warn(f"attention-planner: {error}; the model is returned unchanged", stacklevel=2)
        _attach_report(model, report)
        return model
    if not optimized.report.decisions:
        _attach_report(model, optimized.report)
        return model
    return optimized


def _attach_report(module: torch.nn.Module, report: Report) -> None:
    # object.__setattr__ keeps the report out of nn.Module's submodule/parameter bookkeeping.
    object.__setattr__(module, "report", report)

