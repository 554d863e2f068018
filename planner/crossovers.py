"""Crossovers: the lengths at which one candidate becomes cheaper than another, solved from the symbolic costs
(sympy) where the difference is a polynomial in L, by bisection otherwise; and the cheapest candidate over a range of
lengths (the envelope the report shows)."""
from __future__ import annotations

import math
from typing import Optional

import sympy

from backends.costs import SEQUENCE_LENGTH, as_function
from passes.records import Candidate, Crossover


def _active(expression: sympy.Expr, at: dict) -> sympy.Expr:
    """`expression` with every Max, Min and Piecewise replaced by the branch that is active at `at`."""
    if isinstance(expression, (sympy.Max, sympy.Min)):
        arguments = [_active(argument, at) for argument in expression.args]
        values = [float(argument.subs(at)) for argument in arguments]
        pick = max if isinstance(expression, sympy.Max) else min
        return arguments[values.index(pick(values))]
    if isinstance(expression, sympy.Piecewise):
        for branch, condition in expression.args:
            if condition == sympy.true or bool(condition.subs(at)):
                return _active(branch, at)
    if not expression.args:
        return expression
    return expression.func(*[_active(argument, at) for argument in expression.args])


def _solve_exactly(faster: sympy.Expr, slower: sympy.Expr, low: int, high: int) -> list[float]:
    """Real roots in [low, high] of faster − slower, from the symbolic costs: branches (Max, Min, Piecewise) are
    fixed at the interval's middle, and the difference is then solved as a polynomial in L (sympy), if it is one."""
    middle = {SEQUENCE_LENGTH: (low + high) / 2}
    difference = sympy.together(_active(faster, middle) - _active(slower, middle))
    numerator, _ = sympy.fraction(difference)
    try:
        polynomial = sympy.Poly(sympy.expand(numerator), SEQUENCE_LENGTH)
    except sympy.PolynomialError:
        return []
    if polynomial.degree() < 1 or polynomial.degree() > 4:
        return []
    # Solve in a symbol without L's assumptions (positive integer), which would discard the real roots between.
    unconstrained = sympy.Symbol("x")
    roots = sympy.Poly(polynomial.as_expr().subs(SEQUENCE_LENGTH, unconstrained), unconstrained).nroots()
    values = []
    for root in roots:
        value = complex(root)
        if abs(value.imag) < 1e-9 * max(1.0, abs(value.real)) and low - 1 <= value.real <= high + 1:
            values.append(value.real)
    return values


def crossover_length(faster: Candidate, slower: Candidate, low: int, high: int) -> Optional[int]:
    """The smallest integer L in (low, high] from which `faster` is estimated faster than `slower`, given that it is
    not at `low` and is at `high`. Solved from the symbolic costs (sympy) where the difference is a polynomial on
    the interval, checked against the full expressions; bisection on the integers otherwise."""
    faster_at, slower_at = as_function(faster.time_expr), as_function(slower.time_expr)

    def beats(length: int) -> bool:
        return faster_at(length) < slower_at(length) * (1 - TIE_TOLERANCE)

    for root in sorted(_solve_exactly(faster.time_expr, slower.time_expr, low, high)):
        length = max(low + 1, math.floor(root))
        while length <= high and not beats(length):
            length += 1
            if length > math.floor(root) + 2:
                break
        if length <= high and beats(length) and not beats(length - 1):
            return length
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if beats(middle) else (middle, high)
    return high


TIE_TOLERANCE = 1e-9  # estimates this close are a tie (the same arithmetic), which goes to the earlier variant


def fastest_index(times: list[float]) -> int:
    """Index of the fastest time; near-ties go to the earliest (VARIANTS order: the original, then exact ones)."""
    best = min(times)
    return next(index for index, value in enumerate(times) if value <= best * (1 + TIE_TOLERANCE))


def cheapest_envelope(candidates: list[Candidate], limit: int) -> tuple[tuple[tuple[int, str], ...],
                                                                          tuple[Crossover, ...]]:
    """Which candidate is the cheapest by estimated time over [1, limit], and the lengths where that changes."""
    if not candidates:
        return (), ()
    functions = [as_function(candidate.time_expr) for candidate in candidates]
    grid = sorted({max(1, int(round(2 ** (step / 8)))) for step in range(0, int(8 * math.log2(limit)) + 1)}
                  | {limit})

    def cheapest(length: int) -> int:
        return fastest_index([function(length) for function in functions])

    winner = cheapest(grid[0])
    envelope = [(1, candidates[winner].variant)]
    crossovers = []
    for previous, length in zip(grid, grid[1:]):
        new = cheapest(length)
        if new == winner:
            continue
        at = crossover_length(candidates[new], candidates[winner], previous, length)
        crossovers.append(Crossover(candidates[new].variant, candidates[winner].variant, at))
        envelope.append((at, candidates[new].variant))
        winner = new
    return tuple(envelope), tuple(crossovers)
