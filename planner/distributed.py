"""Sequence parallelism over a torch.distributed process group: the `world_size` path of `optimize`, and the
helpers that split inputs into this rank's shard and put outputs back together.

    # under torchrun, every rank:
    fast = planner.optimize(model, max_len="256k", device="h200", world_size=P)  # this rank's partitioned module
    local = planner.shard_inputs((input_ids,), world_size=P, rank=rank)          # this rank's tokens
    logits = planner.gather_outputs(fast(*local))                                # the whole sequence, every rank

The module takes this rank's shard of every input (split along `dim` in `layout`, see backends/ring/layout.py) and
returns this rank's shard of every output that has the sequence; outputs without it (a loss, a mean over the
sequence) come back whole on every rank. The graph pass is backends/ring/partition.py; the report shows the partition:
shard lengths, bytes sent per ring step and per layer, and whether compute hides the transfer on the target's
interconnect (from the ring's cost model, backends/ring/cost.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from backends.costs import evaluate
from backends.registry import VARIANTS, Offer
from backends.ring.comm import group_name_of
from backends.ring.layout import check_layout, chunks_per_rank, local_chunks, shard, unshard
from backends.ring.partition import SequenceShard, check_ring_site, partition, sequence_symbols
from passes.errors import InvalidArgumentError, PlanError
from planner.pipeline import PlanOptions, capture_sites, plan_report, plan_sites
from planner.plan import cost_shape, format_bytes, format_seconds


# ---------------------------------------------------------------------------------------------------------------
# Inputs and outputs


def shard_inputs(inputs: Any, world_size: int, rank: int, layout: str = "zigzag", dim: int = 1) -> Any:
    """This rank's shard of `inputs` (a tensor, or a tuple / list / dict of them, nested): every tensor with more
    than `dim` dims is split along `dim` (the sequence) in `layout`; other values are returned as they are.

    The sequence length must be divisible by world_size (by 2·world_size in the zigzag layout)."""
    check_layout(layout)
    _check_world(world_size, rank)

    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            return shard(value, dim, rank, world_size, layout)
        return value

    return pytree.tree_map(one, inputs)


def gather_outputs(outputs: Any, group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag",
                   dim: int = 1, *, module: Optional[torch.nn.Module] = None) -> Any:
    """The whole-sequence outputs from every rank's shard (an all_gather over `group`, then the inverse of the
    layout's split). Call it on every rank of `group`.

    Which outputs are shards: with `module` (the partitioned module that returned `outputs`), exactly those it
    returns sharded, each along its own sequence dim; the others (a loss, a mean over the sequence: every rank holds
    them whole) come back as they are. Without `module`: every tensor with more than `dim` dims, along `dim`."""
    check_layout(layout)
    _require_initialized("gather_outputs")
    leaves, spec = pytree.tree_flatten(outputs)
    partition_info = getattr(module, "partition", None) if module is not None else None
    if module is not None and partition_info is None:
        raise InvalidArgumentError("gather_outputs(module=...) takes the module returned by "
                                   "optimize(..., world_size=P); this one has no .partition")
    if partition_info is not None:
        dims = list(partition_info.output_dims)
        if len(dims) != len(leaves):
            raise InvalidArgumentError(f"the module returns {len(dims)} outputs; gather_outputs was given "
                                       f"{len(leaves)}")
    else:
        dims = [dim if isinstance(leaf, torch.Tensor) and leaf.dim() > dim else None for leaf in leaves]
    size = dist.get_world_size(group)
    gathered = [leaf if along is None else _gather_one(leaf, along, size, group, layout)
                for leaf, along in zip(leaves, dims)]
    return pytree.tree_unflatten(gathered, spec)


def _gather_one(value: torch.Tensor, dim: int, size: int, group, layout: str) -> torch.Tensor:
    sent = value.detach().contiguous()
    if sent.dtype == torch.bool:  # gloo has no bool collectives
        sent = sent.to(torch.uint8)
    pieces = [torch.empty_like(sent) for _ in range(size)]
    dist.all_gather(pieces, sent, group=group)
    return unshard(pieces, dim, layout).to(value.dtype)


def _check_world(world_size: int, rank: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgumentError(f"world_size={world_size!r} must be a positive int")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank={rank!r} is not in a world of size {world_size}")


def _require_initialized(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(f"{what} needs torch.distributed initialized (torchrun, then "
                                   "torch.distributed.init_process_group); it is not")


# ---------------------------------------------------------------------------------------------------------------
# The partition as the report shows it


@dataclass(frozen=True)
class RingTraffic:
    """The ring's traffic at a group of identical sites, per rank, at max_len (forward pass).

    bytes_per_step: one K/V shard; steps: transfers per site call; compute_per_step_s / transfer_per_step_s: an
    average ring step's attention compute and one shard's transfer on the target; hidden: compute >= transfer (the
    double-buffered transfer is then free)."""

    sites: tuple[str, ...]
    bytes_per_step: float
    steps: int
    compute_per_step_s: float
    transfer_per_step_s: float

    @property
    def bytes_per_layer(self) -> float:
        return self.bytes_per_step * self.steps

    @property
    def hidden(self) -> bool:
        return self.compute_per_step_s >= self.transfer_per_step_s


@dataclass
class Partition:
    """How the sequence is split, what the pass rewrote, and what the ring sends."""

    world_size: int
    rank: int
    layout: str
    dim: int
    max_len: int
    device: str
    interconnect_bandwidth: float
    traffic: list[RingTraffic] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    sequence_symbols: tuple[str, ...] = ()
    output_dims: list = field(default_factory=list)  # per flattened output: its sequence dim, None if whole

    @property
    def shard_length(self) -> int:
        return self.max_len // self.world_size

    def chunks(self, rank: Optional[int] = None) -> list[tuple[int, int]]:
        """[start, end) global positions held by `rank` (default: this rank) at max_len."""
        rank = self.rank if rank is None else rank
        return [(chunk.global_start, chunk.global_start + chunk.length)
                for chunk in local_chunks(self.shard_length, rank, self.world_size, self.layout)]

    @property
    def bytes_per_forward(self) -> float:
        return sum(item.bytes_per_layer * len(item.sites) for item in self.traffic)

    def summary(self) -> list[str]:
        """Lines for the report's notes."""
        held = ", ".join(f"[{start:,}, {end:,})" for start, end in self.chunks())
        lines = [f"partition: the sequence (dim {self.dim}) of max_len {self.max_len:,} over {self.world_size} ranks, "
                 f"layout {self.layout}: {self.shard_length:,} tokens per rank"
                 + (f" ({chunks_per_rank(self.layout)} chunks of {self.shard_length // 2:,})"
                    if self.layout == "zigzag" else "")
                 + f"; rank {self.rank} holds positions {held}"]
        for item in self.traffic:
            verdict = "hidden by compute" if item.hidden else "NOT hidden: the ring is bound by the interconnect"
            lines.append(
                f"partition: ring at {_names(item.sites)}: {format_bytes(item.bytes_per_step)} sent per step per "
                f"rank, {item.steps} step{'s' if item.steps != 1 else ''}, {format_bytes(item.bytes_per_layer)} per layer (forward); a step computes "
                f"{format_seconds(item.compute_per_step_s)} against {format_seconds(item.transfer_per_step_s)} of "
                f"transfer at {self.interconnect_bandwidth / 1e9:.0f} GB/s on {self.device}: {verdict}")
        if self.traffic:
            lines.append(f"partition: {format_bytes(self.bytes_per_forward)} sent per rank per forward pass")
        lines.extend(f"partition: {line}" for line in self.rewrites)
        if self.max_len % (self.world_size * chunks_per_rank(self.layout)):
            lines.append(f"partition: max_len {self.max_len:,} is not divisible by "
                         f"{self.world_size * chunks_per_rank(self.layout)}: inputs must be (shard_inputs refuses "
                         "other lengths)")
        return lines

    def to_json(self) -> dict:
        return {
            "world_size": self.world_size, "rank": self.rank, "layout": self.layout, "dim": self.dim,
            "max_len": self.max_len, "shard_length": self.shard_length, "chunks": self.chunks(),
            "device": self.device, "interconnect_bandwidth": self.interconnect_bandwidth,
            "bytes_per_forward": self.bytes_per_forward, "rewrites": list(self.rewrites),
            "output_dims": list(self.output_dims),
            "traffic": [{"sites": list(item.sites), "bytes_per_step": item.bytes_per_step, "steps": item.steps,
                         "bytes_per_layer": item.bytes_per_layer, "compute_per_step_s": item.compute_per_step_s,
                         "transfer_per_step_s": item.transfer_per_step_s, "hidden": item.hidden}
                        for item in self.traffic],
        }


