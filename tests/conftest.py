"""Test configuration: Triton runs through its interpreter when no GPU is present, GPU tests skip without CUDA, and
tests marked `long` (each a slower duplicate of a faster check) run only with --long."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported, so every kernel test runs on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long (the full suite)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_long = pytest.mark.skip(reason="long test: runs with --long")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "long" in item.keywords and not config.getoption("--long"):
            item.add_marker(skip_long)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh but reproducible random inputs per test (seed from the test name)."""
    import hashlib

    name = os.environ.get("PYTEST_CURRENT_TEST", "")
    torch.manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
    yield
