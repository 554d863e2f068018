"""planner.linearize: the learned linear attention against a float64 recurrence oracle, its two implementations
against each other, and attention transfer on a small random model (errors fall, the rewritten graph runs)."""
import pytest
import torch

import planner  # noqa: F401
from planner.demo_model import DemoConfig, DemoLlama
from planner.errors import InvalidArgumentError
from planner.linearization import HedgehogFeatureMap, LinearizedAttention, linearize

TINY = DemoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def _recurrence_oracle(module: LinearizedAttention, q, k, v, causal: bool):
    """float64, one position at a time: o_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    with torch.no_grad():
        fq, fk = module.feature_map(q.double()), module.feature_map(k.double())
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    length = q.shape[2]
    for i in range(length):
        visible = slice(0, i + 1) if causal else slice(0, length)
        weights = (fq[:, :, i:i + 1] * fk[:, :, visible]).sum(-1)  # (batch, heads, keys)
        out[:, :, i] = (weights[..., None] * v[:, :, visible].double()).sum(2) / weights.sum(-1, keepdim=True)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_parallel_form_matches_the_recurrence(causal):
    module = LinearizedAttention(4, 2, 8, causal=causal, scale=8 ** -0.5, implementation="parallel").double()
    with torch.no_grad():
        module.feature_map.weight.add_(0.3 * torch.randn_like(module.feature_map.weight))
        module.feature_map.bias.add_(0.1 * torch.randn_like(module.feature_map.bias))
    q, k = torch.randn(2, 4, 13, 8, dtype=torch.float64), torch.randn(2, 2, 13, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 13, 5, dtype=torch.float64)
    torch.testing.assert_close(module(q, k, v), _recurrence_oracle(module, q, k, v, causal), rtol=1e-10, atol=1e-12)


def test_kernel_form_matches_the_parallel_form():
    """backends.linear_attention (the chunked kernel; the Triton interpreter on the CPU) gives the parallel form."""
    module = LinearizedAttention(2, 1, 8, causal=True, scale=0.35, features=6, implementation="parallel")
    q, k, v = torch.randn(1, 2, 19, 8), torch.randn(1, 1, 19, 8), torch.randn(1, 1, 19, 8)
    expected = module(q, k, v)
    module.implementation = "kernel"
    torch.testing.assert_close(module(q, k, v), expected, rtol=2e-4, atol=2e-5)


def test_hedgehog_features_are_two_distributions():
    feature_map = HedgehogFeatureMap(3, 8, features=5, scale=0.5)
    features = feature_map(torch.randn(2, 3, 7, 8))
    assert features.shape == (2, 3, 7, 10) and bool((features > 0).all())
    torch.testing.assert_close(features[..., :5].sum(-1), torch.ones(2, 3, 7))
    torch.testing.assert_close(features[..., 5:].sum(-1), torch.ones(2, 3, 7))


def test_linearize_reduces_each_site_error_and_rewrites_the_graph():
    torch.manual_seed(3)
    model = DemoLlama(TINY).eval()
    calibration = [torch.randint(0, TINY.vocab_size, (2, 41)) for _ in range(2)]
    linear = linearize(model, calibration, steps=40, learning_rate=2e-2, finetune_steps=5)
    report = linear.linearize_report
    assert [item.site for item in report.sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    for item in report.sites:
        assert item.error_after < 0.8 * item.error_before, item
        assert item.cosine_after > item.cosine_before
    assert "linearize: 2 site(s)" in report.summary()
    assert report.kl_after_finetune < report.kl_before_finetune  # the end-to-end stage lowers the output KL
    modules = [name for name, _ in linear.named_children() if name.startswith("linearized_")]
    assert len(modules) == 2
    assert not any(node.target == torch.ops.aten.scaled_dot_product_attention.default for node in linear.graph.nodes)
    ids = torch.randint(0, TINY.vocab_size, (2, 29))  # another length than calibration
    with torch.no_grad():
        out, original = linear(ids), model(ids)
    assert out.shape == original.shape and bool(torch.isfinite(out).all())
    assert not torch.allclose(out, original)  # linear attention is another function
    # The rewritten graph trains: gradients reach the feature maps.
    linear(ids).logsumexp(-1).mean().backward()
    assert all(module.feature_map.weight.grad is not None for module in
               (getattr(linear, name) for name in modules))


def test_linearize_checks_its_arguments():
    model = DemoLlama(TINY).eval()
    with pytest.raises(InvalidArgumentError):
        linearize(model, [torch.randint(0, 64, (1, 9))], steps=-1)
    with pytest.raises(InvalidArgumentError):
        linearize(model, [], steps=1)
