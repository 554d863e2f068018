"""Generation: a captured model decoded token by token, each attention site reading and appending to its own cache.

From one capture of the model (token ids and explicit positions as inputs), two graphs are derived: the *prefill*
graph, whose sites run the tiled kernel over the prompt and write its keys and values into the caches, and the
*decode* graph, whose sites append the new tokens' keys and values and read the cache with the split-K decoding
kernel (backends/decode). Each site's cache follows its proved mask: a causal site keeps every position up to
max_len; a sliding-window site keeps a rolling buffer of its window, whatever the context length; a site that
`planner.linearize` turned into linear attention keeps its recurrent state (a fixed-size matrix per head: constant
memory and time per token at any context length).

Positions are an input of both graphs (each row's count of real tokens so far), so left-padded batches decode as
transformers does. Before first use the derived graphs are checked against the model's own full forward on a short
random prompt; a model whose sites or positions cannot be carried into a decode step (a bidirectional or arbitrary
mask, positions built inside the model, no `position_ids` argument) is decoded by running its whole sequence through
the optimized forward at every step instead: exact, slower, and `report` says why.

    state = fast.prefill(input_ids)                 # state.logits: (batch, vocab) at the last position
    logits, state = fast.decode(state, next_ids)    # next_ids: (batch,) or (batch, 1)
    tokens = fast.generate(input_ids, max_new_tokens=64)   # transformers models: model.generate's common cases
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from backends.decode.cache import append_to_cache, cache_slots
from backends.decode.cost import cache_bytes, time_per_token
from backends.decode.op import DecodeOptions, decode_attention
from backends.devices import device_spec
from backends.flash.rule import emit_sink_logits
from passes.capture import bind_call, capture_call
from passes.match import find_sites
from passes.rewrite import erase_dead_inputs, match_memory_order, prepare_inputs, restore_output
from planner.errors import InvalidArgumentError, PlannerError
from planner.fidelity import first_tensor
from planner.lengths import format_length, parse_length
from planner.records import AttentionSite
from planner.token_loop import generate_with

CHECK_PROMPT = 13  # the length of the random prompt the derived graphs are checked on (odd, short)
CHECK_STEPS = 3
# How far the derived steps' logits may be from the model's own forward, relative to the largest logit: kernel
# rounding (our tiled and decoding kernels against the model's attention) stays far below it, a position or mask
# that a step does not carry gives errors of order one. Half precision rounds 2^13 times coarser than float32.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 2e-2}


# ----------------------------------------------------------------------------------------------------------------------
# The cached attention a site becomes
# ----------------------------------------------------------------------------------------------------------------------


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_len: torch.Tensor, start: torch.Tensor, sink_logits: Optional[torch.Tensor], scale: float,
                     window: int, softcap: Optional[float], rolling: bool, prefill: bool) -> torch.Tensor:
    """Append the step's keys and values (positions cache_len .. cache_len + T - 1 of each row) to the site's cache,
    then attend: causally, from each row's first real position `start`, within `window` keys (-1: none).

    prefill: the cache was empty, so the T queries need only the step's own keys: the tiled kernel runs on them (its
    memory is linear in T) instead of the decoding kernel, whose tile holds every query."""
    append_to_cache(k_cache, v_cache, k, v, cache_len, rolling=rolling)
    if prefill:
        import backends

        keys = torch.arange(k.shape[2], device=k.device)
        padding = keys[None, :] >= start[:, None]
        if window > 0:
            return backends.sliding_window_attention(q, k, v, window, causal=True, scale=scale,
                                                     key_padding_mask=padding, softcap=softcap,
                                                     sink_logits=sink_logits)
        return backends.flash_attention(q, k, v, causal=True, scale=scale, key_padding_mask=padding, softcap=softcap,
                                        sink_logits=sink_logits)
    options = DecodeOptions(scale=scale, window=window if window > 0 else None, softcap=softcap, rolling=rolling)
    return decode_attention(q, k_cache, v_cache, cache_len + q.shape[2], options, start=start,
                            sink_logits=sink_logits)


LINEAR_DENOMINATOR_FLOOR = 1e-12  # as planner.linearize's forward


class RecurrentLinearSite(torch.nn.Module):
    """A linearized site (planner.linearize's LinearizedAttention) decoded from its recurrent state.

    Linear attention o_i = phi(q_i) S_i / phi(q_i) z_i with S_i = sum_{j<=i} phi(k_j)^T v_j and z_i = sum phi(k_j):
    the state (batch, heads, features, value_dim + 1) holds S and z side by side (z as the value column of ones),
    in float32 at least, whatever the context. Left padding: positions before a row's start add nothing to it."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, state: torch.Tensor,
                length: torch.Tensor, start: torch.Tensor, prefill: bool) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        output_dtype = value.dtype
        query, key, value = (tensor.to(state.dtype) for tensor in (query, key, value))
        slot = length[:, None] + torch.arange(key.shape[2], device=key.device)[None, :]
        real = (slot >= start[:, None]).to(state.dtype)[:, None, :, None]
        # The normalizer is the output for a value column of ones; a padded key's row is zero in both.
        extended = torch.cat([value, torch.ones_like(value[..., :1])], dim=-1) * real
        feature_map = self.attention.feature_map
        key_features = feature_map(key)
        if prefill and query.is_cuda:
            from backends.linear.op import linear_attention

            out = linear_attention(query, key, extended, feature_map=feature_map, causal=True)
        else:
            query_features = feature_map(query)
            out = (query_features @ key_features.transpose(-1, -2)).tril() @ extended
            if not prefill:
                out = out + query_features @ state
        state.add_(key_features.transpose(-1, -2) @ extended)
        return (out[..., :-1] / out[..., -1:].clamp_min(LINEAR_DENOMINATOR_FLOOR)).to(output_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The decode plan and the state
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteCache:
    """How one site decodes: its cache form, the cache's size at max_len and the estimated time per token."""

    site: str
    kind: str  # "full" (every position up to max_len), "rolling" (the proved window) or "recurrent" (linear)
    window: Optional[int]
    kv_heads: int
    head_dim: int
    value_dim: int
    slots: int
    bytes_at_max_len: float
    seconds_per_token: float

    def describe(self) -> str:
        from planner.plan import format_bytes, format_seconds

        form = {"rolling": f"rolling buffer of {self.window}", "recurrent": "recurrent state"}.get(self.kind,
                                                                                                   "full cache")
        return (f"{self.site}: {form}, {format_bytes(self.bytes_at_max_len)} per sequence at max_len, "
                f"~{format_seconds(self.seconds_per_token)} per token (cache read)")


@dataclass
class GenerationState:
    """What decoding carries between steps. `logits`: (batch, vocab) at the last position of the latest step;
    `tokens`: every token so far (prompt included, left padding kept); `length`: positions written per row."""

    logits: torch.Tensor
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    length: torch.Tensor
    start: torch.Tensor
    caches: list = field(default_factory=list)
    recompute: bool = False
    step_graph: Optional["GraphedStep"] = None  # the one-token decode step captured over these caches (CUDA)


# ----------------------------------------------------------------------------------------------------------------------
# Deriving the graphs
# ----------------------------------------------------------------------------------------------------------------------


def _linear_obstacle(site: AttentionSite) -> Optional[str]:
    """Why a linearized site cannot decode from a recurrent state (None: it can)."""
    if not site.mask.is_causal or site.mask.kind != "causal":
        return f"its mask is {site.mask.describe()}: only causal linear attention has a recurrent form"
    if site.q_len != site.kv_len:
        return "its queries and keys are different sequences"
    return None


def _recurrent_site(site: AttentionSite, attention: torch.nn.Module, bandwidth: float) -> SiteCache:
    """A linearized site's state: (heads, features, value_dim + 1) floats per sequence, read and written once a token."""
    features = 2 * attention.feature_map.weight.shape[-1]  # phi(x) = [softmax(xW + b), softmax(-(xW + b))]
    state_bytes = site.heads * features * (site.value_dim + 1) * 4
    return SiteCache(site.name, "recurrent", None, site.heads, features, site.value_dim + 1, 0, state_bytes,
                     2 * state_bytes / bandwidth)


def _decode_obstacle(site: AttentionSite) -> Optional[str]:
    """Why a site cannot read a cache in a decode step (None: it can). A key padding mask is allowed: the step's
    padding input is all ones, and the caches carry each row's padding as its start."""
    mask = site.mask
    if site.unsupported:
        return site.unsupported
    if mask.kind not in ("causal", "sliding_window"):
        return f"its mask is {mask.describe()}: only causal and sliding-window sites decode from a cache"
    if mask.bias:
        return f"its mask is {mask.describe()}"
    if site.q_len != site.kv_len:
        return "its queries and keys are different sequences"
    return None


class Generator:
    """The prefill and decode graphs of one model, derived once (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_len: int, bandwidth: float,
                 forward: Optional[Any] = None, linear_sites: Optional[dict] = None,
                 reference: Optional[Any] = None, recompute_because: Optional[str] = None):
        """linear_sites: site name -> the LinearizedAttention that replaces it (planner.linearize); those sites
        decode from a recurrent state. reference: what the derived steps are checked against and what a
        recomputing step runs, called with the token ids alone (default: the model with explicit positions).
        recompute_because: decode by running `forward` over the whole sequence at every step, for this reason."""
        self.model = model
        self.forward = forward or model  # what a recomputing step runs: the optimized model
        self.linear_sites = dict(linear_sites or {})
        self.reference = reference
        self.max_len = max_len
        self.sites: list[SiteCache] = []
        self.recompute_because: Optional[str] = None
        self.cuda_graphs = True  # one-token CUDA steps replay a CUDA graph (False after a capture failed)
        self.graph_failure: Optional[str] = None
        self._graphs: dict = {}
        if recompute_because is not None:
            self.recompute_because = recompute_because
            return
        try:
            self._derive(bandwidth)
        except PlannerError as error:
            self.recompute_because = str(error)

    def _parameters(self) -> dict:
        return inspect.signature(self.model.forward).parameters

    def _call(self, ids: torch.Tensor, positions: torch.Tensor):
        kwargs = {"position_ids": positions}
        if "attention_mask" in self._parameters():
            # All ones: padding is the caches' business (each row's start). Without a mask, transformers reads
            # position_ids that restart as packed sequences, and the mask would depend on them.
            kwargs["attention_mask"] = torch.ones_like(ids)
        if "logits_to_keep" in self._parameters():
            kwargs["logits_to_keep"] = 1  # a long prompt's logits are (length, vocab): only the last is needed
        return bind_call(self.model, (ids,), kwargs)

    def _derive(self, bandwidth: float) -> None:
        if "position_ids" not in self._parameters():
            raise PlannerError(f"{type(self.model).__name__}.forward takes no position_ids: positions cannot be "
                               "offset by the tokens already seen")
        device = next((tensor.device for tensor in self.model.parameters()), torch.device("cpu"))
        vocab = _vocab_size(self.model)
        # A generator of its own: deriving the graphs must not move the global seed a sampling call relies on.
        ids = torch.randint(0, vocab, (2, 67), generator=torch.Generator().manual_seed(0)).to(device)
        positions = torch.arange(67, device=device).expand(2, 67).contiguous()
        captured, _ = capture_call(self.model, self._call(ids, positions), widen_batch=False)
        sites = find_sites(captured.graph_module)
        if not sites:
            raise PlannerError("no attention site was found to cache")
        missing = sorted(set(self.linear_sites) - {site.name for site in sites})
        if missing:
            raise PlannerError(f"the linearized sites {', '.join(missing)} are not attention sites of the model")
        for site in sites:
            obstacle = _linear_obstacle(site) if site.name in self.linear_sites else _decode_obstacle(site)
            if obstacle:
                raise PlannerError(f"site {site.name} cannot decode from a cache: {obstacle}")
        dtype_bytes = next(self.model.parameters()).element_size()
        for site in sites:
            if site.name in self.linear_sites:
                self.sites.append(_recurrent_site(site, self.linear_sites[site.name], bandwidth))
                continue
            window = site.mask.window if site.mask.kind == "sliding_window" else None
            rolling = window is not None and window < self.max_len
            slots = cache_slots(self.max_len, window=window, rolling=rolling)
            self.sites.append(SiteCache(
                site.name, "rolling" if rolling else "full", window, site.kv_heads, site.head_dim, site.value_dim,
                slots, cache_bytes(self.max_len, site.kv_heads, site.head_dim, dtype_bytes, value_dim=site.value_dim,
                                   window=window, rolling=rolling),
                time_per_token(self.max_len, site.kv_heads, site.head_dim, dtype_bytes, bandwidth,
                               value_dim=site.value_dim, window=window, rolling=rolling)))
        for prefill in (True, False):
            # A new module over a copy of the graph: the weights stay shared with the model, not copied.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation inside TreeSpec's copy
                graph = copy.deepcopy(captured.graph_module.graph)
            graph_module = torch.fx.GraphModule(captured.graph_module, graph)
            self._graphs[prefill] = _with_caches(graph_module, sites, self.sites, prefill, self.linear_sites)

    def plan_lines(self) -> list[str]:
        """The decode plan for a report: per group of sites with the same cache, its form, size and time per token;
        or why generation recomputes, and why steps run without a CUDA graph."""
        from planner.plan import format_bytes, format_seconds
        from planner.report import compress_names

        if self.recompute_because:
            return [f"generation recomputes the whole sequence at every step: {self.recompute_because}"]
        groups: dict = {}
        for site in self.sites:
            key = (site.kind, site.window, site.bytes_at_max_len, site.seconds_per_token)
            groups.setdefault(key, []).append(site.site)
        lines = []
        for (kind, window, size, seconds), names in groups.items():
            form = {"rolling": f"a rolling buffer of {window} positions",
                    "recurrent": "a recurrent state (linear attention)"}.get(kind, "a full cache")
            lines.append(f"decoding: {compress_names(names)} ({len(names)} sites) read {form}: {format_bytes(size)} "
                         f"per sequence and site at max_len, ~{format_seconds(seconds)} per token and site (cache read)")
        if self.graph_failure:
            lines.append(f"decoding steps run uncaptured (no CUDA graph): {self.graph_failure}")
        return lines

    def check(self) -> None:
        """Prefill a short random prompt and decode a few tokens; compare with the model's full forward. A mismatch
        (positions the graphs do not carry, say) switches to recomputation, with the reason."""
        if self.recompute_because is not None:
            return
        device = next((tensor.device for tensor in self.model.parameters()), torch.device("cpu"))
        generator = torch.Generator(device="cpu").manual_seed(0)
        # Two rows, one left-padded; one row against a reference of token ids alone (which may be fixed to it).
        rows = 1 if self.reference is not None else 2
        tokens = torch.randint(0, _vocab_size(self.model), (rows, CHECK_PROMPT + CHECK_STEPS), generator=generator)
        tokens = tokens.to(device)
        mask = torch.ones_like(tokens)
        takes_mask = "attention_mask" in self._parameters()
        if takes_mask and self.reference is None:
            mask[1, :2] = 0
        with torch.no_grad():
            state = self.prefill(tokens[:, :CHECK_PROMPT], mask[:, :CHECK_PROMPT])
            for step in range(CHECK_STEPS):
                end = CHECK_PROMPT + step
                # Positions as generation gives them: each row's count of real tokens (what prefill/decode pass).
                positions = (mask[:, :end].cumsum(-1) - 1).clamp_min(0)
                padding = {"attention_mask": mask[:, :end]} if takes_mask else {}
                if self.reference is not None:
                    full = first_tensor(self.reference(tokens[:, :end]))[:, -1]
                else:
                    full = first_tensor(self.model(tokens[:, :end], position_ids=positions, **padding))[:, -1]
                scale = full.abs().max().clamp_min(1e-6)
                error = ((state.logits - full).abs().max() / scale).item()
                if not error < CHECK_TOLERANCE.get(state.logits.dtype, 5e-2):
                    self.recompute_because = (f"the derived decode step did not reproduce the model's forward (relative "
                                              f"error {error:.1e} at step {step}): its positions or masks are not "
                                              "carried into a step")
                    return
                state = self.decode(state, tokens[:, CHECK_PROMPT + step])[1]

    # -- the steps ---------------------------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> GenerationState:
        if input_ids.dim() != 2:
            raise InvalidArgumentError(f"input_ids must be (batch, length) token ids; got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        self._check_room(length)
        start = (mask.cumsum(-1) == 0).sum(-1)
        left_padded = bool((mask == (torch.arange(length, device=mask.device)[None, :] >= start[:, None])).all())
        recompute = self.recompute_because is not None or not left_padded
        zero = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
        state = GenerationState(logits=None, tokens=input_ids, attention_mask=mask, length=zero, start=start,
                                recompute=recompute)
        if recompute:
            state.logits = self._recomputed_logits(state)
            return state
        state.caches = [self._new_cache(site, batch, input_ids) for site in self.sites]
        state.logits = self._step(state, input_ids, prefill=True)
        return state

    def decode(self, state: GenerationState, next_ids: torch.Tensor) -> tuple[torch.Tensor, GenerationState]:
        next_ids = next_ids.reshape(state.tokens.shape[0], -1).to(state.tokens.device)
        self._check_room(state.tokens.shape[1] + next_ids.shape[1])
        state = dataclasses.replace(
            state, tokens=torch.cat([state.tokens, next_ids], dim=1),
            attention_mask=torch.cat([state.attention_mask, torch.ones_like(next_ids)], dim=1))
        if state.recompute:
            state.logits = self._recomputed_logits(state)
        else:
            state.logits = self._step(state, next_ids, prefill=False)
        return state.logits, state

    def _check_room(self, length: int) -> None:
        if length > self.max_len:
            raise InvalidArgumentError(f"the sequence would reach {length:,} tokens, past max_len="
                                       f"{format_length(self.max_len)} that the model was optimized for: optimize "
                                       "with a larger max_len or ask for fewer new tokens")

    def _new_cache(self, site: SiteCache, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.model.parameters())
        if site.kind == "recurrent":
            dtype = torch.promote_types(weight.dtype, torch.float32)
            state = torch.zeros(batch, site.kv_heads, site.head_dim, site.value_dim, dtype=dtype, device=like.device)
            return state, state.new_empty(0)
        shape = (batch, site.kv_heads, site.slots)
        # Zeros, not empty: a slot not written yet is never visible, but 0 * NaN garbage would still be NaN.
        return (torch.zeros(shape + (site.head_dim,), dtype=weight.dtype, device=like.device),
                torch.zeros(shape + (site.value_dim,), dtype=weight.dtype, device=like.device))

    def _step(self, state: GenerationState, ids: torch.Tensor, prefill: bool) -> torch.Tensor:
        if not prefill and ids.shape[1] == 1 and self.cuda_graphs and ids.is_cuda:
            logits = self._graphed_step(state, ids)
        else:
            logits = self._run_step(state.caches, ids, state.length, state.start, prefill)
        state.length = state.length + ids.shape[1]
        return logits

    def _run_step(self, caches: list, ids: torch.Tensor, length: torch.Tensor, start: torch.Tensor,
                  prefill: bool) -> torch.Tensor:
        """The step's graph over these caches: the last position's logits. Reads no tensor data on the host, so a
        one-token step can be captured in a CUDA graph."""
        graph = self._graphs[prefill]
        positions = (length[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :] - start[:, None])
        positions = positions.clamp_min(0)
        for index, (k_cache, v_cache) in enumerate(caches):
            setattr(graph, f"_decode_k_{index}", k_cache)
            setattr(graph, f"_decode_v_{index}", v_cache)
        graph._decode_length = length
        graph._decode_start = start
        output = graph(*_call_tensors(self._call(ids, positions)))
        return first_tensor(output)[:, -1]

    def _graphed_step(self, state: GenerationState, ids: torch.Tensor) -> torch.Tensor:
        """A one-token step replayed from a CUDA graph (captured on a state's first step: per-token work is then
        the GPU's alone, not hundreds of Python dispatches). A step that cannot be captured runs as it is, noted."""
        if state.step_graph is None:
            try:
                state.step_graph, logits = GraphedStep.capture(self, state, ids)
                return logits
            except Exception as error:  # a capture the step's ops refuse: run uncaptured from now on
                self.cuda_graphs = False
                self.graph_failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                torch.cuda.synchronize()
                return self._run_step(state.caches, ids, state.length, state.start, prefill=False)
        return state.step_graph.replay(ids, state.length, state.start)

    def _recomputed_logits(self, state: GenerationState) -> torch.Tensor:
        if self.reference is not None and bool(state.attention_mask.all()):
            output = self.reference(state.tokens)
        elif self.reference is not None:
            raise InvalidArgumentError("this model is called with token ids alone: a padded batch cannot be "
                                       "generated by recomputation; give rows of one length")
        elif "attention_mask" in self._parameters():
            positions = {"position_ids": (state.attention_mask.cumsum(-1) - 1).clamp_min(0)} \
                if "position_ids" in self._parameters() else {}
            output = self.forward(state.tokens, attention_mask=state.attention_mask, **positions)
        elif bool(state.attention_mask.all()):
            output = self.forward(state.tokens)
        else:
            raise InvalidArgumentError(f"{type(self.model).__name__}.forward takes no attention_mask: a padded batch "
                                       "cannot be generated; give rows of one length")
        return first_tensor(output)[:, -1]


class GraphedStep:
    """A state's one-token decode step as a CUDA graph: static input buffers (ids, lengths, starts) copied into before
    each replay, the state's caches written in place by the replayed append, the logits cloned out."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", ids: torch.Tensor, length: torch.Tensor, start: torch.Tensor,
                 logits: torch.Tensor):
        self.graph, self.ids, self.length, self.start, self.logits = graph, ids, length, start, logits

    @classmethod
    def capture(cls, generator: "Generator", state: GenerationState, ids: torch.Tensor):
        """Run the step once (warming kernels up: its logits are this step's) on a side stream, then capture it."""
        ids_, length, start = ids.clone(), state.length.clone(), state.start.clone()

        def step() -> torch.Tensor:
            return generator._run_step(state.caches, ids_, length, start, prefill=False)

        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            logits = step().clone()
        torch.cuda.current_stream(ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Capture records the step without running it: the caches keep what the warm-up wrote.
        with torch.cuda.graph(graph):
            static_logits = step()
        return cls(graph, ids_, length, start, static_logits), logits

    def replay(self, ids: torch.Tensor, length: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.length.copy_(length)
        self.start.copy_(start)
        self.graph.replay()
        return self.logits.clone()


def _call_tensors(bound: inspect.BoundArguments) -> tuple:
    from passes.capture import call_signature

    return call_signature(bound)[1]


def _vocab_size(model: torch.nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        embeddings = [module for module in model.modules() if isinstance(module, torch.nn.Embedding)]
        if not embeddings:
            raise PlannerError(f"{type(model).__name__} has no token embedding to generate with")
        vocab = embeddings[0].num_embeddings
    return int(vocab)


def _with_caches(graph_module: torch.fx.GraphModule, sites: list[AttentionSite], caches: list[SiteCache],
                 prefill: bool, linear_sites: Optional[dict] = None) -> torch.fx.GraphModule:
    """Each site replaced by cached_attention over the graph's cache attributes (set per state before a call), or,
    a linearized site, by its RecurrentLinearSite over its state."""
    linear_sites = linear_sites or {}
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    # Buffers that each state replaces with its own tensors before a call.
    graph_module.register_buffer("_decode_length", torch.zeros(1, dtype=torch.int64), persistent=False)
    graph_module.register_buffer("_decode_start", torch.zeros(1, dtype=torch.int64), persistent=False)
    for index, (site, cache) in enumerate(zip(sites, caches)):
        graph_module.register_buffer(f"_decode_k_{index}", torch.empty(0), persistent=False)
        graph_module.register_buffer(f"_decode_v_{index}", torch.empty(0), persistent=False)
        node = nodes[site.node]
        with graph.inserting_before(node):
            emitted, extra = prepare_inputs(graph, site, nodes)
            everything = {**nodes, **extra}
            qkv = (everything[emitted.query], everything[emitted.key], everything[emitted.value])
            if cache.kind == "recurrent":
                graph_module.add_submodule(f"_decode_linear_{index}", RecurrentLinearSite(linear_sites[site.name]))
                replacement = graph.call_module(f"_decode_linear_{index}", (
                    *qkv, graph.get_attr(f"_decode_k_{index}"), graph.get_attr("_decode_length"),
                    graph.get_attr("_decode_start"), prefill))
            else:
                arguments = (
                    *qkv, graph.get_attr(f"_decode_k_{index}"), graph.get_attr(f"_decode_v_{index}"),
                    graph.get_attr("_decode_length"), graph.get_attr("_decode_start"),
                    emit_sink_logits(graph, site, everything), float(site.effective_scale()),
                    int(cache.window) if cache.window is not None else -1,
                    None if site.softcap is None else float(site.softcap), cache.kind == "rolling", prefill,
                )
                replacement = graph.call_function(cached_attention, arguments)
            output = match_memory_order(graph, restore_output(graph, replacement, site, extra), node)
        node.replace_all_uses_with(output)
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erase_dead_inputs(graph, inputs)
    graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module



# ----------------------------------------------------------------------------------------------------------------------
# The front door for models that optimize() does not wrap
# ----------------------------------------------------------------------------------------------------------------------


class Decoder:
    """Token-by-token generation for a model: `prefill`, `decode` and (transformers models) `generate`, as
    `planner.optimize`'s result has them. Made by `planner.decoder`; `notes` holds the decode plan."""

    def __init__(self, model: torch.nn.Module, max_len: int, bandwidth: float, linear_sites: Optional[dict] = None,
                 reference: Optional[Any] = None):
        self.model, self.max_len, self.bandwidth = model, max_len, bandwidth
        self.linear_sites, self.reference = linear_sites, reference
        self.notes: list[str] = []
        self._generators: dict = {}

    def _generator(self) -> Generator:
        weight = next(self.model.parameters())
        key = (weight.dtype, weight.device, self.model.training)
        if key not in self._generators:
            generator = Generator(self.model, self.max_len, self.bandwidth, forward=self.reference or self.model,
                                  linear_sites=self.linear_sites, reference=self.reference)
            generator.check()
            self._generators[key] = generator
            self.notes.extend(line for line in generator.plan_lines() if line not in self.notes)
        return self._generators[key]

    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> GenerationState:
        """Run the prompt (left padding allowed) and fill every site's cache or state; `state.logits` are the
        (batch, vocab) logits at the last position."""
        with torch.no_grad():
            return self._generator().prefill(input_ids, attention_mask)

    def decode(self, state: GenerationState, next_ids: torch.Tensor) -> tuple[torch.Tensor, GenerationState]:
        """One step: `next_ids` (batch,) or (batch, T) appended; returns (logits at the last position, state)."""
        with torch.no_grad():
            return self._generator().decode(state, next_ids)

    def generate(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, *,
                 generation_config: Any = None, streamer: Any = None, **kwargs: Any) -> torch.Tensor:
        """transformers' `generate` for its common cases (see OptimizedModel.generate). With linearized sites, options
        the loop does not follow raise instead of running the model's own (softmax) generate."""
        fallback = None if self.linear_sites else getattr(self.model, "generate", None)
        return generate_with(self._generator, fallback, self.notes.append,
                             getattr(self.model, "generation_config", None), input_ids, attention_mask,
                             generation_config, streamer, kwargs)


def _token_call(linearized: torch.fx.GraphModule, source: torch.nn.Module):
    """How a linearize result is called with token ids alone: by keyword with use_cache=False when the source model
    takes use_cache (linearize captured it so), else positionally."""
    parameters = inspect.signature(source.forward).parameters
    if "use_cache" not in parameters:
        return linearized
    first = next(iter(parameters))
    return lambda ids: linearized(**{first: ids, "use_cache": False})


def decoder(model: torch.nn.Module, max_len: Union[int, str] = "32k",
            device: Union[None, str, torch.device] = None) -> Decoder:
    """Generation for `model` without optimize(): an nn.Module LM that takes `position_ids` (transformers causal
    LMs, or any module with that argument), or the result of `planner.linearize`, whose linearized sites then
    decode from their recurrent state (constant memory and time per token; the rest from caches).

    max_len: the longest sequence (prompt plus new tokens) the caches hold. device: what the per-token estimates in
    `notes` are for (default: the model's own device)."""
    linear_sites = getattr(model, "linear_modules", None)
    reference = None
    if linear_sites is not None:
        source = getattr(model, "source_model", None)
        if not isinstance(source, torch.nn.Module):
            raise InvalidArgumentError("this linearized model was made from a graph, not an nn.Module: pass "
                                       "planner.linearize the model itself to decode it")
        reference = _token_call(model, source)
        model = source
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"decoder takes an nn.Module or planner.linearize's result; got "
                                   f"{type(model).__name__}")
    if device is None:
        weight = next(model.parameters(), None)
        device = "cuda" if weight is not None and weight.is_cuda else "cpu"
    return Decoder(model, parse_length(max_len, name="max_len"), device_spec(device).memory_bandwidth,
                   linear_sites=linear_sites, reference=reference)
