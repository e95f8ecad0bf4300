"""Tiny models of every family, built once per session and shared read-only by the tests here."""

from __future__ import annotations

import pytest
import torch

from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import get_adapter
from tests.tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny_cache() -> dict[str, tuple[torch.nn.Module, object, ModelAdapter]]:
    return {}


@pytest.fixture
def tiny(tiny_cache):
    """tiny(family) -> (model, processor, adapter); tests must not change the model."""

    def get(family: str) -> tuple[torch.nn.Module, object, ModelAdapter]:
        if family not in tiny_cache:
            model, processor = make_tiny(family)
            tiny_cache[family] = (model, processor, get_adapter(model, processor))
        return tiny_cache[family]

    return get
