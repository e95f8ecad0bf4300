"""Tiny random-weight models of the real transformers classes, with real processors, built offline.

Every family edgelmm serves gets a model of its real architecture class at toy sizes (hidden 64,
2 decoder layers, a 2-layer vision tower on images of a few dozen pixels) and the family's real processor
class around a byte-level BPE tokenizer trained here on a few sentences, with the family's
special tokens and a chat template in the family's style. Configs and processors agree on the
token ids and on how many image tokens an image becomes, so the pair behaves like a real
checkpoint, only small: building one takes well under a second, and nothing is downloaded.

    model, processor = make_tiny("qwen2_vl")
    path = save_tiny("llava", tmp_path / "llava")  # an HF checkpoint directory

Names are `config.model_type` values (VLM_FAMILIES, CAUSAL_FAMILIES). Vision processors are
built without their video processor (`edgelmm.models.loader.images_only`), as edgelmm loads
them, because transformers' video processors need torchvision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from edgelmm.models.processors import images_only

VLM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl")
CAUSAL_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
FAMILIES = VLM_FAMILIES + CAUSAL_FAMILIES

# The decoder every family gets; head_dim 16 gives 8 rotary frequencies (see the mRoPE sections).
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
)

CORPUS = (
    "What color is the circle? The circle is red.",
    "How many squares are there in the image? There are two squares.",
    "Describe the picture in one sentence: a blue triangle left of a green star.",
    "Hello! How can I help you today? Please answer briefly.",
)

CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image, before the processor expands it
INTERNVL_VISION = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")


def chat_template(turn_start: str, turn_end: str, image: str, generation_prompt: str, prefix: str = "") -> str:
    """A Jinja chat template in the shape the real ones have: string or typed-parts content."""
    return (
        prefix + "{% for message in messages %}" + turn_start + "{% if message['content'] is string %}"
        "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image + "{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}" + turn_end + "{% endfor %}"
        "{% if add_generation_prompt %}" + generation_prompt + "{% endif %}"
    )


def chatml(image: str = "") -> str:
    return chat_template("<|im_start|>{{ message['role'] }}\n", "<|im_end|>\n", image, "<|im_start|>assistant\n")


LLAVA_TEMPLATE = chat_template("{{ message['role'] | upper }}: ", " ", "<image>\n", "ASSISTANT:")
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>")
LLAMA3_TEMPLATE = chat_template(
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n", "<|eot_id|>", "",
    "<|start_header_id|>assistant<|end_header_id|>\n\n", prefix="{{ bos_token }}",
)


@functools.cache
def _bpe_json() -> str:
    """A byte-level BPE trained on CORPUS: every string encodes, common words are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer.to_str()


