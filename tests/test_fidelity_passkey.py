"""Fidelity on a causal LM whose attention really reaches far back: the DemoLlama trained by
examples/train_passkey.py (checkpoint shipped in examples/checkpoints/) to retrieve values 200+ tokens back.

Exact rewrites keep its recall; a sliding window shorter than the distance breaks retrieval, sink tokens do not
bring it back, and calibration refuses the window under a strict tolerance, with the numbers in its report."""
import importlib.util
import pathlib

import pytest
import torch

import planner  # noqa: F401
from passes.capture import capture
from passes.match import find_sites
from planner.devices import device_spec
from planner.fidelity import measure_plan, rewrite_copy
from planner.plan import make_plan

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_passkey", ROOT / "examples" / "train_passkey.py")
passkey = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(passkey)

STRICT = {"kl_mean": 0.01, "kl_p99": 0.1, "top1": 0.99}
EVALUATION = 48  # sequences, 6 queries each
CHANCE = 1 / passkey.VALUE_COUNT


@pytest.fixture(scope="module")
def trained():
    assert passkey.CHECKPOINT.exists(), "run python examples/train_passkey.py to make the checkpoint"
    assert passkey.CHECKPOINT.stat().st_size < 2 * 2**20
    model = passkey.load_model()
    ids, positions, answers = passkey.evaluation_batch(EVALUATION, seed=2024)
    captured = capture(model, (ids[:2],))
    sites = find_sites(captured.graph_module)
    return model, captured.graph_module, sites, (ids, positions, answers)


def recall(module, data) -> float:
    return passkey.recall_accuracy(module, *data, batch_size=16)


def switched(graph_module, sites, candidate):
    return rewrite_copy(graph_module, {site.name: candidate for site in sites}, sites)[0]


def test_the_trained_model_retrieves_far_back(trained):
    model, graph_module, sites, data = trained
    ids, positions, _ = data
    first_query = positions.min().item()
    pair_positions = (ids >= passkey.PAIR_START) & (ids < passkey.ANSWERS.start)
    assert (first_query - pair_positions.nonzero()[:, 1].max().item()) >= passkey.MIN_EVAL_DISTANCE
    assert len(sites) == passkey.CONFIG.num_layers
    assert recall(model, data) > 0.75  # chance is 1/16
    assert recall(graph_module, data) == recall(model, data)


def test_exact_rewrites_keep_recall(trained):
    model, graph_module, sites, data = trained
    plan = make_plan(sites, device_spec("h200"), "exact", 32768)
    assert all(decision.rewritten and decision.choice.exactness == "exact" for decision in plan.decisions)
    exact = rewrite_copy(graph_module, {d.site.name: d.choice for d in plan.decisions}, sites)[0]
    ids = data[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(exact(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert recall(exact, data) == recall(model, data)


def test_a_short_window_breaks_retrieval_and_sinks_do_not_restore_it(trained):
    model, graph_module, sites, data = trained
    from planner.fidelity import make_candidate

    original = recall(model, data)
    covering = recall(switched(graph_module, sites, make_candidate("sliding_window", window=320)), data)
    window = recall(switched(graph_module, sites, make_candidate("sliding_window", window=64)), data)
    with_sinks = recall(switched(graph_module, sites, make_candidate("sliding_window", window=64, sinks=4)), data)
    print(f"\nrecall at distance >= {passkey.MIN_EVAL_DISTANCE}: original {original:.3f}, window 320 (covers) "
          f"{covering:.3f}, window 64 {window:.3f}, window 64 + 4 sinks {with_sinks:.3f} (chance {CHANCE:.3f})")
    assert covering == original
    assert window < 3 * CHANCE and with_sinks < 3 * CHANCE


def test_calibration_refuses_the_window_under_a_strict_tolerance(trained):
    model, graph_module, sites, data = trained
    plan = make_plan(sites, device_spec("h200"), "approximate", 32768, window=64, sinks=4)
    assert all(decision.choice.variant == "sliding_window" for decision in plan.decisions)
    calibration = [data[0][:4]]
    new_plan, report = measure_plan(graph_module, plan, calibration, STRICT)
    print("\n" + report.summary())
    assert set(report.refused) == {site.name for site in sites}
    assert all(decision.choice.exactness == "exact" for decision in new_plan.decisions)
    for trial in report.trials:
        if trial.candidate.variant != "sliding_window":
            assert "unmeasured" in trial.reason  # HyperAttention is exact at 288 tokens: refused, not let through
            continue
        assert not trial.passed and "kl_p99" in trial.reason
        assert trial.site_error.bound_holds and trial.site_error.mass_kept_mean < 1.0
    assert report.final.kl_mean < 1e-6 and report.final.top1 == 1.0
    final = rewrite_copy(graph_module, {d.site.name: d.choice for d in new_plan.decisions if d.rewritten}, sites)[0]
    assert recall(final, data) == recall(model, data)


def test_optimize_with_policy_approximate_measures_and_refuses_the_window(trained):
    """The public front door: optimize(policy="approximate", window=, tolerance=, calibration=) measures the window
    on the calibration batches, refuses it under a strict tolerance, and the report carries the numbers."""
    model, _, _, data = trained
    ids, _, _ = data
    with pytest.raises(planner.InvalidArgumentError, match="tolerance"):
        planner.optimize(model, ids.shape[1], device="h200", example_inputs=(ids[:2],), policy="approximate",
                         window=32)
    optimized = planner.optimize(model, ids.shape[1], device="h200", example_inputs=(ids[:2],),
                                 policy="approximate", window=32, tolerance=STRICT, calibration=[ids[:8]])
    report = optimized.report
    assert report.fidelity is not None and "fidelity" in report.to_dict()
    trials = report.to_dict()["fidelity"]["trials"]
    assert {trial["site"] for trial in trials} == {decision.site.name for decision in report.decisions}
    assert all(trial["candidate"].startswith("sliding_window") and not trial["passed"] for trial in trials)
    assert all(decision.choice.exactness == "exact" for decision in report.decisions)
    assert "tolerance" in report.summary()
    with torch.no_grad():
        torch.testing.assert_close(optimized(ids[:4]), model(ids[:4]), atol=1e-4, rtol=1e-4)
    assert recall(optimized, data) == pytest.approx(recall(model, data), abs=0.01)
