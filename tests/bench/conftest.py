"""A tiny random-weight LLaVA checkpoint, built once per session: the runner tests use a real
model of a real architecture class without downloading or training anything."""

from pathlib import Path

import pytest

from tests.tiny_models import save_tiny


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return save_tiny("llava", tmp_path_factory.mktemp("models") / "tiny-llava")
