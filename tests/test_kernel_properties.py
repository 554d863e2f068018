"""Property-based tests (hypothesis) of every public kernel against its naive reference.

Each public function (`backends.flash_attention`, `sliding_window_attention`, `linear_attention`, `ssd`,
`hyper_attention`, `backends.decode.op.decode_attention`, and the ring's single-process pieces) runs each of its
implementations on random shapes: odd lengths (1, 7, 33, 65, ...), head dims 16-256, a value head dim unlike the
query/key one, grouped heads, non-contiguous (transposed) inputs, causal or not, windows and streaming sinks, key
padding, attention masks, tanh soft-capping and sink logits. Outputs and the gradients of every differentiable input
are compared with the naive reference in float64 (float32 for the Triton kernels, which run on CUDA, or on the CPU
under TRITON_INTERPRET=1); each naive reference is itself checked against a second, independent formula. Every
`attention_planner` custom op goes through `torch.library.opcheck`.

Examples are derandomized (reproducible in CI) and few for the Triton kernels, whose interpreter is slow: the file
takes about 30 s of CPU time on two cores.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Optional
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import backends
from backends.common import interpreting
from backends.flash.naive import attention_reference
from backends.hyper.naive import hyper_attention_naive
from backends.linear.naive import linear_attention_naive
from backends.ring.layout import chunks_per_rank, shard, unshard
from backends.ring.local import block_backward, block_forward
from backends.ring.op import merge_block
from backends.ring.schedule import ring_schedule
from backends.sliding_window.naive import sliding_window_reference
from backends.mamba2.naive import ssd_naive
from planner.errors import BackendError

TRITON = torch.cuda.is_available() or interpreting()
# Where the Triton implementations run: CUDA where there is a GPU, else the CPU under the interpreter. References and
# every other implementation run on the CPU.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton needs CUDA or TRITON_INTERPRET=1")


def triton_property(cases, check, examples: int = 3):
    """A test that `check(case, "triton")` holds on a few drawn cases (small ones: the interpreter is slow), without
    shrinking a failure."""
    @needs_triton
    @given(case=cases)
    @_settings(examples, shrink=False)
    def test(case):
        check(case, "triton")
    return test


def kernel_properties(cases, check, impl: str, examples: int):
    """Two tests of one kernel: `check(case, impl)` on `examples` drawn cases (the CPU path), and on a few small ones
    with Triton (triton_property)."""
    @given(case=cases())
    @_settings(examples)
    def test(case):
        check(case, impl)
    return test, triton_property(cases(small=True), check)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tensors here are tiny: a second OpenMP thread costs more than it gains (much more on a busy machine,
    where waiting threads spin), so this module runs with one and gives the setting back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(examples: int, *, shrink: bool = True):
    """Few examples, derandomized (the same ones on every run: CI reproduces), no example database. Tests of the
    Triton kernels do not shrink a failure: under the interpreter shrinking would take many minutes; the failing
    example is printed as drawn."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    phases=phases, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the one comparison ----------------------------------------------------------------------------------------------

# Largest error allowed, relative to the largest magnitude of the expected tensor (at least SCALE_FLOOR: a gradient
# that is zero in exact arithmetic comes out of a float32 kernel as rounding noise of the O(1) terms that cancel):
# float64 paths agree to rounding, float32 kernels (accumulating in float32) to a few units of 1e-5.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}
SCALE_FLOOR = {torch.float64: 1e-2, torch.float32: 1e-2}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                 factor: float = 1.0, floor: float = 0.0) -> None:
    """actual == expected up to TOLERANCE[dtype] * factor of expected's largest magnitude (at least SCALE_FLOOR and
    `floor`); infinities (the lse of a row with no visible key) must sit at the same places with the same sign; NaN
    never passes."""
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result"
    assert not torch.isnan(expected).any(), f"{name}: NaN in the reference"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: infinities at other places than the reference's"
    assert torch.equal(actual[~finite], expected[~finite]), f"{name}: infinities of another sign"
    if not finite.any():
        return
    error = (actual[finite] - expected[finite]).abs().max().item()
    scale = max(expected[finite].abs().max().item(), SCALE_FLOOR[dtype], floor)
    bound = TOLERANCE[dtype] * factor * scale
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g} (largest reference value {scale:.3g})"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(outputs, inputs: dict, seed: int):
    """Gradients of a random linear functional of `outputs` (a list of tensors, None skipped) w.r.t. `inputs`."""
    generator = _generator(seed + 1)
    loss = 0
    for output in outputs:
        if output is not None:
            weight = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output)
            loss = loss + (output * weight).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return dict(zip(inputs, grads))


def _differentiable(tensors: dict, dtype: torch.dtype, transposed: bool, device=None) -> dict:
    """Each tensor cast to dtype (and moved to device), requiring grad. transposed: the 4-dim ones are
    (batch, heads, seq, dim) views of a (batch, seq, heads, dim) storage, not contiguous, as models hand them over."""
    def make(tensor):
        tensor = tensor.to(device=device, dtype=dtype)
        if transposed and tensor.dim() == 4:
            return tensor.transpose(1, 2).contiguous().requires_grad_().transpose(1, 2)
        return tensor.requires_grad_()
    return {name: make(tensor) for name, tensor in tensors.items()}


def _as_reference(leaves: dict) -> dict:
    """The values a kernel saw (a float32 cast included) as float64 CPU leaves for the reference."""
    return {name: t.detach().double().cpu().requires_grad_() for name, t in leaves.items()}


def _compare_grads(actual: dict, expected: dict, dtype: torch.dtype, *, factor: float = 1.0) -> None:
    """Each gradient against its reference. A gradient that is (nearly) zero in exact arithmetic, such as a decay's
    over a single position, is computed by kernels as a difference of terms as large as the other gradients of the
    call: its error is measured against a hundredth of the largest of them."""
    largest = max((grad.detach().abs().max().item() for grad in expected.values() if grad.numel()), default=0.0)
    for name in expected:
        assert actual[name] is not None, f"d{name}: no gradient"
        assert_close(f"d{name}", actual[name], expected[name], dtype, factor=factor, floor=0.01 * largest)