def _names(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} identical)"


def ring_traffic(plan: Any, device: Any) -> list[RingTraffic]:
    """Per group of identical ring decisions of `plan` (a planner Plan): what the ring's cost model says it sends and
    computes per step on `device` (a DeviceSpec)."""
    groups: dict = {}
    for decision in plan.decisions:
        choice = decision.choice
        if choice is None or choice.variant != "ring":
            continue
        key = (choice.time_expr, choice.memory_expr, decision.site.dtype)
        groups.setdefault(key, []).append(decision)
    traffic = []
    for decisions in groups.values():
        decision = decisions[0]
        site, choice = decision.site, decision.choice
        offer = Offer(choice.implementation, choice.exactness, choice.parameters)
        shape = cost_shape(site, plan.max_len, "ring", offer, plan.world_size)
        costs = VARIANTS["ring"].costs(shape)
        steps = int(round(evaluate(costs.comm_steps, plan.max_len)))
        sent = evaluate(costs.comm_bytes, plan.max_len)
        compute = max(evaluate(costs.flops, plan.max_len) / (device.peak_flops(site.dtype) * device.efficiency_of(
            costs.work)), evaluate(costs.bytes, plan.max_len) / (device.memory_bandwidth * device.efficiency_of(
                "memory")))
        transfer = sent / (device.interconnect_bandwidth * device.efficiency_of("interconnect"))
        traffic.append(RingTraffic(tuple(d.site.name for d in decisions), sent, steps, compute / (steps + 1),
                                   transfer))
    return traffic


