"""The report: a stable JSON schema (golden key sets), a readable summary that groups identical layers and states the
crossovers, and a self-contained HTML page that parses and carries the plot."""
from __future__ import annotations

import json
import sys
from html.parser import HTMLParser

import pytest
import sympy

import planner  # noqa: F401
from planner.devices import device_spec
from planner.errors import PlannerError
from planner.plan import make_plan
from planner.records import AttentionSite, MaskSpec
from planner.report import Report, compress_names

S = sympy.Symbol("s0", positive=True, integer=True)

TOP_KEYS = {"schema_version", "model", "device", "policy", "max_len", "world_size", "train", "window", "sinks",
            "notes", "fidelity", "memory", "groups", "sites"}
DEVICE_KEYS = {"name", "memory_bytes", "memory_bandwidth", "matrix_flops", "source", "key", "family", "usable_bytes",
               "interconnect_bandwidth", "launch_overhead_s", "efficiency"}
MEMORY_KEYS = {"usable_bytes", "weights_bytes", "activations_bytes", "masks_bytes", "attention_bytes", "total_bytes",
               "fits", "ring_devices", "verdict", "method"}
SITE_KEYS = {"name", "source", "form", "dtype", "shape", "scale", "mask", "choice", "rewritten", "reason",
             "candidates", "crossovers", "envelope", "notes"}
SHAPE_KEYS = {"batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "value_dim"}
MASK_KEYS = {"kind", "window", "chunk", "key_padding", "bias", "tensor", "proof", "description"}
CHOICE_KEYS = {"variant", "implementation", "exactness"}
CANDIDATE_KEYS = {"variant", "implementation", "exactness", "feasible", "time_s", "memory_bytes", "reason", "time_expr",
                  "memory_expr", "parameters", "flops", "bytes_moved", "comm_bytes", "bound", "work", "saved_bytes",
                  "fits_up_to"}
CROSSOVER_KEYS = {"faster", "slower", "sequence_length"}


def site(name, mask=None):
    return AttentionSite(name=name, source="/src/model.py:42", form="sdpa", node="sdpa", query="q", key="k",
                         value="v", batch=1, heads=32, kv_heads=8, q_len=S, kv_len=S, head_dim=128, value_dim=128,
                         scale=None, mask=mask or MaskSpec("causal", proof="is_causal=True"), dtype="bfloat16",
                         hints=(("s0", 67),))


@pytest.fixture(scope="module")
def report():
    local = MaskSpec("sliding_window", window=4096, tensor="mask", proof="proved from the mask subgraph")
    sites = [site(f"model.layers.{index}.self_attn", local if index % 2 == 0 else None) for index in range(6)]
    plan = make_plan(sites, device_spec("h200"), "approximate", 131072, window=8192)
    return Report(plan=plan, model="Toy")


def test_json_schema_is_stable(report):
    document = json.loads(report.to_json())
    assert set(document) == TOP_KEYS
    assert document["schema_version"] == 1
    assert set(document["device"]) == DEVICE_KEYS
    assert set(document["memory"]) == MEMORY_KEYS
    assert {frozenset(group) for group in document["groups"]} == {frozenset({"label", "sites"})}
    for entry in document["sites"]:
        assert set(entry) == SITE_KEYS
        assert set(entry["shape"]) == SHAPE_KEYS
        assert set(entry["mask"]) == MASK_KEYS
        assert set(entry["choice"]) == CHOICE_KEYS
        for candidate in entry["candidates"]:
            assert set(candidate) == CANDIDATE_KEYS
        for crossover in entry["crossovers"]:
            assert set(crossover) == CROSSOVER_KEYS
        assert {frozenset(step) for step in entry["envelope"]} == {frozenset({"from_length", "variant"})}
    assert json.loads(report.to_json(indent=None)) == document


def test_json_values_follow_the_plan(report):
    document = report.to_dict()
    first = document["sites"][0]
    assert first["choice"]["variant"] == "sliding_window" and first["choice"]["exactness"] == "exact"
    second = document["sites"][1]
    # An imposed window and HyperAttention are both approximate here: the choice is the faster one that fits.
    assert second["choice"]["exactness"] == "approximate"
    feasible = [c for c in second["candidates"] if c["feasible"] and c["time_s"] is not None]
    assert second["choice"]["variant"] == min(feasible, key=lambda c: c["time_s"])["variant"]
    window = next(c for c in second["candidates"] if c["variant"] == "sliding_window")
    assert window["parameters"] == {"window": 8192, "sinks": 0, "imposed": True}
    assert sympy.sympify(window["time_expr"]).free_symbols == {sympy.Symbol("L")}
    assert [group["sites"] for group in document["groups"]] == [
        [f"model.layers.{index}.self_attn" for index in (0, 2, 4)],
        [f"model.layers.{index}.self_attn" for index in (1, 3, 5)]]
    assert document["memory"]["fits"] is True


def test_summary_groups_identical_layers_and_states_crossovers(report):
    text = report.summary()
    assert "model.layers.{0,2,4}.self_attn" in text and "model.layers.{1,3,5}.self_attn" in text
    assert "policy=approximate, window=8192" in text
    assert "crossovers:" in text and "beats" in text and "tokens" in text
    assert "memory: fits on one device" in text
    assert text.splitlines()[0].startswith("attention-planner: Toy on NVIDIA H200")


def test_compress_names():
    assert compress_names(["a.0.b", "a.1.b", "a.2.b"]) == "a.{0..2}.b"
    assert compress_names(["a.0.b", "a.2.b", "a.4.b", "a.6.b"]) == "a.{0,2..6}.b"
    assert compress_names(["a.1.b", "a.5.b"]) == "a.{1,5}.b"
    assert compress_names(["x", "y"]) == "x (+1 more)"
    assert compress_names(["only"]) == "only"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.json_text, self._in_json, self.table_rows = [], "", False, 0

    def handle_starttag(self, tag, attributes):
        self.tags.append(tag)
        attributes = dict(attributes)
        self._in_json = tag == "script" and attributes.get("id") == "report-json"
        if tag == "tr":
            self.table_rows += 1

    def handle_data(self, data):
        if self._in_json:
            self.json_text += data

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_json = False


def test_html_is_self_contained_and_has_the_plots(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = report.save_html(tmp_path / "report.html")
    page = path.read_text()
    parser = _Page()
    parser.feed(page)
    assert parser.tags.count("svg") == 2  # one figure (time and memory panels) per group of sites
    assert parser.table_rows == 1 + 2
    assert json.loads(parser.json_text) == json.loads(report.to_json())
    assert 'src="http' not in page and 'href="http' not in page and "<link" not in page
    assert "max_len = 131,072" in page and "usable memory" in page
    assert "sequence length (tokens)" in page


def test_html_without_matplotlib_names_the_extra(report, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlannerError, match=r"needs matplotlib.*pip install matplotlib"):
        report.to_html()
