"""Quantized checkpoints: compressed-tensors pack-quantized (read by transformers + the
`compressed-tensors` package and by vLLM), AutoAWQ GEMM (read by LMDeploy / TurboMind and by
vLLM's `--quantization awq`), and edgelmm's own loader for both.

compressed-tensors layout, per quantized linear `X` (see `packing`):
    X.weight_packed     int32 [out, in * bits / 32]
    X.weight_scale      model dtype [out, in / group]
    X.weight_zero_point int32 [ceil(out * bits / 32), in / group]   (asymmetric only)
    X.weight_shape      int64 [2]
and config.json `quantization_config` = {quant_method: "compressed-tensors", format:
"pack-quantized", config_groups: {group_0: {targets: ["Linear"], weights: {...}}}, ignore:
[regexes of the 16-bit modules]}. The ignore list is written as `re:.*NAME.*` patterns of the
modules' attribute names (vision_tower, visual, multi_modal_projector, lm_head) so that it matches
both transformers' in-memory names and the checkpoint's (and vLLM's) names of the same modules.

AutoAWQ GEMM layout: X.qweight int32 [in, out / 8], X.qzeros int32 [in / group, out / 8] (both
unsigned, interleaved), X.scales float16 [in / group, out], and quantization_config = {quant_method:
"awq", version: "gemm", bits: 4, group_size, zero_point: true, modules_to_not_convert}.

Every writer goes through `atomic_directory`: an existing output is refused unless `overwrite`,
and a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import edgelmm.methods.quantization.packing as packing
from edgelmm.errors import EdgelmmError
from edgelmm.methods.quantization.linear import QuantLinear
from edgelmm.models.base import ModelAdapter
from edgelmm.models.loader import Checkpoint, resolve_checkpoint
from edgelmm.utils.device import resolve_device, resolve_dtype
from edgelmm.utils.io import atomic_directory, atomic_write_text

CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
AWQ_SUFFIXES = ("qweight", "qzeros", "scales")
SUPPORTED = "compressed-tensors pack-quantized (int4/int8 weights, group strategy) or AutoAWQ GEMM (4-bit)"


# ---------------------------------------------------------------- config.json


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def skipped_modules(model: nn.Module, adapter: ModelAdapter) -> list[str]:
    """Attribute names of the containers whose linears stay 16-bit (vision tower, projector,
    lm_head), for ignore lists that match under any naming of the model's modules.

    Checked both ways: every 16-bit linear is covered, and no quantized one is.
    """
    names = {id(m): name for name, m in model.named_modules()}
    layers = _quant_layers(model)
    quantized = {id(m) for m in layers.values()}
    containers: list[str] = []
    for module in (adapter.vision_tower(), adapter.projector(), adapter.lm_head()):
        if module is None or id(module) in quantized or not any(isinstance(m, nn.Linear) for m in module.modules()):
            continue
        name = names[id(module)]
        if not any(name.startswith(c + ".") for c in containers):  # Qwen-VL's merger sits inside `visual`
            containers.append(name)
    skipped = list(dict.fromkeys(c.rpartition(".")[2] for c in containers))
    patterns = [re.compile(rf".*\b{re.escape(leaf)}\b.*") for leaf in skipped]
    for name, module in model.named_modules():
        covered = any(p.fullmatch(name) for p in patterns)
        if isinstance(module, nn.Linear) and not covered:
            raise EdgelmmError(
                f"linear layer '{name}' is neither quantized nor inside a module kept in 16-bit",
                "quantize the model with edgelmm before saving it",
            )
        if isinstance(module, QuantLinear) and covered:
            raise EdgelmmError(f"quantized layer '{name}' lies inside a module kept in 16-bit ({', '.join(skipped)})")
    return skipped


def ct_quantization_config(layer: QuantLinear, skipped: list[str]) -> dict[str, Any]:
    weights = {
        "num_bits": layer.bits, "type": "int", "symmetric": layer.symmetric, "group_size": layer.group_size,
        "strategy": "group", "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
                        "format": "pack-quantized"},
        },
        "ignore": [f"re:.*{leaf}.*" for leaf in skipped],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        # transformers + compressed-tensors 0.20 build asymmetric layers with unpacked zero points and
        # then refuse the packed ones every other reader expects; `dequantize` (a key transformers'
        # CompressedTensorsConfig reads, and vLLM and compressed-tensors pass over) makes a plain
        # from_pretrained decompress instead. See docs/quantization.md.
        **({} if layer.symmetric else {"dequantize": True}),
    }


def save_quantized(model: nn.Module, processor: Any, adapter: ModelAdapter, out: str | Path, overwrite: bool = False) -> Path:
    """Write a Hugging Face checkpoint in the compressed-tensors pack-quantized format.

    transformers' own `save_pretrained` writes the tensors (so keys get the checkpoint naming
    that every engine expects for the family), with `quantization_config` set on the config for
    the duration of the save only.
    """
    layers = _quant_layers(model)
    if not layers:
        raise EdgelmmError("the model has no quantized layers", "quantize it first (edgelmm quantize)")
    schemes = {(m.bits, m.group_size, m.symmetric) for m in layers.values()}
    if len(schemes) > 1:
        raise EdgelmmError(f"the model mixes quantization schemes {sorted(schemes)}", "quantize it with one config")
    skipped = skipped_modules(model, adapter)
    config = ct_quantization_config(next(iter(layers.values())), skipped)
    method = getattr(model, "edgelmm_quantization", None)
    with atomic_directory(out, overwrite) as tmp:
        model.config.quantization_config = config
        try:
            model.save_pretrained(tmp)
        finally:
            del model.config.quantization_config
        type(adapter).finish_checkpoint(tmp, model.config)
        if processor is not None:
            processor.save_pretrained(tmp)
        if method is not None:
            record = {"method": method.describe(), **asdict(method)}
            if (calibration := getattr(model, "edgelmm_calibration", None)) is not None:
                record["calibration"] = asdict(calibration)
            atomic_write_text(tmp / "edgelmm_quantization.json", json.dumps(record, indent=2, default=str))
    return Path(out)


# ---------------------------------------------------------------- reading checkpoints


def read_quantization_config(checkpoint: str | Path | Checkpoint) -> dict[str, Any]:
    """The checkpoint's quantization_config, checked to be a format edgelmm reads."""
    checkpoint = resolve_checkpoint(checkpoint)
    path = checkpoint.path
    qc = checkpoint.config.get("quantization_config")
    if not isinstance(qc, dict):
        raise EdgelmmError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    method = qc.get("quant_method")
    if method == "awq":
        if qc.get("version", "gemm").lower() != "gemm" or qc.get("bits", qc.get("w_bit")) != 4 or not qc.get("zero_point", True):
            raise EdgelmmError(f"{path}: unsupported AWQ variant {qc}", f"edgelmm reads {SUPPORTED}")
        return qc
    if method != "compressed-tensors":
        raise EdgelmmError(f"{path}: foreign quantized checkpoint (quant_method '{method}')", f"edgelmm reads {SUPPORTED}")
    if qc.get("format") != "pack-quantized":
        raise EdgelmmError(f"{path}: compressed-tensors format '{qc.get('format')}' is not supported", f"edgelmm reads {SUPPORTED}")
    schemes = []
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if (group.get("input_activations") or w.get("type") != "int" or w.get("num_bits") not in (4, 8)
                or w.get("strategy") != "group" or w.get("actorder") == "group" or w.get("dynamic")):
            raise EdgelmmError(f"{path}: quantization scheme '{name}' is not supported ({w})", f"edgelmm reads {SUPPORTED}")
        schemes.append((w["num_bits"], w["group_size"], bool(w.get("symmetric"))))
    if len(set(schemes)) != 1:
        raise EdgelmmError(f"{path}: expected one weight scheme, found {len(set(schemes))}", f"edgelmm reads {SUPPORTED}")
    return qc


