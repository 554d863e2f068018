"""What the partition knows of the sequence: which sizes are the sequence (the inputs' symbols along the sharded dim),
which outputs hold this rank's tokens, which attention sites ring attention can run, and which ops may see the
sequence (the tables the position pass of backends/ring/partition.py consults), with the small helpers it reads nodes
with."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import sympy
import torch

from passes.errors import PlanError
from passes.graph_info import size_expr, source_line
from passes.records import AttentionSite

RING_MASK_KINDS = ("none", "causal", "sliding_window")


# ---------------------------------------------------------------------------------------------------------------
# The sequence symbols and the sites


def sequence_symbols(graph_module: torch.fx.GraphModule, dim: int) -> frozenset:
    """The size symbols of the graph's tensor inputs along `dim` (inputs with fewer dims are not sharded)."""
    symbols: set = set()
    for node in graph_module.graph.nodes:
        if node.op != "placeholder" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        value = node.meta["val"]
        if value.dim() <= dim:
            continue
        size = size_expr(value.shape[dim])
        if not isinstance(size, sympy.Symbol):
            raise PlanError(
                f"partition: input {node.name!r} has length {size} along dim {dim}, fixed by the model's code at "
                "capture (not a free sequence length); a shard would have another length. Capture with inputs "
                "whose sequence length the model does not specialize, or pass dim= for the sequence dimension")
        symbols.add(size)
    if not symbols:
        raise PlanError(f"partition: no input tensor has a dim {dim}: nothing to shard along the sequence")
    return frozenset(symbols)


def output_sequence_dims(graph_module: torch.fx.GraphModule, symbols: frozenset) -> list:
    """For each flattened output: the dim holding this rank's tokens, or None (whole on every rank). An output whose
    tokens share a dim with another size (a flattened batch x sequence) cannot be put back together by a gather of
    whole slices, and is refused."""
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    leaves = torch.utils._pytree.tree_leaves(output.args[0])
    dims = []
    for leaf in leaves:
        value = leaf.meta.get("val") if isinstance(leaf, torch.fx.Node) else None
        found = [index for index, size in enumerate(getattr(value, "shape", ())) if involves(size, symbols)] \
            if isinstance(value, torch.Tensor) else []
        if found and not isinstance(size_expr(value.shape[found[0]]), sympy.Symbol):
            raise PlanError(f"partition: the output {leaf.name!r} ({user_line(leaf)}) has shape {tuple(value.shape)}:"
                            " its positions share a dimension with another size, so the shards cannot be gathered "
                            "back; return it with the sequence as a dimension of its own")
        dims.append(found[0] if found else None)
    return dims


def check_ring_site(site: AttentionSite, symbols: frozenset) -> None:
    """Refuse a site that ring attention cannot run exactly on sharded inputs (names the site and its source)."""
    where = f"attention site {site.name} ({site.source})"
    mask = site.mask
    reason = None
    if site.unsupported:
        reason = site.unsupported
    elif mask.kind not in RING_MASK_KINDS:
        reason = (f"its mask is {mask.describe()}; ring attention takes causal, none or sliding_window masks (a "
                  "padding or arbitrary mask tensor would have to be sharded by query and key)")
    elif mask.key_padding or mask.bias:
        reason = f"its mask is {mask.describe()}: the padding / bias tensor cannot be split over the ring"
    elif site.dropout_p != 0.0:
        reason = f"dropout_p={site.dropout_p}: ring attention has no dropout"
    elif site.softcap is not None or site.sinks is not None:
        reason = "soft-capping and attention sinks are not in ring attention"
    elif site.heads % site.kv_heads:
        reason = f"{site.heads} query heads are not a multiple of {site.kv_heads} kv heads"
    elif not (isinstance(site.q_len, sympy.Symbol) and site.q_len in symbols and site.kv_len == site.q_len):
        reason = (f"it attends {site.q_len} queries to {site.kv_len} keys; ring attention needs self-attention over "
                  f"the sharded sequence ({', '.join(sorted(map(str, symbols)))})")
    if reason:
        raise PlanError(f"partition: {where} cannot run as ring attention: {reason}")


# ---------------------------------------------------------------------------------------------------------------
# Which ops may see the sequence


