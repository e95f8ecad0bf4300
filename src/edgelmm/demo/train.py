"""Train a shapes-world VLM from scratch and save it as a plain Hugging Face checkpoint.

    python -m edgelmm.demo.train --name shapes-vlm-s --seed 0 --out DIR [--device cuda] [--steps N | --minutes M]

The model is a standard `LlavaForConditionalGeneration` (CLIP vision tower, Llama language
model) so that every backend and method of edgelmm can treat it like a real LLaVA. Training data
are multi-turn chats drawn on the fly from the shapes world (several questions about one picture,
sometimes the caption request too): batch k of run seed s uses world seed
`TRAIN_SEED_BASE + s * SEED_STRIDE + k`, never an evaluation seed. The loss is on answer tokens
only, as in LLaVA's instruction tuning, plus a training-only perception loss on the projected
image tokens (see `aux_labels`); the saved checkpoint is the plain LLaVA model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from edgelmm.demo import shapes
from edgelmm.demo.tokenizer import ASSISTANT, CHAT_TEMPLATE, EOS, IMAGE, USER, build_tokenizer, prompt_text
from edgelmm.models.llava import LlavaAdapter
from edgelmm.utils.io import as_new

PATCH = 8
IMAGE_TOKENS = (shapes.IMAGE_SIZE // PATCH) ** 2  # at full resolution; CLS is dropped ("default" strategy)
SEED_STRIDE = 10_000_000  # world seeds per run seed: no two run seeds share a batch
EVAL_SEED = 0
SELECTION_SEED = 2  # learning curves and the choice between runs; never the recorded results' seed
_PROBE = (100, 200)  # steps timed by `train(minutes=...)`: past start-up, inside warm-up


@dataclass(frozen=True)
class Preset:
    """Size and schedule of one demo model; a run is fully described by (preset, seed, steps)."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    steps: int
    lr: float
    batch_size: int = 256
    warmup: int = 300
    weight_decay: float = 0.05
    caption_fraction: float = 0.25  # share of pictures whose chat includes the caption request
    turns: int = 6  # questions per picture (one chat); the image tokens, most of the cost, are shared
    aux_weight: float = 1.0  # training-only perception heads on the projected image tokens
    kind_weights: tuple[float, ...] | None = None  # how often each of shapes.VQA_KINDS is asked; None: evenly
    image_size: int = shapes.IMAGE_SIZE  # the side the vision tower sees; the processor scales pictures to it
    patch: int = PATCH  # the vision tower's patch side; image_size / patch must be a multiple of the 3-cell grid

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


# The CPU recipe: each fits an hour on a 2-core x86 CPU with bf16 autocast (AVX512-BF16); steps are
# fitted to about 52 minutes from measured step times. Small batches for `s`, a 4-layer language model
# with 12-question chats for `l`. See benchmarks/demo_training/README.md.
PRESETS: dict[str, Preset] = {
    "shapes-vlm-s": Preset(vision_hidden=128, vision_layers=3, vision_heads=4,
                           text_hidden=128, text_layers=4, text_heads=4, steps=8340, lr=2e-3, batch_size=16,
                           caption_fraction=0.5),
    # The edge model of the edge-cloud demo, weak on purpose: a quarter of shapes-vlm-s's width and
    # half its depth, trained for a few minutes, so that routing has answers to fix (78 % against the
    # cloud model's 96 %). About 5 minutes on the 2-core CPU.
    "shapes-vlm-xs": Preset(vision_hidden=64, vision_layers=2, vision_heads=2,
                            text_hidden=64, text_layers=2, text_heads=2, steps=2000, lr=2e-3, batch_size=16,
                            caption_fraction=0.5),
    # The edge of the routing demo: trained to convergence, but it looks at a 24-px thumbnail (9
    # visual tokens) through a vision tower 16 wide. It masters most questions and is unsure where
    # it fails (mostly which colour belongs to which shape, and places), which is what confidence
    # routing needs; the under-trained shapes-vlm-xs guesses where it fails. 20.5 minutes on the
    # 2-core CPU, one thread beside another run (benchmarks/collab/README.md, "Which edge").
    "shapes-vlm-thumb": Preset(vision_hidden=16, vision_layers=2, vision_heads=2,
                               text_hidden=64, text_layers=2, text_heads=2, steps=8000, lr=2e-3, batch_size=16,
                               caption_fraction=0.5, image_size=24),
    # The edge of the routing pair that meets the demo's "the edge alone at most 85 % of the cloud"
    # (81.2 % of 500 questions against 96.0 %): the xs vision tower on the 24-px thumbnail, a
    # one-layer language model, a 1,500-step warm-up. Runs of such recipes land far apart (about one
    # in five stalls near 70 %, where confidence cannot route; benchmarks/collab/README.md, "Which
    # edge"); this is seed 0 on the 2-core CPU, 9.7 minutes on one thread beside another run.
    "shapes-vlm-thumb-1l": Preset(vision_hidden=64, vision_layers=2, vision_heads=2,
                                  text_hidden=64, text_layers=1, text_heads=2, steps=8000, lr=2e-3, batch_size=16,
                                  warmup=1500, caption_fraction=0.5, image_size=24),
    "shapes-vlm-l": Preset(vision_hidden=192, vision_layers=4, vision_heads=6,
                           text_hidden=256, text_layers=4, text_heads=8, steps=1205, lr=1e-3, batch_size=32,
                           turns=12, caption_fraction=0.5, aux_weight=3.0),
}


