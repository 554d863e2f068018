"""`planner.linearize`: turn each softmax attention of a model into linear attention with a learned feature map,
distilled on calibration data by matching attention outputs (attention transfer). (The module is named apart from
the function, so that importing it does not replace `planner.linearize`.)

Linear attention is another architecture (the "retrain" class), not an approximation the planner may slip in: it
is chosen only under policy "any" with train=True, and this module is the training. For each site:

    softmax:  o_i = sum_j exp(s q_i.k_j) v_j / sum_j exp(s q_i.k_j)
    linear:   o_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)        (j <= i when causal)

with phi the Hedgehog feature map (Zhang et al., 2024, "The Hedgehog & the Porcupine"): per head a linear map W
followed by phi(x) = [softmax(x W + b), softmax(-(x W + b))], positive and spiky like the exponential it imitates.
Each site's phi is trained alone on the original model's q, k, v of that site (the teacher's own inputs, as in
LoLCATs' attention transfer) to minimise the relative squared error of the output; the report gives every site's
error before and after.

The rewritten graph calls LinearizedAttention modules: on CUDA (or implementation="kernel") they run
backends.linear_attention (the chunked kernel, with phi as its feature_map and the normalizer as an extra value
column of ones); on the CPU the same function in its parallel form (a masked (L x L) product: fast at calibration
lengths). Both are tested to agree.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from passes.errors import InvalidArgumentError
from passes.records import AttentionSite
from passes.rewrite import drop_dead_metadata_asserts, replace_site
from planner.fidelity import _tap_prepared_inputs, as_batches, first_tensor, rewrite_copy, site_error
from planner.pipeline import capture_sites

IMPLEMENTATIONS = ("auto", "kernel", "parallel")
DENOMINATOR_FLOOR = 1e-12


class HedgehogFeatureMap(torch.nn.Module):
    """phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))] over the features, per head h.

    x: (batch, heads, sequence, head_dim) -> (batch, heads, sequence, 2 * features)."""

    def __init__(self, heads: int, head_dim: int, features: Optional[int] = None, scale: float = 1.0):
        super().__init__()
        features = features or head_dim
        weight = torch.zeros(heads, head_dim, features)
        if features == head_dim:
            weight[:] = torch.eye(head_dim)  # start from softmax(+-x): already a softmax-like kernel
        else:
            torch.nn.init.normal_(weight, std=head_dim ** -0.5)
        # The softmax's scale s splits evenly between q and k: phi(q).phi(k) should follow exp(s q.k).
        self.weight = torch.nn.Parameter(weight * math.sqrt(scale))
        self.bias = torch.nn.Parameter(torch.zeros(heads, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = torch.einsum("bhld,hdf->bhlf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)[:, None, :]
        return torch.cat([torch.softmax(projected, dim=-1), torch.softmax(-projected, dim=-1)], dim=-1)


class LinearizedAttention(torch.nn.Module):
    """Normalized linear attention with a learned feature map, in attention's roles: forward(q, k, v) -> out,
    q (batch, heads, L, D), k and v (batch, kv_heads, L, D|Dv), out (batch, heads, L, Dv) in v's dtype.

    implementation: "kernel" (backends.linear_attention), "parallel" (masked L x L products in PyTorch), or "auto"
    (the kernel on CUDA, the parallel form elsewhere)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, *, causal: bool, scale: float,
                 features: Optional[int] = None, implementation: str = "auto"):
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise InvalidArgumentError(f"implementation={implementation!r}; accepted: {', '.join(IMPLEMENTATIONS)}")
        self.heads, self.kv_heads, self.causal = heads, kv_heads, causal
        self.implementation = implementation
        self.feature_map = HedgehogFeatureMap(heads, head_dim, features, scale)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        groups = self.heads // key.shape[1]
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        output_dtype = value.dtype
        compute = torch.promote_types(value.dtype, torch.float32)
        query, key, value = query.to(compute), key.to(compute), value.to(compute)
        use_kernel = self.implementation == "kernel" or (self.implementation == "auto" and query.is_cuda)
        if use_kernel:
            numerator, denominator = self._kernel(query, key, value)
        else:
            numerator, denominator = self._parallel(query, key, value)
        return (numerator / denominator.clamp_min(DENOMINATOR_FLOOR)).to(output_dtype)

    def _kernel(self, query, key, value):
        from backends.linear.op import linear_attention

        # The normalizer phi(q_i) . sum_j phi(k_j) is the output for a value column of ones.
        ones = torch.ones(*value.shape[:-1], 1, dtype=value.dtype, device=value.device)
        out = linear_attention(query, key, torch.cat([value, ones], dim=-1), feature_map=self.feature_map,
                               causal=self.causal)
        return out[..., :-1], out[..., -1:]

    def _parallel(self, query, key, value):
        weights = self.feature_map(query) @ self.feature_map(key).transpose(-1, -2)
        if self.causal:
            length = weights.shape[-1]
            weights = weights * torch.ones(weights.shape[-2], length, device=weights.device,
                                           dtype=weights.dtype).tril(length - weights.shape[-2])
        return weights @ value, weights.sum(-1, keepdim=True)


