"""Small readers of what torch.export leaves on FX nodes: shapes (with symbols), module paths, source lines."""
from __future__ import annotations

import re
from typing import Any, Optional

import sympy
import torch

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def tensor_meta(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor that export recorded for a node (None for non-tensors)."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def size_expr(size: Any):
    """An int, or the sympy expression behind a SymInt."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def shape_of(node: Any) -> Optional[tuple]:
    value = tensor_meta(node)
    return None if value is None else tuple(size_expr(size) for size in value.shape)


def size_hints(node: Any) -> dict[str, int]:
    """Values of the symbols in a node's shape at capture time."""
    value = tensor_meta(node)
    hints = {}
    if value is None:
        return hints
    for size in value.shape:
        if isinstance(size, torch.SymInt) and size.node.hint is not None:
            expr = size.node.expr
            if isinstance(expr, sympy.Symbol):
                hints[str(expr)] = int(size.node.hint)
            else:
                for symbol in expr.free_symbols:
                    hint = symbol_hint(size.node.shape_env, symbol)
                    if hint is not None:
                        hints[str(symbol)] = int(hint)
    return hints


def symbol_hint(shape_env: Any, symbol: sympy.Symbol) -> Optional[int]:
    """The value a size symbol had at capture (torch renamed var_to_val to backed_var_to_val)."""
    table = getattr(shape_env, "backed_var_to_val", None)
    if table is None:
        table = getattr(shape_env, "var_to_val", {})
    value = table.get(symbol)
    return None if value is None else int(value)


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost module that produced the node ("layers.0.self_attn"), or "" at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # Export may record paths like "L['self'].layers[0].attn" or "layers.0.attn"; normalize to the dotted form.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = path.replace("._modules.", ".").lstrip(".")
    return path


def source_line(node: torch.fx.Node) -> str:
    """'file.py:line' of the innermost user frame that produced the node."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return "<unknown>"
    filename, line = frames[-1]
    return f"{filename}:{line}"


def dtype_name(node: Any) -> str:
    value = tensor_meta(node)
    return str(value.dtype).replace("torch.", "") if value is not None else "unknown"


def node_argument(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """An argument of a call by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
