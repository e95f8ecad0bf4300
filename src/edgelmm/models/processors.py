"""Processors from local files: the tokenizer of a causal LM, the image-only processor of a VLM."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

from edgelmm.utils.images import image_hash

MEMO_IMAGES = 8  # processed picture sets a processor keeps (a chat's next turns send the same picture)
_memos: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _images_key(images: Any, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a processed picture set depends on: the pictures' content and the processing settings
    (None for inputs that are not PIL images, which are processed every time)."""
    flat = images if isinstance(images, (list, tuple)) else [images]
    if not flat or not all(hasattr(i, "tobytes") and hasattr(i, "mode") for i in flat):
        return None
    return tuple(image_hash(i) for i in flat) + (repr(sorted(kwargs.items())),)


def _remembered_images(self: Any, parent: Any, images: Any, kwargs: dict[str, Any]) -> Any:
    """`parent(images, **kwargs)` (the family's own `_process_images`), remembered for the last
    MEMO_IMAGES picture sets: a chat's second turn about a picture skips resizing and
    normalising it again."""
    key = _images_key(images, kwargs)
    if key is None:
        return parent(images, **kwargs)
    memo = _memos.setdefault(self, OrderedDict())
    if key in memo:
        memo.move_to_end(key)
    else:
        memo[key] = parent(images, **kwargs)
        while len(memo) > MEMO_IMAGES:
            memo.popitem(last=False)
    processed, replacements = memo[key]
    return processed, list(replacements)  # the caller merges `processed` into a new dict


@cache
def images_only(processor_cls: type) -> type:
    """The family's own processor class, without its video processor, remembering the pictures
    it processed last.

    transformers 5 gives every Qwen-VL and InternVL processor a mandatory video processor, and
    video processors need torchvision, which CPU-only and Jetson installs often lack (PyPI's
    torchvision wheels do not even load against torch's CPU build). edgelmm feeds images only,
    so it drops that one part: tokenizer, image processor, chat template and the image-token
    expansion stay the family's own. Where the family processes pictures through transformers'
    shared `_process_images`, its result is remembered by the pictures' content (the same hash
    the prompt caches use) for the last MEMO_IMAGES picture sets. Cached, so that a family has
    one such class.
    """
    attributes = [name for name in processor_cls.get_attributes() if name != "video_processor"]
    made = type(processor_cls.__name__, (processor_cls,), {"get_attributes": classmethod(lambda cls: attributes)})
    if getattr(processor_cls, "_process_images", None) is not None:
        def process_images(self: Any, images: Any, **kwargs: Any) -> Any:
            return _remembered_images(self, super(made, self)._process_images, images, kwargs)

        made._process_images = process_images  # type: ignore[attr-defined]
    return made


def load_processor(path: Path, model_type: str, multimodal: bool, trust_remote_code: bool = False) -> Any:
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    if not multimodal:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:  # not a transformers-native family (remote code, a registered one): transformers resolves it
        return AutoProcessor.from_pretrained(path, **kwargs)
    return images_only(processor_class_from_name(name)).from_pretrained(path, local_files_only=True)
