"""The partitioned graph (backends/ring/partition.py, planner/distributed.py): a model's sequence sharded over P ranks,
every attention site on the ring, positions made global, reductions over the sequence completed by all_reduce,
everything else that mixes positions refused with an error naming the node.

In process (no process group needed): positions made global at every rank and layout, the refusals and their
messages, shard_inputs. On 4 gloo processes (one spawn; the 2-rank cases on the subgroup [0, 1]): the demo model and a
transformers Llama, gathered outputs against the model on the whole sequence (float32, atol 1e-5), zigzag and
contiguous, with controls that must be far off; means, maxima, sums and a masked mean cross-entropy; the report's
partition numbers against an independent count.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import partition_models
import partition_worker
from backends.ring.layout import shard, unshard
from passes.capture import capture
from passes.match import find_sites
from backends.ring.partition import SequenceShard, partition
from planner.distributed import shard_inputs
from planner.errors import InvalidArgumentError, PlanError

LAYOUTS = ("zigzag", "contiguous")
TOLERANCE = 1e-5
MODELS_FILE = "partition_models.py"


def _partitioned(model, example, world_size, rank, layout="zigzag", train=False):
    graph_module = capture(model, example).graph_module
    result = partition(graph_module, find_sites(graph_module), SequenceShard(world_size, rank, "unused", layout),
                       train=train)
    return graph_module, result


# ---- positions, in process -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def position_table():
    return capture(partition_models.PositionTable(), (torch.randint(1, 9, (2, 67)),)).exported


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_positions_become_global_on_every_rank(position_table, layout, world_size):
    ids = torch.randint(1, 9, (2, 2 * world_size * 3))
    expected = partition_models.PositionTable()(ids)
    for rank in range(world_size):
        graph_module = capture(position_table).graph_module
        result = partition(graph_module, [], SequenceShard(world_size, rank, "unused", layout))
        actual = graph_module(*shard_inputs((ids,), world_size, rank, layout))
        table, ids_out = actual
        # sin of a shorter vector may differ in the last bit (vectorized vs scalar tails); positions exactly.
        torch.testing.assert_close(table, shard(expected[0], 1, rank, world_size, layout), rtol=1e-6, atol=1e-6)
        assert torch.equal(ids_out, shard(expected[1], 1, rank, world_size, layout)), (rank, ids_out)
        assert len(result.positions) == 2 and all("global positions" in line for line in result.positions)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_position_buffer_cut_to_the_length_is_read_at_global_positions(layout):
    model = partition_models.PositionBuffer()
    exported = capture(model, (torch.randint(0, 9, (2, 67)),)).exported
    ids = torch.randint(0, 9, (2, 24))
    expected = model(ids)
    for rank in range(4):
        graph_module = capture(exported).graph_module
        result = partition(graph_module, [], SequenceShard(4, rank, "unused", layout))
        actual = graph_module(*shard_inputs((ids,), 4, rank, layout))
        assert torch.equal(actual, shard(expected, 1, rank, 4, layout)), rank
        assert len(result.positions) == 1 and "rows at this rank's global positions" in result.positions[0]


def test_positions_left_local_would_differ(position_table):
    # Control: the unpartitioned graph on a shard of rank 1 computes other positions.
    ids = torch.randint(1, 9, (2, 12))
    local = shard(ids, 1, 1, 2, "zigzag")
    unpartitioned = capture(position_table).graph_module(local)
    expected = shard(partition_models.PositionTable()(ids)[0], 1, 1, 2, "zigzag")
    assert (unpartitioned[0] - expected).abs().max() > 0.1


# ---- refusals, in process ------------------------------------------------------------------------------------

REFUSALS = [
    (partition_models.CumsumModel, "cumsum", "CUMSUM_LINE", "prefix sum"),
    (partition_models.ConvModel, "conv1d", None, "convolution over the sequence (kernel 3"),
    (partition_models.SoftmaxOverTimeModel, "softmax", None, "softmax over the sequence outside an attention"),
    (partition_models.LastTokenModel, "select", None, "lives on one rank"),
    (partition_models.LengthAsNumberModel, "div", None, "sequence length"),
]


@pytest.mark.parametrize("model_class,node,marker,why", REFUSALS, ids=[case[1] for case in REFUSALS])
def test_what_mixes_positions_is_refused_naming_the_node(model_class, node, marker, why):
    with pytest.raises(PlanError) as raised:
        _partitioned(model_class(), (torch.randint(0, 9, (2, 67)),), 2, 0)
    message = str(raised.value)
    assert f"node '{node}" in message and why in message, message
    assert MODELS_FILE in message, message
    if marker is not None:
        assert f"{MODELS_FILE}:{partition_models.source_line_of(model_class, marker)}" in message, message


def test_padding_mask_site_is_refused_naming_the_site():
    ids = torch.randint(0, 9, (2, 67))
    mask = torch.ones(2, 67, dtype=torch.long)
    with pytest.raises(PlanError, match=r"attention site .* cannot run as ring attention: .*padding"):
        _partitioned(partition_models.PaddedAttentionModel(), (ids, mask), 2, 0)


def test_all_reduce_is_refused_when_training():
    with pytest.raises(PlanError, match="train=True"):
        _partitioned(partition_models.PooledAttentionModel(), (torch.randint(0, 9, (2, 67)),), 2, 0, train=True)


def test_partitioned_graph_calls_the_ring_and_the_collectives():
    graph_module, result = _partitioned(partition_models.PooledAttentionModel(), (torch.randint(0, 9, (2, 67)),),
                                        4, 3, layout="contiguous")
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    ring = [node for node in graph_module.graph.nodes
            if node.target == torch.ops.attention_planner.ring_attention.default]
    assert len(ring) == 1 and ring[0].args[3:7] == ("unused", False, -1, "contiguous")
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert targets.count(torch.ops._c10d_functional.all_reduce.default) == 3
    assert result.output_dims == [1, None, None, None]


# ---- shard_inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_shard_inputs_round_trip(layout, world_size):
    length = 2 * world_size * 3
    inputs = ({"ids": torch.randint(0, 9, (2, length)), "scale": 0.5},
              [torch.randn(3, length, 4), torch.randn(5)])
    shards = [shard_inputs(inputs, world_size, rank, layout) for rank in range(world_size)]
    for rank_shard in shards:
        assert rank_shard[0]["scale"] == 0.5 and rank_shard[1][1] is inputs[1][1]  # not sequences: as they are
        assert rank_shard[0]["ids"].shape == (2, length // world_size)
    assert torch.equal(unshard([s[0]["ids"] for s in shards], 1, layout), inputs[0]["ids"])
    assert torch.equal(unshard([s[1][0] for s in shards], 1, layout), inputs[1][0])


def test_shard_inputs_refuses_lengths_and_ranks():
    with pytest.raises(InvalidArgumentError, match="not divisible by 8"):
        shard_inputs(torch.zeros(2, 12), 4, 0, "zigzag")
    with pytest.raises(InvalidArgumentError, match="rank=4"):
        shard_inputs(torch.zeros(2, 16), 4, 4)
    with pytest.raises(InvalidArgumentError, match="accepted: zigzag, contiguous"):
        shard_inputs(torch.zeros(2, 16), 4, 0, "striped")


def test_optimize_partitioned_checks_its_arguments_before_capture():
    from planner.distributed import optimize_partitioned

    model = partition_models.CumsumModel()
    with pytest.raises(InvalidArgumentError, match="needs an int >= 2"):
        optimize_partitioned(model, 1024, "cpu", world_size=1)
    with pytest.raises(InvalidArgumentError, match="accepted: zigzag, contiguous"):
        optimize_partitioned(model, 1024, "cpu", world_size=2, layout="striped")
    with pytest.raises(InvalidArgumentError, match="torch.distributed initialized"):
        optimize_partitioned(model, 1024, "cpu", world_size=2)


# ---- on 4 gloo processes -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("partition")
    world_size = 4
    mp.start_processes(partition_worker.worker, args=(world_size, str(directory / "store"), str(directory)),
                       nprocs=world_size, join=True, start_method="spawn")
    results = []
    for rank in range(world_size):
        with open(os.path.join(directory, f"rank{rank}.json")) as handle:
            results.append(json.load(handle))
    assert "worker" not in results[0], results[0]["worker"]["exception"]
    return results


def _findings(ranks, world_size, key):
    found = []
    for rank in range(world_size):
        finding = ranks[rank][key]
        assert "exception" not in finding, f"rank {rank}:\n{finding['exception']}"
        found.append(finding)
    return found


LM_CASES = [(size, model, layout) for size in (2, 4) for model in ("demo", "hf") for layout in LAYOUTS]


@pytest.mark.parametrize("world_size,model,layout", LM_CASES, ids=[f"P{w}-{m}-{l}" for w, m, l in LM_CASES])
def test_gathered_logits_equal_the_whole_sequence(ranks, world_size, model, layout):
    for rank, finding in enumerate(_findings(ranks, world_size, f"P{world_size}-{model}-{layout}")):
        assert finding["error"] <= TOLERANCE, f"rank {rank}: max error {finding['error']:.3g}"
        assert finding["local_length"] == 2 * partition_worker.CHUNK
        assert len(finding["rewritten"]) == 2
        if layout == "zigzag":
            # Controls: without the ring, or with positions left local, the same comparison fails by far.
            assert finding["as_is_error"] > 1000 * TOLERANCE, finding["as_is_error"]
            assert finding["local_positions_error"] > 1000 * TOLERANCE, finding["local_positions_error"]


REDUCTION_CASES = [(size, model, layout) for size in (2, 4) for model in ("pooled", "loss", "window")
                   for layout in LAYOUTS]


@pytest.mark.parametrize("world_size,model,layout", REDUCTION_CASES,
                         ids=[f"P{w}-{m}-{l}" for w, m, l in REDUCTION_CASES])
def test_reductions_and_windows_on_shards(ranks, world_size, model, layout):
    for rank, finding in enumerate(_findings(ranks, world_size, f"P{world_size}-{model}-{layout}")):
        assert max(finding["errors"]) <= TOLERANCE, f"rank {rank}: {finding['errors']}"
        assert finding["output_dims"][0] == 1 and all(dim is None for dim in finding["output_dims"][1:])
        collectives = [line for line in finding["rewrites"] if "all_reduce" in line]
        assert len(collectives) == {"pooled": 3, "loss": 1, "window": 0}[model], finding["rewrites"]
        if model == "window":  # the mask, built from aranges, went dead with the site: nothing else to rewrite
            assert finding["rewrites"] == []


@pytest.mark.parametrize("world_size", [2, 4])
def test_cumsum_is_refused_by_optimize_naming_the_node(ranks, world_size):
    line = partition_models.source_line_of(partition_models.CumsumModel, "CUMSUM_LINE")
    for finding in _findings(ranks, world_size, f"P{world_size}-cumsum"):
        assert finding["refused"], finding
        assert "node 'cumsum'" in finding["message"] and f"{MODELS_FILE}:{line}" in finding["message"]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_report_shows_the_partition(ranks, world_size, layout):
    """Shard lengths and chunks per rank; bytes per step from an independent count of one K/V shard."""
    from planner.devices import device_spec

    spec = device_spec("h200")
    max_len = partition_worker.MAX_LEN
    for rank, finding in enumerate(_findings(ranks, world_size, f"P{world_size}-demo-{layout}")):
        partition_json = finding["partition"]
        assert partition_json["shard_length"] == max_len // world_size
        chunk = max_len // (2 * world_size)
        expected_chunks = ([[rank * chunk, (rank + 1) * chunk],
                            [(2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk]]
                           if layout == "zigzag" else [[rank * 2 * chunk, (rank + 1) * 2 * chunk]])
        assert partition_json["chunks"] == expected_chunks
        (traffic,) = partition_json["traffic"]
        # demo_llama: batch 2 (at capture), 2 kv heads, head dim 16 (k and v), float32.
        shard_bytes = 2 * 2 * (max_len // world_size) * (16 + 16) * 4
        assert traffic["bytes_per_step"] == pytest.approx(shard_bytes)
        assert traffic["steps"] == world_size - 1
        assert traffic["bytes_per_layer"] == pytest.approx(shard_bytes * (world_size - 1))
        assert partition_json["bytes_per_forward"] == pytest.approx(2 * shard_bytes * (world_size - 1))
        transfer = shard_bytes / (spec.interconnect_bandwidth * spec.efficiency_of("interconnect"))
        assert traffic["transfer_per_step_s"] == pytest.approx(transfer)
        assert traffic["hidden"] == (traffic["compute_per_step_s"] >= transfer)
        text = "\n".join(finding["notes"])
        assert f"{max_len // world_size:,} tokens per rank" in text and "per layer" in text
        assert ("hidden by compute" in text) or ("NOT hidden" in text)
        assert "arange" in text and "global positions" in text