# Layout and bookkeeping ops: they move elements without mixing positions (a size check follows on their outputs).
LAYOUT_OPS = {
    "view", "_unsafe_view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "transpose", "permute", "t",
    "contiguous", "clone", "alias", "detach", "flatten", "unflatten", "movedim", "view_as", "lift_fresh_copy",
    "to", "_to_copy", "type_as", "_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "stack",
    "dropout", "embedding", "outer", "masked_fill", "where", "lerp", "bitwise_and", "bitwise_or", "bitwise_xor",
    "__and__", "__or__", "__xor__", "__invert__", "logical_and", "logical_or", "logical_xor", "logical_not",
    "_assert_scalar", "_assert_async", "feature_dropout", "alpha_dropout", "native_dropout", "zeros_like",
    "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "copy", "real", "imag", "view_as_real",
    "view_as_complex", "polar", "complex", "scalar_tensor", "floor_divide", "true_divide", "rsub", "fill", "zero",
}
# Factories: constant along positions (arange is the exception, handled apart).
FACTORY_OPS = {"zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty", "empty_strided",
               "new_empty_strided", "rand", "randn", "randint", "scalar_tensor"}
# Ops that take the sequence length as a number legitimately (bounds of a slice, the end of an arange).
LENGTH_AS_NUMBER_OK = {"arange", "slice", "narrow", "_assert_scalar", "sym_constrain_range",
                       "sym_constrain_range_for_size", "sym_size"}
# A reduction over the sequence that an all_reduce completes: op name -> (reduce op, divide by world_size).
REDUCTIONS = {"sum": ("sum", False), "mean": ("sum", True), "amax": ("max", False), "amin": ("min", False)}
FULL_REDUCTIONS = {"max": "max", "min": "min"}  # max.default / min.default (no dim): the value only
# Along one `dim` argument: these mix positions when it is the sequence.
ALONG_DIM = {
    "softmax": "softmax over the sequence outside an attention site needs every position's score",
    "_softmax": "softmax over the sequence outside an attention site needs every position's score",
    "_safe_softmax": "softmax over the sequence outside an attention site needs every position's score",
    "log_softmax": "log_softmax over the sequence needs every position's score",
    "_log_softmax": "log_softmax over the sequence needs every position's score",
    "cumsum": "a prefix sum over a shard needs the sums of the tokens before it, on other ranks",
    "cumprod": "a prefix product over a shard needs the tokens before it, on other ranks",
    "cummax": "a running max over a shard needs the tokens before it, on other ranks",
    "cummin": "a running min over a shard needs the tokens before it, on other ranks",
    "logcumsumexp": "a prefix log-sum-exp over a shard needs the tokens before it, on other ranks",
    "diff": "a difference of neighbours crosses shard boundaries",
    "sort": "sorting along the sequence needs every position",
    "argsort": "sorting along the sequence needs every position",
    "topk": "top-k along the sequence needs every position",
    "kthvalue": "a k-th value along the sequence needs every position",
    "median": "a median along the sequence needs every position",
    "nanmedian": "a median along the sequence needs every position",
    "mode": "a mode along the sequence needs every position",
    "argmax": "an argmax along the sequence needs every position and their global indices",
    "argmin": "an argmin along the sequence needs every position and their global indices",
    "select": "selecting one position: it lives on one rank only",
    "index_select": "picking positions by index: they live on other ranks",
    "gather": "gathering positions by index: they live on other ranks",
    "take_along_dim": "gathering positions by index: they live on other ranks",
    "scatter": "scattering to positions by index: they live on other ranks",
    "scatter_add": "scattering to positions by index: they live on other ranks",
    "scatter_reduce": "scattering to positions by index: they live on other ranks",
    "index_add": "adding at positions by index: they live on other ranks",
    "index_copy": "copying to positions by index: they live on other ranks",
    "index_fill": "filling positions by index: they live on other ranks",
    "repeat_interleave": "repeating positions changes which rank holds which position",
    "split": "splitting the sequence: the pieces are spread over the ranks",
    "split_with_sizes": "splitting the sequence: the pieces are spread over the ranks",
    "tensor_split": "splitting the sequence: the pieces are spread over the ranks",
    "chunk": "splitting the sequence: the pieces are spread over the ranks",
    "unbind": "unbinding the sequence: the positions are spread over the ranks",
    "unfold": "sliding windows over the sequence cross shard boundaries",
    "cat": "concatenating along the sequence changes which rank holds which position",
    "var": "a variance over the sequence is not completed by one all_reduce here",
    "std": "a standard deviation over the sequence is not completed by one all_reduce here",
    "var_mean": "a variance over the sequence is not completed by one all_reduce here",
    "std_mean": "a standard deviation over the sequence is not completed by one all_reduce here",
    "logsumexp": "a log-sum-exp over the sequence is not completed by one all_reduce here",
    "prod": "a product over the sequence is not completed by one all_reduce here",
    "all": "all() over the sequence is not completed by one all_reduce here",
    "any": "any() over the sequence is not completed by one all_reduce here",
    "count_nonzero": "a count over the sequence is not completed by one all_reduce here",
    "nansum": "a nansum over the sequence is not completed by one all_reduce here",
    "nanmean": "a nanmean over the sequence is not completed by one all_reduce here",
    "norm": "a norm over the sequence is not completed by one all_reduce here",
    "linalg_vector_norm": "a norm over the sequence is not completed by one all_reduce here",
    "max": "max over the sequence with indices needs the global positions of the winners",
    "min": "min over the sequence with indices needs the global positions of the winners",
}
# The argument that names the dims of ALONG_DIM ops (default "dim").
DIM_ARGUMENT = {"unfold": "dimension"}
CONTRACTIONS = {"linear", "mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "dot", "vdot", "mv", "einsum",
                "addmv", "_scaled_mm"}
