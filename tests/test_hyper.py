"""HyperAttention: the gather + tiled-attention path against the dense float64 estimator, exactness where the
blocks or the sample cover the keys, error falling with the sample size, determinism per seed."""
import pytest
import torch

import backends
from backends.flash.naive import attention_reference
from backends.hyper.naive import hyper_attention_naive
from backends.hyper.op import hyper_attention_op
from planner.errors import BackendError

SMALL = dict(block_size=8, sample_size=8, num_projections=3, min_seq_len=10)


def make_inputs(batch=1, heads=2, kv_heads=None, queries=45, keys=None, head_dim=16, dtype=torch.float64):
    keys = keys or queries
    kv_heads = kv_heads or heads
    return (torch.randn(batch, heads, queries, head_dim, dtype=dtype),
            torch.randn(batch, kv_heads, keys, head_dim, dtype=dtype),
            torch.randn(batch, kv_heads, keys, head_dim, dtype=dtype))


def relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("queries, min_seq_len", [(45, 10), (33, 4)])
def test_matches_dense_estimator_forward_and_gradients(causal, queries, min_seq_len):
    """Causal 33 with leaves of at most 4 pads to 48 = 3 * 2^4: 15 padded keys, more than a leaf, so some fall in
    first halves (keys of the off-diagonal estimator) and must be masked there."""
    leaves = [t.requires_grad_() for t in make_inputs(queries=queries)]
    options = dict(SMALL, min_seq_len=min_seq_len)
    out = backends.hyper_attention(*leaves, causal=causal, seed=3, **options)
    ref = hyper_attention_naive(*leaves, causal=causal, seed=3, **options)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), leaves)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_inference_path_matches_autograd_path(causal):
    """Without gradients the merges run fused and in place (merge.py); with them, as PyTorch ops. Same numbers."""
    q, k, v = make_inputs(queries=33)
    options = dict(SMALL, min_seq_len=4)  # causal: 4 levels and padded keys in first halves
    with torch.no_grad():
        fused = backends.hyper_attention(q, k, v, causal=causal, seed=2, **options)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    composed = backends.hyper_attention(*leaves, causal=causal, seed=2, **options)
    torch.testing.assert_close(fused, composed.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused, hyper_attention_naive(q, k, v, causal=causal, seed=2, **options),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_transposed_inputs_give_the_same_output(causal):
    """Models hand (B, L, H, D) tensors seen as (B, H, L, D): non-contiguous inputs must work and agree."""
    q, k, v = make_inputs(queries=32)  # a length the halving needs no padding for (padding copies)
    transposed = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not transposed[0].is_contiguous()
    options = dict(SMALL, min_seq_len=4)
    expected = backends.hyper_attention(q, k, v, causal=causal, seed=3, **options)
    torch.testing.assert_close(backends.hyper_attention(*transposed, causal=causal, seed=3, **options), expected,
                               rtol=1e-12, atol=1e-12)


def test_non_causal_with_fewer_keys_and_grouped_heads():
    q, k, v = make_inputs(heads=4, kv_heads=2, queries=40, keys=29)
    out = backends.hyper_attention(q, k, v, seed=1, **SMALL)
    torch.testing.assert_close(out, hyper_attention_naive(q, k, v, seed=1, **SMALL), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_when_blocks_or_sample_cover_the_keys(causal):
    q, k, v = make_inputs(queries=53)
    exact = attention_reference(q, k, v, causal=causal)
    covered_by_blocks = backends.hyper_attention(q, k, v, causal=causal, block_size=64, sample_size=4,
                                                 num_projections=3, min_seq_len=10)
    covered_by_sample = backends.hyper_attention(q, k, v, causal=causal, block_size=4, sample_size=64,
                                                 num_projections=3, min_seq_len=10)
    below_min_len = backends.hyper_attention(q, k, v, causal=causal, block_size=4, sample_size=4, min_seq_len=53)
    approximate = backends.hyper_attention(q, k, v, causal=causal, block_size=4, sample_size=4, num_projections=3,
                                           min_seq_len=10)
    for out in (covered_by_blocks, covered_by_sample, below_min_len):
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)
    assert relative_error(approximate, exact) > 1e-3  # the covered cases are not exact by accident


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_sample_size_grows(causal):
    """Peaked rows (q, k scaled up), averaged over seeds; at sample_size = keys the estimate is exact."""
    q, k, v = make_inputs(heads=2, queries=96, head_dim=16)
    q, k = q * 1.5, k * 1.5
    exact = attention_reference(q, k, v, causal=causal)
    errors = []
    for sample_size in (4, 12, 24):  # causal: 24 covers the lower levels' halves but not the top one (48 keys)
        per_seed = [relative_error(backends.hyper_attention(q, k, v, causal=causal, block_size=8,
                                                            sample_size=sample_size, num_projections=3,
                                                            min_seq_len=12, seed=seed), exact) for seed in range(3)]
        errors.append(sum(per_seed) / len(per_seed))
    full = backends.hyper_attention(q, k, v, causal=causal, block_size=8, sample_size=96, num_projections=3,
                                    min_seq_len=12)
    assert errors[0] > errors[1] > errors[2], errors
    assert relative_error(full, exact) < 1e-12


def test_deterministic_per_seed():
    q, k, v = make_inputs(dtype=torch.float32)
    first = backends.hyper_attention(q, k, v, causal=True, seed=7, **SMALL)
    again = backends.hyper_attention(q, k, v, causal=True, seed=7, **SMALL)
    other = backends.hyper_attention(q, k, v, causal=True, seed=8, **SMALL)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.long
def test_opcheck():
    q, k, v = (t.float() for t in make_inputs(heads=1, queries=20))
    torch.library.opcheck(hyper_attention_op, (q, k, v, False, 8, 4, 2, 8, 3))
    torch.library.opcheck(hyper_attention_op, (q, k, v, True, 8, 4, 2, 12, 3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_inputs_are_named():
    q, k, v = make_inputs(queries=12)
    with pytest.raises(BackendError, match="as many queries as keys"):
        backends.hyper_attention(q, k[:, :, :10], v[:, :, :10], causal=True)
    with pytest.raises(BackendError, match="block_size"):
        backends.hyper_attention(q, k, v, block_size=0)
    with pytest.raises(BackendError, match="num_projections"):
        backends.hyper_attention(q, k, v, num_projections=40)
    with pytest.raises(BackendError, match="4 dims"):
        backends.hyper_attention(q[0], k[0], v[0])


def test_triton_gathers_and_ranks_match_torch():
    """The inference path's kernels (gather.py, lsh_kernel.py) against torch.gather and lsh.bucket_ranks, on
    strided (transposed) float32 rows, with padding rows and output heads reading a shared source head."""
    from backends.hyper.blockwise import as_heads
    from backends.hyper.gather import gather_rows
    from backends.hyper.lsh import bucket_ranks, gray_rank_table, projection_directions
    from backends.hyper.lsh_kernel import bucket_ranks_fused

    source = torch.randn(1, 37, 3, 24).transpose(1, 2)  # (1, 3, 37, 24), row stride 72
    rows = as_heads(source)
    index = torch.stack([torch.randperm(37)[:29] for _ in range(3)])
    out = gather_rows(rows, index, 32, 6)  # 6 output heads: head h reads source head and index row h // 2
    for head in range(6):
        expected = source[0, head // 2][index[head // 2]]
        torch.testing.assert_close(out[head, :29], expected, rtol=0, atol=0)
        assert out[head, 29:].abs().sum() == 0
    directions = projection_directions(4, 24, 5, "cpu", torch.float32)
    table = gray_rank_table(5, "cpu")
    torch.testing.assert_close(bucket_ranks_fused(rows, directions, table).long(),
                               bucket_ranks(source, directions, table)[0], rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_inference_path_with_triton_gathers_matches_autograd_path(causal):
    q, k, v = make_inputs(queries=45, dtype=torch.float32)
    options = dict(SMALL, min_seq_len=10)
    with torch.no_grad():
        fast = backends.hyper_attention(q, k, v, causal=causal, seed=4, **options)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    composed = backends.hyper_attention(*leaves, causal=causal, seed=4, **options)
    torch.testing.assert_close(fast, composed.detach(), rtol=1e-5, atol=1e-5)
