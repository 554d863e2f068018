"""backends/registry.py and the variants' rule modules: the registry is the list of variants, and what the planner,
the device specs, the calibration probes and the fidelity check know of a variant comes from its rule."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch

import backends
import planner  # noqa: F401
from backends import registry
from backends.hardware import FAMILY_EFFICIENCY
from backends.variant import EXACT, Fidelity, KernelProbe, Offer, Variant
from planner import calibration
from planner.fidelity import candidate_label, make_candidate, unmeasured_reason


def test_every_variant_is_built_by_its_folder_rule():
    folders = sorted(path.parent.name for path in (Path(backends.__file__).parent).glob("*/rule.py"))
    built = {}
    for folder in folders:
        module = importlib.import_module(f"backends.{folder}.rule")
        built.update({value.name: folder for value in vars(module).values() if isinstance(value, Variant)})
    assert set(built) == set(registry.VARIANTS)
    assert list(registry.VARIANTS)[:3] == ["dense", "sdpa_cudnn", "flash"]  # the original first, then exact ones


def test_device_efficiencies_and_probes_come_from_the_rules():
    for family in ("hopper", "ampere", "cpu"):
        for variant in registry.VARIANTS.values():
            for work, value in variant.efficiency.get(family, {}).items():
                assert FAMILY_EFFICIENCY[family][work] == value
    assert FAMILY_EFFICIENCY["ada"] == FAMILY_EFFICIENCY["ampere"]
    works = {probe.work for probe in calibration.default_probes(torch.device("cpu"))}
    assert works == {probe.work for variant in registry.VARIANTS.values() for probe in variant.probes
                     if not probe.gpu_only}


def test_a_registered_variant_brings_its_efficiency_probe_and_fidelity():
    def offer(site, context):
        return Offer("reference", "approximate")

    probe = KernelProbe("toy", "backends.dense.cost", "reference", lambda q, k, v: (lambda: q), gpu_only=False)
    toy = Variant("toy", "toy", "backends.dense.cost", offer, efficiency={"cpu": {"toy": 0.2}}, probes=(probe,),
                  fidelity=Fidelity(shown=("width",), defaults=(("width", 3),),
                                    unmeasured=lambda candidate, length: "never" if length < 10 else None))
    registry.register(toy)
    try:
        assert registry.default_efficiency("cpu")["toy"] == 0.2
        assert probe in registry.probes(on_gpu=False)
        candidate = make_candidate("toy")
        assert candidate.parameter("width") == 3 and candidate_label(candidate) == "toy(width=3)"
        assert unmeasured_reason(candidate, 5) == "never" and unmeasured_reason(candidate, 50) is None
    finally:
        registry.VARIANTS.pop("toy")
    assert dataclasses.replace(toy, fidelity=EXACT).fidelity.unmeasured is None
