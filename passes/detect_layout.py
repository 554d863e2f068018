"""Axis algebra for the detector: which axis of which tensor is which axis of q, k and v, proved by shape algebra.

A tensor on the way from q, k, v to the attention output is described by a *layout*: a list of axes, each axis a list
of atoms, outer to inner. An atom is a factor of one axis of a *root* (the last op before the attention that is not a
pure layout op: a projection, a rotary embedding, ...) or a broadcast (from expand/repeat). Layout ops (view, reshape,
permute, transpose, expand, unsqueeze, ...) only move atoms around, splitting one where a view splits an axis, so after
a chain of them every axis of a contraction's operand is a known product of root factors.

A contraction (matmul, bmm, baddbmm, einsum) pairs axes of its two operands; `AtomSpace.align` unifies the atoms of
paired axes (union-find, splitting atoms where two factorizations differ). After both contractions of an attention,
each class of unified atoms is one logical axis: batch or heads (q, k and v atoms), query positions (q only), key
positions (k and v), head dim (q and k), value dim (v). That is how a transposed K is never taken for Kᵀ: the classes
come from the contractions' index algebra, not from positions in a shape.
"""
from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch

from passes.graph_info import size_expr, tensor_meta

aten = torch.ops.aten
Size = Any  # int or sympy.Expr


class LayoutError(Exception):
    """A layout could not be followed or two layouts could not be aligned (the site is then not matched)."""


def sizes_equal(first: Size, second: Size) -> bool:
    if isinstance(first, int) and isinstance(second, int):
        return first == second
    return sympy.expand(sympy.sympify(first) - sympy.sympify(second)) == 0


def exact_quotient(numerator: Size, denominator: Size) -> Optional[Size]:
    """numerator / denominator when it is provably an integer for every value of the size symbols, else None."""
    if isinstance(numerator, int) and isinstance(denominator, int):
        return numerator // denominator if denominator and numerator % denominator == 0 else None
    quotient = sympy.cancel(sympy.sympify(numerator) / sympy.sympify(denominator))
    if quotient.is_number:
        return int(quotient) if quotient.is_integer else None
    if quotient.is_polynomial(*quotient.free_symbols):
        poly = sympy.Poly(quotient, *sorted(quotient.free_symbols, key=str))
        if all(coefficient.is_integer for coefficient in poly.coeffs()):
            return quotient
    return None


def product(sizes) -> Size:
    total: Size = 1
    for size in sizes:
        total = total * size
    if isinstance(total, sympy.Expr):
        total = sympy.expand(total)
        if total.is_number:
            total = int(total)
    return total


_COUNTER = itertools.count()


class Atom:
    """One factor of an axis. role: "q", "k", "v" (a root's factor, with root = node name and axis) or "broadcast"."""

    __slots__ = ("size", "role", "root", "axis", "parts", "number")

    def __init__(self, size: Size, role: str, root: Optional[str] = None, axis: Optional[int] = None):
        self.size = size
        self.role = role
        self.root = root
        self.axis = axis
        self.parts: Optional[list[Atom]] = None
        self.number = next(_COUNTER)

    def __repr__(self) -> str:
        where = f"{self.root}[{self.axis}]" if self.root else ""
        return f"<{self.role}{where}:{self.size}#{self.number}>"

    @property
    def broadcast(self) -> bool:
        return self.role == "broadcast"


def leaves(atoms) -> list[Atom]:
    """The unsplit atoms of a list of atoms, outer to inner, without size-1 factors (they index nothing)."""
    found = []
    for atom in atoms:
        if atom.parts is not None:
            found.extend(leaves(atom.parts))
        elif not (isinstance(atom.size, int) and atom.size == 1):
            found.append(atom)
    return found


Layout = list  # list of axes; an axis is a list of atoms


def layout_sizes(layout: Layout) -> list:
    return [product(atom.size for atom in leaves(axis)) for axis in layout]


