"""The torch.compile backend with Inductor: same values and gradients as eager, our backward in the backward graph,
graph breaks, dynamic lengths, the FX graph cache across processes, reports, logging, fallback.

Each compiled test runs on the CPU (the plan targets an H200; the rewritten op runs its blockwise CPU implementation)
and, marked `gpu`, on CUDA (planned for the real GPU; the op runs the Triton kernels): `pytest -m gpu` selects those.
An Inductor compile takes tens of seconds on the CPU, so each compiled model serves several checks.
"""
from __future__ import annotations

import copy
import json
import logging
import operator
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

import planner
import planner.compile_backend as compile_backend
import planner.pipeline as pipeline
from planner.costs import SEQUENCE_LENGTH
from planner.demo_model import DemoConfig, DemoLlama

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = dict(atol=1e-4, rtol=1e-4)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
PLAN_TARGET = {"cpu": "h200", "cuda": "cuda"}  # on the CPU, plan for an H200 (the CPU plan keeps fused SDPA)
FORWARD_OP = "attention_planner::flash_attention"
BACKWARD_OP = "attention_planner::flash_attention_backward"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def no_inductor_cache():
    """Inductor compiles for real (no cache hit), so the graphs it compiles are seen by the backend's record."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts, at run time, the calls of our kernels behind attention_planner::flash_attention(_backward): the
    blockwise implementation (CPU, or a kept mask tensor) and the Triton one (CUDA)."""
    import backends.flash.op as flash_op

    calls = Counter()

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(flash_op, "blockwise_attention_forward", "forward")
    counting(flash_op, "blockwise_attention_backward", "backward")
    if torch.cuda.is_available():
        import backends.flash.triton as flash_triton  # op.py imports these at call time

        counting(flash_triton, "flash_forward", "forward")
        counting(flash_triton, "flash_backward", "backward")
    return calls


def tiny_demo() -> DemoLlama:
    config = DemoConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)
    return DemoLlama(config)


def language_model_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def assert_same_gradients(model: nn.Module, reference: nn.Module) -> None:
    for (name, parameter), reference_parameter in zip(model.named_parameters(), reference.parameters()):
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, reference_parameter.grad, **TOLERANCE, msg=lambda m: f"{name}: {m}")


class CausalSelfAttention(nn.Module):
    """One attention block: (batch, length, hidden) -> (batch, length, hidden), SDPA on 4-D heads."""

    def __init__(self, hidden: int = 24, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))


class DropoutAttention(CausalSelfAttention):
    """Attention with dropout on the probabilities: the tiled kernels have no dropout, so the site stays as written."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))


class BrokenTwoBlocks(nn.Module):
    """Two attention blocks with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.first = CausalSelfAttention()
        self.second = DropoutAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.first(x)
        torch._dynamo.graph_break()
        return x + self.second(x)


# ---------------------------------------------------------------------------------------------------------------------
# Without compiling


def test_registered_as_a_torch_compile_backend():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "attention_planner" in list_backends(exclude_tags=())
    assert lookup_backend("attention_planner") is compile_backend.attention_planner_backend
    compile_backend.register()  # a second registration is a no-op, not a duplicate-name error
    assert planner.backend is compile_backend.backend and planner.last_report is compile_backend.last_report


def test_backend_arguments_are_checked():
    with pytest.raises(planner.InvalidArgumentError, match="policy"):
        planner.backend(max_len="32k", policy="fastest")
    with pytest.raises(planner.InvalidArgumentError, match="max_len"):
        planner.backend(max_len="lots")
    with pytest.raises(planner.UnknownDeviceError):
        planner.backend(max_len="32k", device="abacus")


@pytest.mark.parametrize("dynamo_path, model_path", [
    ("L['self'].layers[0].self_attn", "layers[0].self_attn"),
    ("L['args'][0].model.layers[1].self_attn", "model.layers[1].self_attn"),
    ("L['self']._modules['layers']._modules['2']", "layers.2"),
    ("G['model'].blocks[3]", "blocks[3]"),
    ("layers.0.attn", "layers.0.attn"),
])
def test_module_paths_are_named_from_the_model_root(dynamo_path, model_path):
    assert compile_backend.module_path_from_root(dynamo_path) == model_path


