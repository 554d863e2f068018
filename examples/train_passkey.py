"""Train the repo's small Llama-style model (planner.demo_model.DemoLlama) on synthetic key-value recall whose
answers lie far back, on the CPU in a few minutes, and save a small checkpoint (< 2 MB) for the fidelity tests.

    python examples/train_passkey.py                  # trains, evaluates, writes examples/checkpoints/passkey.pt
    python examples/train_passkey.py --evaluate-only  # evaluates the saved checkpoint

The shipped checkpoint was made in three runs (about 30 minutes of a shared 2-core CPU in all):
    python examples/train_passkey.py --steps 600 --output /tmp/stage1.pt
    python examples/train_passkey.py --steps 700 --learning-rate 2e-3 --seed 1 --resume /tmp/stage1.pt \
        --output /tmp/stage2.pt
    python examples/train_passkey.py --steps 200 --learning-rate 1e-3 --seed 2 --resume /tmp/stage2.pt

The task (passkey retrieval with several keys): a sequence is

    BOS, filler (>= MIN_PREFIX tokens), [k1:v1] [k2:v2] ... [kn:vn], filler ..., ?k_a v_a ?k_b v_b ...

[k:v] is one token holding a key k (of KEY_COUNT) and its value v (of VALUE_COUNT); ?k asks for key k and the next
token is the answer v (an answer token). Pair, query, answer and filler tokens come from disjoint ranges, so the only
way to answer is to find [k:*] among the first tokens and read its value: attention must reach back the whole gap,
at least MIN_EVAL_DISTANCE tokens at evaluation. The first tokens are filler, so "sink" tokens (the first few
positions) never hold a pair: sinks cannot rescue retrieval that a short window breaks.

Everything the tests need (the config, the batch generator, the accuracy) is importable from this file.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from dataclasses import asdict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from planner.demo_model import DemoConfig, DemoLlama, rotary_tables  # noqa: E402

CHECKPOINT = ROOT / "examples" / "checkpoints" / "passkey.pt"

BOS = 1
KEY_COUNT, VALUE_COUNT = 8, 16
QUERIES = range(8, 8 + KEY_COUNT)  # ?k
PAIR_START = 16  # [k:v] = PAIR_START + k * VALUE_COUNT + v
ANSWERS = range(PAIR_START + KEY_COUNT * VALUE_COUNT, PAIR_START + KEY_COUNT * VALUE_COUNT + VALUE_COUNT)
FILLER = range(ANSWERS.stop, 256)
PAIRS = 6
SEQUENCE_LENGTH = 288
MIN_PREFIX = 8  # filler before the pairs: more than any number of sink tokens we test
MIN_EVAL_DISTANCE = 200  # the shortest pair -> query distance at evaluation

CONFIG = DemoConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, attention="sdpa")


def passkey_batch(batch_size: int, generator: torch.Generator, *, sequence_length: int = SEQUENCE_LENGTH,
                  pairs: int = PAIRS, max_prefix: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Synthetic recall sequences.

    Returns (input_ids (batch, length) int64, query_positions (batch, pairs): the positions of the ?k tokens, whose
    next token is the answer, answers (batch, pairs): the answer token to predict there). max_prefix bounds the
    filler before the pairs: None lets the pairs sit anywhere (training: gaps of every length), a small value keeps
    every gap long.
    """
    tail = 2 * pairs  # the queries and their answers
    longest_prefix = sequence_length - 1 - pairs - tail - 1
    max_prefix = longest_prefix if max_prefix is None else min(max_prefix, longest_prefix)
    ids = torch.randint(FILLER.start, FILLER.stop, (batch_size, sequence_length), generator=generator)
    ids[:, 0] = BOS
    query_positions = torch.empty(batch_size, pairs, dtype=torch.long)
    answers = torch.empty(batch_size, pairs, dtype=torch.long)
    first_query = sequence_length - tail
    for row in range(batch_size):
        keys = torch.randperm(KEY_COUNT, generator=generator)[:pairs]
        values = torch.randint(0, VALUE_COUNT, (pairs,), generator=generator)
        prefix = int(torch.randint(MIN_PREFIX, max_prefix + 1, (1,), generator=generator))
        ids[row, 1 + prefix:1 + prefix + pairs] = PAIR_START + keys * VALUE_COUNT + values
        order = torch.randperm(pairs, generator=generator)
        ids[row, first_query::2] = QUERIES.start + keys[order]
        ids[row, first_query + 1::2] = ANSWERS.start + values[order]
        query_positions[row] = torch.arange(first_query, sequence_length, 2)
        answers[row] = ANSWERS.start + values[order]
    return ids, query_positions, answers


