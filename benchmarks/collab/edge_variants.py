"""Which edge model makes confidence routing work on the demo: train candidate edges and measure
how well their own confidence finds their mistakes.

    python benchmarks/collab/edge_variants.py --out runs/edge-variants [--device cuda] [--variants a,b@s1] [--seeds 0,1] [--jobs N]

(`benchmarks/collab/results/edge-variants/`: runs on a lent H200 and on the 2-core CPU; each file
names the commands that made it.)

Each variant is a `edgelmm.demo.train.Preset` (architecture, picture side, steps), trained from
scratch with the demo recipe (`python -m edgelmm.demo.train`, run seed 0 unless `--seeds` names
others; a run of seed N > 0 is recorded as `variant@sN`), then asked 500
shapes-vqa questions of seed 1 (calibration) and of seed 0 (test), as is the cloud model
(`shapes-vlm-l`, bundled). For each, the routing figures of `edgelmm.collab.calibrate` on seed 0
with the max_prob strategy on the first answer token: the cloud share needed for 97 % and 99 % of
the cloud's accuracy, APGR, and the share and quality that a threshold fitted on seed 1 gives.
The variants run in parallel processes (`--jobs`); results in OUT/variants.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch

from edgelmm.demo import checkpoint_path, shapes
from edgelmm.demo.train import PRESETS, Preset, build_processor, normalise_answer, run

XS, S = PRESETS["shapes-vlm-xs"], PRESETS["shapes-vlm-s"]
VARIANTS: dict[str, Preset] = {
    "xs-96-2k": XS,  # the recipe of the bundled shapes-vlm-xs
    "xs-96-8k": replace(XS, steps=8000),
    "xs-48-8k": replace(XS, steps=8000, image_size=48),
    "xs-72-8k": replace(XS, steps=8000, image_size=72),
    "s-48-8k": replace(S, steps=8000, image_size=48),
    "s-48-3k": replace(S, steps=3000, image_size=48),
    "s-24-8k": replace(S, steps=8000, image_size=24),
    "xs-24-8k": replace(XS, steps=8000, image_size=24),
    "xs-24-4k": replace(XS, steps=4000, image_size=24),
    "xs-18p6-8k": replace(XS, steps=8000, image_size=18, patch=6),
    "xs-12p4-8k": replace(XS, steps=8000, image_size=12, patch=4),
    "xs-12p4-4k": replace(XS, steps=4000, image_size=12, patch=4),
    "xs-12p4-16k": replace(XS, steps=16000, image_size=12, patch=4),
    "s-12p4-8k": replace(S, steps=8000, image_size=12, patch=4),
    "xxs-24-8k": replace(XS, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, steps=8000, image_size=24),
    "xxs-12p4-8k": replace(XS, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, steps=8000,
                           image_size=12, patch=4),
    # kind_weights over shapes.VQA_KINDS = (color, shape, count, position, exists)
    "xs-24-8k-color.1": replace(XS, steps=8000, image_size=24, kind_weights=(0.1, 1, 1, 1, 1)),
    "xs-24-8k-exists.1": replace(XS, steps=8000, image_size=24, kind_weights=(1, 1, 1, 1, 0.1)),
    "xs-24-8k-color.1-exists.1": replace(XS, steps=8000, image_size=24, kind_weights=(0.1, 1, 1, 1, 0.1)),
    "xs-24-6k": replace(XS, steps=6000, image_size=24),
    "xs-96-5k": replace(XS, steps=5000),
    "xs-v16-24-8k": replace(XS, vision_hidden=16, steps=8000, image_size=24),
    "xs-t1-24-8k": replace(XS, text_layers=1, steps=8000, image_size=24),
    "xs-v12-24-8k": replace(XS, vision_hidden=12, steps=8000, image_size=24),
    # around the bundled shapes-vlm-thumb (xs-v16-24-8k): weaker by one part each
    "xs-v16-24-6k": replace(XS, vision_hidden=16, steps=6000, image_size=24),
    "xs-v16-t1-24-8k": replace(XS, vision_hidden=16, text_layers=1, steps=8000, image_size=24),
    "xs-v16-24-8k-position.2": replace(XS, vision_hidden=16, steps=8000, image_size=24, kind_weights=(1, 1, 1, 0.2, 1)),
    "xs-v16-12p4-8k": replace(XS, vision_hidden=16, steps=8000, image_size=12, patch=4),
    "xs-6p2-8k": replace(XS, steps=8000, image_size=6, patch=2),
    # the thumb recipe with one change of schedule or loss each: which of them keeps a run off the
    # ~70 % plateau that some seeds of every recipe land on
    "xs-v16-24-8k-w1500": replace(XS, vision_hidden=16, steps=8000, image_size=24, warmup=1500),
    "xs-v16-24-8k-lr1e-3": replace(XS, vision_hidden=16, steps=8000, image_size=24, lr=1e-3),
    "xs-v16-24-8k-aux3": replace(XS, vision_hidden=16, steps=8000, image_size=24, aux_weight=3.0),
    "xs-t1-24-8k-w1500": PRESETS["shapes-vlm-thumb-1l"],  # = replace(XS, text_layers=1, steps=8000, image_size=24, warmup=1500)
    "xs-t1-24-8k-aux3": replace(XS, text_layers=1, steps=8000, image_size=24, aux_weight=3.0),
    "xs-t1-24-8k-w1500-aux3": replace(XS, text_layers=1, steps=8000, image_size=24, warmup=1500, aux_weight=3.0),
}
SEEDS = (1, 0)  # calibration, test


@torch.no_grad()
def first_token(model, processor, samples: list[shapes.Sample], batch: int = 100) -> dict[str, list]:
    """Greedy answers, whether each is right, and the first answer token's top probability."""
    model.eval()
    out: dict[str, list] = {"correct": [], "max_prob": []}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
            add_generation_prompt=True) for s in chunk]
        inputs = processor(images=[s.image for s in chunk], text=texts, padding=True, return_tensors="pt").to(model.device)
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
        replies = processor.batch_decode(generated.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out["max_prob"] += torch.softmax(generated.scores[0].float(), -1).max(-1).values.tolist()
        out["correct"] += [normalise_answer(r) == normalise_answer(s.answer) for r, s in zip(replies, chunk)]
    return out


def answers(model, processor) -> dict[str, dict[str, list]]:
    return {str(seed): first_token(model, processor, shapes.generate(500, seed, "vqa")) for seed in SEEDS}


def run_name(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}@s{seed}"


def train_variant(name: str, seed: int, out: Path, device: str, steps: int | None, threads: int) -> dict:
    torch.set_num_threads(threads)  # several variants share the host's cores
    preset = VARIANTS[name] if steps is None else replace(VARIANTS[name], steps=steps)
    record = run(name, preset, seed, out / run_name(name, seed), device, steps=preset.steps, eval_samples=100)
    from transformers import LlavaForConditionalGeneration

    from edgelmm.demo.tokenizer import build_tokenizer
    model = LlavaForConditionalGeneration.from_pretrained(out / run_name(name, seed)).to(device)
    return {"seed": seed, "preset": record["preset"], "train_seconds": record["train_seconds"], "device": record["device"],
            "parameters": record["parameters"], "answers": answers(model, build_processor(build_tokenizer(), preset.image_size, preset.patch))}


def routing(edge: dict[str, list], cloud: dict[str, list], fit_on: tuple[dict[str, list], dict[str, list]]) -> dict:
    from edgelmm.collab.calibrate import Sample, curve, fit, measure
    from edgelmm.collab.confidence import MaxProb, Position
    from edgelmm.collab.policy import Policy

    def samples(e: dict[str, list], c: dict[str, list]) -> list[Sample]:
        import math
        return [Sample([Position(math.log(max(p, 1e-12)))], float(r), float(k)) for p, r, k in zip(e["max_prob"], e["correct"], c["correct"])]

    test = samples(edge, cloud)
    routes = curve([MaxProb().sequence(s.positions) for s in test], test)
    policy = fit(Policy(strategy="max_prob", aggregate="first", first_k=1), samples(*fit_on), target_quality=0.97)
    applied = measure(policy, test)
    return {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in routes.summary().items()},
            "fitted_share": round(applied["cloud_share"], 4),
            "fitted_quality": round(applied["accuracy"] / routes.cloud_accuracy, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="training seeds for each variant not named as VARIANT@sN")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--steps", type=int, help="override every variant's steps (a smoke test)")
    args = parser.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = [(n.split("@s")[0], int(n.split("@s")[1])) if "@s" in n else (n, seed)
            for n in args.variants.split(",") for seed in ([0] if "@s" in n else seeds)]
    unknown = [n for n, _ in runs if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    cloud_path = checkpoint_path("shapes-vlm-l")
    cloud = answers(LlavaForConditionalGeneration.from_pretrained(cloud_path).to(args.device), LlavaProcessor.from_pretrained(cloud_path))
    results: dict[str, dict] = {"cloud": {"model": "shapes-vlm-l", "answers": cloud}}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    kinds = [s.kind for s in shapes.generate(500, SEEDS[1], "vqa")]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_variant, n, seed, args.out, args.device, args.steps, threads): run_name(n, seed)
                   for n, seed in dict.fromkeys(runs)}
        for future in as_completed(futures):
            name = futures[future]
            results[name] = future.result()
            a = results[name]["answers"]
            results[name]["routing"] = routing(a["0"], cloud["0"], (a["1"], cloud["1"]))
            by_kind = {k: sum(c for c, kind in zip(a["0"]["correct"], kinds) if kind == k) / kinds.count(k) for k in shapes.VQA_KINDS}
            print(json.dumps({"variant": name, "edge_accuracy": sum(a["0"]["correct"]) / 500, "by_kind": by_kind,
                              "train_seconds": results[name]["train_seconds"], **results[name]["routing"]}), flush=True)
            (args.out / "variants.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