def build_model(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden, intermediate_size=4 * preset.vision_hidden,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=preset.image_size, patch_size=preset.patch, projection_dim=preset.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.text_hidden, intermediate_size=3 * preset.text_hidden,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_heads, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=preset.image_tokens, vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # LLaVA takes the penultimate layer; a 3-4 layer tower has none to spare
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    return model


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = shapes.IMAGE_SIZE,
                    patch: int = PATCH) -> LlavaProcessor:
    """CLIP preprocessing: at 96 px shapes-world images pass through unchanged, only normalised
    (which `_normalise` reproduces on the device during training); at a smaller `image_size` they
    are first scaled down (bicubic, which `encode` reproduces)."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE,
    )


def _normalise(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NCHW → what the CLIP image processor gives for the same 96 px images."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels.float() / 255.0 - mean) / std).to(dtype)


def encode(samples: list[shapes.Sample] | list[shapes.Conversation],
           tokenizer: PreTrainedTokenizerFast, image_size: int = shapes.IMAGE_SIZE,
           patch: int = PATCH) -> dict[str, torch.Tensor]:
    """Token ids exactly as processor + chat template make them, with labels on the answers only,
    and the per-patch perception labels of `aux_labels`.

    A `Sample` is a one-turn conversation. Images stay uint8 here (4× less to move between
    processes); `_normalise` runs on the device. Below 96 px they are scaled down as the CLIP
    image processor does it (PIL, bicubic).
    """
    tokens = (image_size // patch) ** 2
    convs = [c if isinstance(c, shapes.Conversation) else shapes.Conversation(c.image, [(c.question, c.answer, c.kind)], c.shapes)
             for c in samples]
    image_id, eos, pad = tokenizer.convert_tokens_to_ids(IMAGE), tokenizer.eos_token_id, tokenizer.pad_token_id
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    rows = []
    for conv in convs:
        ids: list[int] = []
        labels: list[int] = []
        for turn, (question, reply, _) in enumerate(conv.turns):
            text = prompt_text(question) if turn == 0 else f"{USER}\n{question}{EOS}\n{ASSISTANT}\n"
            prompt = tokenizer(text, add_special_tokens=False).input_ids
            prompt = [t for tok in prompt for t in ([tok] * tokens if tok == image_id else [tok])]
            target = tokenizer(reply, add_special_tokens=False).input_ids + [eos]
            glue = newline if turn + 1 < len(conv.turns) else []
            ids += prompt + target + glue
            labels += [-100] * len(prompt) + target + [-100] * len(glue)
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad)
    label_ids = torch.full_like(input_ids, -100)
    for row, (ids, labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        label_ids[row, : len(labels)] = torch.tensor(labels)
    size = (image_size, image_size)
    images = [c.image if c.image.size == size else c.image.resize(size, Image.Resampling.BICUBIC) for c in convs]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).contiguous()
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(), "labels": label_ids,
            "pixels": pixels, "aux": aux_labels([c.shapes for c in convs], image_size // patch)}


AUX_CLASSES = (len(shapes.COLORS) + 1, len(shapes.SHAPES) + 1, shapes.GRID, shapes.GRID)  # colour, shape, row, column


def aux_labels(scenes: list[tuple[shapes.Shape, ...]], side: int = shapes.IMAGE_SIZE // PATCH) -> torch.Tensor:
    """(batch, side², 4) targets for the training-only perception heads: the colour and shape of
    the object in the patch's grid cell (0 = empty cell; every shape lies inside its cell), and
    the cell's row and column. `side`: patches per image side (a multiple of the 3-cell grid)."""
    if side % shapes.GRID:
        raise ValueError(f"{side} patches a side do not split into the {shapes.GRID}x{shapes.GRID} grid")
    cell_of_patch = torch.tensor([(r * shapes.GRID // side) * shapes.GRID + c * shapes.GRID // side
                                  for r in range(side) for c in range(side)])
    colors, kinds = list(shapes.COLORS), list(shapes.SHAPES)
    out = torch.zeros(len(scenes), side * side, 4, dtype=torch.long)
    out[:, :, 2] = cell_of_patch // shapes.GRID
    out[:, :, 3] = cell_of_patch % shapes.GRID
    for row, scene in enumerate(scenes):
        for s in scene:
            where = cell_of_patch == s.cell
            out[row, where, 0] = colors.index(s.color) + 1
            out[row, where, 1] = kinds.index(s.shape) + 1
    return out


class _Batches(IterableDataset):
    """Batch k of the training stream; DataLoader workers take every n-th k, so the stream is
    the same whatever the number of workers."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, preset: Preset, seed: int, steps: int):
        self.tokenizer, self.preset, self.steps = tokenizer, preset, steps
        self.base = shapes.TRAIN_SEED_BASE + seed * SEED_STRIDE

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        p = self.preset
        return encode(shapes.conversations(p.batch_size, self.base + k, p.turns, p.caption_fraction, p.kind_weights),
                      self.tokenizer, p.image_size, p.patch)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return (self.batch(k) for k in range(worker, self.steps, workers))


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def bf16_autocast_fast(device: str) -> bool:
    """Whether training autocasts to bfloat16 here: on CUDA, and on CPUs with bf16 matrix
    instructions (AVX512-BF16 / AMX), where oneDNN runs bf16 matmuls about twice as fast as fp32
    (`shapes-vlm-l` steps: 1.7x). Elsewhere bf16 would be emulated, slower than fp32."""
    if device == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, preset: Preset, seed: int,
          device: str, steps: int | None = None, minutes: float | None = None,
          eval_every: int = 0, bf16: bool | None = None) -> tuple[int, list[dict]]:
    """AdamW + cosine over `steps`; returns (steps run, logged history).

    With `minutes` instead, the step count is fitted to that much wall-clock time from the
    speed of steps 100..200 (all in warm-up, whose schedule does not depend on the total), so the
    run equals one made with `steps` set to the count it picked: a fixed time limit, as on a lent
    GPU, is used fully and the result stays reproducible. `bf16` (default: `bf16_autocast_fast`)
    autocasts the forward pass to bfloat16; weights and optimizer state stay float32.
    """
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps and minutes")
    if minutes is not None and preset.warmup <= _PROBE[1]:
        raise ValueError(f"fitting steps to minutes needs a warm-up longer than {_PROBE[1]} steps")
    model.to(device).train()
    # Perception heads, used in training only (not saved): from every projected image token,
    # predict what lies in its grid cell. Dense targets make the image tokens carry colour, shape
    # and place linearly from the first steps, so the language model only has to learn to look
    # them up; without them the models needed about ten times more pictures.
    aux_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(AUX_CLASSES)).to(device)
    projected: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda mod, args, out: projected.append(out))
    params = [*model.parameters(), *aux_head.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    cuda = device == "cuda"
    bf16 = bf16_autocast_fast(device) if bf16 is None else bf16
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr, betas=(0.9, 0.98), fused=cuda,
    )
    total = steps or 10**7  # with `minutes`, fixed once the probe has run
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, preset.warmup, total))
    loader = DataLoader(_Batches(tokenizer, preset, seed, total), batch_size=None, pin_memory=cuda,
                        num_workers=min(4, (os.cpu_count() or 4) // 4) if cuda else 0)
    history, start, probe_start = [], time.perf_counter(), 0.0
    bar = tqdm(total=steps, desc="train", mininterval=5, file=sys.stdout)
    for step, batch in enumerate(loader):
        if step == total:
            break
        if minutes is not None and step == _PROBE[0]:
            probe_start = time.perf_counter()
        if minutes is not None and step == _PROBE[1]:
            per_step = (time.perf_counter() - probe_start) / (_PROBE[1] - _PROBE[0])
            total = max(step + 1, int((60 * minutes - (time.perf_counter() - start)) / per_step) + step)
            bar.total = total
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        projected.clear()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            lm_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"], pixel_values=_normalise(batch["pixels"], torch.float32)).loss
            logits = aux_head(projected[0].reshape(-1, preset.image_tokens, aux_head.in_features)).float()
        targets = batch["aux"]
        aux_loss = sum(torch.nn.functional.cross_entropy(part.flatten(0, 1), targets[..., i].flatten())
                       for i, part in enumerate(logits.split(AUX_CLASSES, dim=-1))) / len(AUX_CLASSES)
        loss = lm_loss + preset.aux_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.update()
        if step % 50 == 0:
            seconds = round(time.perf_counter() - start, 1)
            history.append({"step": step, "loss": round(lm_loss.item(), 5), "aux_loss": round(aux_loss.item(), 5),
                            "seconds": seconds})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", aux=f"{history[-1]['aux_loss']:.3f}",
                            lr=f"{schedule.get_last_lr()[0]:.2e}")
        if eval_every and (step + 1) % eval_every == 0:
            curve = evaluate(model, build_processor(tokenizer, preset.image_size, preset.patch), shapes.generate(200, SELECTION_SEED, "vqa"))
            history.append({"step": step + 1, "vqa": round(curve["accuracy"], 4), "by_kind": curve["by_kind"],
                            "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(history[-1]), flush=True)
            model.train()
    hook.remove()
    bar.close()
    return total, history


def normalise_answer(text: str) -> str:
    """The scoring rule of the demo: case, surrounding space and a final full stop don't count."""
    return text.strip().lower().removesuffix(".").strip()


@torch.no_grad()
def answer(model: LlavaForConditionalGeneration, processor: LlavaProcessor, samples: list[shapes.Sample],
           batch_size: int = 64) -> list[str]:
    """Greedy answers through the public path (chat template + processor + generate)."""
    model.eval()
    replies = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
            add_generation_prompt=True) for s in chunk]
        inputs = processor(images=[s.image for s in chunk], text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        longest = 64 if any(s.kind == "caption" for s in chunk) else 8
        out = model.generate(**inputs, max_new_tokens=longest, do_sample=False)
        replies += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def evaluate(model: LlavaForConditionalGeneration, processor: LlavaProcessor, samples: list[shapes.Sample]) -> dict:
    """Exact-match accuracy overall and per question kind."""
    hits: dict[str, list[bool]] = {}
    for s, reply in zip(samples, answer(model, processor, samples)):
        hits.setdefault(s.kind, []).append(normalise_answer(reply) == normalise_answer(s.answer))
    every = [h for kind in hits.values() for h in kind]
    return {"accuracy": sum(every) / len(every), "n": len(every),
            "by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}}


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path, record: dict) -> None:
    """Write the checkpoint into a temporary sibling and rename it into place: a reader never
    sees half a checkpoint. Weights are stored as float16 (half the bytes; the shipped models
    score the same before and after), while the config keeps float32 so that a plain
    `from_pretrained` computes in float32, which is what a CPU runs fastest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    half = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=half)
    LlavaAdapter.finish_checkpoint(tmp, model.config)  # the weight names vLLM reads
    processor.save_pretrained(tmp)
    write_json(tmp / "training.json", record)
    as_new(tmp)  # mkdtemp's folder and safetensors' rewritten file are private (0700, 0600)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Atomic: write a sibling, then replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run(name: str, preset: Preset, seed: int, out: Path, device: str, steps: int | None = None,
        minutes: float | None = None, eval_samples: int = 500, eval_every: int = 0, bf16: bool | None = None) -> dict:
    """Build, train, evaluate on unseen world seed `EVAL_SEED`, save; returns the run's record."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before DataLoader workers fork
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model, processor = build_model(preset, tokenizer), build_processor(tokenizer, preset.image_size, preset.patch)
    params = sum(p.numel() for p in model.parameters())
    bf16 = bf16_autocast_fast(device) if bf16 is None else bf16
    print(f"{name}: {params / 1e6:.2f}M parameters, batches of {preset.batch_size} on {device}"
          f" ({'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} CPU threads)")

    start = time.perf_counter()
    steps, history = train(model, tokenizer, preset, seed, device, steps=steps, minutes=minutes, eval_every=eval_every,
                           bf16=bf16)
    record = {"name": name, "seed": seed, "steps": steps, "preset": asdict(replace(preset, steps=steps)),
              "parameters": params,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "autocast": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "train_seconds": round(time.perf_counter() - start, 1), "history": history}
    save(model, processor, out, record)  # before evaluating: a failed evaluation loses no training
    vqa = evaluate(model, processor, shapes.generate(eval_samples, EVAL_SEED, "vqa"))
    captions = evaluate(model, processor, shapes.generate(eval_samples // 5, EVAL_SEED, "caption"))
    record |= {"eval_seed": EVAL_SEED, "vqa": vqa, "caption": {k: v for k, v in captions.items() if k != "by_kind"}}
    write_json(out / "training.json", record)
    print(json.dumps({k: v for k, v in record.items() if k != "history"}))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgelmm.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0, help="initialisation and training-stream seed")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="override the preset's number of steps")
    budget.add_argument("--minutes", type=float, help="fit the number of steps to this much training time")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="forward-pass autocast; auto: bf16 on CUDA and on CPUs with bf16 instructions")
    parser.add_argument("--eval-samples", type=int, default=500, help=f"VQA samples of world seed {EVAL_SEED}")
    args = parser.parse_args(argv)
    preset = PRESETS[args.name]
    run(args.name, preset, args.seed, args.out, args.device, minutes=args.minutes,
        steps=None if args.minutes else args.steps or preset.steps, eval_samples=args.eval_samples,
        bf16=None if args.precision == "auto" else args.precision == "bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