class AtomSpace:
    """Union-find over atoms, where unifying or splitting an atom acts on its whole class."""

    def __init__(self):
        self.parent: dict[Atom, Atom] = {}
        self.members: dict[Atom, list[Atom]] = {}

    def find(self, atom: Atom) -> Atom:
        if atom not in self.parent:
            self.parent[atom] = atom
            self.members[atom] = [atom]
        root = atom
        while self.parent[root] is not root:
            root = self.parent[root]
        while self.parent[atom] is not root:
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def class_of(self, atom: Atom) -> list[Atom]:
        return self.members[self.find(atom)]

    def union(self, first: Atom, second: Atom) -> None:
        first_root, second_root = self.find(first), self.find(second)
        if first_root is second_root:
            return
        if not sizes_equal(first_root.size, second_root.size):
            raise LayoutError(f"cannot unify atoms of sizes {first_root.size} and {second_root.size}")
        members = self.class_of(first_root) + self.class_of(second_root)
        self.parent[second_root] = first_root
        self.members[first_root] = members
        self.members.pop(second_root, None)

    def split(self, atom: Atom, sizes: list) -> list[Atom]:
        """Split `atom` (a leaf) and every atom unified with it into factors of `sizes` (outer to inner)."""
        if atom.parts is not None:
            raise LayoutError("splitting an atom that is already split")
        if not sizes_equal(product(sizes), atom.size):
            raise LayoutError(f"cannot split {atom.size} into {sizes}")
        members = list(self.class_of(atom))
        new_parts = []
        for member in members:
            member.parts = [Atom(size, member.role, member.root, member.axis) for size in sizes]
            new_parts.append(member.parts)
        for parts in new_parts[1:]:
            for mine, theirs in zip(new_parts[0], parts):
                self.union(mine, theirs)
        return atom.parts

    def align(self, first_atoms: list[Atom], second_atoms: list[Atom]) -> None:
        """Unify two factorizations of the same index range, factor by factor, splitting where they differ."""
        first, second = list(leaves(first_atoms)), list(leaves(second_atoms))
        position_first = position_second = 0
        while position_first < len(first) and position_second < len(second):
            a, b = first[position_first], second[position_second]
            if sizes_equal(a.size, b.size):
                self.union(a, b)
                position_first += 1
                position_second += 1
                continue
            quotient = exact_quotient(a.size, b.size)
            if quotient is not None:
                first[position_first:position_first + 1] = self.split(a, [b.size, quotient])
                continue
            quotient = exact_quotient(b.size, a.size)
            if quotient is not None:
                second[position_second:position_second + 1] = self.split(b, [a.size, quotient])
                continue
            raise LayoutError(f"cannot align factors {a.size} and {b.size}")
        if position_first != len(first) or position_second != len(second):
            raise LayoutError("aligned axes have different sizes")

    def leaf_classes(self, atoms) -> list[Atom]:
        return [self.find(atom) for atom in leaves(atoms)]


def node_shape(node: Any) -> Optional[tuple]:
    value = tensor_meta(node)
    return None if value is None else tuple(size_expr(size) for size in value.shape)


def root_layout(node: torch.fx.Node, role: str) -> Layout:
    shape = node_shape(node)
    if shape is None:
        raise LayoutError(f"{node.name} has no recorded shape")
    return [[Atom(size, role, node.name, axis)] for axis, size in enumerate(shape)]


def broadcast_atom(size: Size) -> list[Atom]:
    return [] if isinstance(size, int) and size == 1 else [Atom(size, "broadcast")]


