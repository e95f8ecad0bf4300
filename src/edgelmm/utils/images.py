"""Pictures by their content: one hash for the prompt caches and the processor's memo."""

from __future__ import annotations

import hashlib
from typing import Any


def image_hash(image: Any) -> str:
    """A picture's content hash (its pixels, size and mode)."""
    digest = hashlib.sha256(f"{getattr(image, 'mode', '')}:{getattr(image, 'size', '')}".encode())
    digest.update(image.tobytes() if hasattr(image, "tobytes") else bytes(str(image), "utf8"))
    return digest.hexdigest()[:32]
