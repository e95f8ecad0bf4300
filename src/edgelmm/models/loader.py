"""Resolve a model name or directory and load it with transformers, offline only."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch

from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import adapter_class


def resolve_model_path(name_or_path: str) -> Path:
    """A bundled demo name or a local directory holding config.json; nothing is downloaded."""
    from edgelmm.demo import DEMO_MODELS, checkpoint_path

    if name_or_path in DEMO_MODELS:
        return checkpoint_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise EdgelmmError(
            f"model not found: '{name_or_path}' is neither a bundled model nor a directory",
            f"bundled models: {', '.join(DEMO_MODELS)}; or give a local Hugging Face checkpoint directory",
        )
    if not (path / "config.json").is_file():
        raise EdgelmmError(
            f"no config.json in {path}",
            "point to a Hugging Face checkpoint directory (the one holding config.json)",
        )
    return path


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise EdgelmmError(f"{path / 'config.json'}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise EdgelmmError(f"{path / 'config.json'} has no 'model_type'", "is this a transformers checkpoint?")
    return config


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgelmmError("device 'cuda' asked for, but torch sees no CUDA GPU", "use --device cpu, or install a CUDA build of torch")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


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
    """The tokenizer of a causal LM, or the image-only processor of a VLM, from local files."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    if not multimodal:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:  # not a transformers-native family (remote code): let transformers resolve it
        return AutoProcessor.from_pretrained(path, **kwargs)
    return images_only(processor_class_from_name(name)).from_pretrained(path, local_files_only=True)


def load_model(spec: ModelSpec) -> tuple[torch.nn.Module, Any, ModelAdapter, torch.device]:
    """Load weights and processor, move to the device, and wrap in the family's adapter."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    path = resolve_model_path(spec.path)
    config = read_config(path)
    if config.get("quantization_config", {}).get("quant_method") in ("compressed-tensors", "awq"):
        # W4A16 checkpoints run on edgelmm's own packed kernels (either layout it writes).
        from edgelmm.methods.quantization import load_quantized_model

        return load_quantized_model(spec)
    cls = adapter_class(config["model_type"])
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    auto_model = AutoModelForImageTextToText if cls.multimodal else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "local_files_only": True}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = auto_model.from_pretrained(path, **kwargs)
        processor = load_processor(path, config["model_type"], cls.multimodal, spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgelmmError(f"cannot load {path}: {first}", "check that the checkpoint is complete") from None
    model.to(device).eval()
    return model, processor, cls(model, processor), device