lengths = st.one_of(st.sampled_from([1, 7, 33, 65]), st.integers(1, 70))
# The largest head dims stay few: one draw in eight.
head_dims = st.sampled_from([16, 16, 24, 32, 32, 48, 64, 80, 96, 128, 16, 32, 64, 24, 48, 256])
grouped_heads = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 3]))  # (kv heads, query heads per kv)


# ---- exact softmax attention: flash_attention and sliding_window_attention -------------------------------------------

@dataclass(frozen=True)
class AttentionCase:
    batch: int
    kv_heads: int
    group: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    causal: bool
    window: Optional[int]
    sinks: int
    padding: bool
    softcap: Optional[float]
    sink_logits: bool
    scale: Optional[float]
    amplitude: float
    attn_mask: Optional[str]  # flash_attention only: None, "bool" or "additive" (differentiable), broadcast shapes
    mask_shape: int  # which broadcastable shape the mask takes (see _attention_inputs)
    tile: int  # the blockwise loop's query and key block (512 in the library; small ones cross tile borders)
    transposed: bool
    seed: int


@st.composite
def attention_cases(draw, *, windowed: bool, small: bool = False):
    kv_heads, group = draw(grouped_heads)
    q_len = draw(lengths)
    kv_len = draw(st.one_of(st.just(q_len), lengths))
    head_dim = draw(st.sampled_from([16, 24, 32, 64]) if small else head_dims)
    value_dim = draw(st.one_of(st.just(head_dim), st.sampled_from([16, 24, 32, 64]) if small else head_dims))
    window = draw(st.integers(1, max(q_len, kv_len) + 2)) if windowed else None
    return AttentionCase(
        batch=1 if small else draw(st.sampled_from([1, 2])), kv_heads=kv_heads, group=group, q_len=q_len, kv_len=kv_len,
        head_dim=head_dim, value_dim=value_dim, causal=draw(st.booleans()), window=window,
        sinks=draw(st.sampled_from([0, 0, 1, 3])) if windowed else 0, padding=draw(st.booleans()),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 30.0))), sink_logits=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), amplitude=draw(st.sampled_from([1.0, 3.0])),
        attn_mask=None if windowed or small else draw(st.sampled_from([None, None, "bool", "additive"])),
        mask_shape=draw(st.integers(0, 2)), tile=draw(st.sampled_from([8, 16, 512])),
        transposed=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _attention_inputs(case: AttentionCase) -> dict:
    """float64 q, k, v (and sink logits, an additive attn_mask), a bool key padding mask or None, a bool attn_mask
    or None."""
    generator = _generator(case.seed)
    q_heads = case.kv_heads * case.group

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    inputs = dict(q=normal(case.batch, q_heads, case.q_len, case.head_dim) * case.amplitude,
                  k=normal(case.batch, case.kv_heads, case.kv_len, case.head_dim),
                  v=normal(case.batch, case.kv_heads, case.kv_len, case.value_dim))
    if case.sink_logits:
        inputs["sink_logits"] = normal(q_heads) * 2
    mask = None
    if case.padding:
        mask = torch.rand(case.batch, case.kv_len, generator=generator) > 0.3
        mask[-1, : max(1, case.kv_len // 4)] = False  # early causal rows of the last batch may see no key
    bool_mask = None
    if case.attn_mask is not None:
        shape = [(case.q_len, case.kv_len), (case.batch, 1, case.q_len, case.kv_len),
                 (1, q_heads, case.q_len, case.kv_len)][case.mask_shape]
        if case.attn_mask == "bool":
            bool_mask = torch.rand(*shape, generator=generator) > 0.25
        else:
            inputs["attn_mask"] = normal(*shape)
    return dict(tensors=inputs, key_padding_mask=mask, attn_mask=bool_mask)


def _oracle_attention(q, k, v, *, causal, window, sinks, scale, key_padding_mask, softcap, sink_logits,
                      query_offset: int = 0, attn_mask=None):
    """Softmax attention written from the documented rules alone, entry by entry for the mask, independent of
    backends/flash/naive.py: query i (at position i + query_offset) sees key j iff (not causal or j <= i) and
    (no window, or j < sinks, or i - W < j (causal) / |i - j| < W (not causal)) and key j is real, and a bool
    attn_mask allows it (a float one is added to the scores). Returns (out, lse) in float64."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_len, group = k.shape[2], q_heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    rule = [[(not causal or j <= i) and (window is None or j < sinks or (i - j < window if causal else
                                                                          abs(i - j) < window))
             for j in range(kv_len)] for i in range(query_offset, query_offset + q_len)]
    visible = torch.tensor(rule, dtype=torch.bool).reshape(q_len, kv_len).expand(batch, q_heads, q_len, kv_len)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    bias = torch.zeros(batch, q_heads, q_len, kv_len, dtype=torch.float64)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        bias = bias + attn_mask
    out = torch.zeros(batch, q_heads, q_len, v.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float64)
    for h in range(q_heads):
        scores = torch.einsum("bid,bjd->bij", q[:, h], k[:, h // group]) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = (scores + bias[:, h]).masked_fill(~visible[:, h], float("-inf"))
        if sink_logits is not None:  # one more logit per row, with a zero value
            scores = torch.cat([scores, sink_logits[h].expand(batch, q_len, 1)], dim=-1)
        row_lse = torch.logsumexp(scores, dim=-1)
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)[..., :kv_len]
        out[:, h] = weights @ v[:, h // group]
        lse[:, h] = row_lse
    return out, lse


def _check_exact_attention(case: AttentionCase, impl: str) -> None:
    dtype = torch.float32 if impl == "triton" else torch.float64
    inputs = _attention_inputs(case)
    mask = inputs["key_padding_mask"]
    options = dict(causal=case.causal, scale=case.scale, key_padding_mask=mask, softcap=case.softcap)
    if inputs["attn_mask"] is not None:
        options["attn_mask"] = inputs["attn_mask"]
    window_options = dict(window=case.window, sinks=case.sinks) if case.window is not None else {}

    device = KERNEL_DEVICE if impl == "triton" else torch.device("cpu")
    leaves = _differentiable(inputs["tensors"], dtype, case.transposed, device)
    kernel_options = {name: value.to(device) if isinstance(value, torch.Tensor) else value
                      for name, value in options.items()}
    tiles = mock.patch.multiple("backends.flash.blockwise", QUERY_BLOCK=case.tile, KEY_BLOCK=case.tile)
    with tiles:
        if case.window is None:
            out, lse = backends.flash_attention(**leaves, **kernel_options, return_lse=True, impl=impl)
        else:
            out, lse = backends.sliding_window_attention(**leaves, **kernel_options, **window_options,
                                                         return_lse=True, impl=impl)
    reference_leaves = _as_reference(leaves)
    reference = attention_reference if case.window is None else sliding_window_reference
    expected_out, expected_lse = reference(**reference_leaves, **options, **window_options, return_lse=True)
    assert out.dtype == dtype and lse.dtype == dtype
    assert_close("out", out, expected_out, dtype)
    assert_close("lse", lse, expected_lse, dtype)

    # The naive reference against the entry-by-entry oracle (forward; float64).
    oracle_out, oracle_lse = _oracle_attention(
        *(reference_leaves[name].detach() for name in ("q", "k", "v")), causal=case.causal, window=case.window,
        sinks=case.sinks, scale=case.scale, key_padding_mask=mask, softcap=case.softcap,
        sink_logits=reference_leaves["sink_logits"].detach() if case.sink_logits else None,
        attn_mask=(reference_leaves["attn_mask"].detach() if "attn_mask" in reference_leaves
                   else options.get("attn_mask")))
    assert_close("reference out vs oracle", expected_out, oracle_out, torch.float64)
    assert_close("reference lse vs oracle", expected_lse, oracle_lse, torch.float64)

    # Gradients of q, k, v (and sink logits) through out, and through lse where every row has one.
    with_lse = bool(torch.isfinite(expected_lse).all())
    with tiles:
        grads = _grads([out, lse if with_lse else None], leaves, case.seed)
    expected_grads = _grads([expected_out, expected_lse if with_lse else None], reference_leaves, case.seed)
    _compare_grads(grads, expected_grads, dtype)


@given(case=attention_cases(windowed=False), impl=st.sampled_from(["blockwise", "reference", "auto"]))
@_settings(20)
def test_flash_attention_matches_reference(case, impl):
    _check_exact_attention(case, impl)


test_flash_attention_triton_matches_reference = triton_property(
    attention_cases(windowed=False, small=True), _check_exact_attention)


@given(case=attention_cases(windowed=True), impl=st.sampled_from(["blockwise", "reference", "auto"]))
@_settings(20)
def test_sliding_window_attention_matches_reference(case, impl):
    _check_exact_attention(case, impl)


test_sliding_window_attention_triton_matches_reference = triton_property(
    attention_cases(windowed=True, small=True), _check_exact_attention)


def test_value_head_dim_of_its_own_on_the_cpu_fused_path():
    """Multi-head latent attention: v's head dim differs from q/k's. The CPU tiles without a mask run PyTorch's
    fused flash kernel, which needs one head dim: such inputs take the PyTorch tiles, not a raw aten error."""
    generator = _generator(11)
    q = torch.randn(1, 4, 40, 32, generator=generator, dtype=torch.float64)
    k = torch.randn(1, 2, 40, 32, generator=generator, dtype=torch.float64)
    v = torch.randn(1, 2, 40, 16, generator=generator, dtype=torch.float64)
    for causal in (False, True):
        for dtype in (torch.float64, torch.float32):
            expected = attention_reference(q, k, v, causal=causal)
            actual = backends.flash_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, impl="blockwise")
            assert_close(f"causal={causal} {dtype}", actual, expected, dtype)


def test_additive_mask_gradient_with_softcap():
    """An additive attn_mask joins the scores after the tanh cap, so its gradient is the score gradient without the
    cap's (1 - tanh^2) factor (the q/k gradients keep it)."""
    generator = _generator(12)
    q = torch.randn(2, 4, 19, 16, generator=generator, dtype=torch.float64) * 3
    k = torch.randn(2, 2, 23, 16, generator=generator, dtype=torch.float64)
    v = torch.randn(2, 2, 23, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(1, 4, 19, 23, generator=generator, dtype=torch.float64)
    leaves = dict(q=q, k=k, v=v, attn_mask=bias)
    for impl in ("blockwise", "reference"):
        actual = {name: t.clone().requires_grad_() for name, t in leaves.items()}
        expected = {name: t.clone().requires_grad_() for name, t in leaves.items()}
        out = backends.flash_attention(**actual, causal=True, softcap=2.0, impl=impl)
        reference = attention_reference(**expected, causal=True, softcap=2.0)
        _compare_grads(_grads([out], actual, 12), _grads([reference], expected, 12), torch.float64)


def test_exact_attention_rejects_what_it_cannot_take():
    q = torch.randn(1, 4, 9, 16)
    with pytest.raises(BackendError, match="head dims differ"):
        backends.flash_attention(q, torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 16))
    with pytest.raises(BackendError, match="divide"):
        backends.flash_attention(q, torch.randn(1, 3, 9, 16), torch.randn(1, 3, 9, 16))
    with pytest.raises(BackendError, match="window"):
        backends.sliding_window_attention(q, q, q, 0)
    with pytest.raises(BackendError, match="softcap"):
        backends.flash_attention(q, q, q, softcap=-1.0)
    with pytest.raises(BackendError, match="sink_logits"):
        backends.flash_attention(q, q, q, sink_logits=torch.zeros(3))
    if TRITON:
        with pytest.raises(BackendError, match="float16, bfloat16 or float32"):
            backends.flash_attention(q.double(), q.double(), q.double(), impl="triton")
        with pytest.raises(BackendError, match="attn_mask"):
            backends.flash_attention(q, q, q, attn_mask=torch.ones(9, 9, dtype=torch.bool), impl="triton")


# ---- decoding over a KV cache ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeCase:
    batch: int
    kv_heads: int
    group: int
    queries: int
    lengths: tuple
    head_dim: int
    value_dim: int
    window: Optional[int]
    sinks: int
    rolling: bool
    extra_slots: int
    left_padding: bool
    softcap: Optional[float]
    sink_logits: bool
    num_splits: Optional[int]
    seed: int


@st.composite
def decode_cases(draw, small: bool = False):
    batch = draw(st.sampled_from([1, 2]))
    queries = draw(st.sampled_from([1, 1, 2, 3]))
    row_lengths = tuple(draw(st.lists(st.integers(queries, 70), min_size=batch, max_size=batch)))
    kv_heads, group = draw(grouped_heads)
    head_dim = draw(st.sampled_from([16, 24, 32, 64]) if small else head_dims)
    window = draw(st.one_of(st.none(), st.integers(1, 40)))
    return DecodeCase(
        batch=batch, kv_heads=kv_heads, group=group, queries=queries, lengths=row_lengths, head_dim=head_dim,
        value_dim=draw(st.one_of(st.just(head_dim), st.sampled_from([16, 32, 48]))), window=window,
        sinks=draw(st.sampled_from([0, 0, 1, 4])), rolling=window is not None and draw(st.booleans()),
        extra_slots=draw(st.integers(0, 3)), left_padding=draw(st.booleans()),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 30.0))), sink_logits=draw(st.booleans()),
        num_splits=draw(st.one_of(st.none(), st.integers(1, 4))), seed=draw(st.integers(0, 2**31 - 1)))


