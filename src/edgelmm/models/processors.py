"""Processors from local files: the tokenizer of a causal LM, the image-only processor of a VLM."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any


@cache
def images_only(processor_cls: type) -> type:
    """The family's own processor class, without its video processor.

    transformers 5 gives every Qwen-VL and InternVL processor a mandatory video processor, and
    video processors need torchvision, which CPU-only and Jetson installs often lack (PyPI's
    torchvision wheels do not even load against torch's CPU build). edgelmm feeds images only,
    so it drops that one part: tokenizer, image processor, chat template and the image-token
    expansion stay the family's own. Cached, so that a family has one such class.
    """
    attributes = [name for name in processor_cls.get_attributes() if name != "video_processor"]
    return type(processor_cls.__name__, (processor_cls,), {"get_attributes": classmethod(lambda cls: attributes)})


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
