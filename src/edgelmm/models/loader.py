"""Resolve a model name or directory once (its config read once), and load a float model offline.

`resolve_checkpoint` answers everything later steps ask of a checkpoint — its directory, its
config.json, the family's adapter, whether it is quantized — so a load reads config.json once.
Quantized checkpoints are loaded by `edgelmm.methods.quantization.load_quantized_model`; the
backend that loads a model makes that choice from `Checkpoint.quantization`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.models.base import ModelAdapter
from edgelmm.models.registry import adapter_class
from edgelmm.utils.device import resolve_device, resolve_dtype

QUANTIZED_FORMATS = ("compressed-tensors", "awq")  # quant_method values edgelmm's own kernels run


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]  # config.json, as read
    adapter_cls: type[ModelAdapter]

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The quantization_config of a W4A16/W8A16 checkpoint edgelmm runs; None for a float one."""
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) and qc.get("quant_method") in QUANTIZED_FORMATS else None


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A bundled demo name or a local directory holding config.json; nothing is downloaded."""
    from edgelmm.demo import DEMO_MODELS, checkpoint_path

    if str(name_or_path) in DEMO_MODELS:
        return checkpoint_path(str(name_or_path))
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
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise EdgelmmError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})", "is this a transformers checkpoint?") from None
    except json.JSONDecodeError as exc:
        raise EdgelmmError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise EdgelmmError(f"{file} has no 'model_type'", "is this a transformers checkpoint?")
    return config


def resolve_checkpoint(name_or_path: str | Path | Checkpoint) -> Checkpoint:
    if isinstance(name_or_path, Checkpoint):
        return name_or_path
    path = resolve_model_path(name_or_path)
    config = read_config(path)
    return Checkpoint(path, config, adapter_class(config["model_type"]))


def _unreadable_weights(path: Path) -> Path | None:
    """The first safetensors file of a checkpoint whose header does not read, if any."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (OSError, SafetensorError):
            return file
    return None


def load_model(spec: ModelSpec, checkpoint: Checkpoint | None = None) -> tuple[torch.nn.Module, Any, ModelAdapter, torch.device]:
    """Load a float checkpoint's weights and processor onto the spec's device, wrapped in its adapter
    (`checkpoint`: spec.path already resolved)."""
    checkpoint = checkpoint or resolve_checkpoint(spec.path)
    cls = checkpoint.adapter_cls
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    try:
        model = cls.load_model(checkpoint.path, dtype, spec.trust_remote_code, spec.attn_implementation)
        processor = cls.load_processor(checkpoint.path, checkpoint.model_type, spec.trust_remote_code)
    except (OSError, ValueError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = _unreadable_weights(checkpoint.path) or checkpoint.path
        raise EdgelmmError(f"cannot load {where}: {first}", "check that the checkpoint is complete") from None
    model.to(device).eval()
    return model, processor, cls(model, processor), device
