"""Generation: decode a transformers Llama (built from a small config, no download) through the planner's caches,
prefill/decode step by step, and a linearized model decoding from its recurrent state.

    python examples/generate.py
"""
import torch
import transformers

import planner

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
model = transformers.LlamaForCausalLM(config).eval()
fast = planner.optimize(model, max_len="4k", device="h200")

prompt = torch.randint(0, 128, (2, 12))
mask = torch.ones_like(prompt)
mask[1, :3] = 0                                             # the second row is left-padded
tokens = fast.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
expected = model.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
print("same tokens as model.generate:", torch.equal(tokens, expected))
print("\n".join(note for note in fast.report.notes if note.startswith("decoding")))  # the decode plan per site

# Any captured model: prefill once, then one step per token (greedy here).
state = fast.prefill(prompt, attention_mask=mask)
next_ids = state.logits.argmax(-1)
for _ in range(4):
    logits, state = fast.decode(state, next_ids)
    next_ids = logits.argmax(-1)
print("prefill/decode tokens:", state.tokens[:, prompt.shape[1]:].tolist())

# A linearized model (planner.linearize: linear attention, trained here for a few steps only) decodes from a
# recurrent state per site: the same memory and time per token at any context length.
linear = planner.linearize(model, [torch.randint(0, 128, (2, 32)) for _ in range(2)], steps=20)
decoder = planner.decoder(linear, max_len="128k")
tokens = decoder.generate(prompt[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
print("linearized:", tokens[0, prompt.shape[1]:].tolist())
print("\n".join(decoder.notes))
