"""The detector on real model code: transformers models from tiny configs (random weights, no download), with
attn_implementation "eager" and "sdpa".

For each model: one site per attention layer and none elsewhere (a mixture-of-experts router is not a site), the
mask kind and window right per layer (padding from the attention_mask input included), and rewriting every site that
an exact tiled variant takes reproduces the model's outputs (float32, rtol 1e-4) on fresh inputs at another length
and batch than the capture's. Soft-capping (Gemma-2) and attention-sink logits (gpt-oss) are recorded on the site and
rewritten too (the tiled kernels take them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

from detector_support import assert_same, rewrite_exactly, strict_matchers  # noqa: F401

transformers = pytest.importorskip("transformers")

VOCAB = 100
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)


@dataclass
class Case:
    """A model, the attention module class whose instances must each be one site, and the expected masks (in
    graph order) with and without what each site may carry."""

    build: Callable[[], tuple]  # () -> (model class, config)
    attention_class: str
    masks: list  # expected MaskSpec.describe() per site, in graph order
    padding: bool = True  # feed an attention_mask with padding
    implementations: tuple = ("eager", "sdpa")
    kv_heads: Optional[int] = None
    rewritten: bool = True  # every site is rewritten by an exact tiled variant
    check_site: Optional[Callable] = None
    extra_inputs: Callable = field(default=lambda batch, length: {})


def config(kind, **overrides):
    return getattr(transformers, kind)(**overrides)


def t5_inputs(batch, length):
    return {"decoder_input_ids": torch.randint(0, VOCAB, (batch, (length + 1) // 2))}


def gemma2_site(site):
    assert site.softcap == pytest.approx(50.0)


def gptoss_site(site):
    assert site.sinks is not None and "sinks" in site.sinks


CASES = {
    "llama": Case(lambda: (transformers.LlamaModel, config("LlamaConfig", num_key_value_heads=2, **SMALL)),
                  "LlamaAttention", ["causal+padding"] * 2, kv_heads=2),
    "mistral": Case(lambda: (transformers.MistralModel,
                             config("MistralConfig", num_key_value_heads=2, sliding_window=5, **SMALL)),
                    "MistralAttention", ["sliding_window(5)+padding"] * 2, kv_heads=2),
    "gemma2": Case(lambda: (transformers.Gemma2Model,
                            config("Gemma2Config", num_key_value_heads=2, sliding_window=5, head_dim=16,
                                   attn_logit_softcapping=50.0, **SMALL)),
                   "Gemma2Attention", ["sliding_window(5)+padding", "causal+padding"], implementations=("eager",),
                   kv_heads=2, check_site=gemma2_site),
    "gpt2": Case(lambda: (transformers.GPT2Model,
                          config("GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 bos_token_id=1, eos_token_id=2)),
                 "GPT2Attention", ["causal+padding"] * 2),
    "gpt_neox": Case(lambda: (transformers.GPTNeoXModel, config("GPTNeoXConfig", **SMALL)),
                     "GPTNeoXAttention", ["causal+padding"] * 2),
    "bert": Case(lambda: (transformers.BertModel, config("BertConfig", **SMALL)),
                 "BertSelfAttention", ["padding"] * 2),
    "distilbert": Case(lambda: (transformers.DistilBertModel,
                                config("DistilBertConfig", vocab_size=VOCAB, dim=64, hidden_dim=128, n_layers=2,
                                       n_heads=4, max_position_embeddings=256)),
                       "DistilBertSelfAttention", ["padding"] * 2),
    "t5": Case(lambda: (transformers.T5Model,
                        config("T5Config", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                               num_heads=4, decoder_start_token_id=0)),
               "T5Attention", ["padding+bias"] * 2 + ["causal+bias", "padding"] * 2, extra_inputs=t5_inputs),
    "whisper": Case(lambda: (transformers.WhisperModel,
                             config("WhisperConfig", vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                    decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32,
                                    max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    decoder_start_token_id=1)),
                    "WhisperAttention", ["none"] * 2 + ["causal", "none"] * 2, padding=False),
    "gpt_oss": Case(lambda: (transformers.GptOssModel,
                             config("GptOssConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                    max_position_embeddings=256,
                                    layer_types=["sliding_attention", "full_attention"])),
                    "GptOssAttention", ["sliding_window(5)+padding", "causal+padding"], implementations=("eager",),
                    kv_heads=2, check_site=gptoss_site),
}
SLOW = {"t5", "whisper", "gpt_oss"}

PARAMETERS = [
    pytest.param(name, implementation, id=f"{name}-{implementation}",
                 marks=[pytest.mark.slow] if name in SLOW else [])
    for name, case in CASES.items() for implementation in case.implementations
]


def make_inputs(name: str, case: Case, batch: int, length: int) -> tuple[tuple, dict, Optional[torch.Tensor]]:
    """(args, kwargs, rows to compare): token ids (Whisper: features), right padding on the last sequence."""
    kwargs = dict(case.extra_inputs(batch, length))
    if name == "whisper":
        features = torch.randn(batch, 16, 64)  # the encoder takes exactly 2 * max_source_positions frames
        kwargs["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, length))
        return (features,), kwargs, None
    ids = torch.randint(3, VOCAB, (batch, length))
    rows = None
    if case.padding:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length - 3:] = 0
        kwargs["attention_mask"] = mask
        rows = None if name == "t5" else mask.bool()  # T5's output is the decoder's: every row is real
    return (ids,), kwargs, rows


@pytest.mark.parametrize("name, implementation", PARAMETERS)
def test_transformers_model(name, implementation):
    case = CASES[name]
    model_class, model_config = case.build()
    model_config._attn_implementation = implementation
    model_config.use_cache = False
    model = model_class(model_config).eval()
    args, kwargs, _ = make_inputs(name, case, 2, 17)
    graph_module, sites, plan = rewrite_exactly(model, args, kwargs)

    attention_modules = [path for path, module in model.named_modules() if type(module).__name__ == case.attention_class]
    assert len(sites) == len(attention_modules), [site.name for site in sites]
    for site in sites:  # each site is inside one attention module: no false positive (routers, heads)
        assert any(site.name == path or site.name.startswith(path + ".") for path in attention_modules), site.name
    assert [site.mask.describe() for site in sites] == case.masks
    for site in sites:
        assert site.unsupported is None, site.unsupported
        if case.kv_heads is not None:
            assert site.kv_heads == case.kv_heads
        if case.check_site is not None:
            case.check_site(site)
        if site.mask.kind != "arbitrary":
            assert "for every length" in site.mask.proof or site.mask.kind == "none"
    assert all(decision.rewritten == case.rewritten for decision in plan.decisions), \
        [decision.reason for decision in plan.decisions]

    args, kwargs, rows = make_inputs(name, case, 3, 23)
    assert_same(model, graph_module, args, kwargs, rows=rows)