def scheme_of(qc: dict[str, Any]) -> tuple[int, int, bool]:
    """(bits, group_size, symmetric) of a checked quantization_config."""
    if qc["quant_method"] == "awq":
        return 4, int(qc.get("group_size", qc.get("q_group_size", 128))), False
    w = next(iter(qc["config_groups"].values()))["weights"]
    return int(w["num_bits"]), int(w["group_size"]), bool(w.get("symmetric"))


@contextmanager
def _open_tensors(path: Path, device: str = "cpu") -> Iterator[dict[str, Any]]:
    """Every tensor of the checkpoint's safetensors files, by key, read lazily."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EdgelmmError(f"{path}: no .safetensors files", "is the checkpoint complete?")
    handles: dict[str, Any] = {}
    try:
        for file in files:
            try:
                handle = safe_open(file, framework="pt", device=device)
            except (SafetensorError, OSError) as exc:
                raise EdgelmmError(f"corrupt checkpoint file {file}: {exc}", "re-create or re-download the checkpoint") from None
            for key in handle.keys():
                handles[key] = handle
        yield handles
    finally:
        handles.clear()


def _get(handles: dict[str, Any], key: str) -> torch.Tensor:
    if key not in handles:
        raise EdgelmmError(f"incomplete checkpoint: tensor '{key}' is missing")
    try:
        return handles[key].get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise EdgelmmError(f"corrupt checkpoint: cannot read tensor '{key}': {exc}") from None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device but real buffers (rotary frequencies are
    buffers computed at construction and are not in checkpoints), so a skeleton costs no memory."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _key_mapper(model: nn.Module, key_mapping: dict[str, str] | None = None) -> Any:
    """Checkpoint key -> model key, with transformers' own renaming rules for the family (the
    same ones `from_pretrained` applies, e.g. LLaVA's `language_model.model.` prefix) and the
    adapter's `key_mapping` for checkpoints with their own weight names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model, key_mapping=key_mapping)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()

    def mapped(key: str) -> str:
        new, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if new not in meta and key in meta:
            return key
        return new

    return mapped


