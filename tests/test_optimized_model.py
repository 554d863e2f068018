"""planner.optimize returns the user's model: every call, mode, dtype and copy that works on the original works on
it and gives the original's outputs (planner/optimized.py)."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import planner
from planner.optimized import OptimizedModel

transformers = pytest.importorskip("transformers")


def _llama(dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_pair():
    model = _llama()
    return model, planner.optimize(model, "32k", device="h200")


def _ids(batch: int, length: int, vocab: int = 101) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def _left_padded(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, :row * 2] = 0
    return mask


def _same(got, expected, atol=1e-5):
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=atol)


def _rewritten_calls(module: OptimizedModel) -> int:
    return sum("attention_planner" in str(node.target) for node in module.graph_module.graph.nodes)


def test_every_calling_convention_of_the_original_gives_its_outputs(llama_pair):
    model, fast = llama_pair
    assert isinstance(fast, OptimizedModel) and _rewritten_calls(fast) == 2
    ids, mask = _ids(3, 29), _left_padded(3, 29)
    with torch.no_grad():
        _same(fast(ids), model(ids))
        _same(fast(input_ids=ids), model(input_ids=ids))
        _same(fast(ids, mask), model(ids, mask))                       # the mask positionally
        _same(fast(**{"input_ids": ids, "attention_mask": mask}), model(input_ids=ids, attention_mask=mask))
        _same(fast(ids, logits_to_keep=1), model(ids, logits_to_keep=1))
        _same(fast(ids), model(ids))                                   # omitting it again: all logits again
        _same(fast(ids, output_hidden_states=True, return_dict=True), model(ids, output_hidden_states=True))
    assert fast(ids, logits_to_keep=1).logits.shape == (3, 1, 101)
    assert fast(ids).logits.shape == (3, 29, 101)
    assert _rewritten_calls(fast) == 2


def test_batch_of_one_and_new_lengths_run_the_rewritten_graph(llama_pair):
    model, fast = llama_pair
    with torch.no_grad():
        for batch, length in ((1, 1), (1, 50), (2, 7), (5, 3)):
            ids = _ids(batch, length)
            mask = torch.ones(batch, length, dtype=torch.long)
            _same(fast(ids, attention_mask=mask), model(ids, attention_mask=mask))
            assert _rewritten_calls(fast) == 2, (batch, length)
            assert all("original" not in note for note in fast.report.notes)


def test_captured_at_batch_one_serves_other_batches(llama_pair):
    model, _ = llama_pair
    ids = _ids(1, 13)
    fast = planner.optimize(model, "32k", device="h200", example_inputs=(ids,),
                            example_kwargs={"attention_mask": torch.ones_like(ids)})
    assert fast.report.decisions[0].site.mask.kind == "causal"  # the padding mask is proved, not kept
    with torch.no_grad():
        ids, mask = _ids(4, 21), _left_padded(4, 21)
        _same(fast(ids, attention_mask=mask), model(ids, attention_mask=mask))
    assert _rewritten_calls(fast) == 2


def test_example_kwargs_alone_and_transformers_keyword_flags_are_captured():
    model = _llama()
    ids = _ids(2, 11)
    fast = planner.optimize(model, "32k", device="h200",
                            example_kwargs={"input_ids": ids, "output_attentions": False, "return_dict": True})
    with torch.no_grad():
        _same(fast(input_ids=ids, output_attentions=False, return_dict=True), model(input_ids=ids))
    flags_only = planner.optimize(model, "32k", device="h200", example_kwargs={"output_hidden_states": False})
    assert len(flags_only.report.rewritten) == 2


def test_attributes_and_methods_are_the_models(llama_pair, tmp_path):
    model, fast = llama_pair
    assert fast.config is model.config and fast.generation_config is model.generation_config
    assert fast.original is model
    assert list(fast.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(fast.parameters(), model.parameters()))
    fast.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(2, 9)
    with torch.no_grad():
        _same(fast(ids), reloaded(ids))


def test_train_and_eval_follow_the_mode_with_dropout():
    model = _llama(dropout=0.5)
    fast = planner.optimize(model, "32k", device="h200")
    ids = _ids(2, 17)
    fast.train()
    assert model.training and all(module.training for module in model.modules())
    first, second = fast(ids).logits, fast(ids).logits
    assert not torch.allclose(first, second)  # dropout is on in train mode
    fast.eval()
    assert not model.training
    with torch.no_grad():
        _same(fast(ids), model(ids))
        _same(fast(ids), fast(ids), atol=0)
    assert _rewritten_calls(fast) == 2


def test_a_training_step_gives_the_originals_gradients():
    model = _llama()
    reference = copy.deepcopy(model)
    fast = planner.optimize(model, "32k", device="h200", train=True)
    ids = _ids(3, 19)
    fast.train()
    reference.train()
    loss = fast(ids, labels=ids).loss
    expected = reference(ids, labels=ids).loss
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, parameter), (_, twin) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(parameter.grad, twin.grad, rtol=1e-4, atol=1e-6, msg=name)
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)
    before = model.lm_head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.lm_head.weight)  # the optimizer moved the user's own weights


@pytest.mark.parametrize("first, second", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_dtype_changes_after_capture_compute_in_the_new_dtype(first, second):
    model = _llama().to(first)
    fast = planner.optimize(model, "32k", device="h200")
    fast.to(second)
    assert model.lm_head.weight.dtype == second
    ids = _ids(2, 23)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        got, expected = fast(ids).logits, reference(ids).logits
    assert got.dtype == second
    # computed in the new dtype, not through casts to the old one
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert _rewritten_calls(fast) == 2


def test_pickle_torch_save_and_deepcopy_keep_the_report_and_the_outputs():
    model = _llama(seed=3)
    fast = planner.optimize(model, "32k", device="h200")
    ids = _ids(2, 15)
    with torch.no_grad():
        expected = model(ids)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast), torch.load(buffer, weights_only=False)):
            assert clone.report is not None and len(clone.report.rewritten) == 2
            assert clone.original is not model
            assert clone.original.model.embed_tokens.weight is next(clone.parameters())
            _same(clone(ids), expected)
            assert _rewritten_calls(clone) == 2


def test_kv_cache_calls_run_the_original_and_say_so(llama_pair):
    model, fast = llama_pair
    ids = _ids(1, 6)
    with torch.no_grad():
        got, expected = fast(ids, use_cache=True), model(ids, use_cache=True)
        _same(got, expected)
        assert got.past_key_values is not None
        step = fast(_ids(1, 1), past_key_values=got.past_key_values, use_cache=True)
    assert step.logits.shape == (1, 1, 101)
    assert any("runs the original" in note for note in fast.report.notes)


class _FixedLength(torch.nn.Module):
    """Attention whose code fixes the sequence length (a Python branch on it), with a positional table cut to it."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, ids):
        x = self.embed(ids)
        if ids.shape[1] == 12:  # specializes the length in the captured graph
            x = x * 2
        q, k, v = self.qkv(x).view(ids.shape[0], ids.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_a_model_that_fixes_the_length_is_captured_again_at_other_lengths():
    torch.manual_seed(1)
    model = _FixedLength()
    fast = planner.optimize(model, "32k", device="h200", example_inputs=(torch.randint(0, 50, (2, 12)),))
    for length in (12, 5, 12, 31):
        ids = torch.randint(0, 50, (3, length))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids), model(ids), rtol=1e-4, atol=1e-5)
    assert any("captured and planned again" in note for note in fast.report.notes)