def test_cache_key_fingerprint_covers_the_files_of_the_ops_in_the_graph():
    import hashlib

    import backends.flash.op as flash_op

    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    call = graph.call_function(torch.ops.attention_planner.flash_attention.default,
                               (q, k, v, None, None, True, -1, 0, 0.125, "auto"))
    graph.output(graph.call_function(operator.getitem, (call, 0)))
    with_op = torch.fx.GraphModule(nn.Module(), graph)
    assert compile_backend.planner_ops(with_op) == Counter({FORWARD_OP: 1})

    expected = hashlib.sha256(Path(flash_op.__file__).read_bytes()).hexdigest()[:16]
    assert compile_backend.ops_fingerprint(with_op) == f"attention_planner-ops-{expected}"
    plain = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with compile_backend._cache_key_tagged(plain):  # graphs without our ops keep Inductor's plain keys
        assert torch.compiler.config.cache_key_tag == ""
    with compile_backend._cache_key_tagged(with_op):
        assert torch.compiler.config.cache_key_tag == f"attention_planner-ops-{expected}"


# ---------------------------------------------------------------------------------------------------------------------
# Compiled


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_demo_model_inference_and_training_match_eager_with_our_backward(device, no_inductor_cache, kernel_calls,
                                                                         caplog):
    torch.manual_seed(1)
    model = tiny_demo().to(device)
    reference = copy.deepcopy(model)
    backend = planner.backend(max_len="32k", device=PLAN_TARGET[device])
    compiled = torch.compile(model, backend=backend, dynamic=True)  # planned for max_len, not the example's length
    input_ids = torch.randint(0, 61, (2, 13), device=device)
    caplog.set_level(logging.INFO, logger="planner")

    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids), reference(input_ids), **TOLERANCE)
    assert kernel_calls["forward"] == 2 and kernel_calls["backward"] == 0

    loss = language_model_loss(compiled(input_ids), input_ids)
    loss.backward()
    reference_loss = language_model_loss(reference(input_ids), input_ids)
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, **TOLERANCE)
    assert_same_gradients(model, reference)
    assert kernel_calls["backward"] == 2  # one per layer: our kernel computed the attention gradients

    inference, training = backend.graphs
    assert inference.frame == training.frame  # grad mode changed: a recompile of the same frame
    assert inference.forward_ops == Counter({FORWARD_OP: 2}) and not inference.backward_ops
    assert training.forward_ops == Counter({FORWARD_OP: 2})
    assert training.backward_ops == Counter({BACKWARD_OP: 2})  # derived from our op's registered autograd
    assert inference.fallback is None and training.fallback is None

    report = planner.last_report()
    assert report.rewritten == ["layers.0.self_attn", "layers.1.self_attn"], report.summary()
    assert len(report.decisions) == 2  # the latest compile of the frame, not both
    assert all(decision.site.sequence_symbols for decision in report.decisions)
    assert all("demo_model.py" in decision.site.source for decision in report.decisions)
    if device == "cuda":
        assert {decision.choice.implementation for decision in report.decisions} == {"triton"}
    assert "2 of 2 attention sites rewritten" in report.summary()
    assert json.loads(report.to_json())["sites"][0]["rewritten"] is True

    lines = [record.getMessage() for record in caplog.records if record.name == "planner"]
    assert len(lines) == 4, lines  # one per rewritten site, for each of the two compiles
    assert sum("layers.0.self_attn -> flash" in line for line in lines) == 2


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_transformers_llama_training_step_matches_eager(device, kernel_calls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    reference = copy.deepcopy(model)
    # Under torch.compile transformers builds its causal mask as a tensor; the test forces flash, which keeps the mask
    # tensor where its structure is not proved, so that the backend's path is tested whatever the planner prefers.
    backend = planner.backend(max_len="32k", device=PLAN_TARGET[device], variant="flash")
    input_ids = torch.randint(0, 67, (2, 11), device=device)

    compiled = torch.compile(model, backend=backend, dynamic=True)
    output = compiled(input_ids=input_ids, labels=input_ids, use_cache=False)
    expected = reference(input_ids=input_ids, labels=input_ids, use_cache=False)
    torch.testing.assert_close(output.logits, expected.logits, **TOLERANCE)
    torch.testing.assert_close(output.loss, expected.loss, **TOLERANCE)
    output.loss.backward()
    expected.loss.backward()
    assert_same_gradients(model, reference)

    report = backend.report
    assert report.rewritten == ["model.layers.0.self_attn", "model.layers.1.self_attn"], report.summary()
    assert kernel_calls["backward"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_graph_break_each_subgraph_planned_and_reports_merged(device, no_inductor_cache):
    torch.manual_seed(3)
    model = BrokenTwoBlocks().to(device).eval()
    backend = planner.backend(max_len="32k", device=PLAN_TARGET[device])
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 9, 24, device=device)
    torch._dynamo.mark_dynamic(x, 1)  # the sequence length is a symbol, planned for max_len
    with torch.no_grad(), torch._inductor.config.patch(fallback_random=True):  # dropout draws as eager does
        torch.manual_seed(7)
        output = compiled(x)
        torch.manual_seed(7)
        torch.testing.assert_close(output, model(x), **TOLERANCE)

    first, second = backend.graphs
    assert first.frame != second.frame
    assert first.forward_ops == Counter({FORWARD_OP: 1})
    assert not second.forward_ops  # the dropout site stays scaled_dot_product_attention

    report = backend.report
    assert [decision.site.name for decision in report.decisions] == ["first", "second"]
    assert report.rewritten == ["first"], report.summary()
    kept = report.decisions[1]
    assert kept.choice is None or kept.choice.variant == "dense"
    flash = next(candidate for candidate in kept.candidates if candidate.variant == "flash")
    assert not flash.feasible and "dropout_p=0.25" in flash.reason, flash.reason  # why it stays as it was
    assert "the tiled kernels have no dropout" in report.summary()
    assert "1 of 2 attention sites rewritten" in report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_three_sequence_lengths_compile_at_most_twice_and_plan_for_max_len(device, no_inductor_cache):
    torch.manual_seed(4)
    model = CausalSelfAttention().to(device).eval()
    backend = planner.backend(max_len="64k", device=PLAN_TARGET[device])
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for length in (13, 17, 23):
            x = torch.randn(2, length, 24, device=device)
            torch.testing.assert_close(compiled(x), model(x), **TOLERANCE)

    assert len(backend.graphs) <= 2
    dynamic = backend.graphs[-1].report.decisions[0]
    assert isinstance(dynamic.site.q_len, sympy.Symbol), dynamic.site.q_len  # the symbol reached the planner
    assert dynamic.rewritten, backend.report.summary()
    flash = next(candidate for candidate in dynamic.candidates if candidate.variant == "flash")
    assert SEQUENCE_LENGTH in flash.time_expr.free_symbols  # costed as a function of the length, at max_len
    assert backend.report.plan.max_len == 64 * 1024
    assert backend.graphs[-1].forward_ops == Counter({FORWARD_OP: 1})


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("failing", ["passes", "inductor"])
def test_a_failure_leaves_the_graph_to_plain_inductor(failing, device, monkeypatch, caplog, no_inductor_cache):
    if failing == "passes":
        def broken(*args, **kwargs):
            raise RuntimeError("matcher exploded")

        monkeypatch.setattr(pipeline, "run_passes", broken)
        expected_reason = "the planner's passes failed on this graph (RuntimeError: matcher exploded)"
    else:
        import torch._inductor.compile_fx as inductor_compile_fx

        original = inductor_compile_fx.compile_fx_inner

        def fails_on_our_ops(graph_module, example_inputs, **kwargs):
            if compile_backend.planner_ops(graph_module):
                raise RuntimeError("lowering exploded")
            return original(graph_module, example_inputs, **kwargs)

        monkeypatch.setattr(inductor_compile_fx, "compile_fx_inner", fails_on_our_ops)
        expected_reason = "Inductor failed on the rewritten graph (RuntimeError: lowering exploded)"
    torch.manual_seed(5)
    model = CausalSelfAttention().to(device).eval()
    backend = planner.backend(max_len="32k", device=PLAN_TARGET[device])
    x = torch.randn(2, 7, 24, device=device)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend, dynamic=True)(x), model(x), **TOLERANCE)

    (record,) = backend.graphs
    assert record.fallback == expected_reason
    assert not record.forward_ops
    report = backend.report
    assert any(expected_reason in note for note in report.notes)
    assert report.rewritten == []
    if failing == "inductor":  # the plan was made: the site is reported, left as it is, with the reason
        (decision,) = report.decisions
        assert decision.reason == f"left as it is: {expected_reason}"
    warnings = [r for r in caplog.records if r.name == "planner" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "plain Inductor" in warnings[0].getMessage()


@pytest.mark.slow
@pytest.mark.gpu
def test_bfloat16_model_on_gpu_runs_the_triton_kernels(kernel_calls):
    torch.manual_seed(6)
    model = tiny_demo().cuda()
    reference = copy.deepcopy(model)
    model = model.to(torch.bfloat16)
    # bfloat16 on an H200 may rightly keep the fused SDPA original; flash is forced to exercise the Triton kernels.
    backend = planner.backend(max_len="128k", device="cuda", variant="flash")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    input_ids = torch.randint(0, 61, (2, 77), device="cuda")
    logits = compiled(input_ids)
    language_model_loss(logits.float(), input_ids).backward()
    with torch.no_grad():
        expected = reference(input_ids)
    torch.testing.assert_close(logits.float(), expected, atol=3e-2, rtol=3e-2)
    assert kernel_calls["forward"] == 2 and kernel_calls["backward"] == 2
    report = backend.report
    assert report.rewritten == ["layers.0.self_attn", "layers.1.self_attn"], report.summary()
    assert {decision.choice.implementation for decision in report.decisions} == {"triton"}


CACHE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F
    from torch import nn
    import planner
    from torch._dynamo.utils import counters

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(1)

    device, target = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = Attention().to(device)
    compiled = torch.compile(model, backend="attention_planner", options={"max_len": "32k", "device": target},
                             dynamic=True)
    x = torch.randn(2, 11, 16, device=device)
    with torch.no_grad():
        error = (compiled(x) - model(x)).abs().max().item()
    compiled(x).square().sum().backward()  # a training graph too: forward and backward, our backward op inside
    gradient = model.qkv.weight.grad.clone()
    model.zero_grad()
    model(x).square().sum().backward()
    error = max(error, (gradient - model.qkv.weight.grad).abs().max().item())
    print(json.dumps({"inductor": dict(counters["inductor"]), "aot_autograd": dict(counters["aot_autograd"]),
                      "rewritten": planner.last_report().rewritten, "error": error}))
""")


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fx_graph_cache_is_reused_by_a_second_process(device, tmp_path):
    script = tmp_path / "compile_once.py"
    script.write_text(CACHE_SCRIPT)
    environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor_cache"),
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, str(script), device, PLAN_TARGET[device]], env=environment,
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "attention-planner" not in result.stderr  # quiet by default: no log lines without logging configured
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))

    first, second = runs
    for run in runs:
        assert run["rewritten"] == ["<top>"] and run["error"] < 1e-4
    assert first["inductor"].get("fxgraph_cache_miss", 0) == 3  # inference, training forward, training backward
    assert second["inductor"].get("fxgraph_cache_hit", 0) == 3, second
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second
    assert second["aot_autograd"].get("autograd_cache_hit", 0) == 2, second  # the two aot_autograd compiles
