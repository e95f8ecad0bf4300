"""Make a MyVLM checkpoint: the bundled demo model `shapes-vlm-s`'s trained weights, rewritten into
MyVLM's layout and saved under the names MyVLM's own training code uses (the language model in
Meta's original Llama names), with the demo's processor files. So the custom model has real,
trained weights and should answer exactly as `shapes-vlm-s` does.

    python examples/custom_vlm/make_weights.py runs/my-vlm
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from edgelmm.demo import checkpoint_path

# shapes-vlm-s (transformers' LLaVA names) -> the names MyVLM's checkpoints use
TOWER = r"^vision_tower\.(?:vision_model\.)?"  # the tower's weights, with or without CLIP's vision_model prefix
RENAMES = [
    (TOWER + r"embeddings\.patch_embedding\.", "vision.patch_embed."),
    (TOWER + r"embeddings\.class_embedding$", "vision.cls_token"),
    (TOWER + r"embeddings\.position_embedding\.weight$", "vision.pos_embed"),
    (TOWER + r"pre_layrnorm\.", "vision.norm_pre."),
    (TOWER + r"encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"vision.blocks.\1.norm\2."),
    (TOWER + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"vision.blocks.\1.\2."),
    (TOWER + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"vision.blocks.\1.proj."),
    (TOWER + r"encoder\.layers\.(\d+)\.mlp\.", r"vision.blocks.\1."),
    (r"^multi_modal_projector\.linear_1\.", "mm_projector.0."),
    (r"^multi_modal_projector\.linear_2\.", "mm_projector.2."),
    (r"^language_model\.model\.embed_tokens\.", "llm.tok_embeddings."),
    (r"^language_model\.model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"llm.layers.\1.attention.w\2."),
    (r"^language_model\.model\.layers\.(\d+)\.mlp\.gate_proj\.", r"llm.layers.\1.feed_forward.w1."),
    (r"^language_model\.model\.layers\.(\d+)\.mlp\.up_proj\.", r"llm.layers.\1.feed_forward.w3."),
    (r"^language_model\.model\.layers\.(\d+)\.mlp\.down_proj\.", r"llm.layers.\1.feed_forward.w2."),
    (r"^language_model\.model\.layers\.(\d+)\.input_layernorm\.", r"llm.layers.\1.attention_norm."),
    (r"^language_model\.model\.layers\.(\d+)\.post_attention_layernorm\.", r"llm.layers.\1.ffn_norm."),
    (r"^language_model\.model\.norm\.", "llm.norm."),
    (r"^language_model\.lm_head\.", "output."),
]
UNUSED = re.compile(r"^vision_tower\.(?:vision_model\.)?post_layernorm\.")  # LLaVA reads the encoder before its last norm
PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


def rename(key: str) -> str:
    for pattern, replacement in RENAMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    raise KeyError(f"no MyVLM name for {key}")


def make(out: Path, source: str = "shapes-vlm-s") -> Path:
    src = checkpoint_path(source)
    llava = json.loads((src / "config.json").read_text())
    vision = llava["vision_config"]
    config = {
        "model_type": "my_vlm", "architectures": ["MyVLM"], "image_token_id": llava["image_token_index"],
        "text_config": llava["text_config"], "tie_word_embeddings": False, "dtype": "float32",
        "vision": {"image_size": vision["image_size"], "patch_size": vision["patch_size"], "channels": vision["num_channels"],
                   "hidden": vision["hidden_size"], "layers": vision["num_hidden_layers"],
                   "heads": vision["num_attention_heads"], "mlp": vision["intermediate_size"], "eps": vision["layer_norm_eps"]},
    }
    weights = load_file(src / "model.safetensors")
    tensors = {rename(k): v.contiguous() for k, v in weights.items() if not UNUSED.match(k)}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in PROCESSOR_FILES:
        shutil.copy(src / name, out / name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the checkpoint directory to write (must not exist)")
    out = Path(parser.parse_args().out)
    if out.exists():
        print(f"make_weights: {out} already exists; choose another directory", file=sys.stderr)
        return 1
    print(f"MyVLM checkpoint: {make(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
