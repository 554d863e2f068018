"""Symbolic evaluation of a mask-building subgraph on index symbols.

`SymbolicEvaluator.value(node, index)` answers: what is element `index` of the tensor that `node` computes, as a
sympy expression of the index symbols and of the graph's size symbols? Index expressions are integers; a boolean
tensor's elements are sympy Booleans. Graph inputs are undefined functions of their index (`input_attention_mask(b, j)`),
parameters and buffers likewise (`param_..(h, i)`), so the result says exactly what the mask depends on.

Because nothing is evaluated at a particular length, a result such as `j <= i` holds for every sequence length: this
is the proof that passes/masks.py builds on. An op that is not modelled raises `Unsupported`, and the caller keeps the
mask tensor as it is.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import sympy
import torch
from sympy.core.function import AppliedUndef

from passes.graph_info import size_expr, tensor_meta
from passes.symbolic import (  # noqa: F401  (index_symbol: re-exported)
    Unsupported, as_bool, as_number, broadcast_index, constant, fold, index_symbol, is_boolean, piecewise,
    sanitize, split_divmod)

aten = torch.ops.aten


class SymbolicEvaluator:
    """Evaluates nodes of one graph element-wise on symbolic indices (see the module docstring)."""

    def __init__(self, graph_module: Optional[torch.nn.Module] = None):
        self.graph_module = graph_module
        self.bounds: dict[sympy.Symbol, sympy.Expr] = {}
        self.inputs: dict[str, torch.fx.Node] = {}  # function name -> placeholder it stands for
        self.parameters: dict[str, str] = {}  # function name -> attribute target
        self.facts: list[str] = []  # what a result relies on beyond the graph's ops (a buffer's contents)
        self._fresh = 0

    # -- helpers -------------------------------------------------------------------------------------------------
    def fresh_index(self, bound: sympy.Expr) -> sympy.Symbol:
        self._fresh += 1
        symbol = index_symbol(f"_t{self._fresh}")
        self.bounds[symbol] = bound
        return symbol

    def shape(self, node: torch.fx.Node) -> tuple:
        value = tensor_meta(node)
        if value is None:
            raise Unsupported(f"{node} has no recorded tensor shape")
        return tuple(size_expr(size) for size in value.shape)

    def dtype(self, node: Any) -> Optional[torch.dtype]:
        value = tensor_meta(node)
        return None if value is None else value.dtype

    def scalar(self, argument: Any) -> sympy.Basic:
        """A non-tensor argument: a number, or a node carrying a SymInt/SymFloat."""
        if isinstance(argument, torch.fx.Node):
            value = argument.meta.get("val")
            if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
                return constant(value) if not isinstance(value, torch.SymInt) else sympy.sympify(size_expr(value))
            raise Unsupported(f"{argument} is not a scalar")
        return constant(argument)

    def operand(self, argument: Any, index: tuple) -> sympy.Basic:
        """Element of a tensor operand at the (broadcast) index, or a scalar operand as it is."""
        if isinstance(argument, torch.fx.Node) and tensor_meta(argument) is not None:
            return self.value(argument, broadcast_index(index, self.shape(argument)))
        return self.scalar(argument)

    # -- the evaluator -------------------------------------------------------------------------------------------
    def value(self, node: torch.fx.Node, index: tuple) -> sympy.Basic:
        index = tuple(sympy.sympify(position) for position in index)
        if node.op == "placeholder":
            return self._placeholder(node, index)
        if node.op == "get_attr":
            return self._attribute(node, index)
        if node.op != "call_function":
            raise Unsupported(f"{node.op} node {node.name}")
        handler = HANDLERS.get(node.target)
        if handler is None:
            raise Unsupported(f"op {node.target}")
        return handler(self, node, index)

    def _placeholder(self, node: torch.fx.Node, index: tuple) -> sympy.Basic:
        name = "input_" + sanitize(node.name)
        self.inputs[name] = node
        element = sympy.Function(name)(*index) if index else sympy.Symbol(name)
        return sympy.Ne(element, 0) if self.dtype(node) == torch.bool else element

    def _attribute(self, node: torch.fx.Node, index: tuple) -> sympy.Basic:
        tensor = _fetch_attribute(self.graph_module, node.target)
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 1 and not isinstance(tensor, torch.nn.Parameter):
            return _tensor_scalar(tensor)
        if isinstance(tensor, torch.Tensor) and not isinstance(tensor, torch.nn.Parameter):
            found = buffer_closed_form(tensor, index)
            if found is not None:
                form, fact = found
                self.facts.append(f"buffer {node.target} is {fact} on all its {'x'.join(map(str, tensor.shape))} "
                                  "entries")
                return form
        name = "param_" + sanitize(str(node.target))
        self.parameters[name] = str(node.target)
        element = sympy.Function(name)(*index) if index else sympy.Symbol(name)
        return sympy.Ne(element, 0) if self.dtype(node) == torch.bool else element


def buffer_closed_form(tensor: torch.Tensor, index: tuple) -> Optional[tuple[sympy.Basic, str]]:
    """A constant buffer (not a parameter) that is a triangle of ones, an arange or a constant, read at `index`, as a
    formula; the check is exhaustive over the buffer, so the formula holds for every index the model can read."""
    tensor = tensor.detach()
    if tensor.numel() > 1 << 24:
        return None
    big = [dim for dim, size in enumerate(tensor.shape) if size > 1]
    flat = tensor.reshape([tensor.shape[dim] for dim in big]) if big else tensor.reshape(())
    positions = [index[dim] for dim in big]
    boolean = tensor.dtype == torch.bool

    def value(truth: sympy.Basic) -> sympy.Basic:
        return truth if boolean else piecewise([(sympy.Integer(1), truth), (sympy.Integer(0), sympy.true)])

    if flat.numel() and bool((flat == flat.reshape(-1)[0]).all()):
        return _tensor_scalar(flat.reshape(-1)[:1]), f"constant {flat.reshape(-1)[0].item()}"
    if flat.dim() == 2 and (boolean or bool(((flat == 0) | (flat == 1)).all())):
        rows, columns = flat.shape
        ones = torch.ones(rows, columns, dtype=torch.bool)
        for diagonal in range(-2, 3):
            if torch.equal(flat.bool(), torch.tril(ones, diagonal)):
                return value(sympy.Le(positions[1] - positions[0], diagonal)), f"tril(ones, {diagonal})"
            if torch.equal(flat.bool(), torch.triu(ones, diagonal)):
                return value(sympy.Ge(positions[1] - positions[0], diagonal)), f"triu(ones, {diagonal})"
    if flat.dim() == 1 and not boolean and torch.equal(flat.to(torch.float64),
                                                       torch.arange(flat.shape[0], dtype=torch.float64)):
        return positions[0], "arange"
    return None


def _fetch_attribute(module: Optional[torch.nn.Module], target: str) -> Any:
    if module is None:
        raise Unsupported(f"attribute {target} without its module")
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            raise Unsupported(f"attribute {target} not found")
    return value


def _tensor_scalar(tensor: torch.Tensor) -> sympy.Basic:
    item = tensor.detach().reshape(()).item()
    return constant(bool(item) if tensor.dtype == torch.bool else item)


# -- op handlers: (evaluator, node, index) -> element ----------------------------------------------------------------
HANDLERS: dict[Any, Callable[[SymbolicEvaluator, torch.fx.Node, tuple], sympy.Basic]] = {}


def handles(*targets):
    def register(function):
        for target in targets:
            HANDLERS[target] = function
        return function

    return register


def _arg(node: torch.fx.Node, position: int, name: str, default: Any = None) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _convert(evaluator: SymbolicEvaluator, value: sympy.Basic, dtype: Optional[torch.dtype]) -> sympy.Basic:
    if dtype is None:
        return value
    if dtype == torch.bool:
        return as_bool(value)
    value = as_number(value)
    if not dtype.is_floating_point and not dtype.is_complex and value.is_integer is not True:
        if value.is_number and value.is_finite:
            return sympy.Integer(int(value))  # float -> int truncates toward zero
        if value.is_number:
            raise Unsupported("an infinite value converted to an integer")
        return sympy.sign(value) * sympy.floor(sympy.Abs(value))
    return value


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(evaluator, node, index):
    if node.target == aten.arange.default:
        start, step = sympy.Integer(0), sympy.Integer(1)
    else:
        start = evaluator.scalar(node.args[0])
        step = evaluator.scalar(_arg(node, 2, "step", 1)) if node.target == aten.arange.start_step else sympy.Integer(1)
    return _convert(evaluator, start + index[0] * step, evaluator.dtype(node))


@handles(aten.full.default, aten.full_like.default, aten.new_full.default)
def _full(evaluator, node, index):
    fill = node.args[1]
    return _convert(evaluator, evaluator.scalar(fill), evaluator.dtype(node))


@handles(aten.ones.default, aten.ones_like.default, aten.new_ones.default)
def _ones(evaluator, node, index):
    return _convert(evaluator, sympy.Integer(1), evaluator.dtype(node))


@handles(aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
def _zeros(evaluator, node, index):
    return _convert(evaluator, sympy.Integer(0), evaluator.dtype(node))


@handles(aten.scalar_tensor.default)
def _scalar_tensor(evaluator, node, index):
    return _convert(evaluator, evaluator.scalar(node.args[0]), evaluator.dtype(node))


@handles(aten.lift_fresh_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
         aten.detach.default, aten.lift_fresh.default)
def _identity(evaluator, node, index):
    return evaluator.value(node.args[0], index)


@handles(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
         aten.to.other)
def _to(evaluator, node, index):
    return _convert(evaluator, evaluator.value(node.args[0], index), evaluator.dtype(node))


@handles(aten.unsqueeze.default)
def _unsqueeze(evaluator, node, index):
    rank = len(index)
    dim = node.args[1] % rank
    return evaluator.value(node.args[0], index[:dim] + index[dim + 1:])


@handles(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(evaluator, node, index):
    source_shape = evaluator.shape(node.args[0])
    rank = len(source_shape)
    if node.target == aten.squeeze.default:
        dims = [d for d, size in enumerate(source_shape) if size == 1]
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [d % rank for d in dims if source_shape[d % rank] == 1]
    source_index, position = [], 0
    for d in range(rank):
        if d in dims:
            source_index.append(sympy.Integer(0))
        else:
            source_index.append(index[position])
            position += 1
    return evaluator.value(node.args[0], tuple(source_index))


@handles(aten.permute.default)
def _permute(evaluator, node, index):
    dims = [d % len(index) for d in node.args[1]]
    source_index = [None] * len(index)
    for position, d in enumerate(dims):
        source_index[d] = index[position]
    return evaluator.value(node.args[0], tuple(source_index))


@handles(aten.transpose.int)
def _transpose(evaluator, node, index):
    rank = len(index)
    first, second = node.args[1] % rank, node.args[2] % rank
    source_index = list(index)
    source_index[first], source_index[second] = index[second], index[first]
    return evaluator.value(node.args[0], tuple(source_index))


@handles(aten.t.default)
def _t(evaluator, node, index):
    return evaluator.value(node.args[0], tuple(reversed(index)))


@handles(aten.expand.default, aten.expand_as.default)
def _expand(evaluator, node, index):
    source = node.args[0]
    return evaluator.value(source, broadcast_index(index, evaluator.shape(source)))


@handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unflatten.int,
         aten.flatten.using_ints)
def _reshape(evaluator, node, index):
    source = node.args[0]
    source_shape, shape = evaluator.shape(source), evaluator.shape(node)
    if tuple(source_shape) == tuple(shape):
        return evaluator.value(source, index)
    flat = sympy.Integer(0)
    for position, size in zip(index, shape):
        flat = flat * size + position
    source_index = []
    stride = sympy.Integer(1)
    strides = []
    for size in reversed(source_shape):
        strides.append(stride)
        stride = stride * size
    strides.reverse()
    bounds = dict(evaluator.bounds)
    for size, position in zip(shape, index):
        for symbol in sympy.sympify(position).free_symbols:
            bounds.setdefault(symbol, size)
    remaining = flat
    for size, stride in zip(source_shape, strides):
        if size == 1:
            source_index.append(sympy.Integer(0))
            continue
        found = split_divmod(remaining, stride, bounds) if stride != 1 else (remaining, sympy.Integer(0))
        if found is None:
            raise Unsupported(f"reshape {tuple(source_shape)} -> {tuple(shape)}: index arithmetic not exact")
        quotient, remaining = found
        source_index.append(quotient)
    return evaluator.value(source, tuple(source_index))


@handles(aten.slice.Tensor)
def _slice(evaluator, node, index):
    source = node.args[0]
    shape = evaluator.shape(source)
    dim = _arg(node, 1, "dim", 0) % len(shape)
    start = _arg(node, 2, "start", None)
    step = _arg(node, 4, "step", 1)
    start = sympy.Integer(0) if start is None else evaluator.scalar(start)
    if start.is_negative:
        start = start + shape[dim]
    source_index = list(index)
    source_index[dim] = start + index[dim] * evaluator.scalar(step)
    return evaluator.value(source, tuple(source_index))


@handles(aten.select.int)
def _select(evaluator, node, index):
    source = node.args[0]
    shape = evaluator.shape(source)
    dim = node.args[1] % len(shape)
    position = evaluator.scalar(node.args[2])
    if position.is_negative:
        position = position + shape[dim]
    return evaluator.value(source, index[:dim] + (position,) + index[dim:])


@handles(aten.index.Tensor)
def _index(evaluator, node, index):
    source, indices = node.args[0], list(node.args[1])
    source_shape = evaluator.shape(source)
    indexed = [position for position, tensor in enumerate(indices) if tensor is not None]
    if not indexed or indexed != list(range(indexed[0], indexed[-1] + 1)):
        raise Unsupported("advanced indexing with non-adjacent index tensors")
    first = indexed[0]
    broadcast_rank = len(index) - (len(source_shape) - len(indexed))
    broadcast_part = index[first:first + broadcast_rank]
    source_index = list(index[:first])
    for position in indexed:
        element = as_number(evaluator.operand(indices[position], broadcast_part))
        source_index.append(element)
    source_index.extend(index[first + broadcast_rank:])
    return evaluator.value(source, tuple(source_index))


@handles(aten.embedding.default)
def _embedding(evaluator, node, index):
    weight, indices = node.args[0], node.args[1]
    row = as_number(evaluator.operand(indices, index[:-1]))
    return evaluator.value(weight, (row, index[-1]))


@handles(aten.cat.default)
def _cat(evaluator, node, index):
    tensors = [tensor for tensor in node.args[0] if evaluator.shape(tensor) != (0,)]
    dim = _arg(node, 1, "dim", 0) % len(index)
    branches, offset = [], sympy.Integer(0)
    for position, tensor in enumerate(tensors):
        size = evaluator.shape(tensor)[dim]
        shifted = list(index)
        shifted[dim] = index[dim] - offset
        element = evaluator.value(tensor, tuple(shifted))
        if position == len(tensors) - 1:
            branches.append((element, sympy.true))
        elif size == 1:
            branches.append((element, sympy.Eq(index[dim], offset)))
        else:
            branches.append((element, sympy.Lt(index[dim], offset + size)))
        offset = offset + size
    return piecewise(branches)


@handles(aten.diff.default)
def _diff(evaluator, node, index):
    source = node.args[0]
    n = _arg(node, 1, "n", 1)
    dim = _arg(node, 2, "dim", -1) % len(index)
    prepend, append = _arg(node, 3, "prepend"), _arg(node, 4, "append")
    if n != 1 or append is not None:
        raise Unsupported("diff with n != 1 or append")

    def joined(position: sympy.Expr) -> sympy.Basic:
        shifted = list(index)
        if prepend is None:
            shifted[dim] = position
            return evaluator.value(source, tuple(shifted))
        prepend_size = evaluator.shape(prepend)[dim]
        if prepend_size != 1:
            raise Unsupported("diff with a prepend longer than 1")
        at_prepend = list(index)
        at_prepend[dim] = sympy.Integer(0)
        shifted[dim] = position - 1
        return piecewise([(evaluator.value(prepend, tuple(at_prepend)), sympy.Eq(position, 0)),
                          (evaluator.value(source, tuple(shifted)), sympy.true)])

    return fold(sympy.expand(as_number(joined(index[dim] + 1)) - as_number(joined(index[dim]))))


@handles(aten.cumsum.default)
def _cumsum(evaluator, node, index):
    source = node.args[0]
    dim = node.args[1] % len(index)
    summand_index = list(index)
    dummy = evaluator.fresh_index(evaluator.shape(source)[dim])
    summand_index[dim] = dummy
    summand = as_number(evaluator.value(source, tuple(summand_index)))
    if dummy not in summand.free_symbols:
        return summand * (index[dim] + 1)
    total = sympy.summation(summand, (dummy, 0, index[dim]))
    if total.has(sympy.Sum):
        raise Unsupported(f"a cumulative sum that does not reduce to a closed form: {summand}")
    return total


def _binary(function):
    def handler(evaluator, node, index):
        return function(evaluator.operand(node.args[0], index), evaluator.operand(node.args[1], index), node)

    return handler


def _add(a, b, node):
    alpha = node.kwargs.get("alpha", 1)
    return as_number(a) + constant(alpha) * as_number(b)


def _sub(a, b, node):
    alpha = node.kwargs.get("alpha", 1)
    return as_number(a) - constant(alpha) * as_number(b)


def _mul(a, b, node):
    if is_boolean(a) and is_boolean(b):
        return sympy.And(a, b)
    a, b = as_number(a), as_number(b)
    # 0 * -inf would be NaN in sympy; a masked additive term is kept as a Piecewise, so fold the zero first.
    if a == 0 or b == 0:
        return sympy.Integer(0)
    return a * b


def _div(a, b, node):
    rounding = node.kwargs.get("rounding_mode")
    a, b = as_number(a), as_number(b)
    if b == 0:
        raise Unsupported("division by zero")
    if rounding == "floor":
        return sympy.floor(a / b)
    if rounding == "trunc":
        raise Unsupported("truncating division")
    return a / b


def _compare(relation):
    def function(a, b, node):
        a, b = as_number(a), as_number(b)
        if not (a.has(sympy.Piecewise) or b.has(sympy.Piecewise)) or a.has(sympy.oo) or b.has(sympy.oo):
            return relation(a, b)
        difference = fold(a - b)
        if isinstance(difference, sympy.Piecewise):
            return piecewise([(relation(value, 0), condition) for value, condition in difference.args])
        return relation(difference, 0)

    return function


def _logical(function):
    def combine(a, b, node):
        return function(as_bool(a), as_bool(b))

    return combine


for _targets, _function in (
    ((aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor), _add),
    ((aten.sub.Tensor, aten.sub.Scalar), _sub),
    ((aten.mul.Tensor, aten.mul.Scalar), _mul),
    ((aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode), _div),
    ((aten.eq.Tensor, aten.eq.Scalar), _compare(sympy.Eq)),
    ((aten.ne.Tensor, aten.ne.Scalar), _compare(sympy.Ne)),
    ((aten.lt.Tensor, aten.lt.Scalar), _compare(sympy.Lt)),
    ((aten.le.Tensor, aten.le.Scalar), _compare(sympy.Le)),
    ((aten.gt.Tensor, aten.gt.Scalar), _compare(sympy.Gt)),
    ((aten.ge.Tensor, aten.ge.Scalar), _compare(sympy.Ge)),
):
    for _target in _targets:
        HANDLERS[_target] = _binary(_function)

for _target in (aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor):
    HANDLERS[_target] = _binary(_logical(sympy.And))
for _target in (aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor):
    HANDLERS[_target] = _binary(_logical(sympy.Or))
for _target in (aten.logical_xor.default, aten.bitwise_xor.Tensor, aten.__xor__.Tensor):
    HANDLERS[_target] = _binary(_logical(sympy.Xor))


@handles(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(evaluator, node, index):
    alpha = node.kwargs.get("alpha", 1)
    return as_number(evaluator.operand(node.args[1], index)) - constant(alpha) * as_number(
        evaluator.operand(node.args[0], index))


def _divisible_operands(evaluator, node, index, what: str):
    """The two operands of a division-like node, refusing a divisor of zero."""
    a = as_number(evaluator.operand(node.args[0], index))
    b = as_number(evaluator.operand(node.args[1], index))
    if b == 0:
        raise Unsupported(f"{what} by zero")
    return a, b


@handles(aten.floor_divide.default, aten.floor_divide.Scalar)
def _floor_divide(evaluator, node, index):
    a, b = _divisible_operands(evaluator, node, index, "division")
    return sympy.floor(a / b)


@handles(aten.remainder.Scalar, aten.remainder.Tensor)
def _remainder(evaluator, node, index):
    a, b = _divisible_operands(evaluator, node, index, "remainder")
    return sympy.Mod(a, b)


@handles(aten.neg.default)
def _neg(evaluator, node, index):
    return -as_number(evaluator.value(node.args[0], index))


@handles(aten.abs.default)
def _abs(evaluator, node, index):
    return sympy.Abs(as_number(evaluator.value(node.args[0], index)))


@handles(aten.logical_not.default, aten.bitwise_not.default)
def _not(evaluator, node, index):
    if evaluator.dtype(node.args[0]) not in (torch.bool, None):
        raise Unsupported("bitwise not of an integer tensor")
    return sympy.Not(as_bool(evaluator.value(node.args[0], index)))


@handles(aten.minimum.default, aten.maximum.default, aten.min.other, aten.max.other)
def _min_max(evaluator, node, index):
    a = as_number(evaluator.operand(node.args[0], index))
    b = as_number(evaluator.operand(node.args[1], index))
    return sympy.Min(a, b) if node.target in (aten.minimum.default, aten.min.other) else sympy.Max(a, b)


@handles(aten.log.default)
def _log(evaluator, node, index):
    return sympy.log(as_number(evaluator.value(node.args[0], index)))


@handles(aten.repeat.default)
def _repeat(evaluator, node, index):
    source = node.args[0]
    source_shape = evaluator.shape(source)
    offset = len(index) - len(source_shape)
    source_index = []
    for dim, size in enumerate(source_shape):
        position = index[offset + dim]
        repeats = node.args[1][offset + dim]
        if size == 1:
            source_index.append(sympy.Integer(0))
        elif repeats == 1:
            source_index.append(position)
        else:
            found = split_divmod(position, size, evaluator.bounds)
            source_index.append(found[1] if found is not None else sympy.Mod(position, size))
    return evaluator.value(source, tuple(source_index))


@handles(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(evaluator, node, index):
    value = as_number(evaluator.value(node.args[0], index))
    if node.target == aten.clamp_min.default:
        low, high = node.args[1], None
    elif node.target == aten.clamp_max.default:
        low, high = None, node.args[1]
    else:
        low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
    if low is not None:
        value = sympy.Max(value, evaluator.scalar(low))
    if high is not None:
        value = sympy.Min(value, evaluator.scalar(high))
    return value


@handles(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(evaluator, node, index):
    condition = as_bool(evaluator.operand(node.args[0], index))
    chosen = evaluator.operand(node.args[1], index)
    other = evaluator.operand(node.args[2], index)
    return _convert(evaluator, piecewise([(chosen, condition), (other, sympy.true)]), evaluator.dtype(node))


@handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor)
def _masked_fill(evaluator, node, index):
    if node.target in (aten.masked_fill_.Scalar, aten.masked_fill_.Tensor) and len(node.args[0].users) > 1:
        raise Unsupported("an in-place masked_fill_ on a tensor that is read elsewhere")
    mask = as_bool(evaluator.operand(node.args[1], index))
    fill = evaluator.operand(node.args[2], index)
    value = evaluator.value(node.args[0], index)
    return _convert(evaluator, piecewise([(fill, mask), (value, sympy.true)]), evaluator.dtype(node))


@handles(aten.tril.default, aten.triu.default)
def _triangle(evaluator, node, index):
    diagonal = evaluator.scalar(_arg(node, 1, "diagonal", 0))
    value = evaluator.value(node.args[0], index)
    row, column = index[-2], index[-1]
    keep = sympy.Le(column - row, diagonal) if node.target == aten.tril.default else sympy.Ge(column - row, diagonal)
    zero = sympy.false if is_boolean(value) else sympy.Integer(0)
    return piecewise([(value, keep), (zero, sympy.true)])


def free_functions(expression: sympy.Basic) -> set:
    """The applied undefined functions (inputs, parameters) an expression depends on."""
    return set(expression.atoms(AppliedUndef))