def reshape_layout(layout: Layout, shape: tuple, space: AtomSpace) -> Layout:
    """The layout after viewing a tensor of `layout` as `shape` (row-major regrouping of the same atoms)."""
    atoms = leaves([atom for axis in layout for atom in axis])
    result: Layout = []
    position = 0
    for size in shape:
        group: list[Atom] = []
        remaining: Size = size
        while not (isinstance(remaining, int) and remaining == 1) and not sizes_equal(remaining, 1):
            if position >= len(atoms):
                raise LayoutError(f"reshape to {shape}: not enough factors")
            atom = atoms[position]
            if sizes_equal(atom.size, remaining):
                group.append(atom)
                position += 1
                remaining = 1
                break
            quotient = exact_quotient(remaining, atom.size)
            if quotient is not None:
                group.append(atom)
                position += 1
                remaining = quotient
                continue
            quotient = exact_quotient(atom.size, remaining)
            if quotient is not None:
                outer, inner = space.split(atom, [remaining, quotient])
                atoms[position:position + 1] = [outer, inner]
                continue
            raise LayoutError(f"reshape to {shape}: factor {atom.size} does not divide {remaining}")
        result.append(group)
    if position != len(atoms):
        raise LayoutError(f"reshape to {shape}: factors left over")
    return result


def _dims(node: torch.fx.Node, argument: Any, rank: int) -> list[int]:
    if isinstance(argument, int):
        argument = [argument]
    return [dim % rank for dim in argument]


def is_full_slice(node: torch.fx.Node) -> bool:
    """slice(x, dim, 0, end) with end past the size: an identity the exporter leaves in graphs."""
    if node.target != aten.slice.Tensor:
        return False
    shape = node_shape(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start", None)
    end = node.args[3] if len(node.args) > 3 else node.kwargs.get("end", None)
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    if shape is None or step != 1 or start not in (None, 0):
        return False
    if end is None or (isinstance(end, int) and end >= 2**62):
        return True
    output = node_shape(node)
    return output is not None and sizes_equal(output[dim % len(shape)], shape[dim % len(shape)])


LAYOUT_TARGETS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unflatten.int, aten.flatten.using_ints,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.detach.default, aten.repeat.default, aten.repeat_interleave.self_int,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.to.device,
}
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unflatten.int,
            aten.flatten.using_ints}
IDENTITIES = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype,
              aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.to.device}


def is_layout_op(node: Any) -> bool:
    """A call that only rearranges (or casts) its first argument's elements."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target == aten.slice.Tensor:
        return is_full_slice(node)
    if node.target == aten.dropout.default:
        return node.args[2] is False if len(node.args) > 2 else node.kwargs.get("train") is False
    if node.target == aten._to_copy.default:
        return set(node.kwargs) <= {"dtype", "device", "layout", "memory_format", "non_blocking"}
    return node.target in LAYOUT_TARGETS


def apply_layout_op(node: torch.fx.Node, layout: Layout, space: AtomSpace) -> Layout:
    """The layout of `node`'s output from the layout of its first argument."""
    target = node.target
    rank = len(layout)
    shape = node_shape(node)
    if shape is None:
        raise LayoutError(f"{node.name} has no recorded shape")
    if target in IDENTITIES or target in (aten.slice.Tensor, aten.dropout.default):
        result = [list(axis) for axis in layout]
    elif target in RESHAPES:
        result = reshape_layout(layout, shape, space)
    elif target == aten.permute.default:
        result = [layout[dim] for dim in _dims(node, node.args[1], rank)]
    elif target == aten.transpose.int:
        first, second = node.args[1] % rank, node.args[2] % rank
        result = list(layout)
        result[first], result[second] = layout[second], layout[first]
    elif target == aten.t.default:
        result = list(reversed(layout))
    elif target == aten.unsqueeze.default:
        dim = node.args[1] % (rank + 1)
        result = layout[:dim] + [[]] + layout[dim:]
    elif target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        sizes = layout_sizes(layout)
        dims = ([d for d in range(rank)] if target == aten.squeeze.default
                else _dims(node, node.args[1], rank))
        drop = {d for d in dims if isinstance(sizes[d], int) and sizes[d] == 1}
        result = [axis for d, axis in enumerate(layout) if d not in drop]
    elif target == aten.expand.default:
        extra = len(shape) - rank
        result = [broadcast_atom(shape[d]) for d in range(extra)]
        for d, axis in enumerate(layout):
            if not leaves(axis) and not sizes_equal(shape[extra + d], 1):
                result.append(broadcast_atom(shape[extra + d]))
            else:
                result.append(list(axis))
    elif target == aten.repeat.default:
        repeats = list(node.args[1])
        extra = len(repeats) - rank
        result = [broadcast_atom(repeats[d]) for d in range(extra)]
        for d, axis in enumerate(layout):
            result.append(broadcast_atom(repeats[extra + d]) + list(axis))
    elif target == aten.repeat_interleave.self_int:
        repeats = node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim is None or not isinstance(repeats, int):
            raise LayoutError("repeat_interleave without a dim")
        result = [list(axis) for axis in layout]
        result[dim % rank] = result[dim % rank] + broadcast_atom(repeats)
    else:
        raise LayoutError(f"{target} is not a layout op")
    sizes = layout_sizes(result)
    if len(sizes) != len(shape) or not all(sizes_equal(a, b) for a, b in zip(sizes, shape)):
        raise LayoutError(f"{node.name}: layout sizes {sizes} do not match the recorded shape {shape}")
    return result