def test_a_failing_graph_falls_back_to_the_original_and_the_report_says_why(llama_pair, monkeypatch):
    model = _llama()
    fast = planner.optimize(model, "32k", device="h200")
    graph = fast.graph_module

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(graph, "forward", broken)
    ids = _ids(2, 9)
    with torch.no_grad():
        _same(fast(ids), model(ids))
    assert any("kernel exploded" in note and "run the original" in note for note in fast.report.notes)
    with pytest.raises(IndexError):
        fast(torch.full((1, 3), 500))  # the original's own error for a bad token id, not ours


class _StridedFrontEnd(torch.nn.Module):
    """Attention over a sequence whose length is a floor division of the input's (a strided convolution, as audio
    front ends and patch embeddings make), then over its second half."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 16, kernel_size=5, stride=5)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        h = h[:, h.shape[1] // 2:]
        batch, length, _ = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_a_sequence_that_is_a_floor_division_of_the_input_is_planned_and_rewritten():
    torch.manual_seed(2)
    model = _StridedFrontEnd().eval()
    fast = planner.optimize(model, "32k", device="h200", example_inputs=(torch.randn(2, 67, 8),))
    assert len(fast.report.rewritten) == 1
    assert "seq//5" in fast.report.summary()
    for length in (40, 67, 203):
        x = torch.randn(3, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert _rewritten_calls(fast) == 1


def test_find_attention_takes_a_stock_transformers_model_as_the_readme_shows():
    model = _llama(seed=4)
    sites = planner.find_attention(model, (_ids(1, 21),))
    assert [site.mask.kind for site in sites] == ["causal", "causal"]


def test_calibration_batches_given_as_token_ids_measure_approximate_choices():
    model = _llama(seed=5)
    calibration = [_ids(2, 48) for _ in range(2)]
    fast = planner.optimize(model, "128k", device="h200", policy="approximate", window=8,
                            tolerance={"kl_mean": 1e-9}, calibration=calibration)
    assert fast.report.fidelity is not None
    assert all(decision.choice.exactness == "exact" for decision in fast.report.decisions)  # refused: too far
    with torch.no_grad():
        ids = _ids(2, 30)
        _same(fast(ids), model(ids))


class _ViewAfterAttention(torch.nn.Module):
    """SDPA's output stored as (batch, length, heads, dim), then transposed and viewed without a copy (as
    Data2Vec-Vision and JetMoE do): the rewritten output must have that memory order too."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(24, 72)

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 4, 6).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.permute(0, 2, 1, 3).view(batch, length, 24)


