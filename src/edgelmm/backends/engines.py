"""What the engine backends share: their options, the CUDA engines' checks, OpenAI-form messages."""

from __future__ import annotations

import base64
import io
from typing import Any

from edgelmm.backends.base import Request
from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.registry import BACKENDS


def engine_options(spec: ModelSpec, known: dict[str, Any], backend: str) -> dict[str, Any]:
    """spec.options over the backend's defaults; an unknown key is an error, not a silent no-op.

    Options may be grouped by backend name (`{openai: {base_url: ...}, llamacpp: {gguf: ...}}`),
    so that one model spec serves a benchmark matrix over several engines: each backend reads its
    own group and skips the others'.
    """
    own = spec.options.get(backend)
    given = own if isinstance(own, dict) else {k: v for k, v in spec.options.items() if k not in BACKENDS}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise EdgelmmError(f"unknown option(s) {', '.join(unknown)} for the {backend} backend",
                           f"known options: {', '.join(sorted(known))}")
    return {**known, **given}


def cuda_engine_profile(spec: ModelSpec, known: dict[str, Any], backend: str, own_options: str) -> Any:
    """Checks shared by the CUDA-only engines (vLLM, LMDeploy), then their hardware profile:
    they cannot take edgelmm's methods and need a GPU; `own_options` names what to use instead."""
    import torch

    from edgelmm.hardware import guess_profile, load_profile

    no_methods(spec, backend, f"use {own_options} or the torch backend")
    if not torch.cuda.is_available():
        raise EdgelmmError(f"the {backend} backend needs a CUDA GPU", "use the torch or llamacpp backend on this machine")
    hardware = engine_options(spec, known, backend)["hardware"]
    return load_profile(hardware) if hardware else guess_profile("cuda")


def no_methods(spec: ModelSpec, backend: str, instead: str) -> None:
    """Engines that run their own model format cannot take edgelmm's methods."""
    if any(m.name != "none" for m in spec.methods):
        raise EdgelmmError(f"the {backend} backend cannot apply edgelmm methods to its model", instead)


def image_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(request: Request) -> list[dict[str, Any]]:
    """A chat request's messages in OpenAI form: each image a data URL where it is in the conversation."""
    assert request.messages is not None
    out = []
    for message in request.messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": image_data_url(p["image"])}} if p["type"] == "image" else p
                for p in content
            ]
        out.append({"role": message["role"], "content": content})
    return out
