"""How prompt caches key a prompt: token ids, and images by their content (no torch needed here).

Shared by the torch backend's prefix cache and the llamacpp backend's prompt-state cache, so that
both reuse a prompt on the same terms: the same text and the same pictures.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from edgelmm.utils.images import image_hash


def prompt_keys(ids: Sequence[int], image_mask: Sequence[bool], images: Sequence[Any]) -> list[Hashable]:
    """A prompt's keys: token ids, and (image hash, index within the image) at image tokens. An
    image's tokens are one run of image positions; runs and images are matched in order."""
    hashes = [image_hash(i) for i in images]
    keys: list[Hashable] = []
    run, within = -1, 0
    for position, (token, is_image) in enumerate(zip(ids, image_mask)):
        if not is_image:
            keys.append(int(token))
            continue
        if position == 0 or not image_mask[position - 1]:
            run, within = run + 1, 0
        name = hashes[run] if run < len(hashes) else f"unmatched-{run}"
        keys.append((name, within))
        within += 1
    return keys
