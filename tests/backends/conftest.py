"""The torch backend on a tiny random-weight model of each of three families (M-RoPE included),
loaded once per test module."""

import pytest

from edgelmm import ModelSpec, load
from tests.tiny_models import save_tiny


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2"])
def backend(request, tmp_path_factory):
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")
    engine = load(ModelSpec(path=str(path), device="cpu"))
    yield engine
    engine.close()
