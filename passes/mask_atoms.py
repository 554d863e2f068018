"""The atoms of a mask's visibility predicate (passes/masks.py classifies the whole): which comparisons of the query
position i and the key position j they are, a chunk size, a difference form d = i - j with its truth at each d, and
how an atom that does not involve i and j is decided over the box of its sizes."""
from __future__ import annotations

import math
from typing import Optional

import sympy

RELATIONS = {sympy.Eq: "eq", sympy.Ne: "ne", sympy.StrictLessThan: "lt", sympy.LessThan: "le",
             sympy.StrictGreaterThan: "gt", sympy.GreaterThan: "ge"}


def chunk_size(atom, query, key) -> Optional[int]:
    """C when the atom is floor(i / C) == floor(j / C) (or !=), else None."""
    if not isinstance(atom, (sympy.Eq, sympy.Ne)):
        return None
    expression = sympy.expand(atom.lhs - atom.rhs)
    floors = list(expression.atoms(sympy.floor))
    if len(floors) != 2:
        return None
    sizes = {}
    for floor in floors:
        argument = floor.args[0]
        symbols = argument.free_symbols
        if len(symbols) != 1:
            return None
        symbol = next(iter(symbols))
        coefficient = argument.coeff(symbol)
        if sympy.expand(argument - coefficient * symbol) != 0 or not coefficient.is_Rational or coefficient <= 0:
            return None
        sizes[symbol] = 1 / coefficient
    if set(sizes) != {query, key} or sizes[query] != sizes[key] or not sizes[query].is_Integer:
        return None
    chunk = int(sizes[query])
    difference = sympy.floor(query / chunk) - sympy.floor(key / chunk)
    if expression not in (difference, -difference):
        return None
    return chunk


def predicate_atoms(predicate: sympy.Basic) -> list:
    if isinstance(predicate, sympy.logic.boolalg.BooleanAtom):
        return []
    if isinstance(predicate, sympy.core.relational.Relational):
        return [predicate]
    found = []
    for argument in predicate.args:
        for atom in predicate_atoms(argument):
            if atom not in found:
                found.append(atom)
    return found


def difference_form(atom, query, key) -> Optional[tuple]:
    """(relation, a, c) with atom <=> relation(a * (j - i) + c, 0), or None if the atom is not a function of j - i."""
    relation = RELATIONS.get(type(atom))
    if relation is None:
        return None
    expression = sympy.expand(atom.lhs - atom.rhs)
    if not expression.free_symbols <= {query, key}:
        return None
    if not expression.is_polynomial(query, key) or sympy.Poly(expression, query, key).total_degree() > 1:
        return None
    a_key = expression.coeff(key)
    a_query = expression.coeff(query)
    rest = sympy.expand(expression - a_key * key - a_query * query)
    if not (a_key.is_number and a_query.is_number and rest.is_number) or a_key != -a_query or a_key == 0:
        return None
    return relation, a_key, rest


def holds(atom, query, key, d: int) -> bool:
    value = atom.xreplace({query: sympy.Integer(0), key: sympy.Integer(d)})
    return bool(value)


def sample_offsets(linears: list) -> list[int]:
    points = {-1, 0, 1}
    for _, a, c in linears:
        threshold = -c / a
        floor, ceil = int(math.floor(threshold)), int(math.ceil(threshold))
        points.update({floor - 1, floor, floor + 1, ceil, ceil + 1})
    low, high = min(points) - 2, max(points) + 2
    points.update({low, high})
    points.update({point + 1 for point in list(points) if point + 1 <= high})
    return sorted(points)


def interval(samples: list[int], table: list[bool]) -> Optional[tuple]:
    """(low, high) of a contiguous true set (None for an infinite end), from a table that is exact on the samples
    and constant beyond the first and the last one."""
    true_positions = [position for position, value in enumerate(table) if value]
    if not true_positions:
        return None
    first, last = true_positions[0], true_positions[-1]
    if any(not table[position] for position in range(first, last + 1)):
        return None
    low = None if first == 0 else samples[first]
    high = None if last == len(samples) - 1 else samples[last]
    return low, high


def decide_on_box(atom, bounds: dict) -> Optional[sympy.Basic]:
    """True/False when the atom holds or fails for every index in its box (indices in [0, size)), else None."""
    relation = RELATIONS.get(type(atom))
    if relation is None:
        return None
    expression = sympy.expand(atom.lhs - atom.rhs)
    index_symbols = [symbol for symbol in expression.free_symbols if symbol in bounds]
    if not expression.is_polynomial(*expression.free_symbols):
        return None
    low, high = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(expression):
        coefficient, factors = term.as_coeff_mul()
        index_factors = [factor for factor in factors if factor in index_symbols]
        if len(index_factors) > 1 or any(factor.as_base_exp()[1] != 1 for factor in factors):
            return None
        others = sympy.Mul(*[factor for factor in factors if factor not in index_symbols])
        if index_factors and not (others == 1 or others.is_positive):
            return None
        if not index_factors:
            low, high = low + term, high + term
            continue
        top = coefficient * others * (bounds[index_factors[0]] - 1)
        low, high = (low + top, high) if coefficient < 0 else (low, high + top)
    checks = {
        "lt": (high < 0, low >= 0), "le": (high <= 0, low > 0), "gt": (low > 0, high <= 0), "ge": (low >= 0, high < 0),
    }
    if relation not in checks:
        return None
    always, never = checks[relation]  # sympy decides these from the size symbols' assumptions, or leaves them
    if always is sympy.true:
        return sympy.true
    if never is sympy.true:
        return sympy.false
    return None
