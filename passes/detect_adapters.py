"""Recipes that tell the rewrite how to feed a site to an attention op and how to return its result.

The detector proves which factors of which graph tensors are batch, heads, positions and head dim; a recipe is the
consequence written as layout steps: reshape a root to its factors, permute them into (batch, heads, sequence, dim)
order, reshape to 4 dims, cast. The rewrite (passes/rewrite.py) emits the steps as graph nodes; the mask check
(passes/masks.py) and tests run them eagerly. Sizes are ints or sympy expressions in the graph's size symbols, so a
rewritten graph works at every length; `SiteAdapter.symbols` says where each symbol can be read from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch


@dataclass(frozen=True)
class TensorAdapter:
    """source: the graph node to start from ("" for the attention op's output). steps: ("reshape", sizes),
    ("permute", dims), ("expand", sizes), ("dtype", name), applied in order."""

    source: str
    steps: tuple = ()


@dataclass(frozen=True)
class MaskTermAdapter:
    """One mask term in the op's (batch, heads, queries, keys) layout (size 1 where it broadcasts).
    kind: "add" (coefficient * tensor), "fill" (True -> masked), "keep" (False -> masked)."""

    kind: str
    tensor: TensorAdapter
    coefficient: float = 1.0


@dataclass(frozen=True)
class KeyPaddingAdapter:
    """The (batch, keys) bool mask, True where a key is visible: relation(source, value), negated if `negate`,
    after taking index 0 of the source's `drop_dims` (size-1 dims, descending) and its first `shape` rows and
    columns (the model indexes the input with batch and key positions, so a larger input is read the same way)."""

    source: str
    relation: str
    value: float
    negate: bool
    shape: tuple
    drop_dims: tuple = ()


@dataclass(frozen=True)
class SiteAdapter:
    """How to run a site with an op that takes (batch, heads, sequence, head_dim) tensors.

    query/key/value: recipes from graph nodes to those tensors (None: the site's node is already in that layout).
    output: recipe from the op's (batch, heads, queries, value_dim) output back to the site node's layout and dtype.
    mask_terms: the terms to combine into one additive mask when the site keeps its mask tensor.
    key_padding: the recipe of the key padding mask when the site's MaskSpec names one.
    symbols: (size symbol, placeholder, dim) for each size symbol the recipes use.
    """

    query: Optional[TensorAdapter] = None
    key: Optional[TensorAdapter] = None
    value: Optional[TensorAdapter] = None
    output: Optional[TensorAdapter] = None
    mask_terms: tuple = ()
    key_padding: Optional[KeyPaddingAdapter] = None
    symbols: tuple = ()


def is_identity_permutation(dims) -> bool:
    return list(dims) == list(range(len(dims)))


def build_steps(leaf_sizes: list, permutation: list, shape: list, dtype: Optional[str] = None,
                expand: Optional[list] = None, view: Optional[list] = None) -> tuple:
    """reshape(leaf_sizes) -> permute -> [reshape(view) -> expand] -> reshape(shape) -> dtype, minus no-ops."""
    steps: list = [("reshape", tuple(leaf_sizes))]
    if not is_identity_permutation(permutation):
        steps.append(("permute", tuple(permutation)))
    if view is not None:
        steps.append(("reshape", tuple(view)))
    if expand is not None:
        steps.append(("expand", tuple(expand)))
    steps.append(("reshape", tuple(shape)))
    if dtype is not None:
        steps.append(("dtype", dtype))
    return tuple(steps)


def concrete(size: Any, values: dict) -> int:
    if isinstance(size, int):
        return size
    return int(sympy.sympify(size).subs(values))


def run_steps(tensor: torch.Tensor, steps: tuple, values: dict) -> torch.Tensor:
    """Apply a recipe's steps eagerly, with the size symbols at `values` ({sympy symbol: int})."""
    for kind, argument in steps:
        if kind == "reshape":
            tensor = tensor.reshape([concrete(size, values) for size in argument])
        elif kind == "permute":
            tensor = tensor.permute(argument)
        elif kind == "expand":
            tensor = tensor.expand([concrete(size, values) for size in argument])
        elif kind == "dtype":
            tensor = tensor.to(getattr(torch, argument))
    return tensor