def _check_decode(case: DecodeCase, impl: str) -> None:
    """A decoding step over a linear or rolling cache equals attention of the last T positions of each row to the
    row's sequence (the entry-by-entry oracle): slots never written hold random values that must not count."""
    from backends.decode.op import DecodeOptions, decode_attention

    dtype = torch.float32 if impl == "triton" else torch.float64
    generator = _generator(case.seed)
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q_heads, longest = case.kv_heads * case.group, max(case.lengths)
    q = normal(case.batch, q_heads, case.queries, case.head_dim) * 2
    keys, values = normal(case.batch, case.kv_heads, longest, case.head_dim), \
        normal(case.batch, case.kv_heads, longest, case.value_dim)
    # Rolling: sinks + R slots, R >= window + T - 1; position p in slot p (p < sinks), else sinks + (p - sinks) % R.
    if case.rolling:
        ring = case.window + case.queries - 1 + case.extra_slots
        slots = case.sinks + ring
        slot_of = lambda p: p if p < case.sinks else case.sinks + (p - case.sinks) % ring  # noqa: E731
    else:
        slots = longest + case.extra_slots
        slot_of = lambda p: p  # noqa: E731
    k_cache, v_cache = normal(case.batch, case.kv_heads, slots, case.head_dim), \
        normal(case.batch, case.kv_heads, slots, case.value_dim)  # garbage where nothing is written
    for row, length in enumerate(case.lengths):
        for position in range(length):
            k_cache[row, :, slot_of(position)] = keys[row, :, position]
            v_cache[row, :, slot_of(position)] = values[row, :, position]
    starts = [int(torch.randint(0, length, (1,), generator=generator)) if case.left_padding else 0
              for length in case.lengths]
    sink_logits = normal(q_heads) * 2 if case.sink_logits else None
    options = DecodeOptions(window=case.window, sinks=case.sinks, softcap=case.softcap, rolling=case.rolling)
    device = KERNEL_DEVICE if impl == "triton" else torch.device("cpu")

    def on_device(tensor):
        if tensor is None:
            return None
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    out, lse = decode_attention(
        on_device(q), on_device(k_cache), on_device(v_cache), on_device(torch.tensor(case.lengths)), options,
        start=on_device(torch.tensor(starts)) if case.left_padding else None, sink_logits=on_device(sink_logits),
        return_lse=True, impl=impl, num_splits=case.num_splits if impl == "triton" else None)
    cast = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    for row, length in enumerate(case.lengths):
        expected_out, expected_lse = _oracle_attention(
            cast(q[row:row + 1]), cast(keys[row:row + 1, :, :length]), cast(values[row:row + 1, :, :length]),
            causal=True, window=case.window, sinks=case.sinks, scale=None, softcap=case.softcap,
            key_padding_mask=(torch.arange(length) >= starts[row])[None], sink_logits=cast(sink_logits),
            query_offset=length - case.queries)
        assert_close(f"row {row} out", out[row:row + 1], expected_out, dtype)
        assert_close(f"row {row} lse", lse[row:row + 1], expected_lse, dtype)