def scalar_factor(node: Any) -> Optional[tuple[torch.fx.Node, float]]:
    """(input, factor) when `node` multiplies or divides a tensor by a constant number, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in (aten.mul.Tensor, aten.mul.Scalar) and len(node.args) == 2:
        first, second = node.args
        if isinstance(second, (int, float)) and not isinstance(second, bool) and isinstance(first, torch.fx.Node):
            return first, float(second)
        if isinstance(first, (int, float)) and not isinstance(first, bool) and isinstance(second, torch.fx.Node):
            return second, float(first)
        for tensor, other in ((first, second), (second, first)):
            value = constant_scalar(other)
            if value is not None and isinstance(tensor, torch.fx.Node) and node_shape(tensor) == node_shape(node):
                return tensor, value
    if node.target in (aten.div.Tensor, aten.div.Scalar) and len(node.args) == 2 and not node.kwargs:
        first, second = node.args
        value = float(second) if isinstance(second, (int, float)) and not isinstance(second, bool) else \
            constant_scalar(second)
        if value is not None and value != 0 and isinstance(first, torch.fx.Node):
            return first, 1.0 / value
    return None


def constant_scalar(node: Any) -> Optional[float]:
    """The value of a one-element tensor computed from constants only (no input, no parameter), else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = tensor_meta(node)
    if value is None or value.numel() != 1:
        return None
    try:
        result = _evaluate_constant(node, depth=0)
    except (LayoutError, RuntimeError, TypeError, AttributeError):
        return None
    return None if result is None else float(result.reshape(()).item())


_CONSTANT_OPS = {aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default, aten.neg.default,
                 aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.pow.Tensor_Scalar,
                 aten.to.dtype, aten._to_copy.default, aten.lift_fresh_copy.default, aten.clone.default,
                 aten.scalar_tensor.default, aten.full.default, aten.detach.default, aten.to.dtype_layout}


def _evaluate_constant(node: Any, depth: int) -> Optional[torch.Tensor]:
    if not isinstance(node, torch.fx.Node):
        return node if isinstance(node, (int, float)) else None
    if depth > 8:
        return None
    if node.op == "get_attr":
        module = node.graph.owning_module
        value: Any = module
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.nn.Parameter) or not isinstance(value, torch.Tensor):
            return None  # a learned value may change after capture
        return value.detach()
    if node.op != "call_function" or node.target not in _CONSTANT_OPS:
        return None
    arguments = []
    for argument in node.args:
        if isinstance(argument, torch.fx.Node):
            evaluated = _evaluate_constant(argument, depth + 1)
            if evaluated is None:
                return None
            arguments.append(evaluated)
        elif isinstance(argument, (list, tuple)) and any(isinstance(a, torch.fx.Node) for a in argument):
            return None
        else:
            arguments.append(argument)
    kwargs = {key: value for key, value in node.kwargs.items() if key not in ("device", "pin_memory", "layout")}
    return node.target(*arguments, **kwargs)


# -- contractions ----------------------------------------------------------------------------------------------------

CONTRACTION_TARGETS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default,
                       aten.mm.default}


