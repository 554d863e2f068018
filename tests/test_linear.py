"""Linear attention: the chunked Triton kernels (CPU interpreter here) against the float64 recurrence."""
import pytest
import torch
from torch import nn

import backends
from backends.linear.naive import linear_attention_naive
from backends.linear.op import linear_attention_op, linear_attention_recurrent_op
from planner.errors import BackendError

DECAYS = ("none", "per_head", "per_position", "per_channel")


def make_decay(kind, batch, heads, seq_len, key_dim, dtype=torch.float64):
    """Log-decays in (-1, 0): fresh random numbers, never a constant that would hide an indexing mistake."""
    if kind == "none":
        return None
    shape = {"per_head": (heads,), "per_position": (batch, heads, seq_len),
             "per_channel": (batch, heads, seq_len, key_dim)}[kind]
    return -torch.rand(shape, dtype=dtype) * 0.9 - 0.05


def make_inputs(batch=2, heads=2, qk_heads=None, seq_len=77, key_dim=16, value_dim=16, dtype=torch.float64):
    qk_heads = qk_heads or heads
    q = torch.randn(batch, qk_heads, seq_len, key_dim, dtype=dtype)
    k = torch.randn(batch, qk_heads, seq_len, key_dim, dtype=dtype)
    v = torch.randn(batch, heads, seq_len, value_dim, dtype=dtype)
    state = torch.randn(batch, heads, key_dim, value_dim, dtype=dtype)
    return q, k, v, state


def gradients(function, tensors, grad_out, grad_state):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out, final = function(*leaves)
    loss = (out * grad_out).sum() + (final.to(grad_state.dtype) * grad_state).sum()
    present = [t for t in leaves if t is not None]
    return out.detach(), final.detach(), torch.autograd.grad(loss, present)


@pytest.mark.parametrize("decay_kind", DECAYS)
def test_chunked_matches_recurrence_forward_and_gradients(decay_kind):
    q, k, v, state = make_inputs(batch=1)
    decay = make_decay(decay_kind, 1, 2, q.shape[2], q.shape[3])
    grad_out = torch.randn_like(v)
    grad_state = torch.randn_like(state)

    def kernel(q, k, v, decay, state):
        return backends.linear_attention(q, k, v, decay=decay, initial_state=state, return_state=True)

    def reference(q, k, v, decay, state):
        return linear_attention_naive(q, k, v, decay=decay, initial_state=state, return_state=True)

    out, final, grads = gradients(kernel, (q, k, v, decay, state), grad_out, grad_state)
    ref_out, ref_final, ref_grads = gradients(reference, (q, k, v, decay, state), grad_out, grad_state)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-10)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("decay_kind", ["per_position", "per_channel"])
def test_grouped_query_key_heads(decay_kind):
    """q and k shared by groups of value heads (Mamba-2's groups); their gradients sum over the group."""
    q, k, v, state = make_inputs(batch=1, heads=2, qk_heads=1, seq_len=70)
    decay = make_decay(decay_kind, 1, 2, 70, 16)
    grad_out, grad_state = torch.randn_like(v), torch.randn_like(state)
    function = lambda *t: backends.linear_attention(t[0], t[1], t[2], decay=t[3], initial_state=t[4],  # noqa: E731
                                                    return_state=True)
    reference = lambda *t: linear_attention_naive(t[0], t[1], t[2], decay=t[3], initial_state=t[4],  # noqa: E731
                                                  return_state=True)
    out, final, grads = gradients(function, (q, k, v, decay, state), grad_out, grad_state)
    ref_out, ref_final, ref_grads = gradients(reference, (q, k, v, decay, state), grad_out, grad_state)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


def test_feature_maps_and_learned_map_receive_gradients():
    q, k, v, _ = make_inputs(batch=1, seq_len=45)
    for feature_map in ("elu+1", "relu"):
        out = backends.linear_attention(q, k, v, feature_map=feature_map)
        torch.testing.assert_close(out, linear_attention_naive(q, k, v, feature_map=feature_map))
    learned = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64), nn.Softplus())
    decay = make_decay("per_head", 1, 2, 45, 16)
    out = backends.linear_attention(q, k, v, feature_map=learned, decay=decay)
    out.square().sum().backward()
    kernel_grad = learned[0].weight.grad.clone()
    learned.zero_grad()
    ref = linear_attention_naive(q, k, v, feature_map=learned, decay=decay)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kernel_grad, learned[0].weight.grad, rtol=1e-9, atol=1e-9)
    assert kernel_grad.abs().sum() > 0