@dataclass(frozen=True)
class SiteDistillation:
    """One site's attention transfer: relative Frobenius error and mean cosine of its output against softmax
    attention on the calibration data (the original's q, k, v), before and after training; elu_error: the plain
    elu+1 feature map, the untrained starting point the planner's "linear" rewrite uses (normalized here)."""

    site: str
    error_before: float
    error_after: float
    cosine_before: float
    cosine_after: float
    elu_error: float
    loss_curve: tuple[float, ...] = ()


@dataclass
class LinearizeReport:
    """What planner.linearize did: per site, the errors before and after; the settings."""

    steps: int
    features: int
    sites: list = field(default_factory=list)  # SiteDistillation
    finetune_steps: int = 0
    kl_before_finetune: Optional[float] = None  # mean KL(original || linearized) of the outputs, calibration data
    kl_after_finetune: Optional[float] = None
    skipped: dict = field(default_factory=dict)  # site -> why it was not linearized
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"linearize: {len(self.sites)} site(s) distilled into linear attention (Hedgehog feature map, "
                 f"{self.features} features x 2), {self.steps} steps; relative error of each site's output"]
        for item in self.sites:
            lines.append(f"  {item.site}: elu+1 {item.elu_error:.3f}; learned map before {item.error_before:.3f} "
                         f"(cosine {item.cosine_before:.3f}) -> after {item.error_after:.3f} "
                         f"(cosine {item.cosine_after:.3f})")
        if self.finetune_steps:
            lines.append(f"  end to end, {self.finetune_steps} steps on KL(original || linearized) of the outputs: "
                         f"mean KL {self.kl_before_finetune:.4f} -> {self.kl_after_finetune:.4f}")
        for site, reason in self.skipped.items():
            lines.append(f"  kept softmax: {site}: {reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def linearizable(site: AttentionSite) -> Optional[str]:
    """Why a site cannot become linear attention, or None."""
    if site.unsupported:
        return site.unsupported
    mask = site.mask
    # A mask tensor proved to be causal (or none) at every length says nothing the causal form does not.
    if mask.kind not in ("none", "causal") or mask.key_padding or mask.bias:
        return f"linear attention replaces none/causal attention; the mask is {mask.describe()}"
    if site.dropout_p not in (0.0,):
        return f"dropout_p={site.dropout_p}"
    if site.softcap is not None or site.sinks is not None:
        return "soft-capping or sink logits have no linear form"
    if site.q_len != site.kv_len and mask.kind == "causal":
        return "causal attention with different query and key lengths"
    if site.heads % site.kv_heads:
        return f"{site.heads} query heads are not a multiple of {site.kv_heads} kv heads"
    return None


def softmax_attention(site: AttentionSite, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> torch.Tensor:
    """The site's softmax attention (the teacher), float32 or wider."""
    groups = query.shape[1] // key.shape[1]
    compute = torch.promote_types(value.dtype, torch.float32)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query.to(compute), key.to(compute), value.to(compute),
                                          is_causal=site.mask.is_causal, scale=site.effective_scale())


def _errors(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> tuple[float, float]:
    error = site_error(teacher, student)
    return error.rel_frobenius_error, error.cosine


def _elu_module(site: AttentionSite) -> torch.nn.Module:
    class EluAttention(torch.nn.Module):
        def forward(self, query, key, value):
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            weights = (F.elu(query) + 1) @ (F.elu(key) + 1).transpose(-1, -2)
            if site.mask.is_causal:
                weights = weights.tril()
            return (weights @ value) / weights.sum(-1, keepdim=True).clamp_min(DENOMINATOR_FLOOR)

    return EluAttention()


def distil_site(site: AttentionSite, inputs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                steps: int, *, features: Optional[int] = None, learning_rate: float = 1e-2,
                seed: int = 0) -> tuple[LinearizedAttention, SiteDistillation]:
    """Train one site's LinearizedAttention to reproduce its softmax attention on `inputs` (q, k, v per batch)."""
    torch.manual_seed(seed)
    module = LinearizedAttention(site.heads, site.kv_heads, site.head_dim, causal=site.mask.is_causal,
                                 scale=site.effective_scale(), features=features, implementation="parallel")
    module = module.to(inputs[0][0].device)  # the feature map lives where the site's q, k, v do
    teachers = [softmax_attention(site, *batch).detach() for batch in inputs]
    with torch.no_grad():
        error_before, cosine_before = _errors([module(*batch) for batch in inputs], teachers)
        elu_error, _ = _errors([_elu_module(site)(*batch) for batch in inputs], teachers)
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    curve = []
    for step in range(steps):
        index = step % len(inputs)
        student = module(*inputs[index])
        teacher = teachers[index]
        loss = ((student - teacher) ** 2).sum() / (teacher ** 2).sum().clamp_min(DENOMINATOR_FLOOR)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        curve.append(float(loss.detach()))
    module.implementation = "auto"
    with torch.no_grad():
        error_after, cosine_after = _errors([module(*batch) for batch in inputs], teachers)
    record = SiteDistillation(site.name, error_before, error_after, cosine_before, cosine_after, elu_error,
                              tuple(curve[:: max(1, steps // 20)]))
    return module, record


def linearize_graph(graph_module: torch.fx.GraphModule, sites: Sequence[AttentionSite], calibration: Any,
                    steps: int, *, features: Optional[int] = None, learning_rate: float = 1e-2,
                    finetune_steps: int = 0, output: Optional[Callable[[Any], torch.Tensor]] = None,
                    seed: int = 0) -> LinearizeReport:
    """Distil each of `sites` (those that can be) into a LinearizedAttention module and rewrite `graph_module` in
    place to call it. calibration: batches of model inputs (see planner.fidelity.as_batches).

    finetune_steps: then train every feature map together, end to end, on the mean KL(original || linearized) of
    the model's output distributions (`output` maps the model's output to logits; default: its first tensor): the
    layer-wise transfer weighs every position alike, the end-to-end loss weighs what changes the predictions."""
    for name, value in (("steps", steps), ("finetune_steps", finetune_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgumentError(f"{name}={value!r} must be a non-negative int (optimizer steps)")
    output = output or first_tensor
    batches = as_batches(calibration)
    report = LinearizeReport(steps=steps, features=0)
    chosen = []
    for site in sites:
        reason = linearizable(site)
        if reason is None:
            chosen.append(site)
        else:
            report.skipped[site.name] = reason
    if not chosen:
        return report

    module, store = rewrite_copy(graph_module, {}, chosen)
    for site in chosen:
        _tap_prepared_inputs(module, site, store)
    module.recompile()
    teacher_outputs = []
    with torch.no_grad():
        for args, kwargs in batches:
            teacher_outputs.append(output(module(*args, **kwargs)).detach())

    trained = {}
    for index, site in enumerate(chosen):
        inputs = list(zip(store[(site.name, "query")], store[(site.name, "key")], store[(site.name, "value")]))
        attention, record = distil_site(site, inputs, steps, features=features, learning_rate=learning_rate,
                                        seed=seed + index)
        report.features = attention.feature_map.weight.shape[-1]
        report.sites.append(record)
        trained[site.name] = attention
    _rewrite_sites(graph_module, chosen, trained)
    object.__setattr__(graph_module, "linear_modules", trained)  # what planner.decoder decodes recurrently
    if finetune_steps:
        _finetune(graph_module, list(trained.values()), batches, teacher_outputs, output, finetune_steps,
                  learning_rate, report)
    return report


def _mean_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(teacher.float(), dim=-1)
    return (log_p.exp() * (log_p - torch.log_softmax(student.float(), dim=-1))).sum(-1).mean()


def _finetune(graph_module, modules, batches, teacher_outputs, output, steps, learning_rate, report) -> None:
    """Train the feature maps end to end on KL(original || linearized); the model's own weights stay frozen."""
    parameters = [parameter for module in modules for parameter in module.parameters()]
    trainable = {id(parameter) for parameter in parameters}
    frozen = [parameter for parameter in graph_module.parameters()
              if id(parameter) not in trainable and parameter.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        def mean_kl() -> float:
            with torch.no_grad():
                values = [float(_mean_kl(teacher, output(graph_module(*args, **kwargs))))
                          for (args, kwargs), teacher in zip(batches, teacher_outputs)]
            return sum(values) / len(values)

        report.finetune_steps, report.kl_before_finetune = steps, mean_kl()
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for step in range(steps):
            args, kwargs = batches[step % len(batches)]
            loss = _mean_kl(teacher_outputs[step % len(batches)], output(graph_module(*args, **kwargs)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        report.kl_after_finetune = mean_kl()
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def _rewrite_sites(graph_module: torch.fx.GraphModule, sites: Sequence[AttentionSite],
                   modules: dict[str, torch.nn.Module]) -> None:
    """Replace each site's node by a call of its module, through the detector's adapters (layouts, dtypes)."""
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    for index, site in enumerate(sites):
        name = f"linearized_{index}"
        graph_module.add_submodule(name, modules[site.name])
        replace_site(graph, nodes, site, functools.partial(_call_module, name))
    drop_dead_metadata_asserts(graph)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()


def _call_module(name: str, graph: torch.fx.Graph, node: torch.fx.Node, site: AttentionSite,
                 nodes: dict) -> torch.fx.Node:
    return graph.call_module(name, (nodes[site.query], nodes[site.key], nodes[site.value]))


def takes_use_cache(model: Any) -> bool:
    """An nn.Module (not a graph) whose forward takes `use_cache`: left on, it returns a KV-cache object."""
    return (isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule)
            and "use_cache" in inspect.signature(model.forward).parameters)


def without_cache_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """A call of `model` as keywords, with use_cache=False unless the call sets it."""
    try:
        arguments = dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError as error:
        raise InvalidArgumentError(f"a calibration batch is not a call {type(model).__name__}.forward takes: "
                                   f"{error}") from None
    arguments.update(arguments.pop("kwargs", {}))
    arguments.setdefault("use_cache", False)
    return arguments


def linearize(model: Any, calibration: Any, steps: int = 300, *, features: Optional[int] = None,
              learning_rate: float = 1e-2, finetune_steps: int = 0,
              output: Optional[Callable[[Any], torch.Tensor]] = None, example_inputs: Optional[tuple] = None,
              example_kwargs: Optional[dict] = None, seed: int = 0) -> torch.fx.GraphModule:
    """Capture `model`, distil every softmax attention with a none/causal mask into linear attention with a learned
    feature map, and return the rewritten graph module with `.linearize_report` (errors before and after per site).

    Args:
        model: an nn.Module (captured with torch.export), a GraphModule or an ExportedProgram; not modified.
        calibration: batches of inputs (tensor, tuple or dict each) on which the attention outputs are matched.
        steps: optimizer steps per site. features: the feature map's width per sign (default head_dim).
        finetune_steps: then train all feature maps together on KL(original || linearized) of the outputs
            (logits; `output` picks them from the model's output). The model's own weights are not trained.
        example_inputs / example_kwargs: for capture (default: the first calibration batch).

    A model whose forward takes `use_cache` (transformers LMs) is captured and calibrated with use_cache=False, by
    keyword: call the result as `linear(input_ids=..., use_cache=False)`. `planner.decoder(linear)` generates
    from it, each linearized site decoding from its recurrent state.
    """
    if not isinstance(calibration, (torch.Tensor, dict)):
        calibration = list(calibration)  # used twice: for capture and for the distillation
    batches = as_batches(calibration)
    if takes_use_cache(model):
        # A KV-cache object in the outputs is no tensor a graph returns: every batch asks for none, by keyword.
        calibration = [without_cache_call(model, args, kwargs) for args, kwargs in batches]
        batches = as_batches(calibration)
        if example_kwargs is not None or example_inputs is not None:
            example_kwargs = without_cache_call(model, tuple(example_inputs or ()), dict(example_kwargs or {}))
            example_inputs = ()
    if example_inputs is None and example_kwargs is None:
        example_inputs, example_kwargs = batches[0]
    if isinstance(model, torch.fx.GraphModule):
        model = copy.deepcopy(model)
    captured, sites = capture_sites(model, example_inputs if example_inputs is not None else (), example_kwargs)
    graph_module = captured.graph_module
    report = linearize_graph(graph_module, sites, calibration, steps, features=features, learning_rate=learning_rate,
                             finetune_steps=finetune_steps, output=output, seed=seed)
    if not sites:
        report.notes.append("no softmax attention was found: the model is unchanged")
    object.__setattr__(graph_module, "linearize_report", report)
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule):
        object.__setattr__(graph_module, "source_model", model)  # planner.decoder captures it with positions
    return graph_module
