"""Rewrite: replace each site that the plan rewrites with the call its variant emits (the planner hands the variants).

A site found in a hand-written form carries a SiteAdapter (passes/detect_adapters.py): before the variant's call, the
rewrite emits the layout steps that turn the site's roots into (batch, heads, sequence, head_dim) q, k and v, the key
padding mask when the mask proof names one, and the kept mask tensor when the site keeps it; after the call, the steps
that return the output to the replaced node's layout and dtype. Sizes are emitted from the graph's inputs
(sym_size), so the rewritten graph works at every length the original did.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Callable, Mapping, Optional

import sympy
import torch
import torch._functorch.predispatch as predispatch

from passes.detect_adapters import SiteAdapter, TensorAdapter
from passes.errors import PlanError
from passes.records import AttentionSite, Plan

aten = torch.ops.aten


Emit = Callable[[torch.fx.Graph, torch.fx.Node, AttentionSite, dict], torch.fx.Node]


def rewrite_sites(graph_module: torch.fx.GraphModule, plan: Plan, variants: Mapping[str, Any]) -> list[str]:
    """Rewrite `graph_module` in place following `plan`: each rewritten site's node becomes the call that its chosen
    variant emits (`variants[name].emit(graph, node, site, nodes, candidate)`, as backends/registry.py's VARIANTS).
    Returns the names of the rewritten sites."""
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    rewritten = []
    for decision in plan.decisions:
        if not decision.rewritten:
            continue
        emit = functools.partial(variants[decision.choice.variant].emit, candidate=decision.choice)
        replace_site(graph, nodes, decision.site, emit, like_the_original=True)
        rewritten.append(decision.site.name)
    drop_dead_metadata_asserts(graph)
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or node.target in STATEFUL)
    graph.lint()
    graph_module.recompile()
    return rewritten


def replace_site(graph: torch.fx.Graph, nodes: dict, site: AttentionSite, emit: Emit, *,
                 like_the_original: bool = False) -> torch.fx.Node:
    """Replace the site's node by what `emit(graph, node, site, nodes)` returns, through the site's adapters (the
    site and nodes `emit` sees are in (batch, heads, sequence, head_dim)); the replacement takes the node's metadata
    and users, and the node is erased. Returns the replacement.

    like_the_original: also lay the output out in memory as the node's was, copy it where a user writes into it in
    place, and erase what only the node used (its scores, softmax, mask building)."""
    node = nodes[site.node]
    with graph.inserting_before(node):
        emitted_site, extra = prepare_inputs(graph, site, nodes)
        output = restore_output(graph, emit(graph, node, emitted_site, {**nodes, **extra}), site, extra)
        if like_the_original:
            output = match_memory_order(graph, output, node)
            if any(_writes_its_input(user) for user in node.users):
                # The kernel keeps its output for the backward; a model that adds into it in place would change it.
                output = graph.call_function(aten.clone.default, (output,))
    for key in ("val", "stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in node.meta:
            output.meta[key] = node.meta[key]
    node.replace_all_uses_with(output)
    inputs = node.all_input_nodes
    graph.erase_node(node)
    if like_the_original:
        erase_dead_inputs(graph, inputs)
    return output


def _ceil_division(numerator: Any, denominator: Any) -> Any:
    return -(-numerator // denominator)


# torch's symbolic integer divisions (the sizes of strided front ends, patches, halves), as graph arithmetic.
_INTEGER_DIVISIONS = {"FloorDiv": operator.floordiv, "CeilDiv": _ceil_division, "Mod": operator.mod,
                      "PythonMod": operator.mod}


class _Emitter:
    """Emits layout steps and sizes into a graph at the current insertion point."""

    def __init__(self, graph: torch.fx.Graph, nodes: dict, adapter: SiteAdapter):
        self.graph = graph
        self.nodes = nodes
        self.sizes: dict = {}
        for symbol, placeholder, dim in adapter.symbols:
            self.sizes[sympy.Symbol(symbol)] = (placeholder, dim)
        self.emitted: dict = {}

    def symbol(self, symbol: sympy.Symbol) -> torch.fx.Node:
        key = str(symbol)
        if key not in self.emitted:
            found = next((source for candidate, source in self.sizes.items() if str(candidate) == key), None)
            if found is None:
                raise PlanError(f"the size {symbol} has no input to be read from")
            placeholder, dim = found
            self.emitted[key] = self.graph.call_function(aten.sym_size.int, (self.nodes[placeholder], dim))
        return self.emitted[key]

    def size(self, size: Any) -> Any:
        """An int, or a node computing the sympy expression from the inputs' sizes."""
        if isinstance(size, int):
            return size
        expression = sympy.sympify(size)
        if expression.is_Integer:
            return int(expression)
        if expression.is_Symbol:
            return self.symbol(expression)
        if expression.is_Add:
            terms = [self.size(term) for term in expression.args]
            total = terms[0]
            for term in terms[1:]:
                total = self.graph.call_function(operator.add, (total, term))
            return total
        if expression.is_Mul:
            coefficient, rest = expression.as_coeff_Mul()
            factors = [self.size(factor) for factor in sympy.Mul.make_args(rest)]
            value = factors[0]
            for factor in factors[1:]:
                value = self.graph.call_function(operator.mul, (value, factor))
            numerator, denominator = sympy.fraction(sympy.Rational(coefficient))
            if numerator != 1:
                value = self.graph.call_function(operator.mul, (value, int(numerator)))
            if denominator != 1:
                value = self.graph.call_function(operator.floordiv, (value, int(denominator)))
            return value
        division = _INTEGER_DIVISIONS.get(type(expression).__name__)
        if division is not None and len(expression.args) == 2:
            numerator, denominator = (self.size(argument) for argument in expression.args)
            return self.graph.call_function(division, (numerator, denominator))
        if isinstance(expression, sympy.floor) and expression.args[0].is_Mul:
            numerator, denominator = sympy.fraction(expression.args[0])
            if denominator != 1:
                return self.graph.call_function(operator.floordiv, (self.size(numerator), self.size(denominator)))
        if expression.is_Pow and expression.exp.is_Integer and expression.exp > 0:
            base = self.size(expression.base)
            value = base
            for _ in range(int(expression.exp) - 1):
                value = self.graph.call_function(operator.mul, (value, base))
            return value
        raise PlanError(f"cannot emit the size {expression}")

    def steps(self, tensor: torch.fx.Node, steps: tuple) -> torch.fx.Node:
        for kind, argument in steps:
            if kind == "reshape":
                tensor = self.graph.call_function(aten.reshape.default, (tensor, [self.size(s) for s in argument]))
            elif kind == "permute":
                tensor = self.graph.call_function(aten.permute.default, (tensor, list(argument)))
            elif kind == "expand":
                tensor = self.graph.call_function(aten.expand.default, (tensor, [self.size(s) for s in argument]))
            elif kind == "dtype":
                tensor = self.graph.call_function(aten._to_copy.default, (tensor,),
                                                  {"dtype": getattr(torch, argument)})
        return tensor

    def adapt(self, adapter: TensorAdapter, source: Optional[torch.fx.Node] = None) -> torch.fx.Node:
        return self.steps(source if source is not None else self.nodes[adapter.source], adapter.steps)


def prepare_inputs(graph: torch.fx.Graph, site: AttentionSite, nodes: dict) -> tuple[AttentionSite, dict]:
    """Emit the site's adapters; return the site as the variant should see it and the new nodes by name."""
    adapter: Optional[SiteAdapter] = site.adapter
    if adapter is None:
        return site, {}
    emitter = _Emitter(graph, nodes, adapter)
    extra: dict = {"__emitter__": emitter}
    changes: dict = {}
    for field_name in ("query", "key", "value"):
        recipe = getattr(adapter, field_name)
        if recipe is not None:
            node = emitter.adapt(recipe)
            extra[node.name] = node
            changes[field_name] = node.name
    mask = site.mask
    mask_changes: dict = {}
    if adapter.key_padding is not None and mask.key_padding is not None:
        node = _emit_key_padding(emitter, adapter)
        extra[node.name] = node
        mask_changes["key_padding"] = node.name
    keeps_tensor = mask.kind == "arbitrary" or mask.bias is not None
    if keeps_tensor and adapter.mask_terms:
        node = _emit_kept_mask(emitter, adapter)
        extra[node.name] = node
        mask_changes["tensor"] = node.name
    if mask_changes:
        changes["mask"] = dataclasses.replace(mask, **mask_changes)
    return dataclasses.replace(site, **changes), extra


def _emit_key_padding(emitter: _Emitter, adapter: SiteAdapter) -> torch.fx.Node:
    padding = adapter.key_padding
    tensor = emitter.nodes[padding.source]
    for dim in padding.drop_dims:
        tensor = emitter.graph.call_function(aten.select.int, (tensor, dim, 0))
    for dim, size in enumerate(padding.shape):
        tensor = emitter.graph.call_function(aten.slice.Tensor, (tensor, dim, 0, emitter.size(size)))
    value = int(padding.value) if float(padding.value).is_integer() else padding.value
    keep = emitter.graph.call_function(getattr(aten, padding.relation).Scalar, (tensor, value))
    if padding.negate:
        keep = emitter.graph.call_function(aten.logical_not.default, (keep,))
    return keep


def _emit_kept_mask(emitter: _Emitter, adapter: SiteAdapter) -> torch.fx.Node:
    """One mask for the op: a lone "keep" term stays boolean; otherwise every term becomes additive and is summed."""
    terms = adapter.mask_terms
    if len(terms) == 1 and terms[0].kind == "keep":
        return emitter.adapt(terms[0].tensor)
    total = None
    for term in terms:
        tensor = emitter.adapt(term.tensor)
        if term.kind == "add":
            if term.coefficient != 1.0:
                tensor = emitter.graph.call_function(aten.mul.Tensor, (tensor, term.coefficient))
        elif term.kind == "keep":
            tensor = emitter.graph.call_function(aten.where.Scalar, (tensor, 0.0, -math.inf))
        else:
            tensor = emitter.graph.call_function(aten.where.Scalar, (tensor, -math.inf, 0.0))
        total = tensor if total is None else emitter.graph.call_function(aten.add.Tensor, (total, tensor))
    return total


def restore_output(graph: torch.fx.Graph, replacement: torch.fx.Node, site: AttentionSite,
                   extra: dict) -> torch.fx.Node:
    """The op's output in the replaced node's layout and dtype."""
    adapter: Optional[SiteAdapter] = site.adapter
    if adapter is None or adapter.output is None:
        return replacement
    return extra["__emitter__"].adapt(adapter.output, replacement)


def _writes_its_input(node: torch.fx.Node) -> bool:
    """An in-place op on its first argument (aten.add_, aten.mul_, ...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def match_memory_order(graph: torch.fx.Graph, output: torch.fx.Node, replaced: torch.fx.Node) -> torch.fx.Node:
    """The output laid out in memory as the replaced node's was. SDPA returns (batch, heads, length, dim) stored as
    (batch, length, heads, dim); models then transpose and `view` it, which needs that order. Our kernels return
    contiguous outputs: where the original's order differs, one copy puts the output in it."""
    value = replaced.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.is_contiguous():
        return output
    try:
        order = list(value.dim_order())  # outermost dim in memory first; symbolic strides compare by their hints
    except Exception:  # strides the shape environment cannot order: leave the output as the kernel returns it
        return output
    if order == list(range(value.dim())):
        return output
    inverse = [order.index(dim) for dim in range(value.dim())]
    permuted = graph.call_function(aten.permute.default, (output, order))
    contiguous = graph.call_function(aten.clone.default, (permuted,), {"memory_format": torch.contiguous_format})
    return graph.call_function(aten.permute.default, (contiguous, inverse))


# Ops FX keeps as impure that may still go once their result is unused: checks on metadata, and dropout (impure
# only because it draws random numbers).
DROPPABLE = {aten._assert_tensor_metadata.default, aten.dropout.default, aten.native_dropout.default}
# Calls FX takes for pure whose effect later ops need: functorch's vmap levels, entered and left around the batched
# ops of a torch.vmap that export captured (transformers builds some masks so). Erased as dead code, the batched ops
# run outside their level and raise.
STATEFUL = {predispatch._vmap_increment_nesting, predispatch._vmap_decrement_nesting}


def has_effect(node: torch.fx.Node) -> bool:
    """Whether `node` must stay although nothing uses its value."""
    if node.op == "output":
        return True
    if node.op == "placeholder":
        return False
    return node.target in STATEFUL or (node.is_impure() and node.target not in DROPPABLE)


def erase_dead_inputs(graph: torch.fx.Graph, nodes: list) -> None:
    """Erase what only the replaced node used (its scores, softmax, mask building), up the graph."""
    work = list(nodes)
    erased: set = set()
    while work:
        node = work.pop()
        # A node reached along two paths may already be gone (erased nodes keep their graph attribute).
        if node in erased or node.op != "call_function" or node.graph is not graph:
            continue
        for user in list(node.users):
            if user.target == aten._assert_tensor_metadata.default and not user.users:
                graph.erase_node(user)
        if node.users or (node.is_impure() and node.target not in DROPPABLE):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        work.extend(inputs)


def drop_dead_metadata_asserts(graph: torch.fx.Graph) -> None:
    """Erase every op whose value reaches neither the outputs nor an op with a side effect, counting metadata checks
    and dropout (DROPPABLE) as free of effects. FX's eliminate_dead_code keeps those two, and with them a replaced
    softmax and its quadratic scores: a metadata check on the probabilities, or their dropout when the model also
    views the probabilities as attention weights that its caller drops (ProphetNet's main stream)."""
    live: set = set()
    stack = [node for node in graph.nodes if has_effect(node)]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    for node in reversed(list(graph.nodes)):  # users before what they use
        if node.op == "call_function" and node not in live:
            graph.erase_node(node)