def test_the_rewritten_output_keeps_the_memory_order_the_model_views():
    model = _ViewAfterAttention().eval()
    try:
        model(torch.randn(2, 9, 24))
    except RuntimeError:
        pytest.skip("this torch's SDPA returns a contiguous output here")
    fast = planner.optimize(model, "32k", device="h200", example_inputs=(torch.randn(2, 67, 24),))
    x = torch.randn(3, 31, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert _rewritten_calls(fast) == 1
    assert not any("run the original" in note for note in fast.report.notes), fast.report.notes


class _AddsIntoTheOutput(torch.nn.Module):
    """Adds into the attention output in place (as Nystromformer does with its convolution of V)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * 8 ** -0.5  # written by hand: matmul does not keep its output
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        out += v * 0.5
        return out


def test_an_in_place_add_into_the_output_keeps_the_backward_right():
    model = _AddsIntoTheOutput()
    fast = planner.optimize(model, "32k", device="h200", example_inputs=(torch.randn(2, 67, 16),), train=True)
    fast.train()
    x = torch.randn(3, 23, 16)
    fast(x).square().sum().backward()
    got = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for mine, theirs in zip(got, model.parameters()):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-4, atol=1e-5)
    assert _rewritten_calls(fast) == 1


class _TimesThree(torch.autograd.Function):
    """A gradient of its own (x -> x forward, 3 * grad backward), as a router's estimator (PhiMoE's) has."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 3


class _GatedByCustomBackward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.gate = torch.nn.Linear(16, 1)

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(batch, length, 16) * _TimesThree.apply(torch.sigmoid(self.gate(x)))


def test_a_custom_autograd_function_keeps_its_backward():
    torch.manual_seed(0)
    model = _GatedByCustomBackward().eval()
    fast = planner.optimize(model, "32k", device="h200", example_inputs=(torch.randn(2, 67, 16),))
    assert _rewritten_calls(fast) == 1
    x = torch.randn(3, 23, 16)
    with torch.no_grad():  # no gradient needed: the graph serves (its forward is exact)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any("the original" in note for note in fast.report.notes), fast.report.notes
    fast(x).square().sum().backward()  # the Function's own backward (3x) is not in the graph: the original runs
    got = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for mine, theirs in zip(got, model.parameters()):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-4, atol=1e-5)
    assert any("_TimesThree" in note and "the original" in note for note in fast.report.notes), fast.report.notes


class _CompositeReturnsCache(torch.nn.Module):
    """A composite model whose use_cache lives on its text sub-config only, taken through **kwargs: called without
    use_cache=False it returns a KV cache, which no graph can output."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.config.text_config = transformers.LlamaConfig(use_cache=True)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x, **kwargs):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(
            batch, length, 16)
        if kwargs.get("use_cache", self.config.text_config.use_cache):
            return out, transformers.DynamicCache()
        return (out,)


def test_use_cache_on_a_sub_config_is_turned_off_for_the_capture():
    model = _CompositeReturnsCache().eval()
    fast = planner.optimize(model, "32k", device="h200", example_inputs=(torch.randn(2, 67, 16),))
    assert _rewritten_calls(fast) == 1
    x = torch.randn(3, 23, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], model(x, use_cache=False)[0], rtol=1e-4, atol=1e-5)
