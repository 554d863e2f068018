"""Mask analysis: classify what a site's mask is, and record how that was proved.

A classification must hold for every sequence length, not one example. The proof is symbolic: every tensor that masks
or biases the scores (an additive mask, a masked_fill/where condition, SDPA's attn_mask) is evaluated element-wise on
index symbols by passes/detect_symbolic.py, giving a formula in the query position i, the key position j, the batch
and head indices, and the graph's inputs (an attention_mask input appears as input_attention_mask(b, j)). The
conjunction of those formulas is the visibility predicate. Its atoms that relate i and j are linear in d = j - i, so
the predicate is a piecewise-constant function of d with breakpoints at the atoms' thresholds: sampling it at every
breakpoint and once inside every gap decides it exactly, for every length. That yields none, causal (d <= 0) or
sliding window W (1 - W <= d <= 0); one atom on an input indexed by (batch, key) combined by conjunction is the key
padding. As an independent check, the mask subgraph is then run at several lengths (including ones not seen at
capture) and compared with the claim.

What cannot be proved stays "arbitrary": the site keeps the mask tensor, and with it exact semantics. An additive
term that is not a mask (ALiBi, relative positions: anything with finite non-zero values) is a bias and is kept as a
tensor too, next to whatever structure was proved.

Exactness: a rewrite that drops a proved mask computes attention over exactly the visible keys. A position counts as
masked when -inf or a value <= -1e4 is written or added there (transformers uses finfo.min, older code -1e4 or -1e9):
exp of it underflows to 0 in float32 unless a score exceeds ~1e4 - 100. The rewrite differs from the original only
in rows where every key is masked (the original gives the mean of the values there when it masks with
a finite value, NaN with -inf; the tiled kernels give 0).
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import networkx
import sympy
import torch
from sympy.core.function import AppliedUndef

from passes.detect_symbolic import SymbolicEvaluator
from passes.symbolic import HUGE_NEGATIVE, Unsupported, as_bool, fold
from passes.graph_info import size_expr, symbol_hint, tensor_meta
from passes.mask_atoms import (RELATIONS, chunk_size, decide_on_box, difference_form, holds, interval, predicate_atoms,
                               sample_offsets)
from passes.records import MaskSpec

CHECK_LENGTHS = (1, 2, 3, 7, 64, 257)


@dataclass
class MaskTerm:
    """One tensor that masks or biases the scores.

    kind: "add" (coefficient * tensor is added to the scaled scores), "fill" (positions where the tensor is True get
        `fill`), "keep" (positions where it is False get `fill`).
    dims: for each dimension of the tensor (right-aligned to the scores), the index symbols it spans, outer to inner;
        () where the tensor broadcasts.
    """

    kind: str
    node: torch.fx.Node
    dims: tuple
    coefficient: float = 1.0
    fill: float = -math.inf


@dataclass
class IndexSpace:
    """The index symbols of the scores: independent axes (batch, heads), query positions and key positions."""

    independent: tuple
    query: tuple
    key: tuple
    sizes: dict

    @property
    def order(self) -> tuple:
        return self.independent + self.query + self.key


@dataclass
class KeyPaddingFinding:
    """The key padding mask: `relation(input, value)` (negated if `negate`) is True where key j of batch b is visible.
    `positions` says which input dim holds the batch index and which the key index (the others have size 1)."""

    node: torch.fx.Node
    relation: str
    value: float
    negate: bool
    batch_symbol: sympy.Symbol
    batch_dim: int
    key_dim: int


@dataclass
class MaskAnalysis:
    spec: MaskSpec
    key_padding: Optional[KeyPaddingFinding] = None
    kept_terms: tuple = ()
    notes: tuple = ()


def sdpa_mask(attn_mask: Optional[torch.fx.Node], is_causal: Any) -> MaskSpec:
    """The mask of a scaled_dot_product_attention call from its arguments alone (no analysis of the tensor)."""
    if attn_mask is not None and is_causal:
        return MaskSpec(kind="arbitrary", tensor=attn_mask.name,
                        proof="attn_mask and is_causal=True together; kept as the model wrote it")
    if is_causal is True:
        return MaskSpec(kind="causal", proof="is_causal=True in the scaled_dot_product_attention call")
    if not isinstance(is_causal, bool):
        return MaskSpec(kind="arbitrary", tensor=None,
                        proof=f"is_causal is a graph value ({is_causal}), not a constant")
    if attn_mask is None:
        return MaskSpec(kind="none", proof="no attn_mask and is_causal=False in the scaled_dot_product_attention call")
    return MaskSpec(kind="arbitrary", tensor=attn_mask.name,
                    proof="the attn_mask tensor's structure was not proved; it is kept exactly")


# -- the analysis ------------------------------------------------------------------------------------------------------

# Models build one mask for all their layers: the analysis of the same terms over the same index space is shared.
_ANALYSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def analyze_mask(graph_module: Optional[torch.nn.Module], terms: Sequence[MaskTerm], space: IndexSpace,
                 is_causal: bool = False, check_lengths: Sequence[int] = CHECK_LENGTHS) -> MaskAnalysis:
    """Classify the mask made of `terms` (plus SDPA's is_causal) over `space`; see the module docstring."""
    key = (tuple((term.kind, term.node, term.dims, term.coefficient, term.fill) for term in terms),
           space.independent, space.query, space.key, tuple(sorted((str(s), str(v)) for s, v in space.sizes.items())),
           is_causal, tuple(check_lengths))
    cache = _ANALYSES.setdefault(graph_module, {}) if graph_module is not None else {}
    if key not in cache:
        cache[key] = _analyze_mask(graph_module, terms, space, is_causal, check_lengths)
    return cache[key]


def _analyze_mask(graph_module: Optional[torch.nn.Module], terms: Sequence[MaskTerm], space: IndexSpace,
                  is_causal: bool, check_lengths: Sequence[int]) -> MaskAnalysis:
    if not terms:
        if is_causal:
            return MaskAnalysis(MaskSpec(kind="causal", proof="is_causal=True in the scaled_dot_product_attention "
                                         "call (top-left aligned)"))
        return MaskAnalysis(MaskSpec(kind="none", proof="no mask, bias or fill reaches the softmax"))
    evaluator = SymbolicEvaluator(graph_module)
    for symbol, size in space.sizes.items():
        evaluator.bounds[symbol] = size
    visibility: list = [sympy.Le(space.key[0], space.query[0])] if is_causal else []
    kept: list[MaskTerm] = []
    unproved: list[str] = []
    biases: list[str] = []
    for term in terms:
        try:
            value = evaluator.value(term.node, _term_index(term, space))
        except (Unsupported, RecursionError, TypeError, ValueError) as error:
            kept.append(term)
            unproved.append(f"{term.node.name} ({error})")
            continue
        if term.kind == "add":
            visible, bias = split_additive(fold(value * term.coefficient) if term.coefficient != 1 else value)
            if bias:
                kept.append(term)
                biases.append(term.node.name)
            visibility.append(visible)
        elif term.kind == "fill":
            visibility.append(sympy.Not(as_bool(value)))
        else:
            visibility.append(as_bool(value))
    predicate = sympy.And(*visibility)
    structure = classify_visibility(predicate, space, evaluator)
    if structure is None:
        kept = list(terms)
        reason = "; ".join(unproved) if unproved else f"the visibility {_short(predicate)} is not a proved structure"
        spec = MaskSpec(kind="arbitrary", tensor=terms[0].node.name,
                        proof=f"not proved ({reason}); the mask tensor is kept exactly")
        return MaskAnalysis(spec, None, tuple(kept))
    kind, window, padding = structure
    chunk = None
    if kind == "chunked":
        chunk, window = window, None
    notes = []
    check, checked_lengths = check_numerically(graph_module, terms, space, (kind, window or chunk, padding),
                                               check_lengths,
                                               skip=set(map(id, kept)), is_causal=is_causal)
    if check is not True:
        spec = MaskSpec(kind="arbitrary", tensor=terms[0].node.name,
                        proof=f"the symbolic form {_short(predicate)} failed the numeric check ({check}); "
                              "the mask tensor is kept exactly")
        return MaskAnalysis(spec, None, tuple(terms), (f"mask check failed: {check}",))
    if padding is not None and kind == "none":
        kind = "padding"
    if kind == "none" and kept:
        kind = "bias" if not unproved else "arbitrary"
    described = _describe(kind, window or chunk, padding)
    proof = f"symbolic: the visible keys are {described} for every length (d = j - i, decided at every breakpoint)"
    if checked_lengths:
        proof += f"; checked numerically at lengths {', '.join(map(str, checked_lengths))}"
    skipped = [length for length in check_lengths if length not in checked_lengths] if checked_lengths else []
    if skipped:
        proof += f" (the model does not accept lengths {', '.join(map(str, skipped))})"
    if biases:
        proof += f"; additive bias {', '.join(biases)} kept as a tensor"
    if unproved:
        proof += f"; not analyzed, kept as a tensor: {', '.join(unproved)}"
    if evaluator.facts:
        proof += f"; relies on: {'; '.join(dict.fromkeys(evaluator.facts))}"
    spec = MaskSpec(
        kind=kind, window=window, chunk=chunk,
        key_padding=padding.node.name if padding is not None else None,
        bias=kept[0].node.name if kept and (biases or unproved) else None,
        tensor=kept[0].node.name if kept else terms[0].node.name,
        proof=proof,
    )
    return MaskAnalysis(spec, padding, tuple(kept), tuple(notes))


def _describe(kind: str, window: Optional[int], padding: Optional[KeyPaddingFinding]) -> str:
    text = {"none": "all keys", "padding": "all keys", "bias": "all keys", "arbitrary": "all keys",
            "causal": "j <= i", "sliding_window": f"i - {window} < j <= i",
            "chunked": f"j <= i in the same chunk of {window} (floor(i / {window}) == floor(j / {window}))"}[kind]
    if padding is not None:
        relation = f"{padding.node.name}[b, j] {_RELATION_TEXT[padding.relation]} {padding.value:g}"
        text += f" where {'not ' if padding.negate else ''}{relation}"
    return text


_RELATION_TEXT = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_FLIPPED = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _short(expression: Any, limit: int = 160) -> str:
    text = str(expression)
    return text if len(text) <= limit else text[:limit] + "..."


def _term_index(term: MaskTerm, space: IndexSpace) -> tuple:
    """The tensor's index as mixed-radix combinations of the symbols each of its dims spans."""
    index = []
    for symbols in term.dims:
        position = sympy.Integer(0)
        for symbol in symbols:
            position = position * space.sizes[symbol] + symbol
        index.append(position)
    return tuple(index)


def is_masking_value(value: Any) -> bool:
    """A constant at or below HUGE_NEGATIVE (or -inf): adding or writing it masks the position."""
    if isinstance(value, (int, float)):
        return value <= HUGE_NEGATIVE
    value = sympy.sympify(value)
    return bool(value.is_number and (value == -sympy.oo or (value.is_real and value <= HUGE_NEGATIVE)))


def split_additive(expression: sympy.Basic) -> tuple[sympy.Basic, list]:
    """(visibility, bias addends) of an additive term: addends that only take the values 0 and a masking value
    become visibility; anything else is a bias."""
    expression = fold(expression)
    visible, bias = sympy.true, []
    for addend in sympy.Add.make_args(expression):
        mask = _masklike(addend)
        if mask is None and isinstance(addend, sympy.Piecewise):
            mask, common = _common_bias(addend)
            if mask is not None:
                bias.extend(common)
        if mask is None:
            bias.append(addend)
        else:
            visible = sympy.And(visible, mask)
    return visible, bias


def _common_bias(expression: sympy.Piecewise) -> tuple[Optional[sympy.Basic], list]:
    """Piecewise((bias + m1, c1), (bias + m2, c2), ...) with masklike m: (visibility, [bias]); else (None, [])."""
    common, masks = None, []
    for value, condition in expression.args:
        if _masklike(value) is sympy.false:
            masks.append((value, condition))  # a masked position: what bias it would have had does not matter
            continue
        addends = sympy.Add.make_args(value)
        masking = [addend for addend in addends if _masklike(addend) is not None]
        rest = sympy.Add(*[addend for addend in addends if _masklike(addend) is None])
        if common is None:
            common = rest
        elif rest != common and sympy.expand(rest - common) != 0:
            return None, []
        masks.append((sympy.Add(*masking), condition))
    if common is None:
        return None, []
    visible = _masklike(sympy.Piecewise(*masks))
    return (visible, [common]) if visible is not None and common != 0 else (None, [])


def _masklike(expression: sympy.Basic) -> Optional[sympy.Basic]:
    if expression == 0:
        return sympy.true
    if is_masking_value(expression):
        return sympy.false
    if isinstance(expression, sympy.Piecewise):
        visible, taken = sympy.false, sympy.false
        for value, condition in expression.args:
            inner = _masklike(value)
            if inner is None:
                return None
            visible = sympy.Or(visible, sympy.And(condition, sympy.Not(taken), inner))
            taken = sympy.Or(taken, condition)
        return visible
    return None


# -- classification of the visibility predicate -------------------------------------------------------------------

def classify_visibility(predicate: sympy.Basic, space: IndexSpace, evaluator: SymbolicEvaluator):
    """(kind, window or chunk, key padding) when the predicate is a proved structure, else None.

    The predicate's atoms are sorted into structural ones (linear in d = j - i), and factors: one key padding atom
    (an input at [batch, j]) and one chunk atom (floor(i / C) == floor(j / C)). Every assignment of the factors is
    tabulated over d; the predicate is "structure AND factors" exactly when one polarity of the factors leaves keys
    visible, and the others none."""
    if predicate is sympy.true:
        return "none", None, None
    if len(space.query) != 1 or len(space.key) != 1:
        return None
    query, key = space.query[0], space.key[0]
    bounds = dict(evaluator.bounds)
    replacements = {}
    structural = []
    padding_atoms, chunk_atoms = [], []
    for atom in predicate_atoms(predicate):
        if atom.atoms(AppliedUndef):
            padding_atoms.append(atom)
            continue
        chunk = chunk_size(atom, query, key)
        if chunk is not None:
            chunk_atoms.append((atom, chunk))
            continue
        decided = decide_on_box(atom, bounds)
        if decided is not None:
            replacements[atom] = decided
            continue
        linear = difference_form(atom, query, key)
        if linear is None:
            return None
        structural.append((atom, linear))
    predicate = predicate.xreplace(replacements)
    if len(padding_atoms) > 1 or len(chunk_atoms) > 1:
        return None
    padding = _key_padding(padding_atoms[0], space, evaluator) if padding_atoms else None
    if padding_atoms and padding is None:
        return None
    factors = padding_atoms + [atom for atom, _ in chunk_atoms]
    samples = sample_offsets([linear for _, linear in structural])
    tables = {}
    for assignment in itertools.product((True, False), repeat=len(factors)):
        table = []
        for d in samples:
            truth = {atom: sympy.true if holds(atom, query, key, d) else sympy.false for atom, _ in structural}
            truth.update({atom: sympy.true if value else sympy.false for atom, value in zip(factors, assignment)})
            value = predicate.xreplace(truth)
            if value not in (sympy.true, sympy.false):
                return None
            table.append(bool(value))
        tables[assignment] = table
    relevant = [position for position in range(len(factors)) if any(
        tables[assignment] != tables[assignment[:position] + (not assignment[position],) + assignment[position + 1:]]
        for assignment in tables)]
    visible = [assignment for assignment, table in tables.items() if any(table)]
    if len({tuple(assignment[position] for position in relevant) for assignment in visible}) != 1:
        return None
    chosen = visible[0]
    structure_table = tables[chosen]
    if padding_atoms and 0 not in relevant:
        padding = None
    elif padding is not None and not chosen[0]:
        padding.negate = not padding.negate
    chunked = chunk_atoms and (len(factors) - 1) in relevant
    if chunked and not chosen[-1]:
        return None  # visible only across chunks: not a chunked mask
    shape = interval(samples, structure_table)
    if shape is None:
        return None
    low, high = shape
    if chunked:
        return ("chunked", chunk_atoms[0][1], padding) if low is None and high == 0 else None
    if low is None and high is None:
        return "none", None, padding
    if low is None and high == 0:
        return "causal", None, padding
    if low is not None and high == 0 and low <= 0:
        return "sliding_window", 1 - low, padding
    return None


def _key_padding(atom, space: IndexSpace, evaluator: SymbolicEvaluator) -> Optional[KeyPaddingFinding]:
    """The atom as relation(input[b, j], constant) for an input indexed by one independent axis and the key."""
    relation = RELATIONS.get(type(atom))
    if relation is None:
        return None
    lhs, rhs = atom.lhs, atom.rhs
    if isinstance(rhs, AppliedUndef) and not isinstance(lhs, AppliedUndef):
        lhs, rhs, relation = rhs, lhs, _FLIPPED[relation]
    if not isinstance(lhs, AppliedUndef) or not rhs.is_number:
        return None
    name = lhs.func.__name__
    node = evaluator.inputs.get(name)
    if node is None:
        return None  # a parameter or buffer, not an input: not padding
    key = space.key[0]
    batch_dim = key_dim = None
    batch_symbol = None
    shape = tensor_meta(node).shape
    for dim, argument in enumerate(lhs.args):
        if argument == key and key_dim is None:
            key_dim = dim
        elif argument in space.independent and batch_symbol is None:
            batch_symbol, batch_dim = argument, dim
        elif argument == 0 and size_expr(shape[dim]) == 1:
            continue
        else:
            return None
    if key_dim is None or batch_symbol is None or batch_dim > key_dim:
        return None
    return KeyPaddingFinding(node, relation, float(rhs), False, batch_symbol, batch_dim, key_dim)


def padding_drop_dims(rank: int, padding: KeyPaddingFinding) -> tuple:
    """The size-1 dims of a padding input other than its batch and key dims, descending."""
    return tuple(dim for dim in reversed(range(rank)) if dim not in (padding.batch_dim, padding.key_dim))


# -- the numeric check ------------------------------------------------------------------------------------------------

def check_numerically(graph_module, terms: Sequence[MaskTerm], space: IndexSpace, structure: tuple,
                      lengths: Sequence[int], skip: set, is_causal: bool = False):
    """Run the mask subgraph at each length and compare the visible keys with the claim: (True, the lengths checked)
    or (what failed, ...). A length the subgraph cannot run at (a buffer shorter than it) is one the model does not
    accept either, and is skipped; at least two lengths must run."""
    checked = [term for term in terms if id(term) not in skip]
    if not checked or not lengths or graph_module is None:
        return True, ()
    sequence_symbols = set()
    for symbol in space.query + space.key:
        size = sympy.sympify(space.sizes[symbol])
        sequence_symbols |= size.free_symbols
    try:
        module, placeholders = _mask_subgraph(graph_module, [term.node for term in checked])
    except Exception as error:  # noqa: BLE001 - any failure to build the subgraph means "not checked"
        return f"the mask subgraph could not be extracted: {type(error).__name__}", ()
    _run_on_cpu(module)
    generator = torch.Generator().manual_seed(0)
    accepted = []
    for length in lengths:
        values = _hints(graph_module)
        values.update({symbol: length for symbol in sequence_symbols})
        try:
            inputs = [_example_input(node, values, generator) for node in placeholders]
            with torch.no_grad():
                outputs = module(*inputs)
            expected = [tuple(int(sympy.sympify(size_expr(size)).subs(values)) for size in
                              tensor_meta(term.node).shape) for term in checked]
        except Exception:  # noqa: BLE001 - the subgraph does not run at this length: neither does the model
            continue
        if any(tuple(output.shape) != shape for output, shape in zip(outputs, expected)):
            continue
        accepted.append(length)
        try:
            same = _matches_claim(checked, outputs, structure, space, values, inputs, placeholders, is_causal)
        except Exception as error:  # noqa: BLE001 - a check that cannot be made is a check that failed
            return f"the check failed at length {length}: {type(error).__name__}: {str(error)[:80]}", tuple(accepted)
        if not same:
            return f"the subgraph's mask differs from the claim at length {length}", tuple(accepted)
    if len(accepted) < 2:
        return f"the mask subgraph ran at {len(accepted)} of the lengths {tuple(lengths)}", tuple(accepted)
    return True, tuple(accepted)


def _run_on_cpu(module: torch.fx.GraphModule) -> None:
    """Point the subgraph's factory calls (arange, ones, full, ...) at the CPU: the check runs there whatever device
    the model was captured on, the meta device included (presets are planned without weights)."""
    cpu = torch.device("cpu")
    for node in module.graph.nodes:
        device = node.kwargs.get("device")
        if isinstance(device, torch.device) and device.type != "cpu":
            node.kwargs = {**node.kwargs, "device": cpu}
        elif isinstance(device, str) and not device.startswith("cpu"):
            node.kwargs = {**node.kwargs, "device": cpu}
        elif isinstance(device, torch.fx.Node):  # the weights' device, read at run time (passes/capture.py)
            node.kwargs = {**node.kwargs, "device": cpu}
    module.recompile()


def _matches_claim(terms, outputs, structure, space: IndexSpace, values: dict, inputs, placeholders,
                   is_causal: bool) -> bool:
    """Whether the keys the evaluated terms leave visible are those the claimed structure and padding do."""
    kind, window, padding = structure
    sizes = {symbol: int(sympy.sympify(size).subs(values)) for symbol, size in space.sizes.items()}
    visible = None
    for term, output in zip(terms, outputs):
        grid = index_grid(output, term.dims, space.order, sizes)
        if term.kind == "add":
            term_visible = (grid * term.coefficient) > HUGE_NEGATIVE
        elif term.kind == "fill":
            term_visible = ~grid.bool()
        else:
            term_visible = grid.bool()
        visible = term_visible if visible is None else visible & term_visible
    claim = _claimed_visibility(kind, window, padding, space, sizes, inputs, placeholders)
    if is_causal:
        claim = claim & _structure_grid("causal", None, space, sizes)
    visible, claim = torch.broadcast_tensors(visible, claim)
    return torch.equal(visible, claim)


def _structure_grid(kind: str, window, space: IndexSpace, sizes: dict) -> torch.Tensor:
    queries = torch.arange(sizes[space.query[0]])
    keys = torch.arange(sizes[space.key[0]])
    d = keys[None, :] - queries[:, None]
    if kind == "causal":
        grid = d <= 0
    elif kind == "sliding_window":
        grid = (d <= 0) & (d > -window)
    elif kind == "chunked":
        grid = (d <= 0) & (queries[:, None] // window == keys[None, :] // window)
    else:
        grid = torch.ones_like(d, dtype=torch.bool)
    return grid.reshape((1,) * len(space.independent) + tuple(grid.shape))


def _claimed_visibility(kind, window, padding, space, sizes, inputs, placeholders) -> torch.Tensor:
    grid = _structure_grid(kind, window, space, sizes)
    if padding is None:
        return grid
    tensor = inputs[placeholders.index(padding.node)]
    keep = padding_tensor(tensor, padding, (sizes[padding.batch_symbol], sizes[space.key[0]]))
    shape = [1] * len(space.order)
    shape[space.order.index(padding.batch_symbol)] = keep.shape[0]
    shape[space.order.index(space.key[0])] = keep.shape[1]
    return grid & keep.reshape(shape)


def padding_tensor(tensor: torch.Tensor, padding: KeyPaddingFinding, shape: tuple) -> torch.Tensor:
    """The (batch, keys) bool mask from the input, as the rewrite computes it."""
    for dim in padding_drop_dims(tensor.dim(), padding):
        tensor = tensor.select(dim, 0)
    tensor = tensor[:shape[0], :shape[1]]
    keep = getattr(torch, padding.relation)(tensor, padding.value)
    return ~keep if padding.negate else keep


def index_grid(tensor: torch.Tensor, dims: tuple, order: tuple, sizes: dict) -> torch.Tensor:
    """The tensor with one dim per symbol of `order` (size 1 where it broadcasts)."""
    leaf_sizes, leaf_symbols = [], []
    for symbols in dims:
        for symbol in symbols:
            leaf_sizes.append(sizes[symbol])
            leaf_symbols.append(symbol)
    tensor = tensor.reshape(leaf_sizes)
    present = [symbol for symbol in order if symbol in leaf_symbols]
    tensor = tensor.permute([leaf_symbols.index(symbol) for symbol in present])
    return tensor.reshape([sizes[symbol] if symbol in leaf_symbols else 1 for symbol in order])


def _hints(graph_module) -> dict:
    values = {}
    for node in graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        value = tensor_meta(node)
        if value is None:
            continue
        for size in value.shape:
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                for symbol in expr.free_symbols:
                    hint = symbol_hint(size.node.shape_env, symbol)
                    if hint is not None:
                        values[symbol] = hint
    return values


def _example_input(node: torch.fx.Node, values: dict, generator: torch.Generator) -> Any:
    value = tensor_meta(node)
    if value is None:
        return node.meta.get("val")
    shape = [int(sympy.sympify(size_expr(size)).subs(values)) for size in value.shape]
    if value.dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.7
    if value.dtype.is_floating_point:
        return (torch.rand(shape, generator=generator) < 0.7).to(value.dtype)
    return (torch.rand(shape, generator=generator) < 0.7).to(value.dtype)


def dependency_graph(graph: torch.fx.Graph) -> "networkx.DiGraph":
    """The graph's data dependencies as a networkx DiGraph (edge: input -> user)."""
    dependencies = networkx.DiGraph()
    for node in graph.nodes:
        dependencies.add_node(node)
        for source in node.all_input_nodes:
            dependencies.add_edge(source, node)
    return dependencies


def _mask_subgraph(graph_module, outputs: list) -> tuple[torch.fx.GraphModule, list]:
    """A module computing `outputs` from the placeholders they depend on (parameters read from graph_module)."""
    dependencies = dependency_graph(graph_module.graph)
    needed = set(outputs)
    for node in outputs:
        needed |= networkx.ancestors(dependencies, node)
    graph = torch.fx.Graph()
    mapping: dict = {}
    placeholders = []
    for node in graph_module.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            placeholders.append(node)
        mapping[node] = graph.node_copy(node, lambda argument: mapping[argument])
    graph.output(tuple(mapping[node] for node in outputs))
    return torch.fx.GraphModule(graph_module, graph), placeholders
