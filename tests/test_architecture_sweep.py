"""The architecture sweep (benchmarks/sweep_architectures.py): every transformers family through the planner.

A fast sample of families runs in CI; the full sweep (every transformers family, tens of minutes on two cores) is
marked slow and runs only with PLANNER_FULL_SWEEP=1, since the repository's pytest configuration does not deselect
slow tests by default.
"""
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep_architectures as sweep  # noqa: E402

# One case per family, both implementations among them: decoder (GQA, rotary), decoder (learned positions, fused
# qkv), encoder, encoder-decoder (cross attention), vision.
SAMPLE = (("llama", "sdpa"), ("gpt2", "eager"), ("bert", "sdpa"), ("bart", "eager"), ("vit", "sdpa"))


def _families():
    return {family[0]: family for family in sweep.families()}


def _problems(record: dict) -> list[str]:
    flags = sweep.classify(record)
    return [f"{step}: {record['steps'][step]} [{record['frames'].get(step)}]"
            for step in flags["crashes"] + flags["mismatches"]]


@pytest.mark.parametrize("model_type,implementation", SAMPLE, ids=[f"{a}-{i}" for a, i in SAMPLE])
def test_sample_family(model_type, implementation):
    families = _families()
    assert model_type in families, f"{model_type} has no swept head in this transformers"
    _, head, auto_name, _ = families[model_type]
    record = sweep.run_case(model_type, implementation, head, auto_name)
    assert record["status"] == "ok", record.get("reason")
    assert record["sites"] >= 2 and record["sites"] == record["planned"], record
    assert record["rewritten"] + record["kept_count"] == record["sites"], record
    assert set(record["steps"]) == set(sweep.STEPS), record["steps"]
    assert not _problems(record), "\n".join(_problems(record))


def test_shrink_keeps_configs_consistent():
    import transformers

    config = sweep.shrink(transformers.CONFIG_MAPPING["llama"]())
    assert config.num_hidden_layers == 2 and config.hidden_size == 64 and config.num_attention_heads == 4
    assert config.num_key_value_heads == 2 and config.vocab_size == sweep.VOCAB
    assert all(value == 0.0 for name, value in vars(config).items() if "dropout" in name and isinstance(value, float))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PLANNER_FULL_SWEEP") != "1",
                    reason="the full sweep takes tens of minutes: set PLANNER_FULL_SWEEP=1")
def test_full_sweep(tmp_path):
    results, table = tmp_path / "sweep.jsonl", tmp_path / "SWEEP.md"
    assert sweep.main(["--results", str(results), "--table", str(table),
                       "--jobs", os.environ.get("PLANNER_SWEEP_JOBS", "1")]) == 0
    records = [record for record in sweep.load_results(results) if record["status"] == "ok"]
    problems = [f"{r['arch']}/{r['impl']}: {p}" for r in records for p in _problems(r)]
    assert not problems, f"{len(problems)} failures:\n" + "\n".join(problems[:50])
    attention = [record for record in records if sweep.softmax_attention(record)]
    covered = [record for record in attention if sweep.covered(record)]
    assert attention and len(covered) >= 0.95 * len(attention), (
        f"{len(covered)} of {len(attention)} softmax-attention cases covered; not: "
        + ", ".join(f"{r['arch']}/{r['impl']}" for r in attention if not sweep.covered(r)))
