"""One tiny random-weight LLaVA served on 127.0.0.1 for the whole module: real FastAPI app, real
uvicorn, real HTTP. Tests talk to it with the official `openai` client and with raw httpx."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from edgelmm import ModelSpec  # noqa: E402
from edgelmm.serve import BackgroundServer, Limits, build  # noqa: E402
from tests.tiny_models import make_image, save_tiny  # noqa: E402

MODEL = "tiny-llava"
LIMITS = Limits(max_body_bytes=2 * 2**20, max_image_bytes=2**20, max_image_pixels=512 * 512, max_images=2,
                max_tokens=64, max_batch_size=8)


def data_url(image=None, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    (image or make_image()).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory) -> Path:
    return save_tiny("llava", tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def served(tiny_llava_path) -> Iterator[tuple[BackgroundServer, object]]:
    """(server, engine) with no API key."""
    app, engine = build(ModelSpec(path=str(tiny_llava_path), device="cpu"), limits=LIMITS, served_name=MODEL)
    with BackgroundServer(app) as server:
        yield server, engine
    engine.close()


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0].url


@pytest.fixture(scope="module")
def client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
