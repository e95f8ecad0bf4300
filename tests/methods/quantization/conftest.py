"""Fresh tiny models for quantization tests: quantization changes a model in place, so none is shared."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import get_adapter
from tests.tiny_models import make_tiny


@pytest.fixture
def fresh() -> Callable[..., tuple[torch.nn.Module, object, ModelAdapter]]:
    """fresh(family) -> (model, processor, adapter), a new model every call."""

    def build(family: str, seed: int = 0) -> tuple[torch.nn.Module, object, ModelAdapter]:
        model, processor = make_tiny(family, seed)
        return model, processor, get_adapter(model, processor)

    return build


def outlier_channels(adapter: ModelAdapter, factor: float = 30.0) -> None:
    """Make a few hidden channels carry large activations, as trained LLMs have and random
    tiny models lack: the case AWQ exists for."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter.language_layers():
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(norm.weight.numel(), generator=generator)[:4]] *= factor
