"""Quickstart: optimize the repo's small Llama-style model for 128k tokens on an H200, read the report, and check
that the rewritten model computes what the original does.

    python examples/quickstart.py
"""
import torch

import planner
from planner.demo_model import DemoConfig, DemoLlama

torch.manual_seed(0)
model = DemoLlama(DemoConfig(attention="eager")).eval()

# Plan for an H200 without having one; the returned module runs wherever its weights are (here: the CPU).
optimized = planner.optimize(model, max_len="128k", device="h200")
print(optimized.report.summary())

input_ids = torch.randint(0, model.config.vocab_size, (1, 1000))
with torch.no_grad():
    difference = (optimized(input_ids) - model(input_ids)).abs().max().item()
print(f"max abs difference at 1000 tokens: {difference:.2e}")

# The full demo (peak memory, a length where the original's scores would need more than 4 GiB):
#   attention-planner demo
