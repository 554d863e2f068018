"""Decoding attention (backends/decode/): the caches, the dense decoding reference, the split-K Triton kernel (on the
CPU through TRITON_INTERPRET=1, set in conftest.py) and the op, against an independent oracle: the dense attention
reference of backends/flash/naive.py over each row's whole prefix (every query, causal, window, sinks, key padding),
of which the decoding step must give the last T rows.

A generation is simulated on random float32 histories: each row's prompt is written into the cache (its own length,
left padding as a first real position), then steps of T tokens are appended and attended, so that rows differ in
length and a rolling buffer wraps around several times. Errors against the oracle are ~1e-6; a wrong slot, position
or mask shows as an O(1) error.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import pytest
import torch

from backends.decode.cache import append_to_cache, cache_slots, new_cache
from backends.decode.cost import cache_bytes, kv_bytes_read_per_step, slots_read_per_step, time_per_token
from backends.decode.naive import decode_attention_reference, slot_positions
from backends.decode.op import DecodeOptions, decode_attention, decode_attention_op
from backends.flash.naive import attention_reference
from planner.errors import BackendError

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 2e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """One simulated generation: rows with their own prompt lengths and first real positions."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    prompts: tuple  # prompt length per row (left padding included)
    starts: tuple  # first real position per row
    steps: int  # decoding steps after the prompt
    queries: int = 1  # T new tokens per step
    window: Optional[int] = None
    sinks: int = 0
    softcap: Optional[float] = None
    sink_logits: bool = False
    rolling: bool = False
    scale: Optional[float] = None
    num_splits: Optional[int] = None  # for the Triton kernel

    @property
    def options(self) -> DecodeOptions:
        return DecodeOptions(scale=self.scale, window=self.window, sinks=self.sinks, softcap=self.softcap,
                             rolling=self.rolling)


CASES = [
    # linear cache, rows of different lengths, grouped-query heads 6/2, head dim 64
    Case("linear-ragged-gqa", 6, 2, 64, 64, prompts=(37, 20, 5), starts=(0, 0, 0), steps=4, num_splits=3),
    # left padding (same length, different first real positions), head dim 40, value dim 24, soft-capping
    Case("linear-left-padding-dv", 6, 2, 40, 24, prompts=(37, 37, 37), starts=(0, 7, 30), steps=3, softcap=5.0,
         num_splits=2),
    # linear cache with a window and sinks: the kernel reads only the window and the sink slots; MQA, head dim 16
    Case("linear-window-sinks", 4, 1, 16, 16, prompts=(100, 60, 37), starts=(0, 3, 0), steps=3, window=16, sinks=4,
         num_splits=2),
    # rolling buffer of 2 + 8 slots over ~100 positions: wraps about 12 times; left padding, Dv != D, soft-capping
    # and sink logits
    Case("rolling-wraps", 6, 2, 16, 40, prompts=(90, 70, 37), starts=(0, 3, 11), steps=6, window=8, sinks=2,
         softcap=20.0, sink_logits=True, rolling=True, num_splits=3),
    # rolling buffer with two tokens per step (R = W + 1), no sinks, rows of different lengths
    Case("rolling-two-per-step", 6, 2, 16, 16, prompts=(41, 30, 9), starts=(0, 0, 0), steps=3, queries=2, window=7,
         rolling=True, num_splits=1),
    # linear cache, two tokens per step, sink logits, a negative scale
    Case("linear-two-per-step-sink-logits", 4, 2, 16, 32, prompts=(20, 33, 26), starts=(2, 0, 5), steps=2, queries=2,
         sink_logits=True, scale=-0.3, num_splits=4),
]


def _history(case: Case, generator: torch.Generator):
    """Random q, k, v for every position a row will reach (fresh per test; never zeros)."""
    batch = len(case.prompts)
    length = max(case.prompts) + case.steps * case.queries
    q = torch.randn(batch, case.q_heads, length, case.head_dim, generator=generator)
    k = torch.randn(batch, case.kv_heads, length, case.head_dim, generator=generator)
    v = torch.randn(batch, case.kv_heads, length, case.value_dim, generator=generator)
    sink_logits = torch.randn(case.q_heads, generator=generator) if case.sink_logits else None
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None if sink_logits is None else sink_logits.to(DEVICE)


