"""The paths the attention matcher follows from a softmax: back through the scores to the Q·K contraction (casts,
layout ops, scaling, additive masks, fills, soft-capping, sink logits), forward through the probabilities to the
contraction with V, and each contraction operand back to its root. passes/detect_attention.py builds a site from
them."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from passes.detect_layout import (
    AtomSpace, Contraction, apply_layout_op, as_contraction, constant_scalar, contraction_layout, is_layout_op,
    node_shape, root_layout, scalar_factor, sizes_equal)
from passes.graph_info import tensor_meta
from passes.masks import is_masking_value

aten = torch.ops.aten

SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MAX_DEPTH = 48


class NotAttention(Exception):
    """The softmax is not attention (a classifier, a router, ...): no site."""


class UnsupportedSite(Exception):
    """It is attention, but a detail cannot be handled: a site marked unsupported (left exact)."""


# -- operands ---------------------------------------------------------------------------------------------------------

@dataclass
class Operand:
    """A contraction operand followed back to its root: root layout (the root's factors) and the layout at the
    contraction, with the constant factors met on the way."""

    node: torch.fx.Node
    root: torch.fx.Node
    root_atoms: list
    layout: list
    scale: float
    dtype: Optional[torch.dtype]


def trace_operand(node: Any, space: AtomSpace, role: str) -> Operand:
    """Follow layout ops and constant scalings back from `node` to the root it rearranges."""
    if not isinstance(node, torch.fx.Node):
        raise NotAttention("a contraction operand is not a tensor")
    chain = []
    scale = 1.0
    current = node
    for _ in range(MAX_DEPTH):
        if is_layout_op(current):
            chain.append(current)
            current = current.args[0]
            continue
        factor = scalar_factor(current)
        if factor is not None:
            scale *= factor[1]
            current = factor[0]
            continue
        break
    root = current
    layout = root_layout(root, role)
    root_atoms = [list(axis) for axis in layout]
    for step in reversed(chain):
        layout = apply_layout_op(step, layout, space)
    value = tensor_meta(node)
    return Operand(node, root, root_atoms, layout, scale, None if value is None else value.dtype)


def is_parameter(node: torch.fx.Node) -> bool:
    """A weight or buffer (possibly through a cast): a classifier or a router multiplies by one, attention does not."""
    return node.op == "get_attr"


# -- the scores: from the softmax back to the Q·K contraction ---------------------------------------------------------

def score_paths(node: Any, depth: int = 0) -> Iterator[list]:
    """Every path [contraction, ..., node] through ops that may sit between scores and their softmax."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or depth > MAX_DEPTH:
        return
    if as_contraction(node) is not None:
        yield [node]
        return
    for candidate in _score_inputs(node):
        for path in score_paths(candidate, depth + 1):
            yield path + [node]


def _score_inputs(node: torch.fx.Node) -> list:
    target = node.target
    if is_layout_op(node):
        return [node.args[0]]
    factor = scalar_factor(node)
    if factor is not None:
        return [factor[0]]
    if target in (aten.add.Tensor, aten.add_.Tensor):
        return [argument for argument in node.args[:2] if isinstance(argument, torch.fx.Node)]
    if target in (aten.sub.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tanh.default):
        return [node.args[0]]
    if target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        return [argument for argument in node.args[1:3] if isinstance(argument, torch.fx.Node)]
    if target == aten.cat.default and len(node.args[0]) == 2:
        return [node.args[0][0]]
    return []


@dataclass
class Scores:
    """What happens to the scores between the Q·K contraction and the softmax."""

    contraction: Contraction
    layout: list = field(default_factory=list)
    scale: float = 1.0
    terms: list = field(default_factory=list)  # (kind, node, coefficient, fill, layout)
    softcap: Optional[float] = None
    sinks: Optional[torch.fx.Node] = None
    sinks_dim: Optional[int] = None
    notes: list = field(default_factory=list)
    default_scale: Optional[float] = None  # SDPA's 1/sqrt(head_dim) when the call leaves the scale unset


def _number(argument: Any) -> Optional[float]:
    if isinstance(argument, bool):
        return None
    if isinstance(argument, (int, float)):
        return float(argument)
    return constant_scalar(argument)


def term_layout(term: torch.fx.Node, scores_layout: list, scores_shape: tuple) -> list:
    """The layout of a tensor that broadcasts against the scores: the scores' atoms where it is full, [] where 1."""
    shape = node_shape(term)
    if shape is None:
        raise UnsupportedSite(f"the mask {term.name} has no recorded shape")
    if len(shape) > len(scores_shape):
        raise UnsupportedSite(f"the mask {term.name} has more dims than the scores")
    offset = len(scores_shape) - len(shape)
    layout = []
    for dim, size in enumerate(shape):
        if isinstance(size, int) and size == 1 and not sizes_equal(scores_shape[offset + dim], 1):
            layout.append([])
        elif sizes_equal(size, scores_shape[offset + dim]):
            layout.append(list(scores_layout[offset + dim]))
        else:
            raise UnsupportedSite(f"the mask {term.name} of shape {shape} does not broadcast to the scores")
    return layout


def _layout_root(node: Any) -> Any:
    """The tensor a chain of layout ops starts from (a sink-logit parameter behind its reshape and expand)."""
    for _ in range(MAX_DEPTH):
        if not is_layout_op(node):
            break
        node = node.args[0]
    return node


def _is_row_max(node: Any, scores: torch.fx.Node) -> bool:
    """max(scores, dim, keepdim=True)[0] or amax(scores, dim, keepdim=True): a shift softmax ignores."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target is operator.getitem and node.args[1] == 0:
        source = node.args[0]
        return (isinstance(source, torch.fx.Node) and source.target == aten.max.dim and source.args[0] is scores
                and len(source.args) > 2 and source.args[2] is True)
    if node.target == aten.amax.default:
        return node.args[0] is scores and len(node.args) > 2 and node.args[2] is True
    return False


def follow_scores(path: list, first: Operand, second: Operand, space: AtomSpace) -> Scores:
    """Walk the path from the contraction to the softmax input, collecting scale, masks, soft-capping and sinks."""
    contraction = as_contraction(path[0])
    scores = Scores(contraction)
    scores.layout = contraction_layout(contraction, (first.layout, second.layout), space)
    scores.scale = contraction.alpha * first.scale * second.scale
    if contraction.bias is not None:
        scores.terms.append(["add", contraction.bias, contraction.beta, None,
                             term_layout(contraction.bias, scores.layout, node_shape(path[0]))])
    before_tanh: Optional[float] = None
    after_tanh = 1.0
    for previous, node in zip(path, path[1:]):
        shape = node_shape(previous)
        if node.target != aten.tanh.default and before_tanh is not None and scalar_factor(node) is None:
            scores.softcap, scores.scale, before_tanh = after_tanh, before_tanh * after_tanh, None
        if is_layout_op(node):
            scores.layout = apply_layout_op(node, scores.layout, space)
            continue
        factor = scalar_factor(node)
        if factor is not None:
            if before_tanh is not None:
                after_tanh *= factor[1]
                continue
            if scores.softcap is not None and factor[1] != 1.0:
                raise UnsupportedSite("the scores are scaled after tanh soft-capping")
            scores.scale *= factor[1]
            for term in scores.terms:
                if term[0] == "add":
                    term[2] *= factor[1]
                else:
                    term[3] *= factor[1]
            continue
        if scores.sinks is not None and node.target != aten.sub.Tensor:
            raise UnsupportedSite(f"{node.target} after the sink logits are concatenated")
        if node_shape(node) != shape and node.target != aten.cat.default:
            raise UnsupportedSite(f"{node.name} broadcasts the scores to a larger shape")
        target = node.target
        if target in (aten.add.Tensor, aten.add_.Tensor):
            alpha = node.kwargs.get("alpha", 1)
            if node.args[0] is previous and node.args[1] is previous:
                raise UnsupportedSite("the scores are added to themselves")
            other = node.args[1] if node.args[0] is previous else node.args[0]
            if node.args[1] is previous and alpha != 1:
                raise UnsupportedSite("add with alpha on the scores")
            if isinstance(other, torch.fx.Node):
                scores.terms.append(["add", other, float(alpha if other is node.args[1] else 1), None,
                                     term_layout(other, scores.layout, shape)])
        elif target == aten.sub.Tensor:
            other = node.args[1]
            if _is_row_max(other, previous):
                continue
            if isinstance(other, torch.fx.Node):
                scores.terms.append(["add", other, -float(node.kwargs.get("alpha", 1)), None,
                                     term_layout(other, scores.layout, shape)])
        elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            fill = _number(node.args[2])
            if fill is None or not is_masking_value(fill):
                raise UnsupportedSite(f"masked_fill with {node.args[2]} (not a masking value) on the scores")
            scores.terms.append(["fill", node.args[1], 1.0, fill, term_layout(node.args[1], scores.layout, shape)])
        elif target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            condition = node.args[0]
            kind, other = ("keep", node.args[2]) if node.args[1] is previous else ("fill", node.args[1])
            fill = _number(other)
            if fill is None or not is_masking_value(fill):
                raise UnsupportedSite(f"where with {other} (not a masking value) on the scores")
            scores.terms.append([kind, condition, 1.0, fill, term_layout(condition, scores.layout, shape)])
        elif target == aten.tanh.default:
            if scores.terms:
                raise UnsupportedSite("a mask is applied before tanh soft-capping")
            if scores.softcap is not None:
                raise UnsupportedSite("tanh applied twice")
            before_tanh, after_tanh = scores.scale, 1.0
        elif target == aten.cat.default:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            scores.sinks, scores.sinks_dim = _layout_root(node.args[0][1]), dim % len(shape)
        else:
            raise UnsupportedSite(f"{target} between the scores and the softmax")
    if before_tanh is not None:
        scores.softcap, scores.scale = after_tanh, before_tanh * after_tanh
    return scores


# -- the probabilities: from the softmax to the contraction with V ---------------------------------------------------

def value_paths(node: torch.fx.Node, depth: int = 0) -> Iterator[list]:
    """Every path [first op after the softmax, ..., contraction] through casts, layout ops, dropout and slices."""
    if depth > MAX_DEPTH:
        return
    for user in node.users:
        if user.op != "call_function":
            continue
        contraction = as_contraction(user)
        if contraction is not None and node in contraction.operands:
            yield [user]
            continue
        if (is_layout_op(user) or _is_dropout(user) or user.target == aten.slice.Tensor) and user.args[0] is node:
            for path in value_paths(user, depth + 1):
                yield [user] + path
        elif user.target == aten.native_dropout.default:
            for getitem in user.users:
                if getitem.args[1] == 0:
                    for path in value_paths(getitem, depth + 1):
                        yield [user, getitem] + path


def _is_dropout(node: torch.fx.Node) -> bool:
    return node.target == aten.dropout.default


def follow_probabilities(path: list, layout: list, scores: Scores, space: AtomSpace) -> tuple[list, float]:
    """The layout of the probabilities where they enter the contraction with V, and the dropout probability."""
    dropout_p = 0.0
    for node in path[:-1]:
        if node.target == aten.native_dropout.default:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
            dropout_p = float(node.args[1]) if train is not False else dropout_p
            continue
        if node.op == "call_function" and node.target.__name__ == "getitem":
            continue
        if _is_dropout(node) and not is_layout_op(node):
            dropout_p = float(node.args[1])
            continue
        if node.target == aten.slice.Tensor and not is_layout_op(node):
            dim = node.args[1] % len(layout)
            start = node.args[2] if len(node.args) > 2 else 0
            if scores.sinks is None or dim != scores.sinks_dim or start not in (0, None):
                raise UnsupportedSite(f"a slice of the attention probabilities ({node.name})")
            continue
        layout = apply_layout_op(node, layout, space)
    return layout, dropout_p


# -- the site -----------------------------------------------------------------------------------------------------------