# ---------------------------------------------------------------------------------------------------------------
# optimize(..., world_size=P)


def optimize_partitioned(
    model: Any,
    max_len: Union[int, str],
    device: Union[str, torch.device, Any] = "cuda",
    *,
    world_size: int,
    group: Optional[dist.ProcessGroup] = None,
    example_inputs: Optional[tuple] = None,
    example_kwargs: Optional[dict] = None,
    policy: str = "exact",
    train: bool = False,
    layout: str = "zigzag",
    dim: int = 1,
) -> torch.nn.Module:
    """`optimize` with the sequence sharded over the `world_size` ranks of `group` (default: the world), on this rank.

    Every attention site becomes ring attention; positions (aranges over the sequence, tables cut to its length)
    become this rank's global positions; sums, means, maxima and losses over the sequence get an all_reduce; anything
    else that mixes positions raises PlanError naming the node. Returns a module that takes this rank's shard of the
    inputs (shard_inputs) and returns its shard of the outputs (gather_outputs puts them together), with `.report`
    (planner.Report, whose notes describe the partition) and `.partition` (planner.distributed.Partition). The module
    is this rank's: positions are built from its rank.

    Every tensor input with more than `dim` dims is taken as a sequence along `dim` (shard_inputs splits the same
    ones). Training: ring attention is differentiable; parameter gradients are then this rank's share (sum them over
    the group, as in any sequence parallelism); reductions over the sequence are refused with train=True (their
    all_reduce has no gradient).

    Args:
        world_size: ranks the sequence is split over; must equal the size of `group`.
        group: the process group (torch.distributed must be initialized, e.g. by torchrun).
        layout: "zigzag" (balanced causal work; the default) or "contiguous".
        dim: the sequence dimension of the inputs (and of the outputs).
        max_len, device, example_inputs, example_kwargs, policy, train: as in planner.optimize; max_len is the whole
            sequence, over all ranks.
    """
    options = PlanOptions.create(max_len, device, policy, train=train, world_size=world_size, layout=layout)
    return partition_model(model, options, group=group, example_inputs=example_inputs, example_kwargs=example_kwargs,
                           dim=dim)