def _dense_prefix(case: Case, q, k, v, sink_logits, lengths, starts):
    """The oracle: dense attention over each row's whole prefix, its last T rows (batch, q_heads, T, value_dim)."""
    outs, lses = [], []
    for row, (length, start) in enumerate(zip(lengths.tolist(), starts.tolist())):
        padding = (torch.arange(length, device=DEVICE) >= start)[None]
        out, lse = attention_reference(
            q[row:row + 1, :, :length], k[row:row + 1, :, :length], v[row:row + 1, :, :length], causal=True,
            window=case.window, sinks=case.sinks, scale=case.scale, key_padding_mask=padding, return_lse=True,
            softcap=case.softcap, sink_logits=sink_logits)
        outs.append(out[:, :, length - case.queries:])
        lses.append(lse[:, :, length - case.queries:])
    return torch.cat(outs), torch.cat(lses)


def _new_queries(q, lengths, count):
    """Each row's last `count` queries (rows have different lengths): (batch, q_heads, count, head_dim)."""
    index = lengths[:, None] - count + torch.arange(count, device=DEVICE)[None, :]
    return q.gather(2, index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))


def _assert_close(name, actual, expected, tolerance=TOLERANCE):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tolerance, f"{name}: max abs error {error:.3e} > {tolerance:.1e}"


def _simulate(case: Case, check):
    """Write each row's prompt, then decode `case.steps` steps; after each step call check(state) where state holds
    the caches, lengths, the step's queries and the oracle's out and lse."""
    generator = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    q, k, v, sink_logits = _history(case, generator)
    batch = len(case.prompts)
    max_len = max(case.prompts) + case.steps * case.queries
    k_cache, v_cache, cache_len = new_cache(batch, case.kv_heads, max_len, case.head_dim, case.value_dim,
                                            window=case.window, sinks=case.sinks, rolling=case.rolling,
                                            queries_per_step=case.queries, device=DEVICE)
    k_cache.normal_()  # slots never written hold garbage, not zeros: a mask that lets one through must show
    v_cache.normal_()
    starts = torch.tensor(case.starts, device=DEVICE)
    for row, prompt in enumerate(case.prompts):  # each row its own prompt length: one append per row (a view)
        append_to_cache(k_cache[row:row + 1], v_cache[row:row + 1], k[row:row + 1, :, :prompt],
                        v[row:row + 1, :, :prompt], cache_len[row:row + 1], sinks=case.sinks, rolling=case.rolling)
    cache_len += torch.tensor(case.prompts, device=DEVICE)
    for step in range(case.steps):
        index = cache_len[:, None] + torch.arange(case.queries, device=DEVICE)[None, :]
        k_new = k.gather(2, index[:, None, :, None].expand(-1, case.kv_heads, -1, case.head_dim))
        v_new = v.gather(2, index[:, None, :, None].expand(-1, case.kv_heads, -1, case.value_dim))
        append_to_cache(k_cache, v_cache, k_new, v_new, cache_len, sinks=case.sinks, rolling=case.rolling)
        cache_len += case.queries
        _assert_cache_holds_history(case, k_cache, v_cache, cache_len, k, v)
        expected_out, expected_lse = _dense_prefix(case, q, k, v, sink_logits, cache_len, starts)
        check(dict(step=step, q=_new_queries(q, cache_len, case.queries), k_cache=k_cache, v_cache=v_cache,
                   cache_len=cache_len.clone(), start=starts, sink_logits=sink_logits, out=expected_out,
                   lse=expected_lse))


