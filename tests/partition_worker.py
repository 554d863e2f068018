"""Worker processes for tests/test_partition.py: 4 gloo ranks; the 4-rank cases run on the world, the 2-rank cases on
the subgroup [0, 1] (so one spawn covers both, and the group= path is exercised). Each rank writes its findings to
rank{r}.json; the tests read them."""
from __future__ import annotations

import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from rank_results import save_rank_results

LAYOUTS = ("zigzag", "contiguous")
MAX_LEN = 4096
CHUNK = 5  # tokens per zigzag chunk: sequences of 2·P·5 tokens, odd chunks


def _error(actual, expected) -> float:
    return float((actual.double() - expected.double()).abs().max())


def _ids(length: int, seed: int) -> torch.Tensor:
    import partition_models

    return torch.randint(0, partition_models.VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _export(model, example):
    from passes.capture import capture

    return capture(model, example).exported


def run_lm(name, model, exported, world_size, group, rank, findings):
    """Gathered logits of the partitioned model against the model on the whole sequence, both layouts; plus two
    controls that must be far off: the model run on each shard as it is, and the partition without global
    positions."""
    from planner.distributed import gather_outputs, optimize_partitioned, shard_inputs

    ids = _ids(2 * world_size * CHUNK, seed=world_size)
    with torch.no_grad():
        expected = model(ids)
    expected = getattr(expected, "logits", expected)
    for layout in LAYOUTS:
        key = f"P{world_size}-{name}-{layout}"
        try:
            fast = optimize_partitioned(exported, MAX_LEN, "h200", world_size=world_size, group=group, layout=layout)
            local = shard_inputs((ids,), world_size, rank, layout)
            with torch.no_grad():
                local_output = fast(*local)
            output = gather_outputs(local_output, group=group, layout=layout)
            output = getattr(output, "logits", output)
            findings[key] = {"error": _error(output, expected), "partition": fast.partition.to_json(),
                             "notes": fast.report.notes, "rewritten": fast.report.rewritten,
                             "local_length": getattr(local_output, "logits", local_output).shape[1]}
            if layout == "zigzag":
                findings[key]["as_is_error"] = _as_is_error(model, ids, world_size, rank, group, layout, expected)
                findings[key]["local_positions_error"] = _local_positions_error(
                    exported, ids, world_size, rank, group, layout, expected)
        except Exception:  # recorded, so that one broken case does not hide the others
            findings[key] = {"exception": traceback.format_exc()}


def _as_is_error(model, ids, world_size, rank, group, layout, expected) -> float:
    """Control: the original model on each shard, gathered (no ring, local positions)."""
    from planner.distributed import gather_outputs, shard_inputs

    with torch.no_grad():
        output = model(*shard_inputs((ids,), world_size, rank, layout))
    output = gather_outputs(getattr(output, "logits", output), group=group, layout=layout)
    return _error(output, expected)


def _local_positions_error(exported, ids, world_size, rank, group, layout, expected) -> float:
    """Control: the partition with its arange rewrite switched off (positions stay local)."""
    import backends.ring.partition as partition_pass
    from planner.distributed import gather_outputs, optimize_partitioned, shard_inputs

    original = partition_pass._PositionPass.globalize_arange
    partition_pass._PositionPass.globalize_arange = lambda self, node: None
    try:
        fast = optimize_partitioned(exported, MAX_LEN, "h200", world_size=world_size, group=group, layout=layout)
    finally:
        partition_pass._PositionPass.globalize_arange = original
    with torch.no_grad():
        output = gather_outputs(fast(*shard_inputs((ids,), world_size, rank, layout)), group=group, layout=layout)
    return _error(getattr(output, "logits", output), expected)


def reduction_inputs(world_size: int) -> dict:
    length = 2 * world_size * CHUNK
    ids = _ids(length, seed=100 + world_size)
    labels = _ids(length, seed=200 + world_size)
    labels[0, : length // 2 + 3] = -100  # ignored labels, unevenly spread over the ranks
    labels[1, -2:] = -100
    return {"pooled": (ids,), "loss": (ids, labels), "window": (ids,)}


def run_reductions(models, exported, world_size, group, rank, findings):
    """Means, sums, maxima and a masked mean cross-entropy over the sequence (all_reduce makes them exact), and a
    sliding-window site."""
    from planner.distributed import gather_outputs, optimize_partitioned, shard_inputs

    for name, inputs in reduction_inputs(world_size).items():
        model = models[name]
        for layout in LAYOUTS:
            key = f"P{world_size}-{name}-{layout}"
            try:
                with torch.no_grad():
                    expected = model(*inputs)
                fast = optimize_partitioned(exported[name], MAX_LEN, "cpu", world_size=world_size, group=group,
                                            layout=layout)
                with torch.no_grad():
                    output = fast(*shard_inputs(inputs, world_size, rank, layout))
                output = gather_outputs(output, group=group, layout=layout, module=fast)
                pairs = zip(torch.utils._pytree.tree_leaves(output), torch.utils._pytree.tree_leaves(expected))
                findings[key] = {"errors": [_error(a, b) for a, b in pairs],
                                 "output_dims": fast.partition.output_dims, "rewrites": fast.partition.rewrites}
            except Exception:
                findings[key] = {"exception": traceback.format_exc()}


def run_refusal(exported, world_size, group, findings):
    """optimize(world_size=P) refuses a cumsum over the sequence, naming the node."""
    import planner
    from planner.errors import PlanError

    try:  # through the public front door: optimize(world_size=P)
        planner.optimize(exported["cumsum"], MAX_LEN, "cpu", world_size=world_size, group=group)
        findings[f"P{world_size}-cumsum"] = {"refused": False}
    except PlanError as error:
        findings[f"P{world_size}-cumsum"] = {"refused": True, "message": str(error)}
    except Exception:
        findings[f"P{world_size}-cumsum"] = {"exception": traceback.format_exc()}


def worker(rank: int, world_size: int, store_path: str, result_dir: str) -> None:
    import partition_models

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    findings: dict = {}
    try:
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        # Each model is exported once (the slow step); optimize() takes the ExportedProgram.
        language_models = {"demo": partition_models.demo_llama(), "hf": partition_models.hf_llama()}
        others = {"pooled": partition_models.PooledAttentionModel(), "loss": partition_models.TokenLossModel(),
                  "window": partition_models.SlidingWindowModel(), "cumsum": partition_models.CumsumModel()}
        example = (_ids(2 * 2 * CHUNK + 7, seed=0),)
        examples = {**reduction_inputs(2), "cumsum": example}
        exported = {name: _export(model, example) for name, model in language_models.items()}
        exported.update({name: _export(model, examples[name]) for name, model in others.items()})
        for size, group in ((world_size, None), (2, pair)):
            if rank < size:
                for name, model in language_models.items():
                    run_lm(name, model, exported[name], size, group, rank, findings)
                run_reductions(others, exported, size, group, rank, findings)
                run_refusal(exported, size, group, findings)
            dist.barrier()
    except Exception:
        findings["worker"] = {"exception": traceback.format_exc()}
    finally:
        save_rank_results(result_dir, rank, findings)
        dist.destroy_process_group()