def make_tokenizer(specials: tuple[str, ...], named: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """The trained BPE plus `specials`; `named` ones also become attributes (tokenizer.image_token)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_bpe_json())
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens=named or {}, **kwargs)


def token_ids(tokenizer: Any, **tokens: str) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in tokens.items()}


def text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """The decoder sized to the tokenizer, with its BOS / EOS / PAD ids."""
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return {**TEXT, "vocab_size": len(tokenizer), **ids, **extra}


def finish(model: Any, tokenizer: Any) -> Any:
    """Eval mode, and a generation config that stops at the tokenizer's EOS and pads with PAD."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


# ---------------------------------------------------------------- families


def _llava() -> tuple[Any, Any]:
    """CLIP 32x32 images in 8x8 patches: 16 patch tokens (the CLS token is dropped). As in
    llava-1.5, the template has no BOS and the tokenizer adds it."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = make_tokenizer(
        ("<s>", "</s>", "<pad>", "<image>"), bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True
    )
    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config={"model_type": "llama", **text_config(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def _qwen_tokenizer(*extra: str, **named: str) -> Any:
    return make_tokenizer(CHATML + QWEN_VISION + extra, named, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _qwen_vision_ids(tokenizer: Any) -> dict[str, int]:
    return token_ids(
        tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>",
    )


def _qwen_image_processor(patch_size: int) -> Any:
    """Images from 2x2 to 8x8 merge units are kept at their size, so token counts are exact."""
    from transformers import Qwen2VLImageProcessorPil

    unit = 2 * patch_size
    pixels = {"shortest_edge": (2 * unit) ** 2, "longest_edge": (8 * unit) ** 2}  # min / max pixels
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2, size=pixels)


def _qwen2_vl(version: str = "2") -> tuple[Any, Any]:
    """14-pixel patches merged 2x2: a W x H image becomes (W/28)*(H/28) `<|image_pad|>` tokens."""
    import transformers

    tokenizer = _qwen_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    if version == "2":
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
        vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2)
    else:  # 2.5: SwiGLU vision blocks with window attention in all but the full-attention blocks
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"],
            window_size=56, fullatt_block_indexes=[1],
        )
    config_cls, model_cls, processor_cls = (getattr(transformers, name) for name in names)
    config = config_cls(
        text_config=text_config(tokenizer, rope_parameters=rope),
        vision_config={**vision, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        **_qwen_vision_ids(tokenizer),
    )
    processor = images_only(processor_cls)(_qwen_image_processor(14), tokenizer, chat_template=chatml(QWEN_IMAGE))
    return model_cls(config), processor


def _qwen3_vl(moe: bool = False) -> tuple[Any, Any]:
    """16-pixel patches merged 2x2 (a W x H image: (W/32)*(H/32) tokens), one deepstack layer."""
    import transformers

    tokenizer = _qwen_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    text = text_config(tokenizer, rope_parameters=rope)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"],
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text, vision_config=vision, **_qwen_vision_ids(tokenizer)
    )
    processor_cls = images_only(transformers.Qwen3VLProcessor)  # Qwen3-VL-MoE uses it too
    processor = processor_cls(_qwen_image_processor(16), tokenizer, chat_template=chatml(QWEN_IMAGE))
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config), processor


def _internvl() -> tuple[Any, Any]:
    """56x56 tiles in 14x14 patches, pixel-shuffled 2x2: 4 `<IMG_CONTEXT>` a tile, between `<img>`
    and `</img>`. The processor tiles by default: a square image is 1 tile, a 2:1 one 2 + a thumbnail."""
    from transformers import GotOcr2ImageProcessorPil as ImageProcessor
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor

    named = dict(zip(("start_image_token", "end_image_token", "context_image_token", "video_token"), INTERNVL_VISION))
    tokenizer = make_tokenizer(CHATML + INTERNVL_VISION, named, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=[56, 56], patch_size=[14, 14],
    )
    config = InternVLConfig(
        vision_config=vision, text_config={"model_type": "qwen2", **text_config(tokenizer)},
        image_token_id=tokenizer.context_image_token_id, image_seq_length=4, downsample_ratio=0.5,
    )
    image_processor = ImageProcessor(size={"height": 56, "width": 56}, max_patches=4)
    processor = images_only(InternVLProcessor)(
        image_processor, tokenizer, image_seq_length=4, chat_template=chatml("<IMG_CONTEXT>\n")
    )
    return InternVLForConditionalGeneration(config), processor


def _causal(model_type: str) -> tuple[Any, Any]:
    """A decoder-only LM of `model_type` (the tokenizer is the processor). llama gets Llama-3's
    tokens, whose template writes BOS while the tokenizer would add one too; the others ChatML."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "llama":
        tokenizer = make_tokenizer(
            LLAMA3, bos_token=LLAMA3[0], eos_token="<|eot_id|>", pad_token=LLAMA3[-1], add_bos_token=True,
            chat_template=LLAMA3_TEMPLATE,
        )
    else:
        tokenizer = make_tokenizer(CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chatml())
    config = AutoConfig.for_model(model_type, **text_config(tokenizer))
    return AutoModelForCausalLM.from_config(config), tokenizer


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": functools.partial(_qwen2_vl, "2.5"),
    "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": functools.partial(_qwen3_vl, moe=True),
    "internvl": _internvl,
    **{family: functools.partial(_causal, family) for family in CAUSAL_FAMILIES},
}


# ---------------------------------------------------------------- public API


def make_tiny(family: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of `family` (a config.model_type in FAMILIES), random weights from `seed`.

    For causal LMs the processor is the tokenizer, as `edgelmm.models.loader` loads it.
    """
    if family not in BUILDERS:
        raise KeyError(f"no tiny model for {family!r}; families: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family]()
    return finish(model, getattr(processor, "tokenizer", processor)), processor


def save_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny `family` checkpoint (config.json, safetensors, processor and tokenizer files)."""
    path = Path(path)
    model, processor = make_tiny(family, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A random RGB image (noise, so no two patches are alike)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sample_images(family: str) -> tuple[Image.Image, Image.Image]:
    """A square and a 2:1 image for `family`, in whole 2x2-merged patches for the Qwen families
    (28 pixels for Qwen2/2.5-VL, 32 for Qwen3-VL), so that their processors keep the size."""
    unit = 28 if family in ("qwen2_vl", "qwen2_5_vl") else 32
    return make_image(2 * unit, 2 * unit, seed=1), make_image(4 * unit, 2 * unit, seed=2)