(test_decode_attention_reference_matches_oracle,
 test_decode_attention_triton_matches_oracle) = kernel_properties(decode_cases, _check_decode, "reference", 25)


# ---- linear attention ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearCase:
    batch: int
    qk_heads: int
    group: int
    seq_len: int
    key_dim: int
    value_dim: int
    decay: str  # none, float, head, position, channel
    feature_map: Optional[str]
    causal: bool
    initial_state: bool
    transposed: bool
    seed: int


@st.composite
def linear_cases(draw, small: bool = False):
    causal = draw(st.booleans())
    return LinearCase(
        batch=1 if small else draw(st.sampled_from([1, 2])), qk_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 3])), seq_len=draw(lengths),
        key_dim=draw(st.sampled_from([16, 24, 32, 64, 128])), value_dim=draw(st.sampled_from([16, 32, 48, 64])),
        decay=draw(st.sampled_from(["none", "float", "head", "position", "channel"])) if causal else "none",
        feature_map=draw(st.sampled_from([None, "elu+1", "relu"])), causal=causal,
        initial_state=draw(st.booleans()), transposed=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _linear_inputs(case: LinearCase) -> tuple[dict, object]:
    """float64 tensors (q, k, v, optional initial_state and tensor decay) and the decay argument's kind."""
    generator = _generator(case.seed)
    heads = case.qk_heads * case.group
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    tensors = dict(q=normal(case.batch, case.qk_heads, case.seq_len, case.key_dim) * case.key_dim ** -0.5,
                   k=normal(case.batch, case.qk_heads, case.seq_len, case.key_dim),
                   v=normal(case.batch, heads, case.seq_len, case.value_dim))
    if case.initial_state:
        tensors["initial_state"] = normal(case.batch, heads, case.key_dim, case.value_dim)
    decay_shapes = {"head": (heads,), "position": (case.batch, heads, case.seq_len),
                    "channel": (case.batch, heads, case.seq_len, case.key_dim)}
    if case.decay in decay_shapes:  # log decays in [-1, 0): factors exp(g) in (0.37, 1)
        tensors["decay"] = -torch.rand(*decay_shapes[case.decay], generator=generator, dtype=torch.float64) * 0.9 - 0.01
    return tensors, (-0.2 if case.decay == "float" else None)