def _assert_cache_holds_history(case, k_cache, v_cache, cache_len, k, v):
    """Every written slot holds the keys and values of the position it should (the slot rule, by a plain loop)."""
    slots = k_cache.shape[2]
    for row, length in enumerate(cache_len.tolist()):
        expected_slot = {}
        for position in range(length):
            if case.rolling and position >= case.sinks:
                expected_slot[case.sinks + (position - case.sinks) % (slots - case.sinks)] = position
            else:
                expected_slot[position] = position
        held = slot_positions(cache_len[row:row + 1], slots, sinks=case.sinks, rolling=case.rolling)[0].tolist()
        assert held == [expected_slot.get(slot, -1) for slot in range(slots)]
        for slot, position in expected_slot.items():
            assert torch.equal(k_cache[row, :, slot], k[row, :, position])
            assert torch.equal(v_cache[row, :, slot], v[row, :, position])


def _arguments(case: Case, state):
    return dict(options=case.options, start=state["start"], sink_logits=state["sink_logits"], return_lse=True)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_reference_matches_dense_attention_over_the_prefix(case):
    def check(state):
        out, lse = decode_attention_reference(
            state["q"], state["k_cache"], state["v_cache"], state["cache_len"], scale=case.scale, window=case.window,
            sinks=case.sinks, softcap=case.softcap, sink_logits=state["sink_logits"], start=state["start"],
            rolling=case.rolling, return_lse=True)
        _assert_close("out", out, state["out"])
        _assert_close("lse", lse, state["lse"])
        # The op's PyTorch path is the reference: the public entry with impl=None off the GPU gives the same.
        out_op, lse_op = decode_attention(state["q"], state["k_cache"], state["v_cache"], state["cache_len"],
                                          impl="reference", **_arguments(case, state))
        _assert_close("op out", out_op, state["out"])
        _assert_close("op lse", lse_op, state["lse"])

    _simulate(case, check)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_triton_kernel_matches_both_references(case):
    checked = []

    def check(state):
        if state["step"] not in (0, case.steps - 1):  # the interpreter is slow: the first and the last step
            return
        out, lse = decode_attention(state["q"], state["k_cache"], state["v_cache"], state["cache_len"],
                                    impl="triton", num_splits=case.num_splits, **_arguments(case, state))
        reference_out, reference_lse = decode_attention(state["q"], state["k_cache"], state["v_cache"],
                                                        state["cache_len"], impl="reference",
                                                        **_arguments(case, state))
        _assert_close("out vs dense prefix", out, state["out"])
        _assert_close("lse vs dense prefix", lse, state["lse"])
        _assert_close("out vs decode reference", out, reference_out)
        _assert_close("lse vs decode reference", lse, reference_lse)
        checked.append(state["step"])

    _simulate(case, check)
    assert checked


@needs_triton
def test_any_number_of_splits_gives_the_same_result():
    """Splits cut each row's range into equal whole blocks; rows shorter than the splits leave some empty (lse -inf
    partials), and the merge must ignore them."""
    case = Case("splits", 6, 2, 16, 24, prompts=(60, 3, 33), starts=(0, 0, 1), steps=1, window=20, sinks=3)
    results = []

    def check(state):
        for splits in (1, 2, 7):
            out, lse = decode_attention(state["q"], state["k_cache"], state["v_cache"], state["cache_len"],
                                        impl="triton", num_splits=splits, **_arguments(case, state))
            _assert_close(f"out, {splits} splits", out, state["out"])
            _assert_close(f"lse, {splits} splits", lse, state["lse"])
            results.append(splits)

    _simulate(case, check)
    assert results == [1, 2, 7]


def test_prompt_longer_than_the_rolling_buffer_keeps_the_latest_positions():
    """A prompt of 50 tokens written at once into 3 sinks + 8 ring slots: ring positions that share a slot are
    written in one scatter, and the latest must win (then the rows decode on, wrapping further)."""
    case = Case("long-prompt", 2, 1, 16, 16, prompts=(50, 31, 12), starts=(0, 4, 0), steps=2, window=8, sinks=3,
                rolling=True)
    seen = []

    def check(state):
        out = decode_attention_reference(state["q"], state["k_cache"], state["v_cache"], state["cache_len"],
                                         window=8, sinks=3, start=state["start"], rolling=True)
        _assert_close("out", out, state["out"])
        seen.append(state["step"])

    _simulate(case, check)
    assert seen == [0, 1]


