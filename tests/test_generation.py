"""Generation through the planner's caches (planner/generation.py): the same tokens as the original model's own
generate, for every cache form, and prefill/decode equal to the model's full forward."""
from __future__ import annotations

import pytest
import torch

import planner

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 64


def _small(config_class, **overrides):
    # initializer_range 0.2: peaked next-token distributions, so that greedy choices are not near-ties that float32
    # rounding could flip (the comparison is of tokens, not of logits).
    config = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=512)
    config.update(overrides)
    return config_class(**config)


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(_small(transformers.LlamaConfig))
    elif kind == "mistral":  # a window smaller than the prompt: the rolling buffer wraps many times
        model = transformers.MistralForCausalLM(_small(transformers.MistralConfig, sliding_window=8))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(_small(transformers.Qwen2Config))
    elif kind == "gemma2":  # soft-capping, window and full layers alternating
        model = transformers.Gemma2ForCausalLM(_small(transformers.Gemma2Config, head_dim=16, sliding_window=8,
                                                      attn_logit_softcapping=20.0, final_logit_softcapping=None))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                                                     n_positions=512, initializer_range=0.2))
    elif kind == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(_small(transformers.GPTNeoXConfig))
    else:
        raise ValueError(kind)
    return model.eval()


def _decodes_from_caches(fast) -> bool:
    return any(note.startswith("decoding:") for note in fast.report.notes) and not any(
        "recomputes the whole sequence" in note for note in fast.report.notes)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_neox"])
def test_greedy_tokens_equal_the_models_own_generate(kind):
    model = _build(kind)
    fast = planner.optimize(model, "1k", device="h200")
    prompt = torch.randint(0, 97, (1, 21))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    got = fast.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert _decodes_from_caches(fast), fast.report.notes
    if kind == "mistral":
        assert any("rolling buffer of 8 positions" in note for note in fast.report.notes)


def test_sampling_with_a_seed_and_a_left_padded_batch_equal_the_models_own_generate():
    model = _build("llama")
    fast = planner.optimize(model, "1k", device="h200")
    prompt = torch.randint(1, 97, (3, 17))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    mask[2, :9] = 0
    prompt = prompt * mask
    options = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(7)
        expected = model.generate(prompt, attention_mask=mask, **options)
    torch.manual_seed(7)
    got = fast.generate(prompt, attention_mask=mask, **options)
    assert torch.equal(got, expected)
    assert _decodes_from_caches(fast)


def test_prefill_and_decode_equal_the_full_forward_and_max_len_is_enforced():
    model = _build("mistral")
    fast = planner.optimize(model, 40, device="h200")
    tokens = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        state = fast.prefill(tokens[:, :30])
        torch.testing.assert_close(state.logits, model(tokens[:, :30]).logits[:, -1], rtol=1e-4, atol=1e-4)
        for step in range(30, 33):
            logits, state = fast.decode(state, tokens[:, step])
            torch.testing.assert_close(logits, model(tokens[:, :step + 1]).logits[:, -1], rtol=1e-4, atol=1e-4)
        with pytest.raises(planner.PlannerError, match="max_len"):
            fast.generate(tokens, max_new_tokens=20)