def _linear_oracle(q, k, v, *, log_decay, causal, initial_state):
    """The quadratic (attention) form, independent of the naive recurrence: with G_t the cumulative log decay,
    o_t = sum_{s <= t} (q_t * exp(G_t - G_s)) . k_s v_s + (q_t * exp(G_t)) . S_0 (per key channel; a per-position
    decay is the same on every channel). log_decay: None or (batch, heads, seq[, key_dim]) float64."""
    heads, seq_len, key_dim = v.shape[1], v.shape[2], q.shape[-1]
    q = q.repeat_interleave(heads // q.shape[1], dim=1)
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    if not causal:
        state = k.transpose(-1, -2) @ v + (0 if initial_state is None else initial_state)
        return q @ state
    if log_decay is None:
        log_decay = torch.zeros(v.shape[0], heads, seq_len, dtype=torch.float64)
    if log_decay.dim() == 3:
        log_decay = log_decay[..., None].expand(*log_decay.shape, key_dim)
    cumulative = log_decay.cumsum(2)  # (b, h, t, key_dim)
    difference = cumulative[:, :, :, None, :] - cumulative[:, :, None, :, :]  # [t, s]
    causal_mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    weights = torch.exp(difference.masked_fill(~causal_mask[..., None], float("-inf")))
    scores = torch.einsum("bhtk,bhtsk,bhsk->bhts", q, weights, k)
    out = scores @ v
    if initial_state is not None:
        out = out + torch.einsum("bhtk,bhkv->bhtv", q * torch.exp(cumulative), initial_state)
    return out


def _check_linear(case: LinearCase, impl: str) -> None:
    dtype = torch.float32 if impl == "triton" else torch.float64
    tensors, float_decay = _linear_inputs(case)
    leaves = _differentiable(tensors, dtype, case.transposed, KERNEL_DEVICE if impl == "triton" else None)
    reference_leaves = _as_reference(leaves)
    heads = case.qk_heads * case.group

    def call(function, inputs):
        decay = inputs.get("decay", float_decay)
        return function(inputs["q"], inputs["k"], inputs["v"], decay=decay, feature_map=case.feature_map,
                        causal=case.causal, initial_state=inputs.get("initial_state"), return_state=True)

    patch = mock.patch("backends.linear.op.triton_usable", lambda tensor: False) if impl == "fallback" else \
        contextlib.nullcontext()
    with patch:
        out, state = call(backends.linear_attention, leaves)
        with torch.no_grad():  # up to 16 positions without gradients: the recurrent (decoding) kernel
            out_no_grad, state_no_grad = call(backends.linear_attention, leaves)
    expected_out, expected_state = call(linear_attention_naive, reference_leaves)
    assert out.dtype == dtype
    assert_close("out", out, expected_out, dtype)
    assert_close("final state", state, expected_state, dtype)
    assert_close("out (no grad)", out_no_grad, expected_out, dtype)
    assert_close("final state (no grad)", state_no_grad, expected_state, dtype)

    # The naive recurrence against the quadratic form.
    plain = {name: t.detach() for name, t in reference_leaves.items()}
    feature = {None: lambda x: x, "elu+1": lambda x: F.elu(x) + 1, "relu": F.relu}[case.feature_map]
    log_decay = plain.get("decay")
    if log_decay is not None and log_decay.dim() == 1:
        log_decay = log_decay.view(1, heads, 1).expand(case.batch, heads, case.seq_len)
    elif float_decay is not None:
        log_decay = torch.full((case.batch, heads, case.seq_len), float_decay, dtype=torch.float64)
    oracle = _linear_oracle(feature(plain["q"]), feature(plain["k"]), plain["v"], log_decay=log_decay,
                            causal=case.causal, initial_state=plain.get("initial_state"))
    assert_close("naive vs quadratic form", expected_out, oracle, torch.float64, factor=100)

    with patch:
        grads = _grads([out, state], leaves, case.seed)
    _compare_grads(grads, _grads([expected_out, expected_state], reference_leaves, case.seed), dtype)


(test_linear_attention_cpu_fallback_matches_reference,
 test_linear_attention_triton_matches_reference) = kernel_properties(linear_cases, _check_linear, "fallback", 20)


def test_linear_attention_rejects_what_it_cannot_take():
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(BackendError, match="same shape"):
        backends.linear_attention(q, torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 16))
    with pytest.raises(BackendError, match="divide"):
        backends.linear_attention(q, q, torch.randn(1, 3, 9, 16))
    with pytest.raises(BackendError, match="decay"):
        backends.linear_attention(q, q, q, decay=torch.zeros(5))
    with pytest.raises(BackendError, match="causal=False"):
        backends.linear_attention(q, q, q, decay=-0.1, causal=False)


# ---- Mamba-2 SSD -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SSDCase:
    batch: int
    groups: int
    heads_per_group: int
    seq_len: int
    head_dim: int
    state_dim: int
    chunk_size: int
    initial_state: bool
    transposed: bool
    seed: int


def ssd_cases(small: bool = False):
    return st.builds(
        SSDCase, batch=st.just(1) if small else st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]),
        heads_per_group=st.sampled_from([1, 3]), seq_len=lengths, head_dim=st.sampled_from([16, 24, 32, 64]),
        state_dim=st.sampled_from([16, 32, 64, 128]), chunk_size=st.sampled_from([16, 32, 64, 256]),
        initial_state=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))


def _ssd_inputs(case: SSDCase) -> dict:
    generator = _generator(case.seed)
    heads = case.groups * case.heads_per_group
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    tensors = dict(x=normal(case.batch, heads, case.seq_len, case.head_dim),
                   dt=F.softplus(normal(case.batch, heads, case.seq_len) - 1),
                   A=-torch.exp(normal(heads) * 0.5),
                   B=normal(case.batch, case.groups, case.seq_len, case.state_dim) * case.state_dim ** -0.5,
                   C=normal(case.batch, case.groups, case.seq_len, case.state_dim))
    if case.initial_state:
        tensors["initial_state"] = normal(case.batch, heads, case.head_dim, case.state_dim)
    return tensors