ELEMENT_LOSSES = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
                  "binary_cross_entropy_with_logits", "kl_div", "soft_margin_loss", "poisson_nll_loss",
                  "hinge_embedding_loss"}
CLASS_LOSSES = {"cross_entropy_loss", "nll_loss", "nll_loss_nd", "nll_loss2d"}
NORMS_OVER_LAST = {"layer_norm": "normalized_shape", "native_layer_norm": "normalized_shape",
                   "rms_norm": "normalized_shape", "_fused_rms_norm": "normalized_shape"}
CONVOLUTIONS = {"convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                "conv_transpose3d", "_convolution"}
POOLS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
         "max_pool1d_with_indices", "max_pool2d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
         "adaptive_max_pool1d", "adaptive_max_pool2d", "upsample_nearest1d", "upsample_linear1d",
         "upsample_nearest2d", "upsample_bilinear2d", "_upsample_nearest_exact1d", "interpolate", "pixel_shuffle"}
PADS = {"constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d",
        "circular_pad1d", "_pad_circular"}
# Ops that may make a tensor as long as the sequence from inputs that are not: constant along positions, or
# rewritten (arange, a table sliced to the sequence length).
SEQUENCE_SOURCES = FACTORY_OPS | {"arange", "slice", "narrow", "expand", "expand_as", "zeros_like", "ones_like",
                                  "empty_like", "full_like"}
CONTEXT_OPERATORS = ("wrap_with_autocast", "wrap_with_set_grad_enabled")
OURS = {"ring_attention", "ring_attention_backward", "all_reduce", "wait_tensor"}


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIRECTORY = os.path.dirname(torch.__file__) + os.sep


def user_line(node: torch.fx.Node) -> str:
    """'file.py:line' of the innermost frame outside torch itself (the model's line, not nn.Conv1d's)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    for filename, line in reversed(frames):
        if not filename.startswith(_TORCH_DIRECTORY):
            return f"{filename}:{line}"
    return source_line(node)


def packet_name(target: Any) -> Optional[str]:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) if packet is not None else None


def tensor_values(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, torch.Tensor)]
    return [value] if isinstance(value, torch.Tensor) else []


def involves(size: Any, symbols: frozenset) -> bool:
    expression = size_expr(size) if isinstance(size, (int, torch.SymInt)) else None
    return isinstance(expression, sympy.Expr) and bool(expression.free_symbols & symbols)


def schema_argument(node: torch.fx.Node, name: str, default: Any = None) -> Any:
    """An argument of an aten call by its schema name (positional or keyword), or its schema default."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.kwargs.get(name, default)
    for index, argument in enumerate(schema.arguments):
        if argument.name != name:
            continue
        if index < len(node.args):
            return node.args[index]
        if name in node.kwargs:
            return node.kwargs[name]
        return argument.default_value if argument.has_default_value() else default
    return default


def normalize_dims(dims: Any, ndim: int) -> list[int]:
    """Dims as non-negative ints; None or [] mean every dim."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return [dim % ndim if ndim else 0 for dim in dims]
