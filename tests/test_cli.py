"""The `attention-planner` command: presets planned on the meta device (no weight memory), a model from
'package.module:function', --json / --html / --quiet, and errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import planner  # noqa: F401
from planner.cli import main
from planner.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def llama_parameters(config: dict) -> int:
    """Parameters of a Llama-architecture causal LM, counted from its config by hand."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    q_width = config["num_attention_heads"] * head_dim
    kv_width = config["num_key_value_heads"] * head_dim
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    mlp = 3 * hidden * config["intermediate_size"]
    per_layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return embeddings + layers * per_layer + hidden


def captured_sites(report: dict) -> int:
    note = next(note for note in report["notes"] if "representative layer(s)" in note)
    return int(re.search(r"which hold (\d+) attention site", note).group(1))


def tiny_model():
    """A model for 'test_cli:tiny_model' (the MODEL argument's package.module:function form)."""
    from planner.demo_model import DemoConfig, DemoLlama

    torch.manual_seed(0)
    return DemoLlama(DemoConfig()).eval(), (torch.randint(0, 256, (1, 67)),)


def test_llama_3_70b_plans_without_weight_memory():
    pytest.importorskip("transformers")
    script = ("import resource, sys\nfrom planner.cli import main\n"
              "code = main(['plan', 'llama-3-70b', '--max-len', '128k', '--device', 'h200', '--json', '--quiet'])\n"
              "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
              "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert captured_sites(report) == 1
    assert len(report["sites"]) == 80  # the representative layer's site, on every layer
    assert report["sites"][-1]["name"] == "model.layers.79.self_attn"
    # The mask is proved on the meta device too (the numeric check runs on the CPU), so the site is rewritten.
    assert {site["mask"]["kind"] for site in report["sites"]} == {"causal"}
    assert all(site["rewritten"] for site in report["sites"])
    assert report["memory"]["activations_bytes"] > 131072 * 8192 * 2  # at least the 128k hidden states
    weights = 2 * llama_parameters(PRESETS["llama-3-70b"].config)  # bf16
    assert weights == 141_107_412_992
    buffers = report["memory"]["weights_bytes"] - weights  # the rotary embedding's inv_freq (64 fp32)
    assert 0 <= buffers <= 4096
    assert not report["memory"]["fits"]  # 131.4 GiB of weights and 128k of activations exceed 138.9 GiB usable
    peak_rss = int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("MAXRSS")))
    assert peak_rss * 1024 < 3 * 2**30  # kilobytes on Linux: the weights (141 GB) were never allocated
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert not progress  # --quiet


def test_gemma_2_gets_one_representative_per_layer_type(capsys):
    pytest.importorskip("transformers")
    assert main(["plan", "gemma-2-9b", "--max-len", "32k", "--device", "h100", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    notes = " ".join(report["notes"])
    assert "captured 2 representative layer(s) (sliding_attention, full_attention) of 42" in notes
    assert "'eager' implementation" in notes  # transformers has no SDPA path for Gemma-2 (soft-capping)
    assert len(report["sites"]) == 21 * captured_sites(report)  # 21 layers of each type
    weights = report["memory"]["weights_bytes"]
    assert 9.0e9 * 2 < weights < 9.5e9 * 2  # gemma-2-9b: 9.24 billion parameters in bf16
    assert "[" in captured.err and "capturing 2 representative layer(s)" in captured.err  # progress on stderr


def test_model_from_a_function_with_html(tmp_path, capsys):
    page = tmp_path / "plan.html"
    code = main(["plan", "test_cli:tiny_model", "--max-len", "64k", "--device", "a100-80gb", "--html", str(page),
                 "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.startswith("attention-planner: DemoLlama on NVIDIA A100 SXM 80GB, max_len=64k")
    assert "layers.{0..3}.self_attn" in text
    assert page.is_file() and "<svg" in page.read_text()


def test_presets_are_listed(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for name in ("llama-3-8b", "llama-3-70b", "mistral-7b", "gemma-2-9b", "qwen2-7b"):
        assert name in listed
    assert "window=4096" in listed


def test_errors_are_reported_with_what_is_accepted(capsys):
    assert main(["plan", "no-such-model", "--max-len", "4k", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "neither a preset" in error and "llama-3-70b" in error and "package.module:function" in error
    assert main(["plan", "llama-3-8b", "--max-len", "lots", "--quiet"]) == 1
    assert "accepted: a positive int" in capsys.readouterr().err
    assert main(["fly"]) == 2


def test_demo_is_dispatched(monkeypatch):
    import planner.demo

    seen = []
    monkeypatch.setattr(planner.demo, "main", lambda argv: seen.append(list(argv)) or 7)
    assert main(["demo", "--short", "1k"]) == 7
    assert seen == [["--short", "1k"]]


def test_representative_sites_are_replicated_to_every_layer_of_their_type():
    import sympy

    from planner.presets import _replicate_sites, representative_layers
    from planner.records import AttentionSite

    length = sympy.Symbol("s0", positive=True, integer=True)

    def site(name):
        return AttentionSite(name=name, source="m.py:1", form="sdpa", node="n", query="q", key="k", value="v",
                             batch=1, heads=2, kv_heads=2, q_len=length, kv_len=length, head_dim=8, value_dim=8,
                             scale=None)

    layer_types = ["local", "global", "local", "global", "local"]
    indices, types = representative_layers(layer_types)
    assert (indices, types) == ([0, 1], ["local", "global"])
    captured = [site("model.layers.0.self_attn"), site("model.layers.1.self_attn"), site("model.layers.1.cross")]
    replicated = _replicate_sites(captured, layer_types, types)
    assert [s.name for s in replicated] == [
        "model.layers.0.self_attn", "model.layers.1.self_attn", "model.layers.1.cross", "model.layers.2.self_attn",
        "model.layers.3.self_attn", "model.layers.3.cross", "model.layers.4.self_attn"]


def test_presets_without_transformers_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers.models.llama.configuration_llama", None)
    assert main(["plan", "llama-3-8b", "--max-len", "8k", "--quiet"]) == 1
    assert "pip install transformers" in capsys.readouterr().err

