"""edgelmm — Edge LMM Optimizer.

Run, optimize and measure multimodal models on memory-limited edge devices. The user-facing
API is small: load a backend, give it requests, read results.

    >>> from edgelmm import load, Request, SamplingParams
    >>> backend = load("shapes-vlm-s")
    >>> backend.generate([Request.chat("What color is the circle?", images=[img])], SamplingParams())
"""

from __future__ import annotations

from edgelmm.backends.base import Backend, Counts, Result, Timings, TokenEvent, TokenScore
from edgelmm.backends.registry import load
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.registry import load_plugin
from edgelmm.request import Request

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Counts",
    "EdgelmmError",
    "ModelSpec",
    "Request",
    "Result",
    "SamplingParams",
    "Timings",
    "TokenEvent",
    "TokenScore",
    "load",
    "load_plugin",
]