class TinyGPT(torch.nn.Module):
    """A nanoGPT-style model: positions made inside forward from the length (no position_ids argument)."""

    def __init__(self, vocab: int = 61, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.tokens = torch.nn.Embedding(vocab, dim)
        self.positions = torch.nn.Embedding(256, dim)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        batch, length = ids.shape
        x = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        for block in self.blocks:
            q, k, v = block(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + y.transpose(1, 2).reshape(batch, length, -1)
        return self.head(x)


def test_a_plain_pytorch_model_decodes_exactly_and_says_how():
    torch.manual_seed(3)
    model = TinyGPT().eval()
    fast = planner.optimize(model, "256", device="h200")
    tokens = torch.randint(0, 61, (2, 25))
    with torch.no_grad():
        state = fast.prefill(tokens[:, :20])
        for step in range(20, 25):
            logits, state = fast.decode(state, tokens[:, step])
            torch.testing.assert_close(logits, model(tokens[:, :step + 1])[:, -1], rtol=1e-4, atol=1e-5)
    assert any("recomputes the whole sequence" in note and "position_ids" in note for note in fast.report.notes)


class IgnoresPositionIds(TinyGPT):
    """Takes position_ids but builds positions from the length: a cached step would see positions from 0 again."""

    def forward(self, ids, position_ids=None):
        return super().forward(ids)


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.logits


def test_a_linearized_model_decodes_from_its_recurrent_state_as_its_own_forward():
    model = _build("llama")
    calibration = [torch.randint(0, 97, (2, 23)) for _ in range(2)]
    linear = planner.linearize(model, calibration, steps=3)
    decoder = planner.decoder(linear, max_len="256")
    prompt = torch.randint(0, 97, (2, 19))
    state = decoder.prefill(prompt)
    tokens = prompt
    for step in range(6):
        full = _logits(linear(input_ids=tokens, use_cache=False))[:, -1]
        torch.testing.assert_close(state.logits, full, rtol=1e-4, atol=1e-4)
        next_ids = torch.randint(0, 97, (2,))
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        _, state = decoder.decode(state, next_ids)
    assert any("recurrent state (linear attention)" in note for note in decoder.notes), decoder.notes
    states = [cache for cache, _ in state.caches]
    assert len(states) == 2 and all(tuple(s.shape) == (2, 4, 32, 17) for s in states)  # heads, 2x16 features, Dv+1

    # A left-padded row decodes as its unpadded tokens do; greedy tokens follow the linearized model's own argmax.
    padded = prompt.clone()
    padded[1, :5] = 0
    mask = torch.ones_like(padded)
    mask[1, :5] = 0
    state = decoder.prefill(padded, mask)
    alone = _logits(linear(input_ids=padded[1:, 5:], use_cache=False))
    torch.testing.assert_close(state.logits[1], alone[0, -1], rtol=1e-4, atol=1e-4)
    got = decoder.generate(prompt[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = prompt[:1]
    for _ in range(12):
        logits = _logits(linear(input_ids=expected, use_cache=False))
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, expected)


def test_a_model_rewritten_into_another_function_generates_through_its_rewrite():
    model = _build("llama")
    prompt = torch.randint(0, 97, (1, 15))
    fast = planner.optimize(model, "1k", device="h200", policy="any", train=True, variant="linear",
                            tolerance={"kl_mean": 100.0}, samples=[prompt])
    assert any(decision.choice.variant == "linear" for decision in fast.report.plan.decisions if decision.choice)
    got = fast.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(4):
            logits = _logits(fast(expected))
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, expected)
    assert any("compute another function" in note and "(linear, retrain)" in note for note in fast.report.notes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_that_does_not_carry_positions_is_caught_and_recomputed(dtype):
    torch.manual_seed(5)
    model = IgnoresPositionIds().eval().to(dtype)
    fast = planner.optimize(model, "256", device="h200")
    tokens = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        state = fast.prefill(tokens[:, :20])
        for step in range(20, 24):
            logits, state = fast.decode(state, tokens[:, step])
            torch.testing.assert_close(logits, model(tokens[:, :step + 1])[:, -1])
    assert any("did not reproduce the model's forward" in note for note in fast.report.notes), fast.report.notes


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_cuda_graph_steps_equal_uncaptured_steps_on_the_gpu(kind):
    """A one-token step replayed from a CUDA graph gives the logits of the same step run op by op, every step, for a
    left-padded batch, and generate gives the same tokens either way."""
    model = _build(kind).cuda()
    fast = planner.optimize(model, "1k", device="cuda")
    prompt = torch.randint(0, 97, (3, 21), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    mask[2, :9] = 0
    generator = fast._generator()
    assert generator.graph_failure is None and generator.cuda_graphs
    steps = torch.randint(0, 97, (3, 40), device="cuda")
    with torch.no_grad():
        graphed = fast.prefill(prompt, mask)
        generator.cuda_graphs = False
        eager = fast.prefill(prompt, mask)
        for step in range(steps.shape[1]):
            generator.cuda_graphs = True
            logits, graphed = fast.decode(graphed, steps[:, step])
            generator.cuda_graphs = False
            expected, eager = fast.decode(eager, steps[:, step])
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        generator.cuda_graphs = True
    assert graphed.step_graph is not None and eager.step_graph is None
    assert _decodes_from_caches(fast), fast.report.notes
    got = fast.generate(prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    generator.cuda_graphs = False
    expected = fast.generate(prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
