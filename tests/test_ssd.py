"""Mamba-2 SSD: the op on the linear-attention chunk kernels (CPU interpreter here) against the float64 quadratic
form, the recurrent form, state carry-over, layout, and the reference mixer."""
import pytest
import torch

import backends
from backends.linear.naive import linear_attention_naive
from backends.mamba2.mixer import Mamba2Mixer
from backends.mamba2.naive import ssd_naive
from backends.mamba2.op import ssd_op, ssd_recurrent_op
from planner.errors import BackendError


def make_inputs(batch=1, heads=4, groups=2, seq_len=83, head_dim=16, state_dim=16, dtype=torch.float64):
    """Fresh random SSD inputs: dt > 0 (post-softplus sizes), A < 0, B and C shared by groups of heads."""
    x = torch.randn(batch, heads, seq_len, head_dim, dtype=dtype)
    dt = torch.rand(batch, heads, seq_len, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(heads, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, groups, seq_len, state_dim, dtype=dtype)
    C = torch.randn(batch, groups, seq_len, state_dim, dtype=dtype)
    state = torch.randn(batch, heads, head_dim, state_dim, dtype=dtype)
    return x, dt, A, B, C, state


@pytest.mark.parametrize("chunk_size", [32, 256])
def test_chunked_matches_quadratic_form_forward_and_gradients(chunk_size):
    inputs = [t.requires_grad_() for t in make_inputs()]
    y, final = backends.ssd(*inputs[:5], chunk_size=chunk_size, initial_state=inputs[5], return_state=True)
    ref_y, ref_final = ssd_naive(*inputs[:5], initial_state=inputs[5], return_state=True)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-10)
    grad_y, grad_final = torch.randn_like(y), torch.randn_like(final)
    grads = torch.autograd.grad((y * grad_y).sum() + (final * grad_final).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_y * grad_y).sum() + (ref_final * grad_final).sum(), inputs)
    for name, grad, ref_grad in zip(("x", "dt", "A", "B", "C", "initial_state"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9, msg=name)


def test_quadratic_form_equals_linear_attention_recurrence():
    """The two references are written independently; SSD is linear attention with q=C, k=B, v=x*dt, g=dt*A."""
    x, dt, A, B, C, state = make_inputs(seq_len=31)
    y, final = ssd_naive(x, dt, A, B, C, initial_state=state, return_state=True)
    ref_y, ref_final = linear_attention_naive(C, B, x * dt[..., None], decay=dt * A[None, :, None],
                                              initial_state=state.transpose(-1, -2), return_state=True)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(final, ref_final.transpose(-1, -2))


def test_chunked_equals_recurrent():
    x, dt, A, B, C, state = make_inputs(seq_len=70, dtype=torch.float32)
    chunk_y, chunk_final = ssd_op(x, dt, A, B, C, state, 64)
    step_y, step_final = ssd_recurrent_op(x, dt, A, B, C, state)
    torch.testing.assert_close(chunk_y, step_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunk_final, step_final, rtol=1e-4, atol=1e-4)


def test_state_carries_across_calls_and_decoding_steps():
    x, dt, A, B, C, _ = make_inputs(seq_len=75)
    whole, whole_state = ssd_naive(x, dt, A, B, C, return_state=True)
    split = 68
    first, state = backends.ssd(x[:, :, :split], dt[:, :, :split], A, B[:, :, :split], C[:, :, :split],
                                chunk_size=64, return_state=True)
    pieces = [first]
    with torch.no_grad():  # one position at a time: the recurrent (decoding) form
        for t in range(split, 75):
            piece, state = backends.ssd(x[:, :, t:t + 1], dt[:, :, t:t + 1], A, B[:, :, t:t + 1], C[:, :, t:t + 1],
                                        initial_state=state, return_state=True)
            pieces.append(piece)
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, whole_state, rtol=1e-10, atol=1e-10)


def test_mamba_layout_is_a_transpose_away_and_is_rejected_as_is():
    """Mamba-2's kernels take (batch, seq, heads, dim); ours is (batch, heads, seq, dim)."""
    x, dt, A, B, C, _ = make_inputs(seq_len=21)
    x_mamba, dt_mamba = x.transpose(1, 2), dt.transpose(1, 2)
    B_mamba, C_mamba = B.transpose(1, 2), C.transpose(1, 2)
    y = backends.ssd(x_mamba.transpose(1, 2), dt_mamba.transpose(1, 2), A, B_mamba.transpose(1, 2),
                     C_mamba.transpose(1, 2), chunk_size=64)
    torch.testing.assert_close(y.transpose(1, 2), ssd_naive(x, dt, A, B, C).transpose(1, 2))
    with pytest.raises(BackendError, match="must have shape"):
        backends.ssd(x_mamba, dt_mamba, A, B_mamba, C_mamba)


def test_half_precision_close_to_float64():
    x, dt, A, B, C, _ = make_inputs(seq_len=90, dtype=torch.float16)
    y = backends.ssd(x, dt.float(), A.float(), B, C, chunk_size=64).double()
    ref = ssd_naive(x, dt.float(), A.float(), B, C).double()
    assert (y - ref).norm() / ref.norm() < 2e-2


def test_mixer_matches_mixer_on_the_reference():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(16, d_state=16, head_dim=16, n_groups=2, chunk_size=32, dtype=torch.float64)
    u = torch.randn(1, 41, 16, dtype=torch.float64)
    out = mixer(u)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in mixer.named_parameters()}
    mixer.zero_grad()
    mixer.ssd_function = lambda x, dt, A, B, C, chunk_size: ssd_naive(x, dt, A, B, C)
    ref = mixer(u)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, p in mixer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-8, atol=1e-10, msg=name)
    assert grads["A_log"].abs().sum() > 0 and grads["dt_bias"].abs().sum() > 0


def test_opcheck():
    x, dt, A, B, C, state = make_inputs(heads=2, groups=1, seq_len=19, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, state)]
    torch.library.opcheck(ssd_op, (*leaves, 32))
    torch.library.opcheck(ssd_recurrent_op, tuple(t.detach() for t in leaves))


def test_cpu_fallback_without_triton(monkeypatch):
    inputs = [t.requires_grad_() for t in make_inputs(seq_len=23)]
    y, final = ssd_op(*inputs, 32)
    grads = torch.autograd.grad(y.square().sum() + final.square().sum(), inputs)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fallback_y, fallback_final = ssd_op(*inputs, 32)
    fallback_grads = torch.autograd.grad(fallback_y.square().sum() + fallback_final.square().sum(), inputs)
    torch.testing.assert_close(y, fallback_y)
    for grad, fallback_grad in zip(grads, fallback_grads):
        torch.testing.assert_close(grad, fallback_grad)


def test_bad_inputs_are_named():
    x, dt, A, B, C, state = make_inputs(seq_len=10)
    with pytest.raises(BackendError, match="A must have shape"):
        backends.ssd(x, dt, A[:3], B, C)
    with pytest.raises(BackendError, match="groups dividing heads"):
        backends.ssd(x, dt, A, B.repeat(1, 3, 1, 1)[:, :3], C)
    with pytest.raises(BackendError, match="initial_state"):
        backends.ssd(x, dt, A, B, C, initial_state=state.transpose(-1, -2)[..., :5])
    with pytest.raises(BackendError, match="chunk_size"):
        backends.ssd(x, dt, A, B, C, chunk_size=100)
