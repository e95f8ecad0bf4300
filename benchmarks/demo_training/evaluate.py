"""Score demo checkpoints on unseen shapes-world samples, loading them with plain transformers.

    PYTHONPATH=src python benchmarks/demo_training/evaluate.py DIR... --seed 0 --vqa 1000 --captions 200 [--json OUT]

Greedy decoding through the checkpoint's own chat template and processor; exact match after
`normalise_answer` (case, surrounding space, final full stop).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor

from edgelmm.demo import shapes
from edgelmm.demo.train import evaluate

parser = argparse.ArgumentParser()
parser.add_argument("checkpoints", nargs="+", type=Path)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--vqa", type=int, default=1000)
parser.add_argument("--captions", type=int, default=200)
parser.add_argument("--json", type=Path)
args = parser.parse_args()
assert args.seed < shapes.TRAIN_SEED_BASE, "evaluation seeds must stay below the training seeds"

results = {}
for directory in args.checkpoints:
    model = AutoModelForImageTextToText.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    start = time.perf_counter()
    vqa = evaluate(model, processor, shapes.generate(args.vqa, args.seed, "vqa"))
    caption = evaluate(model, processor, shapes.generate(args.captions, args.seed, "caption"))
    results[directory.name] = {
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype),
        "weights_bytes": (directory / "model.safetensors").stat().st_size,
        "seed": args.seed, "vqa": vqa, "caption": {k: v for k, v in caption.items() if k != "by_kind"},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(directory.name, json.dumps(results[directory.name]), flush=True)

machine = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
           "transformers": transformers.__version__}
if args.json:
    args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
