"""Test configuration: Triton runs through its interpreter when no GPU is present, GPU tests skip without CUDA."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported, so every kernel test runs on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh but reproducible random inputs per test (seed from the test name)."""
    import hashlib

    name = os.environ.get("PYTEST_CURRENT_TEST", "")
    torch.manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
    yield