def _check_ssd(case: SSDCase, impl: str) -> None:
    dtype = torch.float32 if impl == "triton" else torch.float64
    leaves = _differentiable(_ssd_inputs(case), dtype, case.transposed, KERNEL_DEVICE if impl == "triton" else None)
    reference_leaves = _as_reference(leaves)
    names = ("x", "dt", "A", "B", "C")
    patch = mock.patch("backends.mamba2.op.triton_usable", lambda tensor: False) if impl == "fallback" else \
        contextlib.nullcontext()
    with patch:
        y, state = backends.ssd(*(leaves[name] for name in names), chunk_size=case.chunk_size,
                                initial_state=leaves.get("initial_state"), return_state=True)
        with torch.no_grad():
            y_no_grad, state_no_grad = backends.ssd(*(leaves[name] for name in names), chunk_size=case.chunk_size,
                                                    initial_state=leaves.get("initial_state"), return_state=True)
    expected_y, expected_state = ssd_naive(*(reference_leaves[name] for name in names),
                                           initial_state=reference_leaves.get("initial_state"), return_state=True)
    assert y.dtype == dtype
    assert_close("y", y, expected_y, dtype)
    assert_close("final state", state, expected_state, dtype)
    assert_close("y (no grad)", y_no_grad, expected_y, dtype)
    assert_close("final state (no grad)", state_no_grad, expected_state, dtype)

    # The quadratic form against the linear-attention recurrence under SSD's names: q = C, k = B, v = dt x,
    # log decay dt A, state transposed.
    plain = {name: t.detach() for name, t in reference_leaves.items()}
    initial = plain.get("initial_state")
    oracle_y, oracle_state = linear_attention_naive(
        plain["C"], plain["B"], plain["x"] * plain["dt"][..., None], decay=plain["dt"] * plain["A"][None, :, None],
        initial_state=None if initial is None else initial.transpose(-1, -2), return_state=True)
    assert_close("naive vs recurrence", expected_y, oracle_y, torch.float64, factor=100)
    assert_close("naive state vs recurrence", expected_state, oracle_state.transpose(-1, -2), torch.float64,
                 factor=100)

    with patch:
        grads = _grads([y, state], leaves, case.seed)
    _compare_grads(grads, _grads([expected_y, expected_state], reference_leaves, case.seed), dtype)


(test_ssd_cpu_fallback_matches_reference,
 test_ssd_triton_matches_reference) = kernel_properties(ssd_cases, _check_ssd, "fallback", 15)


# ---- HyperAttention (an approximation) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class HyperCase:
    batch: int
    kv_heads: int
    group: int
    q_len: int
    kv_len: int
    head_dim: int
    causal: bool
    block_size: int
    sample_size: int
    num_projections: int
    min_seq_len: int
    transposed: bool
    seed: int


@st.composite
def hyper_cases(draw, *, exact: bool = False):
    causal = draw(st.booleans())
    q_len = draw(lengths)
    kv_len = q_len if causal else draw(st.one_of(st.just(q_len), lengths))
    block_size = draw(st.sampled_from([4, 8, 16, 64]))
    sample_size = draw(st.sampled_from([1, 4, 8, 16, 64]))
    if exact:  # one block, or the sample, covers the keys: the estimator is exact
        if draw(st.booleans()):
            block_size = kv_len + draw(st.integers(0, 3))
        else:
            sample_size = kv_len + draw(st.integers(0, 3))
    kv_heads, group = draw(grouped_heads)
    return HyperCase(batch=draw(st.sampled_from([1, 2])), kv_heads=kv_heads, group=group, q_len=q_len,
                     kv_len=kv_len, head_dim=draw(st.sampled_from([16, 24, 32, 64])), causal=causal,
                     block_size=block_size, sample_size=sample_size, num_projections=draw(st.integers(1, 7)),
                     min_seq_len=draw(st.sampled_from([4, 8, 16, 4096])), transposed=draw(st.booleans()),
                     seed=draw(st.integers(0, 2**31 - 1)))


def _hyper_inputs(case: HyperCase) -> dict:
    generator = _generator(case.seed)
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    return dict(q=normal(case.batch, case.kv_heads * case.group, case.q_len, case.head_dim) * 2,
                k=normal(case.batch, case.kv_heads, case.kv_len, case.head_dim),
                v=normal(case.batch, case.kv_heads, case.kv_len, case.head_dim))


def _hyper_options(case: HyperCase) -> dict:
    return dict(causal=case.causal, block_size=case.block_size, sample_size=case.sample_size,
                num_projections=case.num_projections, min_seq_len=case.min_seq_len, seed=case.seed % 1000)


@given(case=hyper_cases())
@_settings(15)
def test_hyper_attention_is_its_estimator(case):
    """Whatever its parameters, the fast path computes the estimator that naive.py forms densely: out and the
    gradients of q, k, v agree in float64 (the PyTorch path); the inference path (Triton gathers and merges under the
    interpreter or on CUDA) in float32; the same seed gives the same output."""
    options = _hyper_options(case)
    leaves = _differentiable(_hyper_inputs(case), torch.float64, case.transposed)
    out = backends.hyper_attention(**leaves, **options)
    reference_leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    expected = hyper_attention_naive(**reference_leaves, **options)
    assert_close("out", out, expected, torch.float64)
    _compare_grads(_grads([out], leaves, case.seed), _grads([expected], reference_leaves, case.seed), torch.float64)

    with torch.no_grad():
        inputs32 = {name: t.detach().to(KERNEL_DEVICE, torch.float32) for name, t in leaves.items()}
        out32 = backends.hyper_attention(**inputs32, **options)
        assert_close("out (float32, no grad)", out32, expected, torch.float32)
        assert torch.equal(backends.hyper_attention(**inputs32, **options), out32), "same seed, another output"


@given(case=hyper_cases(exact=True))
@_settings(25)
def test_hyper_attention_is_exact_where_documented(case):
    """No error when one block covers the keys (block_size >= keys), the sample covers them (sample_size >= keys),
    or the keys are at most min_seq_len: exact softmax attention, forward and gradients."""
    options = _hyper_options(case)
    leaves = _differentiable(_hyper_inputs(case), torch.float64, case.transposed)
    out = backends.hyper_attention(**leaves, **options)
    reference_leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    expected = attention_reference(**reference_leaves, causal=case.causal)
    assert_close("out", out, expected, torch.float64)
    _compare_grads(_grads([out], leaves, case.seed), _grads([expected], reference_leaves, case.seed), torch.float64)