def _quant_tensors(kind: str, handles: dict[str, Any], prefix: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    """The QuantLinear buffers of one module, from either format, checked against its shape."""
    out_f, in_f = layer.out_features, layer.in_features
    if kind == "awq":
        qweight, qzeros, scales = (_get(handles, f"{prefix}.{s}") for s in AWQ_SUFFIXES)
        groups = in_f // layer.group_size
        expect = {"qweight": (in_f, out_f // 8), "qzeros": (groups, out_f // 8), "scales": (groups, out_f)}
        for name, tensor in zip(AWQ_SUFFIXES, (qweight, qzeros, scales)):
            if tuple(tensor.shape) != expect[name]:
                raise EdgelmmError(f"corrupt checkpoint: '{prefix}.{name}' has shape {tuple(tensor.shape)}, expected {expect[name]}")
        q = (packing.unpack_awq(qweight) - 8).t().to(torch.int8)
        zero = (packing.unpack_awq(qzeros) - 8).t().to(torch.int8)
        tensors = {"weight_packed": packing.pack_weight(q, 4), "weight_scale": scales.t().contiguous(),
                   "weight_zero_point": packing.pack_zero(zero, 4), "weight_shape": torch.tensor([out_f, in_f])}
    else:
        tensors = {s: _get(handles, f"{prefix}.{s}") for s in CT_SUFFIXES if s != "weight_zero_point" or not layer.symmetric}
        expect = {n: tuple(b.shape) for n, b in layer.named_buffers() if b is not None}
        for name, tensor in tensors.items():
            if name != "weight_shape" and tuple(tensor.shape) != expect[name]:
                raise EdgelmmError(f"corrupt checkpoint: '{prefix}.{name}' has shape {tuple(tensor.shape)}, expected {expect[name]}")
        if tensors["weight_shape"].tolist() != [out_f, in_f]:
            shape = tensors["weight_shape"].tolist()
            raise EdgelmmError(f"corrupt checkpoint: '{prefix}.weight_shape' is {shape}, expected {[out_f, in_f]}")
    if f"{prefix}.bias" in handles:
        tensors["bias"] = _get(handles, f"{prefix}.bias")
    return tensors


def load_quantized(checkpoint: str | Path | Checkpoint, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """A quantized checkpoint (either format) as a model of QuantLinear layers, without
    transformers' quantizers or the compressed-tensors package.

    The model is built from config.json with parameters on the meta device, the linears that
    the checkpoint stores packed are swapped for QuantLinear, and every tensor is then read from
    the safetensors files straight into place: peak memory is the quantized model's.
    """
    from transformers import AutoConfig

    checkpoint = resolve_checkpoint(checkpoint)
    path = checkpoint.path
    qc = read_quantization_config(checkpoint)
    kind = "awq" if qc["quant_method"] == "awq" else "ct"
    bits, group, symmetric = scheme_of(qc)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    del config.quantization_config
    with _parameters_on_meta():
        model = checkpoint.adapter_cls.build_model(config, dtype)
    to_model = _key_mapper(model, checkpoint.adapter_cls.key_mapping)
    marker = "qweight" if kind == "awq" else "weight_packed"
    state: dict[str, torch.Tensor] = {}
    with _open_tensors(path, str(device) if torch.device(device).type != "cuda" else "cpu") as handles:
        packed = sorted(k[: -len(marker) - 1] for k in handles if k.endswith("." + marker))
        if not packed:
            raise EdgelmmError(
                f"{path}: config declares {qc['quant_method']} but no tensor ends in '{marker}'",
                "the checkpoint is corrupt or of another format",
            )
        owned: set[str] = set()
        for prefix in packed:
            name = to_model(prefix + ".weight").removesuffix(".weight")
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise EdgelmmError(f"{path}: quantized tensor '{prefix}' matches no layer of {type(model).__name__}") from None
            if linear.in_features % group:
                raise EdgelmmError(f"{path}: group size {group} does not divide layer '{name}' ({linear.in_features} input channels)")
            layer = QuantLinear(linear.in_features, linear.out_features, bits, group, symmetric, linear.bias is not None, dtype, "meta")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
            for suffix, tensor in _quant_tensors(kind, handles, prefix, layer).items():
                state[f"{name}.{suffix}"] = tensor
            owned.update(k for k in handles if k.startswith(prefix + "."))
        for key in handles:
            if key not in owned:
                state[to_model(key)] = _get(handles, key)
        expected = model.state_dict()
        for key, tensor in state.items():
            if key not in expected:
                raise EdgelmmError(f"{path}: unexpected tensor '{key}' for {type(model).__name__}", "the checkpoint is of another model")
            if tensor.is_floating_point():
                state[key] = tensor.to(dtype)
        missing = set(expected) - set(state) - set(getattr(model, "all_tied_weights_keys", {}) or {})
        if missing:
            raise EdgelmmError(f"{path}: incomplete checkpoint, missing {len(missing)} tensor(s), e.g. '{min(missing)}'")
        model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.edgelmm_quantization = qc
    return model.to(device).eval()


def load_quantized_model(spec: Any, checkpoint: Checkpoint | None = None) -> tuple[nn.Module, Any, ModelAdapter, torch.device]:
    """`edgelmm.models.loader.load_model` for quantized checkpoints: same arguments, same tuple out."""
    checkpoint = checkpoint or resolve_checkpoint(spec.path)
    cls = checkpoint.adapter_cls
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    model = load_quantized(checkpoint, device, dtype)
    processor = cls.load_processor(checkpoint.path, checkpoint.model_type, spec.trust_remote_code)
    return model, processor, cls(model, processor), device


# ---------------------------------------------------------------- AutoAWQ converter


def convert_to_awq(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Rewrite a compressed-tensors pack-quantized checkpoint in AutoAWQ's GEMM layout.

    Tensors keep their checkpoint names (as `saved_key` spells them); each quantized linear's four compressed-tensors
    tensors become qweight / qzeros / scales (float16, as AutoAWQ and its kernels require).
    Everything else (config, tokenizer, processor, the 16-bit tensors) is copied unchanged.
    """
    checkpoint = resolve_checkpoint(src)
    src = checkpoint.path
    qc = read_quantization_config(checkpoint)
    if qc["quant_method"] != "compressed-tensors":
        raise EdgelmmError(f"{src} is already in the {qc['quant_method']} format", "give a compressed-tensors checkpoint")
    bits, group, symmetric = scheme_of(qc)
    if bits != 4:
        raise EdgelmmError(f"AutoAWQ's GEMM layout holds 4-bit weights only; {src} has {bits}-bit weights")
    tensors: dict[str, torch.Tensor] = {}
    with _open_tensors(src) as handles:
        prefixes = sorted(k[: -len(".weight_packed")] for k in handles if k.endswith(".weight_packed"))
        for prefix in prefixes:
            out_f, in_f = _get(handles, f"{prefix}.weight_shape").tolist()
            if out_f % 8:
                raise EdgelmmError(f"layer '{prefix}' has {out_f} output channels; AutoAWQ's layout needs a multiple of 8")
            q = packing.unpack_weight(_get(handles, f"{prefix}.weight_packed"), 4, in_f).to(torch.int32) + 8
            if symmetric:
                zero = torch.full((out_f, in_f // group), 8, dtype=torch.int32)
            else:
                zero = packing.unpack_zero(_get(handles, f"{prefix}.weight_zero_point"), 4, out_f).to(torch.int32) + 8
            tensors[f"{prefix}.qweight"] = packing.pack_awq(q.t().contiguous())
            tensors[f"{prefix}.qzeros"] = packing.pack_awq(zero.t().contiguous())
            tensors[f"{prefix}.scales"] = _get(handles, f"{prefix}.weight_scale").t().contiguous().half()
        skip = {f"{p}.{s}" for p in prefixes for s in CT_SUFFIXES}
        for key in handles:
            if key not in skip:
                tensors[key] = _get(handles, key)
    config = json.loads((src / "config.json").read_text())
    tensors = {checkpoint.adapter_cls.saved_key(k, config): v for k, v in tensors.items()}
    config["quantization_config"] = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True,
        "modules_to_not_convert": [re.sub(r"^re:\.\*(.*)\.\*$", r"\1", p).removeprefix("re:") for p in qc.get("ignore", [])] or None,
    }
    with atomic_directory(out, overwrite) as tmp:
        for file in src.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name not in ("config.json", "model.safetensors.index.json"):
                (tmp / file.name).write_bytes(file.read_bytes())
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    return Path(out)