def partition_model(model: Any, options: PlanOptions, *, group: Optional[dist.ProcessGroup] = None,
                    example_inputs: Optional[tuple] = None, example_kwargs: Optional[dict] = None,
                    dim: int = 1) -> torch.nn.Module:
    """optimize_partitioned with its arguments validated by a front door into `options` (options.world_size ranks,
    options.layout); see optimize_partitioned."""
    world_size, layout = options.world_size, options.layout
    if not isinstance(world_size, int) or world_size < 2:
        raise InvalidArgumentError(f"world_size={world_size!r}: the partitioned path needs an int >= 2 "
                                   "(world_size=1 is plain optimize)")
    _require_initialized(f"optimize(world_size={world_size})")
    if dist.get_world_size(group) != world_size:
        raise InvalidArgumentError(f"world_size={world_size} but the process group has {dist.get_world_size(group)} "
                                   "ranks; pass the group whose ranks share the sequence")
    rank = dist.get_rank(group)
    captured, sites = capture_sites(model, example_inputs, example_kwargs)
    graph_module = captured.graph_module
    symbols = sequence_symbols(graph_module, dim)
    for site in sites:
        check_ring_site(site, symbols)  # before planning: the clearest refusal names the site
    # Every site runs the ring over the whole sequence: a window or a fidelity measurement has no part here.
    _, plan = plan_sites(graph_module, dataclasses.replace(options, window=None, sinks=0), sites)
    plan = _ring_everywhere(plan, layout)
    shard_spec = SequenceShard(world_size, rank, group_name_of(group), layout, dim)
    result = partition(graph_module, sites, shard_spec, train=options.train)

    report = plan_report(plan, captured.model_name, no_attention="no softmax attention was found in the graph; only "
                         "positions and reductions were partitioned")
    spec = options.device
    summary = Partition(world_size, rank, layout, dim, options.max_len, spec.name, spec.interconnect_bandwidth,
                        ring_traffic(plan, spec), result.positions + result.collectives, result.sequence_symbols,
                        list(result.output_dims))
    report.notes.extend(summary.summary())
    object.__setattr__(graph_module, "report", report)  # kept out of nn.Module's bookkeeping
    object.__setattr__(graph_module, "partition", summary)
    return graph_module


def _ring_everywhere(plan: Any, layout: str) -> Any:
    """Every decision's choice is the ring candidate (the inputs are sharded: nothing else can run), with the
    layout in its parameters; a site whose ring candidate does not apply is refused."""
    decisions = []
    for decision in plan.decisions:
        ring = next((candidate for candidate in decision.candidates if candidate.variant == "ring"), None)
        if ring is None or ring.time_expr is None:
            why = ring.reason if ring is not None else "no ring candidate"
            raise PlanError(f"partition: attention site {decision.site.name} ({decision.site.source}) cannot run as "
                            f"ring attention: {why}")
        parameters = tuple((name, layout if name == "layout" else value) for name, value in ring.parameters)
        ring = dataclasses.replace(ring, parameters=parameters)
        estimate = ring.reason if ring.feasible else f"beware, it does not fit: {ring.reason}"
        reason = f"world_size={plan.world_size}: the sequence is sharded, so ring attention ({layout}): {estimate}"
        decisions.append(dataclasses.replace(decision, choice=ring, reason=reason))
    return dataclasses.replace(plan, decisions=tuple(decisions))


__all__ = ["shard_inputs", "gather_outputs", "optimize_partitioned", "partition_model", "Partition", "RingTraffic",
           "ring_traffic"]