def test_rows_with_nothing_visible_give_zeros_and_the_sink_logit():
    """A row whose first real position is past its queries sees no key: out 0, lse = its sink logit (no NaN)."""
    q = torch.randn(2, 2, 1, 16)
    k_cache, v_cache = torch.randn(2, 1, 12, 16), torch.randn(2, 1, 12, 16)
    cache_len, start = torch.tensor([9, 12]), torch.tensor([0, 20])
    sink_logits = torch.randn(2)
    for impl in ("reference",) + (("triton",) if TRITON else ()):
        out, lse = decode_attention(q, k_cache, v_cache, cache_len, start=start, sink_logits=sink_logits,
                                    return_lse=True, impl=impl)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        _assert_close(f"{impl} lse", lse[1, :, 0], sink_logits)
        assert torch.isfinite(out).all() and out[0].abs().sum() > 0


def test_fake_implementation_and_registration_pass_opcheck():
    q = torch.randn(3, 6, 1, 40)
    k_cache, v_cache = torch.randn(3, 2, 37, 40), torch.randn(3, 2, 37, 24)
    cache_len, start = torch.tensor([37, 20, 5]), torch.tensor([0, 2, 1])
    arguments = [
        (q, k_cache, v_cache, cache_len, start, torch.randn(6), 40**-0.5, 16, 2, 5.0, False, "reference", 0),
        (q, k_cache, v_cache, cache_len, None, None, 0.2, 30, 3, None, True, "reference", 0),
    ]
    if TRITON:
        arguments.append((q, k_cache, v_cache, cache_len, start, None, 0.1, -1, 0, None, False, "triton", 2))
    for args in arguments:
        torch.library.opcheck(decode_attention_op, args)


def test_a_decoding_step_exports_with_static_shapes():
    """Append and attend in one module over buffers, exported: nothing reads tensor data into Python (the step can
    be captured in a CUDA graph), and the exported step computes what the eager one does."""

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            k_cache, v_cache, cache_len = new_cache(2, 2, 24, 16, 8, window=6, sinks=1, rolling=True)
            self.register_buffer("k_cache", k_cache.normal_())
            self.register_buffer("v_cache", v_cache.normal_())
            self.register_buffer("cache_len", cache_len + torch.tensor([13, 4]))

        def forward(self, q, k_new, v_new):
            append_to_cache(self.k_cache, self.v_cache, k_new, v_new, self.cache_len, sinks=1, rolling=True)
            self.cache_len.add_(1)
            return decode_attention(q, self.k_cache, self.v_cache, self.cache_len,
                                    DecodeOptions(window=6, sinks=1, rolling=True), impl="reference")

    inputs = (torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 8))
    eager, exported_from = Step(), Step()
    exported_from.load_state_dict(eager.state_dict())
    exported = torch.export.export(exported_from, inputs, strict=False).module()
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "attention_planner.decode_attention.default" in targets
    for _ in range(3):  # three steps: the buffers advance in both
        _assert_close("exported step", exported(*inputs), eager(*inputs))