@dataclass
class Contraction:
    """A contraction as einsum: out[output] = alpha * sum(first[specs[0]] * second[specs[1]]) + beta * bias."""

    node: torch.fx.Node
    operands: tuple
    specs: tuple
    output: str
    alpha: float = 1.0
    bias: Optional[torch.fx.Node] = None
    beta: float = 1.0


def as_contraction(node: Any) -> Optional[Contraction]:
    """The node as an einsum of two tensors, or None when it is not a contraction of two tensors."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in CONTRACTION_TARGETS:
        return None
    target = node.target
    if target == aten.einsum.default:
        equation, operands = node.args[0], node.args[1]
        if len(operands) != 2:
            return None
        parsed = _parse_einsum(equation, [node_shape(operand) for operand in operands])
        if parsed is None:
            return None
        return Contraction(node, tuple(operands), parsed[0], parsed[1])
    if target == aten.baddbmm.default:
        bias, first, second = node.args[:3]
        beta = float(node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1.0))
        alpha = float(node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1.0))
        return Contraction(node, (first, second), ("zmk", "zkn"), "zmn", alpha, None if beta == 0 else bias, beta)
    first, second = node.args[:2]
    first_shape, second_shape = node_shape(first), node_shape(second)
    if first_shape is None or second_shape is None or len(first_shape) < 2 or len(second_shape) < 2:
        return None
    if target == aten.bmm.default:
        return Contraction(node, (first, second), ("zmk", "zkn"), "zmn")
    batch_rank = max(len(first_shape), len(second_shape)) - 2
    batch = string.ascii_uppercase[:batch_rank]
    first_batch = batch[batch_rank - (len(first_shape) - 2):]
    second_batch = batch[batch_rank - (len(second_shape) - 2):]
    return Contraction(node, (first, second), (first_batch + "mk", second_batch + "kn"), batch + "mn")


def _parse_einsum(equation: str, shapes: list) -> Optional[tuple[tuple[str, str], str]]:
    equation = equation.replace(" ", "")
    if "->" in equation:
        inputs, output = equation.split("->")
    else:
        inputs, output = equation, None
    specs = inputs.split(",")
    if len(specs) != 2 or any(shape is None for shape in shapes):
        return None
    ellipsis_letters = "ABCDEFGH"
    expanded = []
    widest = 0
    for spec, shape in zip(specs, shapes):
        if "..." in spec:
            count = len(shape) - (len(spec) - 3)
            widest = max(widest, count)
    for spec, shape in zip(specs, shapes):
        if "..." in spec:
            count = len(shape) - (len(spec) - 3)
            spec = spec.replace("...", ellipsis_letters[widest - count:widest])
        if len(spec) != len(shape):
            return None
        expanded.append(spec)
    if output is None:
        counts = {letter: (expanded[0] + expanded[1]).count(letter) for letter in set(expanded[0] + expanded[1])}
        output = "".join(sorted(letter for letter, count in counts.items() if count == 1))
    output = output.replace("...", ellipsis_letters[:widest])
    return (expanded[0], expanded[1]), output


def contraction_layout(contraction: Contraction, layouts: tuple[Layout, Layout], space: AtomSpace) -> Layout:
    """Align the letters both operands share and return the output's layout."""
    first_spec, second_spec = contraction.specs
    first_axes = dict(zip(first_spec, layouts[0]))
    second_axes = dict(zip(second_spec, layouts[1]))
    for letter in set(first_spec) & set(second_spec):
        first_atoms, second_atoms = leaves(first_axes[letter]), leaves(second_axes[letter])
        if first_atoms and second_atoms:
            space.align(first_atoms, second_atoms)
    for letter in set(first_spec) ^ set(second_spec):
        if letter not in contraction.output:
            raise LayoutError(f"index {letter} is summed over one operand only")
    result = []
    for letter in contraction.output:
        atoms = leaves(first_axes.get(letter, [])) or leaves(second_axes.get(letter, []))
        result.append(list(atoms))
    return result