def test_hyper_attention_rejects_a_value_head_dim_of_its_own():
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(BackendError, match="head dim"):
        backends.hyper_attention(q, q, torch.randn(1, 2, 40, 8), min_seq_len=8, block_size=8, sample_size=8)
    with pytest.raises(BackendError, match="as many queries as keys"):
        backends.hyper_attention(q, torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16), causal=True)


# ---- ring attention: the single-process pieces -----------------------------------------------------------------------

@dataclass(frozen=True)
class RingCase:
    world_size: int
    layout: str
    chunk: int
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    value_dim: int
    causal: bool
    window: Optional[int]
    seed: int


@st.composite
def ring_cases(draw, small: bool = False):
    world_size = 2 if small else draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["zigzag", "contiguous"]))
    chunk = draw(st.integers(1, 3 if small else 9))
    length = world_size * chunks_per_rank(layout) * chunk
    kv_heads, group = draw(grouped_heads)
    head_dim = draw(st.sampled_from([16, 24, 32, 64]) if small else head_dims)
    return RingCase(world_size=world_size, layout=layout, chunk=chunk,
                    batch=1 if small else draw(st.sampled_from([1, 2])),
                    kv_heads=kv_heads, group=group, head_dim=head_dim,
                    value_dim=draw(st.one_of(st.just(head_dim), st.sampled_from([16, 32, 48]))),
                    causal=draw(st.booleans()), window=draw(st.one_of(st.none(), st.integers(1, length + 1))),
                    seed=draw(st.integers(0, 2**31 - 1)))


def _simulated_ring(q, k, v, grad_out, case: RingCase, impl: str):
    """Every rank's blocks and log-sum-exp merges (backends/ring/local.py, op.merge_block) in one process, no
    communication: returns the unsharded out and (dq, dk, dv), each block's dK/dV added to its owner's shard."""
    world, layout, window = case.world_size, case.layout, case.window
    scale = q.shape[-1] ** -0.5
    shards = [{name: shard(t, 2, rank, world, layout) for name, t in dict(q=q, k=k, v=v, g=grad_out).items()}
              for rank in range(world)]
    local_len = shards[0]["q"].shape[2]
    accumulation = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for rank in range(world):
        local = shards[rank]
        out = torch.zeros(*local["q"].shape[:3], v.shape[-1], dtype=accumulation, device=q.device)
        lse = torch.full(local["q"].shape[:3], float("-inf"), dtype=accumulation, device=q.device)
        for step in ring_schedule(rank, world, local_len, causal=case.causal, window=window, layout=layout):
            visiting = shards[step.source_rank]
            for block in step.blocks:
                block_out, block_lse = block_forward(local["q"], visiting["k"], visiting["v"], block,
                                                     causal=case.causal, window=window, scale=scale, impl=impl)
                merge_block(out[:, :, block.q_start:block.q_end], lse[:, :, block.q_start:block.q_end],
                            block_out, block_lse)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    grads = {name: [torch.zeros(shards[0][name].shape, dtype=accumulation, device=q.device) for _ in range(world)]
             for name in ("q", "k", "v")}
    for rank in range(world):
        local = shards[rank]
        for step in ring_schedule(rank, world, local_len, causal=case.causal, window=window, layout=layout):
            visiting = shards[step.source_rank]
            for block in step.blocks:
                grad_q, grad_k, grad_v = block_backward(local["g"], local["q"], visiting["k"], visiting["v"],
                                                        outs[rank], lses[rank], block, causal=case.causal,
                                                        window=window, scale=scale, impl=impl)
                grads["q"][rank][:, :, block.q_start:block.q_end] += grad_q
                grads["k"][step.source_rank][:, :, block.k_start:block.k_end] += grad_k
                grads["v"][step.source_rank][:, :, block.k_start:block.k_end] += grad_v
    return unshard(outs, 2, layout), {name: unshard(parts, 2, layout) for name, parts in grads.items()}


def _check_ring(case: RingCase, impl: str) -> None:
    dtype = torch.float32 if impl == "triton" else torch.float64
    device = KERNEL_DEVICE if impl == "triton" else torch.device("cpu")
    generator = _generator(case.seed)
    length = case.world_size * chunks_per_rank(case.layout) * case.chunk

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    q = normal(case.batch, case.kv_heads * case.group, length, case.head_dim)
    k = normal(case.batch, case.kv_heads, length, case.head_dim)
    v = normal(case.batch, case.kv_heads, length, case.value_dim)
    grad_out = normal(case.batch, q.shape[1], length, case.value_dim)
    out, grads = _simulated_ring(q, k, v, grad_out, case, impl)
    leaves = _as_reference(dict(q=q, k=k, v=v))
    expected = attention_reference(**leaves, causal=case.causal, window=case.window)
    assert_close("out", out, expected, dtype)
    expected_grads = dict(zip(leaves, torch.autograd.grad((expected * grad_out.double().cpu()).sum(),
                                                          list(leaves.values()))))
    _compare_grads(grads, expected_grads, dtype)


@given(case=ring_cases(), impl=st.sampled_from(["blockwise", "reference"]))
@_settings(30)
def test_ring_blocks_merged_over_the_schedule_equal_attention(case, impl):
    _check_ring(case, impl)


test_ring_blocks_with_triton_equal_attention = triton_property(ring_cases(small=True), _check_ring, examples=2)