def test_bad_inputs_raise_backend_errors_that_say_what_is_accepted():
    q, k_cache, v_cache, cache_len = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), \
        torch.tensor([9, 4])
    cases = [
        (dict(q=torch.randn(2, 3, 1, 16)), "divide q's"),
        (dict(k_cache=torch.randn(2, 2, 9, 8)), "head dims differ"),
        (dict(v_cache=torch.randn(2, 2, 8, 16)), "slots"),
        (dict(cache_len=torch.tensor([9.0, 4.0])), "int64 tensor of shape (batch,)"),
        (dict(cache_len=torch.tensor([9])), "int64 tensor of shape (batch,)"),
        (dict(v_cache=torch.randn(2, 2, 9, 16, dtype=torch.float64)), "share one dtype"),
        (dict(options=DecodeOptions(window=8, sinks=2, rolling=True)), "needs sinks + window + T - 1 = 10 slots"),
        (dict(sink_logits=torch.randn(2)), "sink_logits must be"),
        (dict(impl="fast"), "accepted: triton, reference, auto"),
        (dict(num_splits=0), "num_splits must be"),
        (dict(options=dict(window=4)), "DecodeOptions"),
    ]
    for change, message in cases:
        arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_len=cache_len) | change
        with pytest.raises(BackendError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            decode_attention(**arguments)
    for options, message in ((dict(rolling=True), "needs the proved sliding window"), (dict(window=0), "window"),
                             (dict(sinks=-1), "sinks"), (dict(softcap=0.0), "softcap"),
                             (dict(scale=float("nan")), "scale")):
        with pytest.raises(BackendError, match=message):
            DecodeOptions(**options)
    with pytest.raises(BackendError, match="needs a window"):
        cache_slots(100, rolling=True)
    with pytest.raises(BackendError, match="offset must be"):
        append_to_cache(k_cache, v_cache, torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), torch.tensor([1]))


def test_costs_count_the_bytes_read_and_the_cache_allocated():
    kv_heads, head_dim, value_dim, batch = 8, 128, 64, 2
    for options in (dict(), dict(window=4096, sinks=4, rolling=True), dict(window=4096, sinks=4)):
        # The cache's bytes are what new_cache allocates.
        k_cache, v_cache, _ = new_cache(batch, kv_heads, 5000, head_dim, value_dim, device="meta",
                                        dtype=torch.bfloat16, **options)
        allocated = k_cache.numel() * 2 + v_cache.numel() * 2
        assert cache_bytes(5000, kv_heads, head_dim, 2, value_dim=value_dim, batch=batch, **options) == allocated
    # A linear cache's step reads every position; the rolling buffer's at most sinks + window, at any length.
    per_slot = kv_heads * (head_dim + 128) * 2
    assert kv_bytes_read_per_step(131072, kv_heads, head_dim, 2) == 131072 * per_slot
    assert kv_bytes_read_per_step(131072, kv_heads, head_dim, 2, window=4096, sinks=4, rolling=True) == 4100 * per_slot
    assert kv_bytes_read_per_step(100, kv_heads, head_dim, 2, window=4096, rolling=True) == 100 * per_slot
    assert slots_read_per_step(131072, window=4096, sinks=4, queries=2) == 4101
    rolling = [cache_bytes(max_len, kv_heads, head_dim, 2, window=4096, rolling=True) for max_len in (8192, 131072)]
    assert rolling[0] == rolling[1]
    assert cache_bytes(131072, kv_heads, head_dim, 2) == 16 * cache_bytes(8192, kv_heads, head_dim, 2)
    bandwidth = 4.8e12
    assert time_per_token(131072, kv_heads, head_dim, 2, bandwidth) == pytest.approx(131072 * per_slot / bandwidth)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rolling", [False, True], ids=["linear", "rolling"])
def test_kernel_on_the_gpu_at_model_sizes(dtype, rolling):
    """The 1B Llama/Mistral shapes (32 query heads on 8 kv heads, head dim 64), caches of thousands of slots, the
    automatic number of splits, half precision against the float32 decoding reference."""
    batch, heads, kv_heads, head_dim = 3, 32, 8, 64
    options = DecodeOptions(window=1024, sinks=4, rolling=rolling) if rolling else DecodeOptions()
    slots = cache_slots(5000, window=options.window, sinks=options.sinks, rolling=rolling)
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=dtype)
    k_cache = torch.randn(batch, kv_heads, slots, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn(batch, kv_heads, slots, head_dim, device="cuda", dtype=dtype)
    cache_len = torch.tensor([5000, 1777, 40], device="cuda")
    start = torch.tensor([0, 13, 2], device="cuda")
    out = decode_attention(q, k_cache, v_cache, cache_len, options, start=start, impl="triton")
    expected = decode_attention(q.float(), k_cache.float(), v_cache.float(), cache_len, options, start=start,
                                impl="reference")
    _assert_close("out", out, expected, tolerance=2e-2)