def evaluation_batch(batch_size: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed evaluation sequences whose every pair -> query gap is at least MIN_EVAL_DISTANCE tokens."""
    generator = torch.Generator().manual_seed(seed)
    first_query = SEQUENCE_LENGTH - 2 * PAIRS
    max_prefix = first_query - MIN_EVAL_DISTANCE - PAIRS - 1
    return passkey_batch(batch_size, generator, max_prefix=max_prefix)


def answer_logits(logits: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """(batch, pairs, vocab): the logits at the query positions."""
    index = query_positions[..., None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)


def recall_accuracy(model, input_ids: torch.Tensor, query_positions: torch.Tensor, answers: torch.Tensor,
                    batch_size: int = 32) -> float:
    """Fraction of queries whose most likely next token is the right value."""
    correct = 0
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            part = slice(start, start + batch_size)
            logits = model(input_ids[part])
            correct += (answer_logits(logits, query_positions[part]).argmax(-1) == answers[part]).sum().item()
    return correct / answers.numel()


def load_model(path: pathlib.Path = CHECKPOINT) -> DemoLlama:
    """The trained model in float32, eval mode (the checkpoint stores bfloat16 weights to stay small)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = DemoConfig(**state["config"])
    model = DemoLlama(config)
    model.load_state_dict({name: tensor.float() for name, tensor in state["weights"].items()})
    return model.eval()


def save_model(model: DemoLlama, path: pathlib.Path = CHECKPOINT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "weights": weights}, path)


def curriculum_length(step: int, steps: int) -> int:
    """Short sequences first (cheap steps, short gaps: the copying circuit forms quickly), growing to the full
    length over the first half of training."""
    shortest = 48
    grown = shortest + (SEQUENCE_LENGTH - shortest) * step / max(1, steps // 2)
    return int(min(SEQUENCE_LENGTH, 16 * round(grown / 16)))


def training_loss(model: DemoLlama, ids: torch.Tensor, positions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query positions only (the filler is unpredictable); the output head runs only there."""
    hidden = model.embed_tokens(ids)
    config = model.config
    cos, sin = rotary_tables(ids.shape[1], config.head_dim, config.rope_theta, hidden.device, hidden.dtype)
    for layer in model.layers:
        hidden = layer(hidden, cos, sin)
    index = positions[..., None].expand(-1, -1, hidden.shape[-1])
    logits = model.lm_head(model.norm(hidden.gather(1, index)))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))


def train(steps: int, batch_size: int, learning_rate: float, seed: int, log_every: int = 50,
          start: Optional[DemoLlama] = None) -> DemoLlama:
    """AdamW with warmup and cosine decay; sequences grow to full length over the first half (unless resuming)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = start.train() if start is not None else DemoLlama(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    eval_ids, eval_positions, eval_answers = evaluation_batch(64)
    began = time.perf_counter()
    for step in range(steps):
        length = SEQUENCE_LENGTH if start is not None else curriculum_length(step, steps)
        ids, positions, answers = passkey_batch(batch_size, generator, sequence_length=length)
        loss = training_loss(model, ids, positions, answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps - 1:
            model.eval()
            accuracy = recall_accuracy(model, eval_ids, eval_positions, eval_answers)
            model.train()
            print(f"step {step:5d}  loss {loss.item():.3f}  recall at distance >= {MIN_EVAL_DISTANCE}: "
                  f"{accuracy:.3f}  ({time.perf_counter() - began:.0f} s)", flush=True)
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=pathlib.Path, default=CHECKPOINT)
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--resume", type=pathlib.Path, default=None, help="continue training from a checkpoint")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    if arguments.evaluate_only:
        model = load_model(arguments.output)
    else:
        start = load_model(arguments.resume) if arguments.resume is not None else None
        model = train(arguments.steps, arguments.batch_size, arguments.learning_rate, arguments.seed, start=start)
        save_model(model, arguments.output)
        model = load_model(arguments.output)  # evaluate what was saved (bfloat16 weights)
        print(f"saved {arguments.output} ({arguments.output.stat().st_size / 2**20:.2f} MiB)")
    ids, positions, answers = evaluation_batch(256, seed=99)
    print(f"recall of the saved model at distance >= {MIN_EVAL_DISTANCE} (256 fresh sequences): "
          f"{recall_accuracy(model, ids, positions, answers):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