def test_non_causal_matches_reference_and_rejects_decay():
    q, k, v, state = make_inputs(batch=1, seq_len=37)
    out, final = backends.linear_attention(q, k, v, causal=False, initial_state=state, return_state=True)
    ref_out, ref_final = linear_attention_naive(q, k, v, causal=False, initial_state=state, return_state=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(final, ref_final)
    with pytest.raises(BackendError, match="decay=None"):
        backends.linear_attention(q, k, v, causal=False, decay=-0.1)


@pytest.mark.parametrize("decay_kind", DECAYS)
def test_chunked_equals_recurrent(decay_kind):
    q, k, v, state = make_inputs(batch=1, seq_len=77, dtype=torch.float32)
    decay = make_decay(decay_kind, 1, 2, 77, 16, dtype=torch.float32)
    log_decay = None if decay is None else (decay.view(1, 2, 1).expand(1, 2, 77) if decay.dim() == 1 else decay)
    chunk_out, chunk_final = linear_attention_op(q, k, v, log_decay, state, 64)
    step_out, step_final = linear_attention_recurrent_op(q, k, v, log_decay, state)
    torch.testing.assert_close(chunk_out, step_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunk_final, step_final, rtol=1e-4, atol=1e-4)


def test_decoding_steps_use_the_recurrent_form_and_agree():
    """A prompt through the chunked kernel, then one-token calls from the carried state: same as one long call."""
    q, k, v, _ = make_inputs(batch=1, seq_len=71)
    decay = make_decay("per_channel", 1, 2, 71, 16)
    full = linear_attention_naive(q, k, v, decay=decay)
    with torch.no_grad():
        out, state = backends.linear_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], decay=decay[:, :, :64],
                                               return_state=True)
        steps = [out]
        for t in range(64, 71):
            out, state = backends.linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                                   decay=decay[:, :, t:t + 1], initial_state=state,
                                                   return_state=True)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay_kind", ["per_position", "per_channel"])
def test_state_carries_across_calls(decay_kind):
    q, k, v, state = make_inputs(batch=1, seq_len=101)
    decay = make_decay(decay_kind, 1, 2, 101, 16)
    whole, whole_state = backends.linear_attention(q, k, v, decay=decay, initial_state=state, return_state=True)
    split = 45
    first, middle = backends.linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split],
                                              decay=decay[:, :, :split], initial_state=state, return_state=True)
    second, last = backends.linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:],
                                             decay=decay[:, :, split:], initial_state=middle, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, whole_state, rtol=1e-10, atol=1e-10)


def test_strong_decays_do_not_overflow():
    """Cumulative log-decays far below -88 (exp underflows in float32): masked before exp, nothing is inf/NaN."""
    q, k, v, _ = make_inputs(batch=1, seq_len=80, dtype=torch.float32)
    decay = -torch.rand(1, 2, 80, 16) * 20 - 5
    out = backends.linear_attention(q, k, v, decay=decay)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, linear_attention_naive(q, k, v, decay=decay), rtol=1e-4, atol=1e-4)


# bfloat16 only on the GPU: Triton 3.9's interpreter multiplies bfloat16's raw bits in tl.dot (float16 is right).
HALF_TYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("decay_kind", ["none", "per_position", "per_channel"])
def test_half_precision_close_to_float64(dtype, decay_kind):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, _ = (t.to(device) for t in make_inputs(batch=1, seq_len=130, dtype=dtype))
    decay = make_decay(decay_kind, 1, 2, 130, 16, dtype=torch.float32)
    decay = None if decay is None else decay.to(device)
    out = backends.linear_attention(q, k, v, decay=decay).double()
    ref = linear_attention_naive(q, k, v, decay=decay).double()
    assert (out - ref).norm() / ref.norm() < 2e-2


def test_gradients_without_decay_or_states():
    """The backward op's absent gradients (decay, initial state) must be distinct tensors (custom ops may not return
    aliases); found on the GPU benchmark, where no test had both absent."""
    q, k, v, _ = make_inputs(batch=1, seq_len=40)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(v)
    grads = torch.autograd.grad(backends.linear_attention(*leaves), leaves, grad_out)
    ref_grads = torch.autograd.grad(linear_attention_naive(*leaves), leaves, grad_out)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


def test_opcheck():
    q, k, v, state = make_inputs(batch=1, heads=1, seq_len=20, dtype=torch.float32)
    decay = make_decay("per_channel", 1, 1, 20, 16, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v, decay, state)]
    torch.library.opcheck(linear_attention_op, (*leaves, 64))
    torch.library.opcheck(linear_attention_recurrent_op, tuple(t.detach() for t in leaves))


def test_cpu_fallback_without_triton(monkeypatch):
    """Without CUDA or the interpreter, the op runs the recurrence: the same numbers and gradients."""
    q, k, v, state = make_inputs(batch=1, seq_len=40)
    decay = make_decay("per_position", 1, 2, 40, 16)
    grad_out, grad_state = torch.randn_like(v), torch.randn_like(state)
    op = lambda *t: linear_attention_op(*t, 64)  # noqa: E731
    out, final, grads = gradients(op, (q, k, v, decay, state), grad_out, grad_state)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fallback_out, fallback_final, fallback_grads = gradients(op, (q, k, v, decay, state), grad_out, grad_state)
    torch.testing.assert_close(out, fallback_out)
    for grad, fallback_grad in zip(grads, fallback_grads):
        torch.testing.assert_close(grad, fallback_grad)


def test_bad_inputs_are_named():
    q, k, v, state = make_inputs(batch=1, seq_len=10)
    with pytest.raises(BackendError, match="decay of shape"):
        backends.linear_attention(q, k, v, decay=torch.zeros(3))
    with pytest.raises(BackendError, match="feature_map"):
        backends.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(BackendError, match="initial_state"):
        backends.linear_attention(q, k, v, initial_state=state[:, :, :3])
    with pytest.raises(BackendError, match="4 dims"):
        backends.linear_attention(q[0], k[0], v[0])
    with pytest.raises(BackendError, match="dtype"):
        backends.linear_attention(q.int(), k.int(), v.int())
