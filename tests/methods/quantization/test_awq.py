"""AWQ: structure read off the layer, exact folds, and less error than round-to-nearest."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgelmm.methods.quantization import AWQConfig, CalibrationConfig, RTNConfig, calibration_batches, quantize, target_linears
from edgelmm.methods.quantization.awq import awq_search, capture_layer_inputs, layer_groups
from edgelmm.models.registry import get_adapter
from tests.methods.quantization.conftest import outlier_channels
from tests.tiny_models import make_tokenizer, text_config

CALIBRATION = CalibrationConfig(source="shapes", num_samples=4, max_seq_len=32, batch_size=2)


def groups_of(model, adapter) -> list[tuple[list[str], tuple[str, str, float] | None]]:
    """Layer 0's groups as (linear names, (fold target, kind, offset))."""
    batches = calibration_batches(adapter.tokenizer, CALIBRATION)
    samples, arguments = capture_layer_inputs(model, adapter, batches)
    layer = adapter.language_layers()[0]
    samples[0].args, samples[0].kwargs = arguments[0][0]
    names = {m: n for n, m in layer.named_modules()}
    targets = set(target_linears(model, adapter, AWQConfig(group_size=32)).values())
    with torch.no_grad():
        groups = layer_groups(layer, samples[0], samples[0].run(layer), targets)
    return [([names[lin] for lin in g.linears], g.fold and (names[g.fold.module], g.fold.kind, g.fold.offset)) for g in groups]


def test_groups_and_folds_are_found_without_names(fresh) -> None:
    model, _, adapter = fresh("llava")  # Llama decoder with grouped-query attention
    assert groups_of(model, adapter) == [
        (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ("input_layernorm", "norm", 0.0)),
        (["self_attn.o_proj"], None),  # v is narrower than o's input under GQA: no exact fold
        (["mlp.gate_proj", "mlp.up_proj"], ("post_attention_layernorm", "norm", 0.0)),
        (["mlp.down_proj"], ("mlp.up_proj", "linear", 0.0)),
    ]


def test_gemma_norms_fold_with_their_offset(fresh) -> None:
    model, _, adapter = fresh("gemma")  # RMSNorm computes x * (1 + w)
    folds = [fold for _, fold in groups_of(model, adapter)]
    assert folds[0] == ("input_layernorm", "norm", 1.0)


def test_value_projection_folds_into_output_projection_without_gqa() -> None:
    tokenizer = make_tokenizer(("<|im_end|>", "<|endoftext|>"), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", **{**text_config(tokenizer), "num_key_value_heads": 4})
    model = AutoModelForCausalLM.from_config(config).eval()
    assert groups_of(model, get_adapter(model, tokenizer))[1] == (["self_attn.o_proj"], ("self_attn.v_proj", "linear", 0.0))


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma"])
def test_scaling_alone_leaves_the_float_model_unchanged(fresh, family: str) -> None:
    model, _, adapter = fresh(family)
    outlier_channels(adapter)
    ids = calibration_batches(adapter.tokenizer, CalibrationConfig(source="shapes", num_samples=1, max_seq_len=24, seed=7))[0].input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
        config = AWQConfig(group_size=32, clip=False)
        targets = set(target_linears(model, adapter, config).values())
        stats = awq_search(model, adapter, config, calibration_batches(adapter.tokenizer, CALIBRATION), targets, progress=False)
        after = model(input_ids=ids).logits
    assert stats["scaled"] > 0
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen3"])
def test_awq_beats_round_to_nearest_on_outlier_activations(fresh, family: str) -> None:
    model, _, adapter = fresh(family)
    outlier_channels(adapter)
    ids = calibration_batches(adapter.tokenizer, CalibrationConfig(source="shapes", num_samples=2, max_seq_len=48, seed=9))[0].input_ids
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        errors = {}
        for config in (RTNConfig(group_size=32), AWQConfig(group_size=32)):
            copy_ = copy.deepcopy(model)
            copy_adapter = get_adapter(copy_, adapter.processor)
            quantize(copy_, copy_adapter, config, CALIBRATION if config.name == "awq" else None, progress=False)
            errors[config.name] = float((copy_(input_ids=ids).logits - reference).norm() / reference.norm())
    assert errors["awq"] < 0.75 * errors["rtn"]


def test_bfloat16_models_quantize_with_awq(fresh) -> None:
    model, _, adapter = fresh("qwen2")
    model.to(torch.bfloat16)
    quantize(model, adapter, AWQConfig(group_size=32, grid=4, clip_grid=4), CALIBRATION, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight_scale.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_the_search_runs_on_search_tokens_whatever_the_calibration_size(fresh) -> None:
    """The grid judges scales on the enclosing block over `search_tokens` tokens (AutoAWQ's
    module2inspect), not on whole layers over every calibration token: time and memory follow
    the model, not the calibration set (shapes-vlm-l: 265 s and 3.1 GB before, on 2 cores)."""
    model, _, adapter = fresh("llava")
    big = CalibrationConfig(source="shapes", num_samples=16, max_seq_len=32, batch_size=2)
    batches = calibration_batches(adapter.tokenizer, big)
    config = AWQConfig(group_size=32, search_tokens=64, calibration=big)
    layer = adapter.language_layers()[0]
    seen = {"layer": 0, "attention": 0, "mlp": 0}

    def counter(name):
        def hook(module, args, kwargs, out):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[name] += hidden.shape[0] * hidden.shape[1]
        return hook

    handles = [m.register_forward_hook(counter(n), with_kwargs=True)
               for n, m in (("layer", layer), ("attention", layer.self_attn), ("mlp", layer.mlp))]
    try:
        awq_search(model, adapter, config, batches, set(target_linears(model, adapter, config).values()), progress=False)
    finally:
        for h in handles:
            h.remove()
    every = 16 * 32
    grid_runs = config.grid + 1  # the grid and the unscaled start
    # whole-layer forwards: capture and reading inputs over every token, structure probes on one batch
    assert seen["layer"] <= 2 * every + 20 * 64
    # each of the two norm-folded groups: its block over about search_tokens tokens per grid point
    assert seen["attention"] - seen["layer"] <= grid_runs * (64 + 32)
    assert seen["mlp"] - seen["layer"] <= grid_runs * (64 + 32)