@contextlib.contextmanager
def _single_rank_group():
    """A one-rank gloo process group in this process (no other process, no network), destroyed on exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ring_attention_on_one_rank_is_attention():
    generator = _generator(5)
    q = torch.randn(2, 6, 14, 32, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 14, 32, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 14, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    with _single_rank_group():
        for causal, window in ((False, None), (True, None), (True, 5), (False, 4)):
            out = backends.ring_attention(q, k, v, causal=causal, window=window, impl="blockwise")
            leaves = {name: t.detach().clone().requires_grad_() for name, t in dict(q=q, k=k, v=v).items()}
            expected = attention_reference(**leaves, causal=causal, window=window)
            assert_close(f"out causal={causal} window={window}", out, expected, torch.float64)
            _compare_grads(_grads([out], dict(q=q, k=k, v=v), 5), _grads([expected], leaves, 5), torch.float64)


# ---- torch.library.opcheck on every custom op ------------------------------------------------------------------------

def _all_custom_ops() -> list[str]:
    """Every attention_planner op, after importing every module of `backends` (so the list does not depend on which
    tests ran before)."""
    for module in pkgutil.walk_packages(backends.__path__, "backends."):
        importlib.import_module(module.name)
    return sorted(name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("attention_planner::"))


def _opcheck_samples() -> dict:
    """op name -> (args, kwargs) of a representative call, on fresh random float64 inputs (float32 for kernels
    that take no float64)."""
    generator = _generator(3)

    def normal(*shape, dtype=torch.float64, grad=False):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(grad)

    batch, heads, kv_heads, length, dim, value_dim = 1, 4, 2, 9, 16, 8
    q, k, v = normal(batch, heads, length, dim, grad=True), normal(batch, kv_heads, length, dim, grad=True), \
        normal(batch, kv_heads, length, value_dim, grad=True)
    mask = torch.rand(batch, length, generator=generator) > 0.2
    sink = normal(heads, grad=True)
    flash_out, flash_lse = torch.ops.attention_planner.flash_attention(
        q, k, v, mask, None, True, 4, 1, 0.25, "blockwise", 5.0, sink)
    samples = {
        "flash_attention": ((q, k, v, mask, None, True, 4, 1, 0.25, "blockwise", 5.0, sink), {}),
        "flash_attention_backward": ((normal(*flash_out.shape), normal(*flash_lse.shape), q.detach(), k.detach(),
                                      v.detach(), flash_out.detach(), flash_lse.detach(), mask, None, True, 4, 1,
                                      0.25, "blockwise", False, 5.0, sink.detach()), {}),
    }
    # Linear attention and SSD: float32 (the Triton kernels under the interpreter or on CUDA; float64 otherwise).
    kernel_dtype = torch.float32 if TRITON else torch.float64
    lq, lk = normal(batch, 1, length, dim, dtype=kernel_dtype, grad=True), normal(batch, 1, length, dim,
                                                                                dtype=kernel_dtype, grad=True)
    lv = normal(batch, 2, length, value_dim, dtype=kernel_dtype, grad=True)
    decay = (-torch.rand(batch, 2, length, dim, generator=generator) * 0.5).to(kernel_dtype).requires_grad_()
    state = normal(batch, 2, dim, value_dim, dtype=kernel_dtype, grad=True)
    _, final = torch.ops.attention_planner.linear_attention(lq, lk, lv, decay, state, 16)
    samples.update({
        "linear_attention": ((lq, lk, lv, decay, state, 16), {}),
        "linear_attention_recurrent": ((lq.detach(), lk.detach(), lv.detach(), decay.detach(), state.detach()), {}),
        "linear_attention_backward": ((normal(*lv.shape, dtype=kernel_dtype), normal(*final.shape),
                                       lq.detach(), lk.detach(), lv.detach(), decay.detach(), state.detach(),
                                       final.detach(), 16), {}),
    })
    x = normal(batch, 2, length, value_dim, dtype=kernel_dtype, grad=True)
    dt = F.softplus(normal(batch, 2, length)).to(kernel_dtype).requires_grad_()
    A = (-torch.rand(2, generator=generator) - 0.1).to(kernel_dtype).requires_grad_()
    B, C = normal(batch, 1, length, dim, dtype=kernel_dtype, grad=True), normal(batch, 1, length, dim,
                                                                              dtype=kernel_dtype, grad=True)
    ssd_state = normal(batch, 2, value_dim, dim, dtype=kernel_dtype, grad=True)
    _, ssd_final = torch.ops.attention_planner.ssd(x, dt, A, B, C, ssd_state, 16)
    plain = lambda *tensors: tuple(t.detach() for t in tensors)  # noqa: E731
    samples.update({
        "ssd": ((x, dt, A, B, C, ssd_state, 16), {}),
        "ssd_recurrent": (plain(x, dt, A, B, C, ssd_state), {}),
        "ssd_backward": ((normal(*x.shape, dtype=kernel_dtype), normal(*ssd_final.shape), *plain(x, dt, A, B, C),
                          ssd_state.detach(), ssd_final.detach(), 16), {}),
        "hyper_attention": ((normal(batch, heads, 12, dim, grad=True), normal(batch, heads, 12, dim, grad=True),
                             normal(batch, heads, 12, dim, grad=True), False, 4, 4, 2, 8, 7), {}),
        # q (batch, heads, T=2, dim) against a rolling cache of 1 sink + 5 slots, window 4, rows of 7 positions.
        "decode_attention": ((normal(2, heads, 2, dim), normal(2, kv_heads, 6, dim), normal(2, kv_heads, 6, value_dim),
                              torch.tensor([7, 3]), torch.tensor([0, 1]), normal(heads), 0.25, 4, 1, 5.0, True,
                              "reference", 0), {}),
    })
    return samples


def _ring_samples(group_name: str) -> dict:
    generator = _generator(4)
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q, k, v = normal(1, 4, 6, 16), normal(1, 2, 6, 16), normal(1, 2, 6, 8)
    options = (group_name, True, 3, "zigzag", 0.25, "blockwise")
    out, lse = torch.ops.attention_planner.ring_attention(q, k, v, *options)
    return {"ring_attention": ((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *options), {}),
            "ring_attention_backward": ((normal(*out.shape), q.detach(), k.detach(), v.detach(), out, lse,
                                         *options), {})}


def test_opcheck_every_custom_op():
    import torch.distributed as dist

    names = _all_custom_ops()
    assert {"flash_attention", "linear_attention", "ssd", "hyper_attention", "ring_attention"} <= set(names)
    samples = _opcheck_samples()
    with _single_rank_group():
        samples.update(_ring_samples(dist.group.WORLD.group_name))
        missing = [name for name in names if name not in samples]
        assert not missing, f"attention_planner ops without a representative input here: {missing}; add one"
        for name in names:
            args, kwargs = samples[name]
            op = getattr(torch.ops.attention_planner, name).default
            result = torch.library.opcheck(op, args, kwargs)
            assert all(status == "SUCCESS" for status in result.values()), f"{name}: {result}"
