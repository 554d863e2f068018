"""CPU smoke test of benchmarks/bench_e2e.py (the end-to-end benchmark): the whole flow on tiny float32
models (`--smoke`, no torch.compile) in a subprocess, then its outputs: the table printed last, the JSON lines, and
the planner's logits against transformers' eager attention at the smoke lengths. The skip rules and the goal
verdicts are checked on synthetic records."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_e2e  # noqa: E402

MODELS = ("llama-3.2-1b", "mistral-1b-w4096")
LENGTHS = (64, 128)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke", "--no-cli",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (out / "e2e.jsonl").read_text().splitlines()]
    return out, done.stdout, records


def forward_records(records):
    return {(r["model"], r["config"], r["length"]): r for r in records if r["section"] == "forward"}


def test_the_markdown_table_is_printed_last(smoke):
    out, stdout, _ = smoke
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("| optimize() mistral-1b-w4096 |"), lines[-3:]
    assert "| model | configuration | 64 | 128 |" in lines
    for model in MODELS:
        for config in ("sdpa", "eager", "planner"):
            row = next(line for line in lines if line.startswith(f"| {model} | {config} |"))
            assert row.count("tok/s") == 2, row
        assert any(line.startswith(f"| {model} | inductor | skipped (--smoke without --compile)") for line in lines)
    assert any(line.startswith("| planner's tokens/s ≥ the fastest transformers") for line in lines)
    assert any(line.startswith("| llama-3.2-1b | sdpa | 128 | ") for line in lines)  # the training row
    assert "`logits_to_keep=1`" in stdout
    assert (out / "e2e_table.md").read_text().strip() == stdout.strip()
    assert (out / "e2e.png").stat().st_size > 10_000


def test_json_lines_hold_every_measurement(smoke):
    _, _, records = smoke
    forward = forward_records(records)
    for model in MODELS:
        for config in ("sdpa", "eager", "planner"):
            for length in LENGTHS:
                record = forward[(model, config, length)]
                assert record["status"] == "ok", record
                assert record["seconds"] > 0 and record["tokens_per_s"] == pytest.approx(length / record["seconds"])
                assert record["seconds"] == pytest.approx(statistics.median(record["runs"]), abs=1e-5)
        for length in LENGTHS:
            assert forward[(model, "inductor", length)]["status"] == "skipped"
        optimized = next(r for r in records if r["section"] == "overhead" and r.get("model") == model)
        assert optimized["seconds"] > 0
        assert optimized["sites"] == optimized["rewritten"] == 2  # both layers' attention rewritten
    train = {r["config"]: r for r in records if r["section"] == "train"}
    assert train["sdpa"]["status"] == "ok" and 0 < train["sdpa"]["loss"] < 20 and train["sdpa"]["grad_norm"] > 0
    assert train["inductor"]["status"] == train["planner-backend"]["status"] == "skipped"
    env = next(r for r in records if r["section"] == "env")
    assert env["logits_to_keep"] is True and env["dtype"] == "float32"


def test_planner_logits_equal_eager_at_the_smoke_lengths(smoke):
    out, _, records = smoke
    logits = torch.load(out / "logits.pt")
    for model in MODELS:
        for length in LENGTHS:
            eager = logits[f"{model}|eager|{length}"]
            planner = logits[f"{model}|planner|{length}"]
            assert eager.dtype == torch.float32 and eager.abs().max() > 0.1
            torch.testing.assert_close(planner, eager, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits[f"{model}|sdpa|{length}"], eager, rtol=1e-4, atol=1e-5)
        # fresh inputs per length: the two lengths' logits differ
        assert not torch.allclose(logits[f"{model}|eager|64"], logits[f"{model}|eager|128"])
    for record in forward_records(records).values():
        if record["config"] == "planner":
            assert record["diff_vs"] == "eager" and record["max_abs_diff"] < 1e-4


# --- the skip rules and verdicts, on synthetic inputs --------------------------------------------------------------


class _Config:
    num_attention_heads = 32
    hidden_size = 2048
    intermediate_size = 8192
    sliding_window = None


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))


def test_eager_attention_estimate_matches_the_scores_it_materializes():
    model = _Model()
    # 32 heads x 32k^2 scores: bf16 + fp32 + bf16 = 8 bytes each, plus a bf16 L^2 mask
    assert bench_e2e.eager_attention_bytes(model, 32768) == 32 * 32768 ** 2 * 8 + 32768 ** 2 * 2
    assert bench_e2e.eager_attention_bytes(model, 32768) / 2 ** 30 == pytest.approx(258.0)


def test_sdpa_estimate_counts_a_materialized_window_mask_only_past_the_window():
    model = _Model()
    activations = 131072 * (3 * 8192 + 6 * 2048) * 2
    assert bench_e2e.estimated_forward_bytes(model, "sdpa", 131072) == 8 + activations  # causal: no mask
    model.config.sliding_window = 4096
    assert bench_e2e.estimated_forward_bytes(model, "sdpa", 131072) == 8 + activations + 3 * 131072 ** 2
    assert bench_e2e.estimated_forward_bytes(model, "sdpa", 4096) == 8 + 4096 * (3 * 8192 + 6 * 2048) * 2
    assert bench_e2e.estimated_forward_bytes(model, "planner", 131072) is None


def test_time_rules():
    assert bench_e2e.predicted_call_s([], 8192) is None
    assert bench_e2e.predicted_call_s([(8192, 0.1), (32768, 0.8)], 65536) == pytest.approx(3.2)
    budget = bench_e2e.Budget(total_s=bench_e2e.Budget(0).elapsed() + 100.0)
    assert bench_e2e.time_skip(50.0, budget, 0.0, "x") is None
    skipped = bench_e2e.time_skip(50.0, budget, 60.0, "x")
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("over the time budget")


def _forward(model, config, length, seconds=None, status="ok", **extra):
    record = {"section": "forward", "model": model, "config": config, "length": length, "status": status, **extra}
    if seconds is not None:
        record.update(seconds=seconds, tokens_per_s=length / seconds, peak_bytes=2 ** 30)
    return record


def test_goal_verdicts():
    records = [
        _forward("llama-3.2-1b", "eager", 8192, 0.1),
        _forward("llama-3.2-1b", "sdpa", 8192, 0.05),
        _forward("llama-3.2-1b", "planner", 8192, 0.04),
        _forward("llama-3.2-1b", "eager", 32768, status="skipped", reason="estimated OOM: ~260 GiB",
                 estimated_bytes=260 * 2 ** 30),
        _forward("llama-3.2-1b", "sdpa", 32768, 0.5),
        _forward("llama-3.2-1b", "planner", 32768, 0.6),
        _forward("mistral-1b-w4096", "sdpa", 32768, status="skipped", reason="over the time budget", predicted_s=40),
        _forward("mistral-1b-w4096", "planner", 32768, 0.2),
    ]
    verdicts = "\n".join(bench_e2e.goals(records, (8192, 32768)))
    assert "llama-3.2-1b: 8k 1.25x sdpa, 32k 0.83x sdpa" in verdicts
    speed, memory, window = verdicts.splitlines()[2:5]
    assert speed.endswith("| no |")  # 0.83x at 32k
    assert "llama-3.2-1b: 32k (est. eager OOM)" in memory and memory.endswith("| yes |")
    assert "not measured" in window and window.endswith("| no |")  # sdpa skipped, no known figure at 32k
    table = "\n".join(bench_e2e.forward_table(records, (8192, 32768)))
    assert "OOM (est. 260 GiB, skipped)" in table and "skipped (time: ~40 s predicted)" in table


def test_known_figure_stands_in_for_a_skipped_sdpa_run_at_128k():
    records = [_forward("mistral-1b-w4096", "sdpa", 131072, status="skipped", reason="over the time budget",
                        predicted_s=11),
               _forward("mistral-1b-w4096", "planner", 131072, 1.0)]
    verdicts = bench_e2e.goals(records, (131072,))
    window = next(line for line in verdicts if line.startswith("| sliding-window model at 128k"))
    assert "10.8x (sdpa from a prior run's 10.8 s figure)" in window and window.endswith("| yes |")
    assert "mistral-1b-w4096 sdpa 128k: 10.8 s known, not measured here" in verdicts[-1]


def test_a_length_where_both_run_out_of_memory_misses_the_memory_goal():
    records = [_forward("llama-3.2-1b", "sdpa", 65536, status="oom", reason="OutOfMemoryError: ..."),
               _forward("llama-3.2-1b", "planner", 65536, status="oom", reason="OutOfMemoryError: ..."),
               _forward("llama-3.2-1b", "sdpa", 32768, status="oom", reason="OutOfMemoryError: ..."),
               _forward("llama-3.2-1b", "planner", 32768, 0.5)]
    memory = bench_e2e.goals(records, (32768, 65536))[3]
    assert "32k (sdpa OOM)" in memory and "64k: planner did not run either" in memory and memory.endswith("| no |")


def test_an_exhausted_budget_skips_what_does_not_fit_and_still_prints_the_tables(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke", "--no-cli",
                           "--budget-s", "1", "--models", "llama", "--paired", "64", "--out", str(tmp_path)],
                          capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    measured = [r for r in records if r["section"] in ("forward", "train")]
    assert len(measured) == 4 * 2 + 3
    assert all(r["status"] == "skipped" for r in measured)
    uncompiled = [r for r in measured if r["config"] in ("sdpa", "eager", "planner")]
    assert len(uncompiled) == 3 * 2 + 1
    assert all(r["reason"].startswith("over the time budget") for r in uncompiled)
    assert "| llama-3.2-1b | sdpa | skipped (time: ~4 s predicted) | skipped (time: ~4 s predicted) |" in done.stdout
    paired = [r for r in records if r["section"] == "paired"]
    assert len(paired) == 1 and paired[0]["status"] == "skipped" and paired[0]["length"] == 64
    assert paired[0]["reason"].startswith("over the time budget: optimize() + 32 calls")


# --- paired timing (--paired): sdpa and the planner called in turn ---------------------------------------------------


def test_paired_runners_keep_transformers_sdpa_path_next_to_the_planner(monkeypatch):
    """Both runners share one model: the sdpa runner must still go through transformers' sdpa attention (once per
    layer), the planner's captured graph must not, and their logits agree."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    settings = bench_e2e.settings_from(bench_e2e.parse_arguments(["--smoke", "--paired", "67"]))
    spec = bench_e2e.model_specs(smoke=True)[0]
    model = bench_e2e.build_model(spec, settings.device, settings.dtype)
    sdpa, planner_runner = bench_e2e.paired_runners(model, settings)
    calls = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(type(ALL_ATTENTION_FUNCTIONS)._global_mapping, "sdpa",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    ids = bench_e2e.input_ids(model.config.vocab_size, 67, settings.device)
    with torch.no_grad():
        expected = sdpa.call(ids)
        assert len(calls) == model.config.num_hidden_layers
        calls.clear()
        got = planner_runner.call(ids)
        assert not calls
        again = sdpa.call(ids)  # the planner's call did not switch the model's attention
    assert len(calls) == model.config.num_hidden_layers
    assert expected.shape == (1, 1, model.config.vocab_size) and expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_paired_smoke_records_both_medians_and_the_pair_ratios(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--smoke", "--no-cli",
                           "--models", "llama", "--configs", "sdpa,planner", "--train-configs", "", "--lengths", "64",
                           "--paired", "64,97", "--paired-calls", "3", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    paired = {r["length"]: r for r in records if r["section"] == "paired"}
    assert sorted(paired) == [64, 97]
    for length, record in paired.items():
        assert record["status"] == "ok" and record["pairs"] == 3 and record["sdpa_attention"] == "sdpa", record
        sdpa, planner = record["sdpa_runs"], record["planner_runs"]
        assert len(sdpa) == len(planner) == 3 and min(sdpa + planner) > 0
        assert record["first_in_pair"] == ["sdpa", "planner", "sdpa"]
        ratios = [a / b for a, b in zip(sdpa, planner)]
        assert record["pair_ratios"] == pytest.approx(ratios, rel=1e-2)
        assert record["ratio_median"] > 0
        assert record["ratio_median"] == pytest.approx(statistics.median(ratios), rel=1e-2)
        assert record["ratio_min"] <= record["ratio_median"] <= record["ratio_max"]
        assert record["planner_faster"] == sum(ratio > 1 for ratio in record["pair_ratios"])
        assert record["sdpa_seconds"] == pytest.approx(statistics.median(sdpa), abs=1e-5)
        assert record["planner_seconds"] == pytest.approx(statistics.median(planner), abs=1e-5)
        assert record["max_abs_diff"] < 1e-4 and record["max_abs_reference"] > 0.1
    assert "**Paired timing** (calls alternated, 3 pairs)" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| llama-3.2-1b | 64 | ")]
    assert len(rows) == 1 and "of 3 pairs" in rows[0]
    speed = next(line for line in done.stdout.splitlines() if line.startswith("| planner's tokens/s"))
    assert f"64 {paired[64]['ratio_median']:.2f}x sdpa (paired), 97 {paired[97]['ratio_median']:.2f}x sdpa (paired)" \
        in speed


def _paired(model, length, ratio_median, low, high, faster=8, pairs=15):
    return {"section": "paired", "model": model, "config": "planner", "rival": "sdpa", "length": length,
            "status": "ok", "pairs": pairs, "sdpa_seconds": 0.049, "planner_seconds": 0.049 / ratio_median,
            "ratio_median": ratio_median, "ratio_min": low, "ratio_max": high, "planner_faster": faster,
            "max_abs_diff": 0.0, "max_abs_reference": 4.0}


def test_goal_takes_the_paired_ratio_where_measured_and_keeps_no_tolerance():
    forward = [_forward("llama-3.2-1b", "sdpa", 8192, 0.0487), _forward("llama-3.2-1b", "planner", 8192, 0.0490),
               _forward("llama-3.2-1b", "sdpa", 65536, 0.918), _forward("llama-3.2-1b", "planner", 65536, 0.917)]
    met = bench_e2e.goals(forward + [_paired("llama-3.2-1b", 8192, 1.004, 0.98, 1.03)], (8192, 65536))
    assert "llama-3.2-1b: 8k 1.00x sdpa (paired), 64k 1.00x sdpa |" in met[2] and met[2].endswith("| yes |")
    assert "llama-3.2-1b 8k: 1.004x (pairs 0.980-1.030), faster in 8/15 (sign test p = 1.00)" in met[-2]
    # 0.996 is within 1% of sdpa, but "met" keeps no tolerance: it says no, and the paired line gives the range
    missed = bench_e2e.goals(forward + [_paired("llama-3.2-1b", 8192, 0.996, 0.97, 1.02, faster=6),
                                        _paired("llama-3.2-1b", 32768, 1.01, 0.99, 1.02)], (8192, 65536))
    assert "8k 1.00x sdpa (paired), 32k 1.01x sdpa (paired), 64k 1.00x sdpa |" in missed[2]
    assert missed[2].endswith("| no |")
    table = bench_e2e.paired_table([_paired("llama-3.2-1b", 8192, 0.996, 0.97, 1.02, faster=6),
                                    {"section": "paired", "model": "llama-3.2-1b", "length": 32768, "pairs": 15,
                                     "status": "skipped", "reason": "over the time budget", "predicted_s": 12.0}])
    assert table[0].startswith("**Paired timing** (calls alternated, 15 pairs)")
    assert "| llama-3.2-1b | 8k | 49.0 ms | 49.2 ms | 0.996x | 0.970-1.020 | 6 of 15 pairs |" in table[-2]
    assert table[-1].startswith("| llama-3.2-1b | 32k | skipped (time: ~12 s predicted) |")


def test_sign_test_against_exact_binomial_sums():
    # 12 of 30 pairs won (the measured 8k figure, benchmarks/RESULTS.md): two-sided p = 2 * P(X <= 12), X ~ Binomial(30, 1/2)
    assert bench_e2e.sign_test_p(12, 30) == pytest.approx(2 * sum(math.comb(30, k) for k in range(13)) / 2**30)
    assert bench_e2e.sign_test_p(12, 30) > 0.3
    assert bench_e2e.sign_test_p(2, 15) < 0.01 and bench_e2e.sign_test_p(7, 15) == 1.0


def test_a_length_lost_in_most_pairs_by_more_than_chance_is_measurably_slower():
    forward = [_forward("llama-3.2-1b", "sdpa", 8192, 0.0487), _forward("llama-3.2-1b", "planner", 8192, 0.0490)]
    even = bench_e2e.goals(forward + [_paired("llama-3.2-1b", 8192, 0.996, 0.97, 1.02, faster=6)], (8192,))
    row = next(line for line in even if line.startswith("| (paired) no length"))
    assert row.endswith("| none slower | yes |")
    lost = bench_e2e.goals(forward + [_paired("llama-3.2-1b", 8192, 0.97, 0.95, 1.01, faster=2)], (8192,))
    row = next(line for line in lost if line.startswith("| (paired) no length"))
    assert "slower at llama-3.2-1b 8k" in row and row.endswith("| no |")
