"""Partition: rewrite a captured ATen graph so that it runs on one rank's shard of the sequence.

Every input tensor is split along its sequence dimension over the P ranks of a process group, in the layout of
backends/ring/layout.py ("zigzag": rank r holds chunks r and 2P-1-r of 2P; "contiguous"); the rewritten graph takes
this rank's shard and returns this rank's shard. Three rewrites make that exact:

  1. attention: every site becomes attention_planner::ring_attention (K/V travel around the ring);
  2. positions: aten.arange over the sequence length (rotary tables, position ids, masks) counts 0..n-1 on a shard
     of n tokens; it is shifted to the global positions of this rank's tokens, under the zigzag permutation too;
  3. reductions over the sequence (sum, mean, amax, amin, a loss): the local reduction, then an all_reduce through
     torch.distributed's functional collectives, so that the graph stays traceable.

Anything else that mixes positions (cumsum, a convolution over time, softmax over the sequence outside attention,
slicing, padding or concatenating along the sequence, the sequence length used as a number, ...) is refused with a
PlanError that names the node and its source line. Unknown ops that touch the sequence are refused too: a partition
is exact or it does not happen.

Which dimensions are the sequence: after capture every size is a sympy expression, and the sequence symbols are the
sizes of the graph's inputs along `dim`. A tensor dimension whose size involves one of them is indexed by this rank's
tokens, in local order (a flattened batch x sequence dimension included). That holds for every tensor the pass lets
through: inputs are sharded, pointwise and layout ops keep positions aligned, factories are constant along positions,
and positions made by arange are made global.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch

from backends.ring.layout import check_layout
from backends.ring.rule import emit_ring
from backends.ring.sequence import (  # noqa: F401  (check_ring_site, sequence_symbols: re-exported)
    ALONG_DIM, CLASS_LOSSES, CONTEXT_OPERATORS, CONTRACTIONS, CONVOLUTIONS, DIM_ARGUMENT, ELEMENT_LOSSES, FACTORY_OPS,
    FULL_REDUCTIONS, LAYOUT_OPS, LENGTH_AS_NUMBER_OK, NORMS_OVER_LAST, OURS, PADS, POOLS, REDUCTIONS, SEQUENCE_SOURCES,
    check_ring_site, involves, normalize_dims, output_sequence_dims, packet_name, schema_argument, sequence_symbols,
    tensor_values, user_line)
from passes.graph_info import module_path, size_expr
from passes.rewrite import drop_dead_metadata_asserts, replace_site
from passes.errors import PlanError
from passes.records import AttentionSite

aten = torch.ops.aten

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class SequenceShard:
    """Where this graph runs: rank `rank` of `world_size`, holding its shard of every input along `dim` in `layout`;
    `group_name`: the registered name of the process group (the ring and the collectives run on it)."""

    world_size: int
    rank: int
    group_name: str
    layout: str = "zigzag"
    dim: int = 1


@dataclass
class PartitionResult:
    """What the pass did, for the report: the sequence symbols, the sites now on the ring, and each position and
    reduction rewrite as "what at file:line -> what now"."""

    shard: SequenceShard
    sequence_symbols: tuple[str, ...]
    ring_sites: list[str] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)
    collectives: list[str] = field(default_factory=list)
    # Per output of the graph (flattened, in the module's output order): the dim that holds this rank's tokens, or
    # None for an output every rank holds whole (a loss, a mean over the sequence) or a non-tensor.
    output_dims: list = field(default_factory=list)


def partition(graph_module: torch.fx.GraphModule, sites: list[AttentionSite], shard: SequenceShard, *,
              train: bool = False) -> PartitionResult:
    """Rewrite `graph_module` in place to run on `shard`: `sites` (from passes.match.find_sites on this graph) become
    ring attention, positions become global, reductions over the sequence get an all_reduce. Raises PlanError, naming
    the node or site and its source line, where the graph cannot be made exact on a shard; the graph is then left in
    an unspecified state (capture again to retry)."""
    check_layout(shard.layout)
    if shard.world_size < 2 or not 0 <= shard.rank < shard.world_size:
        raise PlanError(f"partition: rank {shard.rank} of world_size {shard.world_size}: needs world_size >= 2")
    symbols = sequence_symbols(graph_module, shard.dim)
    for site in sites:
        check_ring_site(site, symbols)
    result = PartitionResult(shard, tuple(sorted(str(symbol) for symbol in symbols)))
    created = rewrite_sites_to_ring(graph_module, sites, shard)
    result.ring_sites = [site.name for site in sites]
    _PositionPass(graph_module, symbols, shard, result, created, train).run()
    result.output_dims = output_sequence_dims(graph_module, symbols)
    drop_dead_metadata_asserts(graph_module.graph)
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    return result


def rewrite_sites_to_ring(graph_module: torch.fx.GraphModule, sites: list[AttentionSite],
                          shard: SequenceShard) -> set:
    """Replace each site's node by ring attention (with the site's layout adapters); return the nodes created."""
    graph = graph_module.graph
    before = set(graph.nodes)
    nodes = {node.name: node for node in graph.nodes}
    emit = functools.partial(emit_ring, group_name=shard.group_name, layout=shard.layout)
    for site in sites:
        replace_site(graph, nodes, site, emit)
    drop_dead_metadata_asserts(graph)
    graph.eliminate_dead_code()
    return set(graph.nodes) - before


class _Chain:
    """Nodes inserted one after the other, after `anchor` (so each may use the ones before it)."""

    def __init__(self, position_pass: "_PositionPass", anchor: torch.fx.Node):
        self.position_pass = position_pass
        self.cursor = anchor

    def add(self, target: Any, args: tuple, kwargs: Optional[dict] = None, val: Any = None) -> torch.fx.Node:
        self.cursor = self.position_pass.insert_after(self.cursor, target, args, kwargs, val)
        return self.cursor


class _PositionPass:
    """Walks the graph once, in order; every node that touches the sequence is let through, rewritten or refused."""

    def __init__(self, graph_module: torch.fx.GraphModule, symbols: frozenset, shard: SequenceShard,
                 result: PartitionResult, skip: set, train: bool):
        self.graph_module = graph_module
        self.graph = graph_module.graph
        self.symbols = symbols
        self.shard = shard
        self.result = result
        self.skip = set(skip)
        self.train = train

    # -- helpers ------------------------------------------------------------------------------------------------

    def sequence_dims(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, torch.Tensor):
            return ()
        return tuple(index for index, size in enumerate(value.shape) if involves(size, self.symbols))

    def dims_of(self, node: Any) -> tuple[int, ...]:
        return self.sequence_dims(node.meta.get("val")) if isinstance(node, torch.fx.Node) else ()

    def refuse(self, node: torch.fx.Node, why: str, advice: str = "") -> None:
        name = packet_name(node.target) or getattr(node.target, "__name__", str(node.target))
        where = f"{name} at node {node.name!r} ({user_line(node)}"
        path = module_path(node)
        where += f", in {path})" if path else ")"
        message = f"cannot partition the sequence over {self.shard.world_size} ranks: {where}: {why}"
        if advice:
            message += f"; {advice}"
        raise PlanError(message)

    def insert_after(self, anchor: torch.fx.Node, target: Any, args: tuple, kwargs: Optional[dict] = None,
                     val: Any = None) -> torch.fx.Node:
        with self.graph.inserting_after(anchor):
            node = self.graph.call_function(target, args, kwargs or {})
        if val is not None:
            node.meta["val"] = val
        for key in ("stack_trace", "nn_module_stack"):
            if key in anchor.meta:
                node.meta[key] = anchor.meta[key]
        self.skip.add(node)
        return node

    # -- the walk -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node in self.skip or node.op in ("placeholder", "get_attr", "output"):
                continue
            self.check_length_as_number(node)
            inputs = [argument for argument in node.all_input_nodes
                      if any(self.sequence_dims(value) for value in tensor_values(argument.meta.get("val")))]
            outputs = [self.sequence_dims(value) for value in tensor_values(node.meta.get("val"))]
            subgraph = isinstance(node.target, torch._ops.HigherOrderOperator)
            if not inputs and not any(outputs) and packet_name(node.target) != "arange" and not subgraph:
                continue
            if node.op == "call_module":
                if str(node.target).startswith("_guards"):
                    continue
                self.refuse(node, "a submodule call on sequence tensors is not analysed")
            name = packet_name(node.target)
            if not inputs and any(outputs) and name not in SEQUENCE_SOURCES and not subgraph:
                self.refuse(node, "it makes a sequence-long tensor from tensors that are not: its rows would be "
                            "the first positions, not this rank's")
            self.visit(node, name)
            self.check_output_sizes(node)

    def check_output_sizes(self, node: torch.fx.Node) -> None:
        for value in tensor_values(node.meta.get("val")):
            dims = self.sequence_dims(value)
            if len(dims) > 1:
                self.refuse(node, f"its output {tuple(value.shape)} pairs positions with positions; on a shard only "
                            "this rank's pairs exist", "pairwise position tensors are supported only as attention "
                            "masks that the detector proves causal or sliding-window")
            for dim in dims:
                expression = sympy.sympify(size_expr(value.shape[dim]))
                coefficient, _ = expression.as_coeff_Mul()
                if not (expression.is_Mul or expression.is_Symbol) or not coefficient.is_Integer or \
                        any(symbol_power.is_Pow for symbol_power in sympy.Mul.make_args(expression)):
                    self.refuse(node, f"its output has {expression} positions along dim {dim}: a length derived "
                                "from the sequence length other than a whole number of shards")

    def check_length_as_number(self, node: torch.fx.Node) -> None:
        """The sequence length flowing into an op as a scalar is the local length n = L/P on a shard."""
        name = packet_name(node.target)
        if name is None or name in LENGTH_AS_NUMBER_OK:
            return
        arguments = list(node.args) + list(node.kwargs.values())
        for argument in arguments:
            if not isinstance(argument, torch.fx.Node):
                continue
            value = argument.meta.get("val")
            if isinstance(value, (torch.SymInt, torch.SymFloat)) and \
                    sympy.sympify(value.node.expr).free_symbols & self.symbols:
                self.refuse(node, f"it uses the sequence length ({value.node.expr}) as a number; on a shard that "
                            f"is the local length L/{self.shard.world_size}",
                            "compute it from global positions or outside the partitioned model")

    def visit(self, node: torch.fx.Node, name: Optional[str]) -> None:
        if node.op != "call_function":
            self.refuse(node, "not analysed")
        target = node.target
        if target is operator.getitem:
            return
        if isinstance(target, torch._ops.HigherOrderOperator):
            return self.visit_context(node)
        if name is None:
            if getattr(target, "__module__", "") in ("_operator", "operator", "torch", "math") or \
                    target in (torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not):
                return  # arithmetic on sizes; its uses are checked where they reach an op
            self.refuse(node, "a Python function on sequence tensors is not analysed")
        if name in OURS:
            return
        if name == "arange":
            return self.globalize_arange(node)
        if name in FACTORY_OPS or name in LAYOUT_OPS or torch.Tag.pointwise in getattr(target, "tags", ()):
            return self.check_layout_op(node, name)
        if name in REDUCTIONS or (name in FULL_REDUCTIONS and target.__name__.endswith("default")):
            return self.reduce(node, name)
        if name in ("slice", "narrow"):
            return self.check_slice(node, name)
        if name == "index":
            return self.check_index(node)
        if name in ALONG_DIM:
            return self.check_along_dim(node, name, ALONG_DIM[name])
        if name in ("flip", "roll"):
            return self.check_dims_argument(node, name, "dims",
                                            "reversing or rotating the sequence moves positions across ranks")
        if name in ("tril", "triu"):
            return self.check_triangle(node, name)
        if name in CONTRACTIONS:
            return self.check_contraction(node, name)
        if name in NORMS_OVER_LAST:
            return self.check_norm(node, name)
        if name in ("group_norm", "native_group_norm", "instance_norm"):
            return self.check_channel_norm(node, name)
        if name in ("batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                    "native_batch_norm", "_native_batch_norm_legit_functional"):
            return self.check_batch_norm(node, name)
        if name in CONVOLUTIONS:
            return self.check_convolution(node)
        if name in POOLS:
            return self.check_spatial(node, "pooling or resampling over the sequence crosses shard boundaries")
        if name in PADS:
            return self.check_pad(node)
        if name == "repeat":
            return self.check_repeat(node)
        if name in ELEMENT_LOSSES or name in CLASS_LOSSES:
            return self.reduce_loss(node, name)
        if name == "scaled_dot_product_attention" or "attention" in name:
            self.refuse(node, "an attention call that the detector did not report as a site is still here",
                        "its keys would be this rank's only")
        self.refuse(node, f"aten.{name} is not known to keep positions apart",
                    "report it (backends/ring/partition.py lists the ops it lets through)")

    def visit_context(self, node: torch.fx.Node) -> None:
        """torch.autocast / torch.no_grad blocks are captured as a higher-order op around a subgraph: the subgraph
        is partitioned like the graph (its nodes carry the same size symbols)."""
        if node.target.__name__ not in CONTEXT_OPERATORS:
            values = [value for argument in node.all_input_nodes for value in tensor_values(argument.meta.get("val"))]
            values += tensor_values(node.meta.get("val"))
            lengths = [argument.meta.get("val") for argument in node.all_input_nodes
                       if isinstance(argument.meta.get("val"), torch.SymInt)]
            if any(self.sequence_dims(value) for value in values) or \
                    any(sympy.sympify(length.node.expr).free_symbols & self.symbols for length in lengths):
                self.refuse(node, f"the higher-order op {node.target.__name__} (control flow or a subgraph) on "
                            "the sequence is not analysed")
            return
        body = next(argument for argument in node.args
                    if isinstance(argument, torch.fx.Node) and argument.op == "get_attr")
        # A copy: the subgraph module is shared with the ExportedProgram (and with every module made from it).
        shared = self.graph_module.get_submodule(body.target)
        graph = torch.fx.Graph()
        graph.output(graph.graph_copy(shared.graph, {}))
        submodule = torch.fx.GraphModule(shared, graph)
        _PositionPass(submodule, self.symbols, self.shard, self.result, set(), self.train).run()
        submodule.graph.eliminate_dead_code()
        submodule.recompile()
        setattr(self.graph_module, body.target, submodule)

    # -- rules ----------------------------------------------------------------------------------------------------

    def check_layout_op(self, node: torch.fx.Node, name: str) -> None:
        if name == "where" and len(node.args) == 1:
            self.refuse(node, "where(condition) lists the positions where it holds: global indices are needed")
        if name in ("masked_fill", "where") or torch.Tag.pointwise in getattr(node.target, "tags", ()):
            return
        if name == "stack":
            return
        if name in ("view", "_unsafe_view", "reshape", "flatten", "unflatten"):
            source = node.args[0] if node.args else None
            if isinstance(source, torch.fx.Node) and self.dims_of(source) and not self.dims_of(node):
                self.refuse(node, "a reshape that hides the sequence length in a fixed size")

    def check_slice(self, node: torch.fx.Node, name: str) -> None:
        source = node.args[0]
        dims = self.dims_of(source)
        ndim = source.meta["val"].dim()
        dim = schema_argument(node, "dim", 0) % ndim
        if dim not in dims:
            if dim in self.dims_of(node):  # a fixed-size table cut to the sequence length
                return self.check_table_slice(node, name, dim)
            return
        size = sympy.sympify(size_expr(source.meta["val"].shape[dim]))
        if name == "slice":
            start, end, step = schema_argument(node, "start"), schema_argument(node, "end"), schema_argument(node, "step", 1)
            full = start in (None, 0) and step == 1 and (end is None or self._at_least(end, size))
        else:
            start, length = schema_argument(node, "start"), schema_argument(node, "length")
            full = start == 0 and self._at_least(length, size)
        if not full:
            self.refuse(node, f"it takes part of the sequence (dim {dim}); on a shard the positions it keeps are on "
                        "several ranks", "slice the gathered output instead, or shard inputs that are already cut")

    def check_table_slice(self, node: torch.fx.Node, name: str, dim: int) -> None:
        length = size_expr(node.meta["val"].shape[dim])
        start = schema_argument(node, "start") or 0
        step = schema_argument(node, "step", 1) if name == "slice" else 1
        if not (isinstance(length, sympy.Symbol) and length in self.symbols) or step != 1 or \
                not isinstance(start, int) or start < 0:
            self.refuse(node, f"it cuts {length} rows out of a fixed-size tensor along dim {dim}: not the rows of "
                        "this rank's positions")
        self.globalize_table_slice(node, dim, start)

    def _at_least(self, bound: Any, size: sympy.Expr) -> bool:
        if isinstance(bound, int):
            return bound >= INT64_MAX // 2
        if isinstance(bound, torch.fx.Node) and isinstance(bound.meta.get("val"), torch.SymInt):
            return sympy.simplify(sympy.sympify(bound.meta["val"].node.expr) - size) == 0
        return False

    def check_index(self, node: torch.fx.Node) -> None:
        source, indices = node.args[0], node.args[1]
        dims = self.dims_of(source)
        for dim, index in enumerate(indices):
            if index is not None and dim in dims:
                self.refuse(node, f"it indexes the sequence (dim {dim}) with a tensor: the positions it picks live "
                            "on other ranks")
        # Indices that carry the sequence (a table looked up at positions) are fine: a gather of rows.

    def check_along_dim(self, node: torch.fx.Node, name: str, why: str) -> None:
        source = node.args[0]
        if isinstance(source, (list, tuple)):  # cat
            source = next((item for item in source if isinstance(item, torch.fx.Node)), None)
            value = node.meta.get("val")
            dims, ndim = self.sequence_dims(value), value.dim()
        else:
            value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
            if value is None:
                self.refuse(node, "its input has no recorded shape")
            dims, ndim = self.sequence_dims(value), value.dim()
        # A missing dim (None, or no such argument in the overload) means every dim, as in torch.
        touched = set(normalize_dims(schema_argument(node, DIM_ARGUMENT.get(name, "dim")), ndim)) & set(dims)
        if touched:
            self.refuse(node, f"it works along the sequence (dim {sorted(touched)[0]}): {why}",
                        "compute it before sharding, on gathered outputs, or with a model that keeps it per position")

    def check_dims_argument(self, node: torch.fx.Node, name: str, argument: str, why: str) -> None:
        value = node.args[0].meta["val"]
        dims = self.sequence_dims(value)
        touched = set(normalize_dims(schema_argument(node, argument), value.dim())) & set(dims)
        if touched:
            self.refuse(node, f"it works along the sequence (dim {sorted(touched)[0]}): {why}")

    def check_triangle(self, node: torch.fx.Node, name: str) -> None:
        value = node.args[0].meta["val"]
        dims = set(self.sequence_dims(value))
        if value.dim() >= 2 and dims & {value.dim() - 2, value.dim() - 1}:
            self.refuse(node, f"{name} compares local indices of the sequence; on a shard they are not the global "
                        "positions", "build masks from positions (torch.arange) so that they become global")

    def check_contraction(self, node: torch.fx.Node, name: str) -> None:
        tensors = [argument for argument in node.args if isinstance(argument, torch.fx.Node)]
        if name == "einsum":
            return self.check_einsum(node)
        if name in ("addmm", "baddbmm", "addbmm", "addmv"):
            tensors = tensors[1:]
        first = tensors[0].meta["val"]
        contracted_first = first.dim() - 1
        pairs = [(tensors[0], contracted_first)]
        if len(tensors) > 1 and name != "linear":
            second = tensors[1].meta["val"]
            pairs.append((tensors[1], 0 if second.dim() == 1 else second.dim() - 2))
        for tensor, dim in pairs:
            if dim in self.dims_of(tensor):
                self.refuse(node, f"it sums over the sequence (dim {dim} of {tensor.name}): a contraction over "
                            "positions needs every rank's positions",
                            "attention-like products are rewritten only where the detector finds attention")

    def check_einsum(self, node: torch.fx.Node) -> None:
        equation = node.args[0].replace(" ", "")
        operands = node.args[1]
        inputs, _, output = equation.partition("->")
        for letters, operand in zip(inputs.split(","), operands):
            if "." in letters:
                self.refuse(node, "an einsum with ellipsis over sequence tensors is not analysed")
            for position in self.dims_of(operand):
                if letters[position] not in output:
                    self.refuse(node, f"einsum {equation} sums over the sequence (index {letters[position]!r})")

    def check_norm(self, node: torch.fx.Node, name: str) -> None:
        value = node.args[0].meta["val"]
        count = len(schema_argument(node, NORMS_OVER_LAST[name]) or ())
        normalized = set(range(value.dim() - count, value.dim()))
        if normalized & set(self.sequence_dims(value)):
            self.refuse(node, f"{name} normalizes over the sequence: its statistics need every position")

    def check_channel_norm(self, node: torch.fx.Node, name: str) -> None:
        value = node.args[0].meta["val"]
        if set(self.sequence_dims(value)) - {0}:
            self.refuse(node, f"{name} normalizes over channels and positions: its statistics need every position")

    def check_batch_norm(self, node: torch.fx.Node, name: str) -> None:
        training = schema_argument(node, "training", name not in ("_native_batch_norm_legit_no_training",))
        if training:
            self.refuse(node, "batch norm in training mode takes statistics over the sequence",
                        "put the model in eval() or use a per-position norm")

    def check_spatial(self, node: torch.fx.Node, why: str) -> None:
        value = node.args[0].meta["val"]
        if set(self.sequence_dims(value)) & set(range(2, value.dim())):
            self.refuse(node, why)

    def check_convolution(self, node: torch.fx.Node) -> None:
        value = node.args[0].meta["val"]
        weight = node.args[1].meta["val"]
        for dim in self.sequence_dims(value):
            if dim == 1:
                self.refuse(node, "the sequence is the convolution's channel dimension, which it sums over")
            if dim == 0:
                continue  # the batch: the convolution is per sample
            kernel = int(weight.shape[dim])
            stride = schema_argument(node, "stride", [1])
            padding = schema_argument(node, "padding", [0])
            transposed = bool(schema_argument(node, "transposed", False))
            spatial = dim - 2
            stride_here = stride[spatial if len(stride) > spatial else 0] if isinstance(stride, (list, tuple)) \
                else stride
            padding_here = padding[spatial if len(padding) > spatial else 0] if isinstance(padding, (list, tuple)) \
                else padding
            if kernel != 1 or stride_here != 1 or padding_here not in (0, "valid") or transposed:
                self.refuse(node, f"a convolution over the sequence (kernel {kernel}, stride {stride_here}) needs "
                            f"the neighbouring {max(kernel - 1, 0)} positions of other ranks (a halo exchange, not "
                            "implemented)", "run the convolution before sharding")

    def check_pad(self, node: torch.fx.Node) -> None:
        value = node.args[0].meta["val"]
        pad = list(schema_argument(node, "pad") or schema_argument(node, "padding") or [])
        dims = set(self.sequence_dims(value))
        for pair in range(len(pad) // 2):
            dim = value.dim() - 1 - pair
            if dim in dims and (pad[2 * pair] != 0 or pad[2 * pair + 1] != 0):
                self.refuse(node, f"it pads the sequence (dim {dim}): the padding lands on one rank's shard only, "
                            "and shifts every position after it", "pad before sharding")

    def check_repeat(self, node: torch.fx.Node) -> None:
        value = node.meta["val"]
        repeats = list(schema_argument(node, "repeats") or [])
        offset = value.dim() - len(repeats)
        for dim in self.sequence_dims(value):
            if dim - offset >= 0 and repeats[dim - offset] != 1:
                self.refuse(node, f"it repeats the sequence (dim {dim}): the copies would be spread over the ranks")

    # -- positions ------------------------------------------------------------------------------------------------

    def globalize_arange(self, node: torch.fx.Node) -> None:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            return
        length = size_expr(value.shape[0])
        if not isinstance(length, sympy.Expr) or not length.free_symbols & self.symbols:
            return  # not over the sequence (rotary frequencies, head indices, ...)
        start = schema_argument(node, "start", 0) if "start" in str(node.target) else 0
        step = schema_argument(node, "step", 1) if "step" in str(node.target) else 1
        if not (isinstance(length, sympy.Symbol) and length in self.symbols):
            self.refuse(node, f"an arange of {length} positions: not the positions of the sequence, so there is no "
                        "global counterpart on a shard")
        if isinstance(start, torch.fx.Node) and isinstance(start.meta.get("val"), torch.SymInt) and \
                sympy.sympify(start.meta["val"].node.expr).free_symbols & self.symbols:
            self.refuse(node, "an arange that starts at the sequence length: positions past the sequence")
        if not isinstance(step, (int, float)):
            self.refuse(node, "an arange over the sequence with a computed step")
        chain = _Chain(self, node)
        local = chain.add(aten.sym_size.int, (node, 0), val=value.shape[0])
        shift = self.shift_to_global(chain, local, value.dtype, value.device, step)
        positions = chain.add(aten.add.Tensor, (node, shift), val=value)
        node.replace_all_uses_with(positions, delete_user_cb=lambda user: user not in self.skip)
        self.result.positions.append(f"arange over the sequence at {user_line(node)} -> the global positions of "
                                     f"this rank's tokens ({self.shard.layout})")

    def globalize_table_slice(self, node: torch.fx.Node, dim: int, start: Any) -> None:
        """table[start : start + n] along `dim` (a fixed-size table cut to the sequence length, e.g. a position-ids
        buffer) becomes index_select(table, dim, start + global positions)."""
        source = node.args[0]
        value = node.meta["val"]
        chain = _Chain(self, node)
        local = chain.add(aten.sym_size.int, (node, dim), val=value.shape[dim])
        index = chain.add(aten.arange.default, (local,), {"dtype": torch.int64, "device": value.device})
        shift = self.shift_to_global(chain, local, torch.int64, value.device, 1)
        positions = chain.add(aten.add.Tensor, (index, shift))
        if start:
            positions = chain.add(aten.add.Tensor, (positions, start))
        picked = chain.add(aten.index_select.default, (source, dim, positions), val=value)
        node.replace_all_uses_with(picked, delete_user_cb=lambda user: user not in self.skip)
        self.result.positions.append(f"{source.name}[{start or 0}:n] along dim {dim} at {user_line(node)} -> the "
                                     f"rows at this rank's global positions ({self.shard.layout})")

    def shift_to_global(self, chain: "_Chain", local: torch.fx.Node, dtype: torch.dtype, device: Any,
                        step: float) -> Any:
        """step·(global position − local index) for each local index of a shard of `local` tokens: a number in the
        contiguous layout, a tensor in zigzag. Whole numbers, so adding them is exact (far below 2^24 in float32)."""
        shard = self.shard
        if shard.layout == "contiguous":
            return chain.add(operator.mul, (local, shard.rank * step))
        # zigzag: local index i < c (first chunk) sits at r·c + i, i >= c at (2P−1−r)·c + (i − c).
        chunk = chain.add(operator.floordiv, (local, 2))
        index = chain.add(aten.arange.default, (local,), {"dtype": torch.int64, "device": device})
        late = chain.add(aten.ge.Scalar, (index, chunk))
        late = chain.add(aten._to_copy.default, (late,), {"dtype": dtype})
        jump = chain.add(operator.mul, (chunk, (2 * shard.world_size - 2 - 2 * shard.rank) * step))
        scaled = chain.add(aten.mul.Tensor, (late, jump))
        first = chain.add(operator.mul, (chunk, shard.rank * step))
        return chain.add(aten.add.Tensor, (scaled, first))

    # -- reductions -----------------------------------------------------------------------------------------------

    def reduce(self, node: torch.fx.Node, name: str) -> None:
        source = node.args[0]
        value = source.meta["val"]
        dims = set(self.sequence_dims(value))
        if name in FULL_REDUCTIONS:
            reduced, operation, average = set(range(value.dim())), FULL_REDUCTIONS[name], False
        else:
            reduced = set(normalize_dims(schema_argument(node, "dim"), value.dim()))
            operation, average = REDUCTIONS[name]
        if not reduced & dims:
            return
        if self.dims_of(node):
            self.refuse(node, f"{name} over part of the sequence leaves positions in its output")
        self.all_reduce(node, operation, average, f"{name} over the sequence")

    def all_reduce(self, node: torch.fx.Node, operation: str, average: bool, what: str) -> torch.fx.Node:
        """Replace the uses of `node` (a local reduction) by its all_reduce over the group (÷ P for averages)."""
        if self.train:
            self.refuse(node, f"{what} becomes an all_reduce, which has no gradient here (train=True)",
                        "compute it outside the partitioned model for training")
        import torch.distributed._functional_collectives  # noqa: F401  registers _c10d_functional

        value = node.meta.get("val")
        reduced = self.insert_after(node, torch.ops._c10d_functional.all_reduce.default,
                                    (node, operation, self.shard.group_name), val=value)
        last = self.insert_after(reduced, torch.ops._c10d_functional.wait_tensor.default, (reduced,), val=value)
        if average:
            last = self.insert_after(last, aten.div.Tensor, (last, self.shard.world_size), val=value)
        node.replace_all_uses_with(last, delete_user_cb=lambda user: user not in self.skip)
        average_text = f" / {self.shard.world_size}" if average else ""
        self.result.collectives.append(f"{what} at {user_line(node)} -> all_reduce({operation}){average_text}")
        return last

    def reduce_loss(self, node: torch.fx.Node, name: str) -> None:
        reduction = schema_argument(node, "reduction", 1)
        if self.dims_of(node) or reduction == 0:
            return  # per position ("none"): stays on the shard
        if name in CLASS_LOSSES and reduction == 1:
            return self.reduce_class_loss_mean(node, name)
        self.all_reduce(node, "sum", reduction == 1, f"{name} (reduction {'mean' if reduction == 1 else 'sum'})")

    def reduce_class_loss_mean(self, node: torch.fx.Node, name: str) -> None:
        """mean over the targets that count: all_reduce(local sum) / all_reduce(local count)."""
        target = schema_argument(node, "target")
        if schema_argument(node, "weight") is not None:
            self.refuse(node, f"{name} with class weights and reduction='mean' divides by the targets' weights",
                        "use reduction='sum' or no weights")
        if target.meta["val"].is_floating_point():  # class probabilities: every row counts
            return self.all_reduce(node, "sum", True, f"{name} (reduction mean)")
        ignore_index = schema_argument(node, "ignore_index", -100)
        schema_names = [argument.name for argument in node.target._schema.arguments]
        position = schema_names.index("reduction")
        if position < len(node.args):
            node.args = node.args[:position] + (2,) + node.args[position + 1:]
        else:
            node.kwargs = {**node.kwargs, "reduction": 2}
        value = node.meta["val"]
        total = self.all_reduce_quietly(node, "sum")
        counted = self.insert_after(total, aten.ne.Scalar, (target, ignore_index))
        count = self.insert_after(counted, aten.sum.default, (counted,), {"dtype": value.dtype})
        count_total = self.all_reduce_quietly(count, "sum")
        mean = self.insert_after(count_total, aten.div.Tensor, (total, count_total), val=value)
        node.replace_all_uses_with(mean, delete_user_cb=lambda user: user not in self.skip)
        self.result.collectives.append(f"{name} (reduction mean) at {user_line(node)} -> all_reduce(sum) of the "
                                       "loss and of the counted targets, divided")

    def all_reduce_quietly(self, node: torch.fx.Node, operation: str) -> torch.fx.Node:
        if self.train:
            self.refuse(node, "a loss over the sequence becomes an all_reduce, which has no gradient here "
                        "(train=True)", "compute the loss outside the partitioned model for training")
        import torch.distributed._functional_collectives  # noqa: F401

        reduced = self.insert_after(node, torch.ops._c10d_functional.all_reduce.default,
                                    (node, operation, self.shard.group_name))
        return self.insert_after(reduced, torch.ops._c10d_functional.wait_tensor.default, (reduced,))


__all__ = ["SequenceShard", "PartitionResult", "partition", "sequence_symbols", "check_ring_site", "emit_ring",
           "rewrite_sites_to_ring", "output_sequence_dims", "user_line"]
