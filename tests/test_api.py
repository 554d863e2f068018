"""planner.optimize and planner.find_attention end to end on the CPU: capture, find, plan, rewrite, report; errors;
memory."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
from planner.demo_model import DemoConfig, DemoLlama


class PaddedEncoder(nn.Module):
    """Bidirectional attention with a key-padding mask given as an input."""

    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, padding):
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = padding[:, None, None, :]  # True = real key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return torch.softmax(self.classifier(torch.relu(self.linear(x))), dim=-1)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        if self.linear(x).sum().item() > 0:  # data-dependent control flow: export cannot capture it
            return x
        return -x


@pytest.fixture(scope="module")
def demo_model():
    torch.manual_seed(1)
    return DemoLlama(DemoConfig(num_layers=2, attention="sdpa")).eval()


def test_causal_gqa_model_matches_original_and_reports_every_site(demo_model):
    optimized = planner.optimize(demo_model, max_len="128k", device="h200")
    report = optimized.report
    assert len(report.decisions) == 2
    assert report.rewritten == ["layers.0.self_attn", "layers.1.self_attn"]
    site = report.sites[0]
    assert (site.heads, site.kv_heads, site.head_dim) == (8, 2, 16)
    assert site.mask.kind == "causal" and "is_causal=True" in site.mask.proof
    assert site.source.endswith("demo_model.py:" + site.source.rsplit(":", 1)[1])
    assert site.sequence_symbols, "the sequence length must stay a symbol"
    for length in (1, 37, 300):  # odd lengths, including one longer than a block and one never seen at capture
        input_ids = torch.randint(0, 256, (2, length))
        with torch.no_grad():
            torch.testing.assert_close(optimized(input_ids), demo_model(input_ids), atol=1e-5, rtol=1e-5)


def test_rewritten_module_exports_again(demo_model):
    optimized = planner.optimize(demo_model, max_len="32k", device="h200")
    input_ids = torch.randint(0, 256, (2, 41))
    exported = torch.export.export(optimized, (input_ids,), strict=False)
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "attention_planner.flash_attention.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(input_ids), demo_model(input_ids), atol=1e-5, rtol=1e-5)


def test_padding_mask_model_matches_original():
    torch.manual_seed(2)
    model = PaddedEncoder().eval()
    x = torch.randn(3, 45, 32)
    padding = torch.rand(3, 45) > 0.3
    # The planner may keep SDPA's own kernel for a mask tensor; force ours to check that the rewrite is exact.
    optimized = planner.optimize(model, 4096, device="a100-80gb", example_inputs=(x, padding), variant="flash")
    assert optimized.report.rewritten == ["<top>"]
    for length in (45, 130):
        x = torch.randn(3, length, 32)
        padding = torch.rand(3, length) > 0.3
        padding[:, 0] = True
        with torch.no_grad():
            torch.testing.assert_close(optimized(x, padding), model(x, padding), atol=1e-5, rtol=1e-5)


def test_graph_module_and_exported_program_are_accepted(demo_model):
    input_ids = torch.randint(0, 256, (2, 33))
    exported = torch.export.export(demo_model, (input_ids,), strict=False)
    for model in (exported, exported.module()):
        optimized = planner.optimize(model, "8k", device="h100", example_inputs=(input_ids,))
        assert len(optimized.report.rewritten) == 2
        with torch.no_grad():
            torch.testing.assert_close(optimized(input_ids), demo_model(input_ids), atol=1e-5, rtol=1e-5)


def test_find_attention_returns_sites_with_records(demo_model):
    sites = planner.find_attention(demo_model, (torch.randint(0, 256, (2, 29)),))
    assert [site.name for site in sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(site.form == "sdpa" and site.scale is None for site in sites)
    assert all(site.effective_scale() == pytest.approx(16**-0.5) for site in sites)


def test_report_summary_and_json():
    # Hand-written ("eager") attention: the original materializes the scores, so at 128k it cannot run.
    eager_model = DemoLlama(DemoConfig(num_layers=2, attention="eager")).eval()
    report = planner.optimize(eager_model, max_len="128k", device="h200").report
    text = report.summary()
    assert "self_attn" in text and "demo_model.py" in text and "causal" in text and "flash" in text
    data = json.loads(report.to_json())
    assert data["schema_version"] == 1 and data["max_len"] == 131072
    assert [site["name"] for site in data["sites"]] == ["layers.0.self_attn", "layers.1.self_attn"]
    site = data["sites"][0]
    assert set(site) >= {"name", "source", "form", "shape", "mask", "choice", "rewritten", "reason", "candidates"}
    dense = next(candidate for candidate in site["candidates"] if candidate["variant"] == "dense")
    # 2 (batch hint) x 8 heads x 131072^2 fp32 scores (1 TiB) do not fit in an H200: the report says so in numbers.
    assert dense["feasible"] is False and "TiB" in dense["reason"]


def test_model_without_attention_comes_back_unchanged():
    model = NoAttention()
    optimized = planner.optimize(model, "1k", device="cpu", example_inputs=(torch.randn(4, 8),))
    assert optimized is model
    assert optimized.report.decisions == ()
    assert "no softmax attention" in optimized.report.summary()


def test_unexportable_model_comes_back_unchanged_and_the_report_names_the_module():
    model = DataDependent()
    with pytest.warns(UserWarning, match="DataDependent"):
        optimized = planner.optimize(model, "1k", device="cpu", example_inputs=(torch.randn(2, 8),))
    assert optimized is model
    assert any("returned unchanged" in note and "DataDependent" in note for note in optimized.report.notes)
    with pytest.raises(planner.CaptureError, match="DataDependent"):
        planner.find_attention(model, (torch.randn(2, 8),))


def test_unknown_device_lists_known_ones(demo_model):
    with pytest.raises(planner.UnknownDeviceError, match="h200") as error:
        planner.optimize(demo_model, "1k", device="tpu-v9")
    assert "tpu-v9" in str(error.value)


@pytest.mark.parametrize("bad", ["12x", "-5", 0, "k", 1.5, None, "1.3"])
def test_malformed_max_len_says_what_is_accepted(demo_model, bad):
    with pytest.raises(planner.InvalidArgumentError, match="128k"):
        planner.optimize(demo_model, bad, device="cpu")


@pytest.mark.parametrize("text, tokens", [("128k", 131072), ("1M", 1048576), ("32K", 32768), (4096, 4096),
                                          ("1.5k", 1536), (" 77 ", 77)])
def test_max_len_strings(text, tokens):
    assert planner.parse_length(text) == tokens


def test_unknown_policy_is_refused(demo_model):
    with pytest.raises(planner.InvalidArgumentError, match="exact"):
        planner.optimize(demo_model, "1k", device="cpu", policy="fastest")


def test_samples_and_their_calibration_alias_are_one_argument(demo_model):
    batch = [torch.zeros(1, 8, dtype=torch.long)]
    with pytest.raises(planner.InvalidArgumentError, match="alias"):
        planner.optimize(demo_model, "1k", device="cpu", policy="approximate", tolerance={"kl_mean": 0.01},
                         samples=batch, calibration=batch)
    with pytest.raises(planner.InvalidArgumentError, match="samples"):
        planner.optimize(demo_model, "1k", device="cpu", policy="approximate", tolerance={"kl_mean": 0.01})


def test_transformers_model_without_example_inputs_is_called_like_the_original():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    # Inputs are guessed (token ids, use_cache=False); the KV cache is not a tensor export can return.
    optimized = planner.optimize(model, "8k", device="h200", variant="flash")
    assert optimized.report.rewritten == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    input_ids = torch.randint(0, 128, (1, 53))
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
        torch.testing.assert_close(optimized(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_module_follows_its_weights_to_another_device():
    # Positions and masks the graph creates take their device from the weights at run time; the meta device stands
    # in for a GPU here (a factory left on the CPU would fail against meta weights).
    model = DemoLlama(DemoConfig(num_layers=1, attention="eager")).eval()
    optimized = planner.optimize(model, "8k", device="h200")
    input_ids = torch.randint(0, 256, (1, 40))
    moved = copy.deepcopy(optimized).to("meta")
    assert moved(input_ids.to("meta")).device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(optimized(input_ids), model(input_ids), atol=1e-5, rtol=1e-5)
