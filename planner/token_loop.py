"""The token loop of transformers' `generate` for its common cases (greedy, sampling with temperature, top-k and top-p
under a seed, eos and pad tokens, streamers), over the prefill/decode of a planner.generation.Generator."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from planner.errors import InvalidArgumentError


# Generation options this loop follows as transformers does; any other option set away from its default sends the
# call to the model's own generate (noted in the report).
FOLLOWED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
            "pad_token_id", "bos_token_id", "num_beams", "num_return_sequences", "use_cache", "cache_implementation",
            "transformers_version", "_from_model_config", "decoder_start_token_id", "return_dict_in_generate",
            "output_scores", "output_logits", "output_attentions", "output_hidden_states"}


def unfollowed_options(config: Any) -> list[str]:
    """Options of a GenerationConfig that this loop does not follow (set away from their defaults)."""
    names = [name for name in config.to_diff_dict() if name not in FOLLOWED]
    if (config.num_beams or 1) != 1:
        names.append("num_beams")
    if (config.num_return_sequences or 1) != 1:
        names.append("num_return_sequences")
    for name in ("return_dict_in_generate", "output_scores", "output_logits"):
        if getattr(config, name, False):
            names.append(name)
    return names


def sample_processors(config: Any) -> list:
    """transformers' warpers for sampling, in its order: temperature, top-k, top-p."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return warpers


def generate_with(generator: Callable[[], Any], fallback: Optional[Callable], note: Callable[[str], None],
                  model_config: Any, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                  generation_config: Any, streamer: Any, kwargs: dict) -> torch.Tensor:
    """transformers' `generate` arguments resolved to a GenerationConfig (the model's own, updated by `kwargs`), then
    the token loop over `generator()`'s prefill/decode. A call with options the loop does not follow goes to
    `fallback` (the model's own generate; its reason noted), or, without one, raises naming the options."""
    try:
        from transformers import GenerationConfig
    except ImportError:
        raise InvalidArgumentError("generate needs transformers for its options; use prefill/decode instead") from None
    inputs = kwargs.pop("inputs", None)
    input_ids = input_ids if input_ids is not None else kwargs.pop("input_ids", inputs)
    config = copy.deepcopy(generation_config or model_config or GenerationConfig())
    unused = config.update(**kwargs)
    unfollowed = unfollowed_options(config) + sorted(unused)
    if input_ids is None or unfollowed:
        named = ", ".join(unfollowed) or "a call without input_ids"
        if fallback is None:
            raise InvalidArgumentError(f"generate does not follow {named}; use prefill/decode")
        note(f"generate ran the model's own generate: {named} is not followed by the planner's decoding")
        return fallback(input_ids, attention_mask=attention_mask, generation_config=generation_config,
                        streamer=streamer, **kwargs)
    with torch.no_grad():
        return generate_tokens(generator(), input_ids, attention_mask, config, streamer)


def generate_tokens(generator: Any, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    config: Any, streamer: Any = None) -> torch.Tensor:
    """The token loop of transformers' greedy search and sampling (without beams), over prefill/decode."""
    length = input_ids.shape[1]
    max_length = length + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    eos = config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    warpers = sample_processors(config) if config.do_sample else []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    tokens = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    state = generator.prefill(input_ids, attention_mask) if tokens.shape[1] < max_length else None
    while tokens.shape[1] < max_length:
        scores = state.logits.float()
        for warper in warpers:
            scores = warper(tokens, scores)
        if config.do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if pad is not None:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos:
            unfinished = unfinished & ~torch.isin(next_tokens, torch.tensor(eos, device=next_tokens.device))
        if unfinished.max() == 0 or tokens.shape[1] >= max_length:
            break
        _, state = generator.decode(state, next_tokens)
    if streamer is not None:
        streamer.end()
    return tokens
