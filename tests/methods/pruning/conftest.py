"""Tiny models of every family, built once per session; a test prunes one only inside `pruned`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from edgelmm.methods.pruning import Pruner, prune, unprune
from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import get_adapter
from tests.tiny_models import make_tiny

Tiny = tuple[torch.nn.Module, object, ModelAdapter]


@pytest.fixture(scope="session")
def tiny_cache() -> dict[str, Tiny]:
    return {}


@pytest.fixture
def tiny(tiny_cache):
    """tiny(family) -> (model, processor, adapter), shared: tests leave the model as they found it."""

    def get(family: str) -> Tiny:
        if family not in tiny_cache:
            model, processor = make_tiny(family)
            tiny_cache[family] = (model, processor, get_adapter(model, processor))
        return tiny_cache[family]

    return get


@contextmanager
def pruned(model: torch.nn.Module, adapter: ModelAdapter, pruner: Pruner) -> Iterator[torch.nn.Module]:
    prune(model, adapter, pruner)
    try:
        yield model
    finally:
        unprune(model)
