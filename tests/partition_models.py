"""Models for the partition tests (tests/test_partition.py, tests/partition_worker.py): the repo's demo model, a tiny
transformers Llama, and small models that each put one thing that mixes positions in the graph."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 61


def demo_llama() -> nn.Module:
    from planner.demo_model import DemoConfig, DemoLlama

    torch.manual_seed(11)
    config = DemoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=96, attention="sdpa")
    return DemoLlama(config).eval()


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(12)
    # initializer 0.05 (not 0.02) and rope_theta 100: logits of magnitude ~2 that positions and attention move by ~2,
    # far above the 1e-5 tolerance.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attn_implementation="sdpa", use_cache=False, initializer_range=0.05, rope_theta=100.0)
    return LlamaForCausalLM(config).eval()


class PositionTable(nn.Module):
    """No attention: returns functions of positions made with arange (float and int64, with a start and a step,
    inside autocast / no_grad blocks, which export captures as subgraphs), so that the partitioned graph runs without
    a process group."""

    def forward(self, input_ids: torch.Tensor):
        length = input_ids.shape[1]
        with torch.autocast("cpu", enabled=False):
            positions = torch.arange(length, dtype=torch.float32)
            table = torch.sin(positions / 7.0)[None, :, None] * input_ids[..., None]
        with torch.no_grad():
            ids = torch.arange(3, 3 + 2 * length, 2) + input_ids  # int64, start 3, step 2
        return table, ids


class PositionBuffer(nn.Module):
    """Learned position embeddings read through a position-ids buffer cut to the sequence length (BERT, GPT-2 style):
    the cut becomes a gather at this rank's global positions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(15)
        self.register_buffer("position_ids", torch.arange(512)[None], persistent=False)
        self.positions = nn.Embedding(512, 8)
        self.tokens = nn.Embedding(VOCAB, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = self.position_ids[:, 2: input_ids.shape[1] + 2]
        return self.tokens(input_ids) + self.positions(position_ids)


class Embedded(nn.Module):
    """Token embeddings of `width` features, which the small models below build on."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)


class CumsumModel(Embedded):
    """A running sum over the sequence: refused."""

    def __init__(self):
        super().__init__(16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        return hidden.cumsum(dim=1)  # CUMSUM_LINE


class ConvModel(Embedded):
    """A convolution over time (kernel 3): refused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)


class SoftmaxOverTimeModel(Embedded):
    """Softmax over the sequence outside attention (attention pooling by hand): refused."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(8, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        weights = torch.softmax(self.score(hidden), dim=1)
        return hidden * weights


class LastTokenModel(Embedded):
    """Keeps the last position only: refused (it lives on one rank)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)[:, -1]


class LengthAsNumberModel(Embedded):
    """Divides by the sequence length taken as a number: refused (on a shard it is the local length)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        return hidden.sum(dim=1) / input_ids.shape[1]


class PaddedAttentionModel(nn.Module):
    """Self-attention with a key padding mask (an input): refused at the site."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 48)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        q, k, v = self.qkv(self.embed(input_ids)).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        mask = attention_mask[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class PooledAttentionModel(nn.Module):
    """Full (non-causal) attention, then sums and means over the sequence and a max: made exact with all_reduce.
    Returns (per-token hidden, pooled mean, max over tokens, a sum that is divided by a constant)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(13)
        self.embed = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids: torch.Tensor):
        batch, length = input_ids.shape
        hidden = self.embed(input_ids)
        q, k, v = self.qkv(hidden).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, 16)
        pooled = self.head(attended.mean(dim=1))
        largest = attended.amax(dim=1)
        total = attended.sum() / 100.0
        return attended, pooled, largest, total


class SlidingWindowModel(nn.Module):
    """Causal sliding-window attention (window 5) with its mask built from positions: the detector proves the window,
    the ring visits only the ranks inside it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(16)
        self.embed = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 48)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        q, k, v = self.qkv(self.embed(input_ids)).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        query_position, key_position = torch.arange(length)[:, None], torch.arange(length)[None, :]
        mask = (key_position <= query_position) & (query_position - key_position < 5)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attended.transpose(1, 2).reshape(batch, length, 16)


class TokenLossModel(nn.Module):
    """Causal attention and a mean cross-entropy over the tokens whose label is not ignored: the loss becomes
    all_reduce(sum of losses) / all_reduce(count of counted labels)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.embed = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        batch, length = input_ids.shape
        q, k, v = self.qkv(self.embed(input_ids)).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(8))
        logits = self.head(attended.transpose(1, 2).reshape(batch, length, 16))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss


def source_line_of(model_class: type, marker: str) -> int:
    """The line number of `marker` in this file (for error-message checks)."""
    import inspect

    lines, start = inspect.getsourcelines(model_class)
    return start + next(index for index, line in enumerate(lines) if marker in line)
