"""Find softmax attention however a model writes it: a softmax over a contraction of Q with K that feeds a contraction
with V, in the exported ATen graph.

The matcher is anchored on the softmax. Backwards, it follows the scores through casts, layout ops, scaling,
additive masks and biases, masked_fill/where, tanh soft-capping and concatenated sink logits to a contraction (matmul,
bmm, baddbmm, einsum); forwards, through casts, layout ops, dropout and the sink slice, to the contraction with V. Each
contraction operand is followed back through layout ops and constant scalings to its root (the projection, the rotary
embedding). Then passes/detect_layout.py proves by index algebra which root factors are batch, heads, positions and
head dim, passes/masks.py proves the mask, and passes/detect_adapters.py records how to feed a tiled op.

The functions are named for what they match, in the style of Inductor's pattern matcher; `match_softmax_attention`
is the entry that passes/match.py runs on every node.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import sympy
import torch

from passes.detect_adapters import (
    KeyPaddingAdapter,
    MaskTermAdapter,
    SiteAdapter,
    TensorAdapter,
    build_steps,
)
from passes.detect_layout import (
    Atom, AtomSpace, Contraction, LayoutError, as_contraction, contraction_layout, exact_quotient, layout_sizes,
    leaves, node_shape, product, sizes_equal)
from passes.detect_paths import (
    SOFTMAX_TARGETS, NotAttention, Operand, Scores, UnsupportedSite, follow_probabilities, follow_scores,
    is_parameter, score_paths, term_layout, trace_operand, value_paths)
from passes.graph_info import dtype_name, module_path, size_expr, size_hints, source_line, tensor_meta
from passes.masks import IndexSpace, MaskAnalysis, MaskTerm, analyze_mask, padding_drop_dims
from passes.records import AttentionSite, MaskSpec
from passes.symbolic import index_symbol

aten = torch.ops.aten


def match_softmax_attention(node: torch.fx.Node) -> Optional[AttentionSite]:
    """softmax(f(Q·Kᵀ)) feeding a contraction with V, in any layout (the form "manual", "einsum" or "baddbmm")."""
    if node.op != "call_function" or node.target not in SOFTMAX_TARGETS:
        return None
    unsupported: Optional[tuple] = None
    paths = list(score_paths(node.args[0]))
    probabilities_paths = list(value_paths(node))
    if not paths or not probabilities_paths:
        # A Q·K contraction may still reach the softmax, or the probabilities a contraction with V, through ops the
        # paths do not model: recorded and kept, with the reason.
        scores = (paths[0], None) if paths else _unmodeled_scores(node)
        values = (probabilities_paths[0], None) if probabilities_paths else _unmodeled_probabilities(node)
        if scores is not None and values is not None:
            reason = "; ".join(text for text in (scores[1], values[1]) if text)
            return unsupported_site(node, scores[0], values[0], reason)
        return None
    for scores_path in paths:
        for probabilities_path in value_paths(node):
            try:
                site = build_site(node, scores_path, probabilities_path)
            except NotAttention:
                continue
            except (UnsupportedSite, LayoutError) as error:
                if unsupported is None:
                    unsupported = (scores_path, probabilities_path, str(error))
                continue
            escaping = _escaping_probabilities(node, probabilities_path)
            if escaping is None:
                return site
            if unsupported is None:
                unsupported = (scores_path, probabilities_path, (
                    f"the attention weights are used beyond the product with V ({escaping.name}: returned, as with "
                    "need_weights=True or output_attentions=True): the quadratic matrix is computed anyway"))
    if unsupported is not None:
        return unsupported_site(node, *unsupported)
    return None


def _nearest_contraction(starts: list, neighbours, accept, parents: dict) -> Optional[torch.fx.Node]:
    """Breadth first from `starts` along `neighbours` (inputs or users), over at most 64 nodes: the first call whose
    accept(node) holds, or None. `parents` maps each node reached to the node it was reached from."""
    frontier, seen = list(starts), set(starts)
    while frontier and len(seen) <= 64:
        node = frontier.pop(0)
        if node.op != "call_function":
            continue
        if as_contraction(node) is not None and accept(node):
            return node
        for other in neighbours(node):
            if other not in seen:
                seen.add(other)
                parents[other] = node
                frontier.append(other)
    return None


def _unmodeled_scores(softmax: torch.fx.Node) -> Optional[tuple[list, str]]:
    """(path [contraction, ..., softmax input], reason) for the nearest contraction upstream of the softmax when no
    score path reaches one: the scores pass through an op that the matcher does not model (a multiplicative mask,
    OpenAI GPT's w * b + -1e4 * (1 - b)). Such a site is recorded and kept, so that the report says why."""
    start = softmax.args[0]
    if not isinstance(start, torch.fx.Node):
        return None
    parents: dict = {}
    contraction = _nearest_contraction([start], lambda node: node.all_input_nodes, lambda node: True, parents)
    if contraction is None:
        return None
    path = [contraction]
    while path[-1] in parents:
        path.append(parents[path[-1]])
    ops = []
    for step in path[1:]:
        name = _op_name(step)
        if name not in ops and name not in ("view", "reshape", "permute", "transpose", "expand", "clone",
                                            "contiguous", "_to_copy", "to", "type_as", "unsqueeze"):
            ops.append(name)
    return path, (f"the scores reach the softmax through ops the matcher does not model "
                  f"({', '.join(ops) or 'unknown'}): kept as it is")


def _unmodeled_probabilities(softmax: torch.fx.Node) -> Optional[tuple[list, str]]:
    """([first op after the softmax, ..., contraction], reason) for the nearest contraction downstream that takes
    what the softmax became through ops the value paths do not model (CPM-Ant zeroes masked probabilities with a
    masked_fill after the softmax)."""
    parents: dict = {user: softmax for user in softmax.users}
    contraction = _nearest_contraction(list(softmax.users), lambda node: node.users,
                                       lambda node: parents[node] in as_contraction(node).operands, parents)
    if contraction is None:
        return None
    path = [contraction]
    while parents.get(path[-1]) not in (None, softmax):
        path.append(parents[path[-1]])
    path.reverse()
    ops = [_op_name(step) for step in path[:-1]]
    return path, (f"the probabilities reach the product with V through ops the matcher does not model "
                  f"({', '.join(dict.fromkeys(ops)) or 'unknown'}): kept as it is")


def _op_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _escaping_probabilities(softmax: torch.fx.Node, path: list) -> Optional[torch.fx.Node]:
    """A user of the probabilities (the softmax or an op on the way to V) outside the path to V whose value reaches
    the graph's outputs (returned attention weights), if any."""
    on_path = set(path)
    for node in [softmax] + path[:-1]:
        for user in node.users:
            if user in on_path:
                continue
            if node.target == aten.native_dropout.default and user.target is operator.getitem and user.args[1] == 1:
                continue  # the dropout mask, not the probabilities
            if _reaches_output(user):
                return user
    return None


def _reaches_output(node: torch.fx.Node) -> bool:
    """Whether the value of `node` flows into the graph's outputs (dead code and assertions do not count)."""
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current.op == "output":
            return True
        if current in seen or len(seen) > 10_000:
            continue
        seen.add(current)
        frontier.extend(current.users)
    return False


def _form(scores: Scores, value_contraction: Contraction) -> str:
    targets = {scores.contraction.node.target, value_contraction.node.target}
    if aten.einsum.default in targets:
        return "einsum"
    if aten.baddbmm.default in targets:
        return "baddbmm"
    return "manual"


@dataclass
class Axes:
    """The classes of unified atoms, by role, and each root's factors."""

    batch: list
    query: list
    key: list
    dim: list
    value_dim: list


def build_site(softmax: torch.fx.Node, scores_path: list, probabilities_path: list) -> AttentionSite:
    space = AtomSpace()
    qk = as_contraction(scores_path[0])
    if any(not isinstance(operand, torch.fx.Node) for operand in qk.operands):
        raise NotAttention("a Q·K operand is not a tensor")
    first = trace_operand(qk.operands[0], space, "A")
    second = trace_operand(qk.operands[1], space, "B")
    if is_parameter(first.root) and is_parameter(second.root):
        raise NotAttention("both operands of the first contraction are weights")
    scores = follow_scores(scores_path, first, second, space)
    rank = len(scores.layout)
    softmax_dim = softmax.args[1] % rank
    key_classes = space.leaf_classes(scores.layout[softmax_dim])
    free_first = _free_classes(qk, 0, (first.layout, second.layout), space)
    free_second = _free_classes(qk, 1, (first.layout, second.layout), space)
    if set(key_classes) == set(free_second) and key_classes:
        query, key = first, second
        query_classes = free_first
    elif set(key_classes) == set(free_first) and key_classes:
        query, key = second, first
        query_classes = free_second
    else:
        raise UnsupportedSite("the softmax does not normalize over the keys of the Q·K contraction")
    if is_parameter(key.root):
        raise NotAttention("the keys are a weight (a classifier or router, not attention)")
    if scores.sinks is not None and scores.sinks_dim != softmax_dim:
        raise UnsupportedSite("the sink logits are concatenated on another axis than the keys")

    pv = as_contraction(probabilities_path[-1])
    feeding = probabilities_path[-2] if len(probabilities_path) > 1 else softmax
    probabilities_layout, dropout_p = follow_probabilities(probabilities_path, scores.layout, scores, space)
    probability_index = 0 if pv.operands[0] is feeding else 1
    other = pv.operands[1 - probability_index]
    if other is feeding:
        raise NotAttention("the probabilities are contracted with themselves")
    value = trace_operand(other, space, "V")
    if is_parameter(value.root):
        raise NotAttention("the values are a weight (a weighted sum with parameters, not attention)")
    return classify_axes(softmax, scores, query, key, value, key_classes, query_classes, qk, first, second, pv,
                         probabilities_layout, probability_index, space, dropout_p, _form(scores, pv), False)


def classify_axes(anchor, scores: Scores, query: Operand, key: Operand, value: Operand, key_classes, query_classes,
                  qk: Contraction, first: Operand, second: Operand, pv: Contraction, probabilities_layout,
                  probability_index: int, space: AtomSpace, dropout_p: float, form: str, is_causal: bool):
    """Check the second contraction against the first and sort every class into batch, query, key, dim, value dim."""
    batch_classes = _shared_classes(qk, (first.layout, second.layout), space)
    dim_classes = _contracted_classes(qk, (first.layout, second.layout), space)
    if value.scale != 1.0:
        raise UnsupportedSite("the values are scaled by a constant")
    layouts = [None, None]
    layouts[probability_index], layouts[1 - probability_index] = probabilities_layout, value.layout
    output_layout = contraction_layout(pv, tuple(layouts), space)
    pv_contracted = _contracted_classes(pv, tuple(layouts), space)
    pv_free_probabilities = _free_classes(pv, probability_index, tuple(layouts), space)
    pv_free_values = _free_classes(pv, 1 - probability_index, tuple(layouts), space)
    pv_shared = _shared_classes(pv, tuple(layouts), space)

    # Re-read every class after the second contraction's unifications.
    def classes(atoms):
        return [space.find(atom) for atom in atoms]

    key_classes = _unique(classes(key_classes))
    if set(classes(pv_contracted)) != set(key_classes):
        raise UnsupportedSite("the contraction with V does not sum over the keys")
    query_classes = _unique(classes(query_classes))
    if set(classes(pv_free_probabilities)) != set(query_classes):
        raise UnsupportedSite("the contraction with V does not keep the queries")
    batch_classes = _unique(classes(batch_classes))
    if set(classes(pv_shared)) != set(batch_classes):
        raise UnsupportedSite("the contraction with V pairs other axes than the Q·K batch axes")
    axes = Axes(batch_classes, query_classes, key_classes, _unique(classes(dim_classes)),
                _unique(classes(pv_free_values)))
    return _site(anchor, scores, query, key, value, axes, space, output_layout, pv, dropout_p, form, is_causal)


def build_sdpa_site(node: torch.fx.Node) -> AttentionSite:
    """scaled_dot_product_attention seen through its operands' layout ops, like a hand-written site: repeated kv
    heads fold back to the kv heads, scalings of q or k join the scale, and the attn_mask is proved like any mask."""
    arguments = list(node.args) + [None] * (8 - len(node.args))
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    values = {name: node.kwargs.get(name, argument) for name, argument in zip(names, arguments)}
    attn_mask, is_causal = values["attn_mask"], bool(values["is_causal"] or False)
    if not isinstance(values["is_causal"], (bool, type(None))) or (attn_mask is not None and is_causal):
        raise UnsupportedSite("is_causal is not a constant, or comes with an attn_mask")
    scale = values["scale"]
    if scale is not None and not isinstance(scale, (int, float)):
        raise UnsupportedSite("the scale is a graph value")
    space = AtomSpace()
    query = trace_operand(values["query"], space, "A")
    key = trace_operand(values["key"], space, "B")
    value = trace_operand(values["value"], space, "V")
    query_shape, key_shape = node_shape(values["query"]), node_shape(values["key"])
    rank = len(query_shape)
    if rank < 3 or len(key_shape) != rank:
        raise UnsupportedSite(f"q has {rank} dims")
    if values["enable_gqa"] and not sizes_equal(query_shape[-3], key_shape[-3]):
        groups = exact_quotient(query_shape[-3], key_shape[-3])
        if groups is None:
            raise UnsupportedSite("enable_gqa with query heads that are not a multiple of the kv heads")
        for operand in (key, value):
            operand.layout[-3] = leaves(operand.layout[-3]) + [Atom(groups, "broadcast")]
    letters = "ABCDEFGH"[:rank - 2]
    qk = Contraction(node, (values["query"], values["key"]), (letters + "ik", letters + "jk"), letters + "ij")
    scores = Scores(qk)
    scores.layout = contraction_layout(qk, (query.layout, key.layout), space)
    default = 1.0 / math.sqrt(query_shape[-1]) if isinstance(query_shape[-1], int) else None
    if scale is None and default is None:
        raise UnsupportedSite("the head dim is symbolic")
    scores.scale = float(scale if scale is not None else default) * query.scale * key.scale
    if scale is None:
        scores.default_scale = default
    if isinstance(attn_mask, torch.fx.Node):
        kind = "keep" if tensor_meta(attn_mask) is not None and tensor_meta(attn_mask).dtype == torch.bool else "add"
        scores.terms.append([kind, attn_mask, 1.0, -math.inf,
                             term_layout(attn_mask, scores.layout, tuple(layout_sizes(scores.layout)))])
    elif attn_mask is not None:
        raise UnsupportedSite("attn_mask is not a tensor")
    pv = Contraction(node, (node, values["value"]), (letters + "ij", letters + "jd"), letters + "id")
    key_classes = space.leaf_classes(scores.layout[-1])
    query_classes = space.leaf_classes(scores.layout[-2])
    dropout_p = values["dropout_p"] or 0.0
    if not isinstance(dropout_p, (int, float)):
        raise UnsupportedSite("dropout_p is a graph value")
    return classify_axes(node, scores, query, key, value, key_classes, query_classes, qk, query, key, pv,
                         scores.layout, 0, space, float(dropout_p), "sdpa", is_causal)


def _unique(items: list) -> list:
    seen, result = set(), []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            result.append(item)
    return result


def _letters(contraction: Contraction, layouts) -> list[dict]:
    return [dict(zip(spec, layout)) for spec, layout in zip(contraction.specs, layouts)]


def _free_classes(contraction: Contraction, index: int, layouts, space: AtomSpace) -> list:
    mine, theirs = _letters(contraction, layouts)[index], _letters(contraction, layouts)[1 - index]
    found = []
    for letter, atoms in mine.items():
        if letter not in theirs and letter in contraction.output:
            found.extend(space.leaf_classes(atoms))
    return found


def _shared_classes(contraction: Contraction, layouts, space: AtomSpace) -> list:
    first, second = _letters(contraction, layouts)
    found = []
    for letter in contraction.output:
        if letter in first and letter in second:
            found.extend(space.leaf_classes(first[letter]) or space.leaf_classes(second[letter]))
    return found


def _contracted_classes(contraction: Contraction, layouts, space: AtomSpace) -> list:
    first, second = _letters(contraction, layouts)
    found = []
    for letter in first:
        if letter in second and letter not in contraction.output:
            found.extend(space.leaf_classes(first[letter]))
    return found


def _member(space: AtomSpace, cls: Atom, root_leaves: list) -> Optional[Atom]:
    ids = {id(atom) for atom in root_leaves}
    members = [atom for atom in space.class_of(cls) if id(atom) in ids]
    if len(members) > 1:
        raise UnsupportedSite("one axis of a root appears twice in the attention")
    return members[0] if members else None


def _root_leaves(operand: Operand) -> list:
    return leaves([atom for axis in operand.root_atoms for atom in axis])


def _site(softmax, scores: Scores, query: Operand, key: Operand, value: Operand, axes: Axes, space: AtomSpace,
          output_layout: list, pv: Contraction, dropout_p: float, form: str, is_causal: bool) -> AttentionSite:
    """The site record: roles checked, mask analyzed, groups chosen, sizes and the adapter recipe."""
    real_kv = _check_roles(axes, space, query, key, value)
    symbols, index_space = _index_space(axes)
    terms = [MaskTerm(kind, node, tuple(tuple(symbols[id(space.find(leaf))] for leaf in leaves(axis))
                                        for axis in layout), coefficient, -math.inf if fill is None else fill)
             for kind, node, coefficient, fill, layout in scores.terms]
    analysis = analyze_mask(softmax.graph.owning_module, terms, index_space, is_causal=is_causal)
    root_shape = node_shape(query.root) or ()
    batch_of_one = len(root_shape) == 4 and root_shape[0] == 1
    batch_group, head_group = _groups(axes.batch, real_kv, analysis, symbols, batch_of_one)
    if analysis.key_padding is not None and [symbols[id(cls)] for cls in batch_group] != \
            [analysis.key_padding.batch_symbol]:
        mask = MaskSpec(kind="arbitrary", tensor=analysis.spec.tensor,
                        proof=analysis.spec.proof + "; but the padding's batch axis is not the only batch axis, so "
                                                    "the mask tensor is kept exactly")
        analysis = MaskAnalysis(mask, None, tuple(terms))
    key_leaves = _root_leaves(key)
    heads = product(cls.size for cls in head_group)
    kv_heads = product(cls.size for cls in head_group if _is_real(space, cls, key_leaves))
    head_dim = product(cls.size for cls in axes.dim)
    value_dim = product(cls.size for cls in axes.value_dim)
    unsupported = None
    if not all(isinstance(size, int) for size in (heads, kv_heads, head_dim, value_dim)):
        unsupported = "the number of heads or the head dim is symbolic"
        heads = kv_heads = head_dim = value_dim = 1
    adapter = _adapter(softmax.graph, query, key, value, axes, space, batch_group, head_group, output_layout, pv,
                       analysis, index_space, symbols, query.dtype)
    if isinstance(adapter, str):
        unsupported, adapter = unsupported or adapter, None
    hints = {}
    for node in (query.root, key.root, value.root):
        hints.update(size_hints(node))
    return AttentionSite(
        name=module_path(pv.node) or module_path(softmax),
        source=source_line(softmax),
        form=form,
        node=pv.node.name,
        query=query.root.name,
        key=key.root.name,
        value=value.root.name,
        batch=product(cls.size for cls in batch_group),
        heads=heads,
        kv_heads=kv_heads,
        q_len=product(cls.size for cls in axes.query),
        kv_len=product(cls.size for cls in axes.key),
        head_dim=head_dim,
        value_dim=value_dim,
        scale=None if scores.default_scale and scores.scale == scores.default_scale else float(scores.scale),
        mask=analysis.spec,
        layout=f"{query.root.name} {tuple(node_shape(query.root) or ())} read as (batch, heads, sequence, head_dim)",
        dropout_p=dropout_p,
        softcap=scores.softcap,
        sinks=scores.sinks.name if scores.sinks is not None else None,
        dtype=dtype_name(query.node),
        hints=tuple(sorted(hints.items())),
        notes=tuple(_notes(scores, analysis)),
        unsupported=unsupported,
        adapter=adapter,
    )


def _check_roles(axes: Axes, space: AtomSpace, query: Operand, key: Operand, value: Operand) -> list[bool]:
    """Every root factor has a role, q/k/v have every axis they must have; per batch class: do k and v have it
    (False: they broadcast over it, as grouped-query heads do)."""
    query_leaves, key_leaves, value_leaves = _root_leaves(query), _root_leaves(key), _root_leaves(value)
    for name, root_leaves, allowed in (
        ("q", query_leaves, axes.batch + axes.query + axes.dim),
        ("k", key_leaves, axes.batch + axes.key + axes.dim),
        ("v", value_leaves, axes.batch + axes.key + axes.value_dim),
    ):
        allowed_ids = {id(cls) for cls in allowed}
        for leaf in root_leaves:
            if id(space.find(leaf)) not in allowed_ids:
                raise UnsupportedSite(f"a factor of {name} ({leaf.size}) is neither batch, heads, position nor dim")
    for name, root_leaves, needed in (("queries", query_leaves, axes.query + axes.dim + axes.batch),
                                      ("keys", key_leaves, axes.key + axes.dim),
                                      ("values", value_leaves, axes.key + axes.value_dim)):
        if any(_member(space, cls, root_leaves) is None for cls in needed):
            raise UnsupportedSite(f"the {name} broadcast over an axis that attention reads")
    real_kv = []
    for cls in axes.batch:
        has_key = _member(space, cls, key_leaves) is not None
        if has_key != (_member(space, cls, value_leaves) is not None):
            raise UnsupportedSite("k and v do not share their batch and head axes")
        real_kv.append(has_key)
    return real_kv


def _index_space(axes: Axes) -> tuple[dict, IndexSpace]:
    """One index symbol per batch, query and key class (b0.., i, j), for the mask analysis."""
    symbols = {}
    for number, cls in enumerate(axes.batch):
        symbols[id(cls)] = index_symbol(f"b{number}")
    for letter, classes in (("i", axes.query), ("j", axes.key)):
        for number, cls in enumerate(classes):
            symbols[id(cls)] = index_symbol(letter if len(classes) == 1 else f"{letter}{number}")
    sizes = {symbols[id(cls)]: cls.size for cls in axes.batch + axes.query + axes.key}
    return symbols, IndexSpace(tuple(symbols[id(cls)] for cls in axes.batch),
                               tuple(symbols[id(cls)] for cls in axes.query),
                               tuple(symbols[id(cls)] for cls in axes.key), sizes)


def _notes(scores: Scores, analysis: MaskAnalysis) -> list[str]:
    notes = list(scores.notes)
    if scores.softcap is not None:
        notes.append(f"tanh soft-capping at {scores.softcap:g}")
    if scores.sinks is not None:
        notes.append(f"attention-sink logits {scores.sinks.name} are concatenated to the scores")
    return notes + list(analysis.notes)


def _is_real(space: AtomSpace, cls: Atom, root_leaves: list) -> bool:
    return _member(space, cls, root_leaves) is not None


def _groups(batch_classes: list, real_kv: list, analysis: MaskAnalysis, symbols: dict, batch_of_one: bool = False):
    """Which independent classes form the op's batch dim and which its heads dim (kv-carrying heads outer).

    batch_of_one: q is (1, heads, sequence, dim): the batch axis vanished from the algebra, so no class is taken for
    it (else grouped-query heads would be split into a "batch" of kv heads; the same arithmetic, a wrong report)."""
    padding_symbol = analysis.key_padding.batch_symbol if analysis.key_padding is not None else None
    batch_group, head_group = [], []
    for cls, real in zip(batch_classes, real_kv):
        symbolic = not isinstance(cls.size, int)
        if real and (symbolic or symbols[id(cls)] == padding_symbol):
            batch_group.append(cls)
        else:
            head_group.append(cls)
    if not batch_group and padding_symbol is None and not batch_of_one:
        for cls, real in zip(batch_classes, real_kv):
            if real and len(head_group) > 1:
                batch_group.append(cls)
                head_group.remove(cls)
                break
    real = {id(cls) for cls, has in zip(batch_classes, real_kv) if has}
    head_group = [cls for cls in head_group if id(cls) in real] + [cls for cls in head_group if id(cls) not in real]
    return batch_group, head_group


# -- adapters ----------------------------------------------------------------------------------------------------------

def _dtype_text(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _operand_steps(operand: Operand, groups: list, space: AtomSpace, dtype: Optional[torch.dtype]) -> TensorAdapter:
    """Root -> (prod groups[0], prod groups[1], ...): reshape to the root's factors, permute, reshape, cast."""
    root_leaves = _root_leaves(operand)
    order = []
    for group in groups:
        for cls in group:
            member = _member(space, cls, root_leaves)
            if member is not None:
                order.append(root_leaves.index(member))
    if sorted(order) != list(range(len(root_leaves))):
        raise UnsupportedSite(f"the factors of {operand.root.name} do not map onto (batch, heads, sequence, dim)")
    shape = [product(leaf.size for leaf in [root_leaves[position] for position in order
                                             if any(space.find(root_leaves[position]) is cls for cls in group)])
             for group in groups]
    root_dtype = tensor_meta(operand.root).dtype if tensor_meta(operand.root) is not None else None
    cast = _dtype_text(dtype) if dtype is not None and dtype != root_dtype else None
    return TensorAdapter(operand.root.name, build_steps([leaf.size for leaf in root_leaves], order, shape, cast))


def _adapter(graph, query, key, value, axes, space, batch_group, head_group, output_layout, pv, analysis,
             index_space, symbols, compute_dtype):
    try:
        kv_heads = [cls for cls in head_group if _is_real(space, cls, _root_leaves(key))]
        query_adapter = _operand_steps(query, [batch_group, head_group, axes.query, axes.dim], space, compute_dtype)
        key_adapter = _operand_steps(key, [batch_group, kv_heads, axes.key, axes.dim], space, compute_dtype)
        value_adapter = _operand_steps(value, [batch_group, kv_heads, axes.key, axes.value_dim], space,
                                       compute_dtype)
        output_adapter = _output_steps(pv, output_layout, space, [batch_group, head_group, axes.query,
                                                                  axes.value_dim], compute_dtype)
        term_adapters = tuple(
            MaskTermAdapter(term.kind, _term_steps(term, index_space, symbols, batch_group, head_group, axes),
                            term.coefficient)
            for term in analysis.kept_terms
        )
        padding = None
        if analysis.key_padding is not None:
            finding = analysis.key_padding
            batch_size = product(cls.size for cls in batch_group)
            kv_len = product(cls.size for cls in axes.key)
            padding = KeyPaddingAdapter(finding.node.name, finding.relation, finding.value, finding.negate,
                                        (batch_size, kv_len),
                                        padding_drop_dims(len(tensor_meta(finding.node).shape), finding))
    except UnsupportedSite as error:
        return str(error)
    adapter = SiteAdapter(query_adapter, key_adapter, value_adapter, output_adapter, term_adapters, padding)
    return _with_symbols(adapter, graph)


def _output_steps(pv: Contraction, output_layout: list, space: AtomSpace, groups: list,
                  compute_dtype: Optional[torch.dtype]) -> TensorAdapter:
    """Op output (batch, heads, queries, value_dim) -> the site node's layout and dtype."""
    output_leaves = leaves([atom for axis in output_layout for atom in axis])
    output_classes = [space.find(leaf) for leaf in output_leaves]
    flat = [cls for group in groups for cls in group]
    if len(flat) != len(output_classes) or {id(c) for c in flat} != {id(c) for c in output_classes}:
        raise UnsupportedSite("the attention output does not consist of batch, heads, queries and value dim")
    permutation = [next(position for position, cls in enumerate(flat) if cls is wanted) for wanted in output_classes]
    shape = node_shape(pv.node)
    dtype = tensor_meta(pv.node).dtype
    cast = _dtype_text(dtype) if dtype != compute_dtype else None
    return TensorAdapter("", build_steps([cls.size for cls in flat], permutation, list(shape), cast))


def _term_steps(term: MaskTerm, index_space: IndexSpace, symbols: dict, batch_group, head_group, axes) -> TensorAdapter:
    """A kept mask term -> (batch | 1, heads | 1, queries, keys), expanding partly broadcast groups."""
    by_symbol = {symbol: cls for cls in batch_group + head_group + axes.query + axes.key
                 for symbol in [symbols[id(cls)]]}
    term_symbols = [symbol for dim in term.dims for symbol in dim]
    groups = [[symbols[id(cls)] for cls in group] for group in (batch_group, head_group, axes.query, axes.key)]
    order = [symbol for group in groups for symbol in group if symbol in term_symbols]
    permutation = [term_symbols.index(symbol) for symbol in order]
    view, expand, shape = [], [], []
    needs_expand = False
    for group in groups:
        present = [symbol in term_symbols for symbol in group]
        full = all(present) or not any(present)
        for symbol, here in zip(group, present):
            size = by_symbol[symbol].size
            view.append(size if here else 1)
            expand.append(size if (here or not full) else 1)
            needs_expand = needs_expand or (not here and not full)
        shape.append(product(size for size in
                             [by_symbol[symbol].size for symbol, here in zip(group, present) if here or not full]))
    leaf_sizes = [index_space.sizes[symbol] for symbol in term_symbols]
    steps = build_steps(leaf_sizes, permutation, shape, None, expand if needs_expand else None,
                        view if needs_expand else None)
    return TensorAdapter(term.node.name, steps)


def _with_symbols(adapter: SiteAdapter, graph: torch.fx.Graph) -> SiteAdapter:
    """Record where each size symbol the recipes use can be read from (a placeholder's dim)."""
    import dataclasses

    needed = set()
    for part in (adapter.query, adapter.key, adapter.value, adapter.output):
        needed |= _step_symbols(part.steps if part else ())
    for term in adapter.mask_terms:
        needed |= _step_symbols(term.tensor.steps)
    if adapter.key_padding is not None:
        for size in adapter.key_padding.shape:
            needed |= sympy.sympify(size).free_symbols
    sources = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = tensor_meta(node)
        if value is None:
            continue
        for dim, size in enumerate(value.shape):
            expr = size_expr(size)
            if isinstance(expr, sympy.Symbol) and expr in needed and expr not in sources:
                sources[expr] = (str(expr), node.name, dim)
    missing = needed - set(sources)
    if missing:
        raise UnsupportedSite(f"the sizes {sorted(map(str, missing))} cannot be read from an input")
    return dataclasses.replace(adapter, symbols=tuple(sorted(sources.values())))


def _step_symbols(steps: tuple) -> set:
    found = set()
    for kind, argument in steps:
        if kind in ("reshape", "expand"):
            for size in argument:
                if isinstance(size, sympy.Basic):
                    found |= size.free_symbols
    return found


def unsupported_site(softmax: torch.fx.Node, scores_path: list, probabilities_path: list, reason: str):
    """A site for attention that was recognized but cannot be rewritten: recorded, left exact."""
    qk = scores_path[0]
    pv = probabilities_path[-1]
    operands = [argument for argument in as_contraction(qk).operands]
    values = [argument for argument in as_contraction(pv).operands if argument is not probabilities_path[-2]] \
        if len(probabilities_path) > 1 else [a for a in as_contraction(pv).operands if a is not softmax]
    shape = node_shape(qk) or (1, 1)
    value_shape = node_shape(pv) or (1,)
    return AttentionSite(
        name=module_path(pv) or module_path(softmax),
        source=source_line(softmax),
        form="manual",
        node=pv.name,
        query=operands[0].name,
        key=operands[1].name,
        value=values[0].name if values else pv.name,
        batch=shape[0] if len(shape) > 2 else 1,
        heads=1,
        kv_heads=1,
        q_len=shape[-2],
        kv_len=shape[-1],
        head_dim=1,
        value_dim=value_shape[-1] if isinstance(value_shape[-1], int) else 1,
        scale=None,
        mask=MaskSpec(kind="arbitrary", proof="not analyzed: the site is unsupported"),
        dtype=dtype_name(qk),
        unsupported=reason,
        notes=(f"recognized as attention but not handled: {reason}",),
    )
