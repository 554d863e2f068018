"""The algebra of index expressions that the symbolic evaluator (passes/detect_symbolic.py) works in: index symbols,
booleans and numbers, piecewise values, folding, constants, and splitting an index by a divisor (reshapes)."""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import sympy
import torch

HUGE_NEGATIVE = -1e4  # a fill or additive value at or below this masks the position (exp underflows to 0 in float32)


class Unsupported(Exception):
    """The subgraph uses an op, or an op in a way, that the evaluator does not model."""


def index_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, nonnegative=True)


def is_boolean(value: Any) -> bool:
    """A sympy truth value (sympy's Symbol also subclasses Boolean, so isinstance(Boolean) is not enough)."""
    return isinstance(value, (sympy.logic.boolalg.BooleanAtom, sympy.logic.boolalg.BooleanFunction,
                              sympy.core.relational.Relational))


def as_bool(value: sympy.Basic) -> sympy.Basic:
    """A tensor element read as a boolean: non-zero is True."""
    if is_boolean(value):
        return value
    return sympy.Ne(value, 0)


def as_number(value: sympy.Basic) -> sympy.Basic:
    """A boolean element read as a number (True -> 1)."""
    if is_boolean(value):
        if value is sympy.true:
            return sympy.Integer(1)
        if value is sympy.false:
            return sympy.Integer(0)
        return sympy.Piecewise((1, value), (0, True))
    return value


def piecewise(branches: Sequence[tuple[sympy.Basic, sympy.Basic]]) -> sympy.Basic:
    """sympy.Piecewise, with a branch whose condition fixes an index (Eq(t, c)) evaluated at that index, so that
    `Piecewise((x[t] - x[t-1] at t=0, Eq(t, 0)), ...)` folds when every branch agrees."""
    folded = []
    for value, condition in branches:
        if isinstance(condition, sympy.Eq):
            for symbol, constant in ((condition.lhs, condition.rhs), (condition.rhs, condition.lhs)):
                if isinstance(symbol, sympy.Symbol) and constant.is_number:
                    value = value.subs(symbol, constant)
                    break
        folded.append((value, condition))
    if all(is_boolean(value) for value, _ in folded):
        # A boolean Piecewise is written as a formula, which the classifier reads.
        result = sympy.false
        taken = sympy.false
        for value, condition in folded:
            result = sympy.Or(result, sympy.And(condition, sympy.Not(taken), value))
            taken = sympy.Or(taken, condition)
        return result
    return sympy.Piecewise(*[(as_number(value), condition) for value, condition in folded])


def fold(expression: sympy.Basic) -> sympy.Basic:
    """Pull a Piecewise out of the sum or product it sits in (a - Piecewise((x, c), ...) -> Piecewise((a - x, c),
    ...)), then normalize the branches. Only the top level is folded: a Piecewise inside a function's arguments (a
    bias table's index) stays where it is."""
    if not isinstance(expression, (sympy.Add, sympy.Mul)):
        return expression
    arguments = list(expression.args)
    position = next((n for n, argument in enumerate(arguments) if isinstance(argument, sympy.Piecewise)), None)
    if position is None:
        return expression
    others = arguments[:position] + arguments[position + 1:]
    branches = []
    for value, condition in arguments[position].args:
        combined = expression.func(*(others + [value]))
        branches.append((fold(sympy.expand(combined) if isinstance(combined, sympy.Add) else combined), condition))
    return piecewise(branches)


def constant(value: Any) -> sympy.Basic:
    """A Python scalar as a sympy value (-inf as -oo)."""
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, float):
        if math.isinf(value):
            return sympy.oo if value > 0 else -sympy.oo
        if math.isnan(value):
            raise Unsupported("a NaN constant")
        if value == int(value) and abs(value) < 2**53:
            return sympy.Integer(int(value))
        return sympy.Float(value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.expr
    raise Unsupported(f"constant of type {type(value).__name__}")


# Linear index arithmetic with bounds: floor division and remainder that are exact when a remainder provably lies in
# [0, divisor). This is what turns reshape's flat-index arithmetic back into atom indices.

def _is_integral_polynomial(expression: sympy.Expr) -> bool:
    expression = sympy.expand(expression)
    if expression.is_number:
        return bool(expression.is_integer)
    if not expression.is_polynomial(*expression.free_symbols):
        return False
    poly = sympy.Poly(expression, *sorted(expression.free_symbols, key=str))
    return all(coefficient.is_integer for coefficient in poly.coeffs())


def _term_bounds(term: sympy.Expr, bounds: dict) -> Optional[tuple[sympy.Expr, sympy.Expr]]:
    """(min, max) of a monomial over index symbols in [0, bound) and positive size symbols; None if unknown."""
    coefficient, factors = term.as_coeff_mul()
    if not coefficient.is_number:
        return None
    low = high = coefficient
    for factor in factors:
        base, exponent = factor.as_base_exp()
        if not isinstance(base, sympy.Symbol) or exponent != 1:
            return None
        if base in bounds:
            high = high * (bounds[base] - 1)
            low = low * 0
        elif base.is_positive:
            low, high = low * base, high * base
        else:
            return None
    return (sympy.Min(low, high), sympy.Max(low, high)) if coefficient.is_negative else (low, high)


def split_divmod(expression: sympy.Expr, divisor: sympy.Expr, bounds: dict) -> Optional[tuple[sympy.Expr, sympy.Expr]]:
    """(expression // divisor, expression % divisor) when exact by linear decomposition, else None."""
    expression = sympy.expand(expression)
    quotient, remainder = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(expression):
        if _is_integral_polynomial(term / divisor):
            quotient += sympy.expand(term / divisor)
        else:
            remainder += term
    low, high = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(remainder):
        if term == 0:
            continue
        found = _term_bounds(term, bounds)
        if found is None:
            return None
        low, high = low + found[0], high + found[1]
    if sympy.expand(low).is_nonnegative and sympy.expand(divisor - 1 - high).is_nonnegative:
        return quotient, remainder
    return None


def broadcast_index(index: tuple, shape: tuple) -> tuple:
    """The index into a tensor of `shape` that broadcasts to a tensor indexed by `index` (right-aligned)."""
    offset = len(index) - len(shape)
    if offset < 0:
        raise Unsupported("an operand has more dimensions than the result")
    return tuple(sympy.Integer(0) if size == 1 else index[offset + position] for position, size in enumerate(shape))


def sanitize(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)
