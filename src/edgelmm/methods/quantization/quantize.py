"""`quantize(model, adapter, config, calibration)`: the one verb.

The language model's decoder layers are found through the adapter, never by class, so every
family quantizes the same way; the vision tower, projector, embeddings and lm_head keep their
16-bit weights unless `config.extra` names them. Every target is checked before anything is
changed (a group size that does not divide a layer's width names that layer), then AWQ (if
asked) adjusts the float weights in place, and each target linear is replaced by a
`QuantLinear` holding only its packed integers, so the float weights are freed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgelmm.config import ModelSpec
from edgelmm.errors import EdgelmmError
from edgelmm.methods.quantization.calibration import CalibrationBatch, calibration_data, calibration_texts
from edgelmm.methods.quantization.checkpoint import save_quantized
from edgelmm.methods.quantization.config import AWQConfig, CalibrationConfig, QuantConfig
from edgelmm.methods.quantization.linear import QuantLinear, weight_bytes
from edgelmm.models.base import ModelAdapter
from edgelmm.models.loader import load_model, resolve_checkpoint
from edgelmm.registry import CALIBRATION_SOURCES


def _linears(root: nn.Module | None) -> list[nn.Linear]:
    return [m for m in root.modules() if isinstance(m, nn.Linear)] if root is not None else []


def target_linears(model: nn.Module, adapter: ModelAdapter, config: QuantConfig) -> dict[str, nn.Linear]:
    """The linear layers to quantize, by their module name in `model`, in forward order.

    Raises on a layer whose width the group size does not divide, naming it, before any
    weight has been touched.
    """
    chosen = [lin for layer in adapter.language_layers() for lin in _linears(layer)]
    if "lm_head" in config.extra:
        head = adapter.lm_head()
        if head.weight is adapter.embed_tokens().weight:
            raise EdgelmmError(
                "lm_head shares its weight with the input embeddings (tied), which stay 16-bit",
                "leave lm_head out of the modules to quantize for this model",
            )
        chosen.append(head)
    if "vision_tower" in config.extra:
        chosen += _linears(adapter.vision_tower())
    if "projector" in config.extra:
        chosen += _linears(adapter.projector())
    names = {id(module): name for name, module in model.named_modules()}
    targets: dict[str, nn.Linear] = {}
    for linear in chosen:
        name = names[id(linear)]
        if linear.in_features % config.group_size:
            raise EdgelmmError(
                f"group size {config.group_size} does not divide layer '{name}' ({linear.in_features} input channels)",
                "choose a group size that divides every quantized layer's input width (e.g. 32, 64 or 128)",
            )
        targets.setdefault(name, linear)
    if not targets:
        raise EdgelmmError(f"no linear layers to quantize in {type(model).__name__}", "is this a supported model family?")
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def quantize(
    model: nn.Module,
    adapter: ModelAdapter,
    config: QuantConfig,
    calibration: CalibrationConfig | list[CalibrationBatch] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize `model` in place with `config` (RTNConfig or AWQConfig) and return it.

    `calibration` (AWQ only) is a CalibrationConfig, read with the adapter's tokenizer, or
    batches made earlier; AWQ needs one (the config's own `calibration` when not given here).
    """
    targets = target_linears(model, adapter, config)
    if isinstance(config, AWQConfig):
        from edgelmm.methods.quantization.awq import awq_search

        calibration = calibration if calibration is not None else config.calibration
        if calibration is None:
            raise EdgelmmError(
                "AWQ needs calibration data",
                "give awq(..., calibration='texts.jsonl') (a .txt/.jsonl file, a datasets folder or hf:NAME)",
            )
        if not isinstance(calibration, list):
            model.edgelmm_calibration = calibration  # recorded in saved checkpoints
            calibration = calibration_data(adapter, calibration)
        awq_search(model, adapter, config, calibration, set(targets.values()), progress)
    elif calibration is not None:
        raise EdgelmmError(f"{config.name} takes no calibration data", "use method awq, or drop the calibration source")
    bar = tqdm(targets.items(), desc=f"pack {config.describe()}", unit="linear", disable=not progress, file=sys.stderr)
    for name, linear in bar:
        replace_module(model, name, QuantLinear.from_linear(linear, config.bits, config.group_size, config.symmetric))
    model.edgelmm_quantization = config  # what produced it, for checkpoints and reports
    return model


def apply_config(model: nn.Module, adapter: ModelAdapter, config: QuantConfig) -> nn.Module:
    """The runner of the quantization methods (a method spec applied at load): no progress bars."""
    return quantize(model, adapter, config, progress=False)


def quantize_checkpoint(
    model: str,
    out: str | Path,
    config: QuantConfig,
    calibration: CalibrationConfig | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, object]:
    """Load a float model (bundled name or checkpoint directory), quantize it, save it to `out`.

    Everything that can be refused is refused before the model loads: an existing `out`
    (unless `overwrite`), a checkpoint that is already quantized, a missing or empty
    calibration source; a group size that does not fit a layer is found before any weight changes.
    Returns a summary: weight bytes before and after, seconds spent quantizing, layers quantized.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise EdgelmmError(f"{out} already exists", "choose another output directory or pass --overwrite")
    checkpoint = resolve_checkpoint(model)
    if checkpoint.quantization is not None:
        raise EdgelmmError(f"{model} is already quantized", "quantize the float checkpoint it was made from")
    if calibration is not None and not isinstance(config, AWQConfig):
        raise EdgelmmError(f"{config.name} takes no calibration data", "use --method awq, or drop --calibration")
    calibration = calibration if calibration is not None else getattr(config, "calibration", None)
    if isinstance(config, AWQConfig) and calibration is None:
        raise EdgelmmError("AWQ needs calibration data", "pass --calibration FILE (a .txt/.jsonl file, a datasets folder or hf:NAME)")
    if calibration is not None and calibration.source not in CALIBRATION_SOURCES and next(calibration_texts(calibration), None) is None:
        raise EdgelmmError(f"the calibration set is empty: {calibration.source} yields no text", "give a source with text in it")
    loaded, processor, adapter, _ = load_model(ModelSpec(path=model, device=device, dtype=dtype), checkpoint)
    before = weight_bytes(loaded)
    start = time.perf_counter()
    quantize(loaded, adapter, config, calibration, progress)
    seconds = time.perf_counter() - start
    layers = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    save_quantized(loaded, processor, adapter, out, overwrite)
    return {"out": str(out), "method": config.describe(), "weight_bytes_before": before,
            "weight_bytes_after": weight_bytes(loaded), "quantize_s": seconds, "quantized_layers": layers}
