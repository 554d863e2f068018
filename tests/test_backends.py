"""The `backends` package: its index (every public name listed by dir(), so editors complete it before first use,
and resolved lazily to the function or class of its variant's module) and the input checks its ops share
(backends/common.py)."""
import importlib

import pytest
import torch

import backends
from planner.errors import BackendError

DECODING = {"decode_attention": "backends.decode.op", "DecodeOptions": "backends.decode.op",
            "append_to_cache": "backends.decode.cache", "new_cache": "backends.decode.cache"}


def test_dir_lists_every_public_name():
    listed = dir(backends)
    for name in list(backends.__all__) + list(DECODING):
        assert name in listed, name
    assert set(DECODING) <= set(backends.__all__)
    assert "__getattr__" in listed and "__dir__" in listed  # the module's own names stay listed


@pytest.mark.parametrize("name", sorted(DECODING))
def test_decoding_names_resolve_to_their_module(name):
    assert getattr(backends, name) is getattr(importlib.import_module(DECODING[name]), name)


def test_every_public_name_resolves():
    for name in backends.__all__:
        assert callable(getattr(backends, name)), name


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        backends.nothing_here


@pytest.mark.parametrize("function", ["linear_attention", "hyper_attention"])
def test_ops_refuse_bad_q_k_v_with_the_shared_messages(function):
    attend = getattr(backends, function)
    good = torch.randn(1, 2, 8, 4)
    with pytest.raises(BackendError,
                       match=r"k must have 4 dims \(batch, heads, sequence, head_dim\); got shape \(2, 8, 4\)"):
        attend(good, good[0], good)
    with pytest.raises(BackendError, match="v has dtype torch.int64; accepted: float16, bfloat16, float32, float64"):
        attend(good, good, good.long())
    with pytest.raises(BackendError,
                       match="q, k, v must share a dtype; got torch.float32, torch.float64, torch.float32"):
        attend(good, good.double(), good)
