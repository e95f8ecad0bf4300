"""How far each quantized variant's logits are from the float model's, on inputs the demo models
were trained for (a picture, a question or caption request, the reference answer appended).

Perplexity cannot show this on the demo VLMs: given the picture they are near-certain of every
answer token (caption perplexity ~1.00002, quantization moves it by ~1e-6), and without the
picture their language model is out of distribution (it was trained on answer tokens after a
picture only), so a text perplexity there is worse than a uniform guess. The logits themselves
still carry the quantization error:

* relative logit error ||z_q - z_f|| / ||z_f||, over every position of the conversation (the
  activations are in distribution everywhere) and over the answer tokens alone;
* KL(float || quantized) per answer token (nats), and top-1 agreement over every position.

Evaluation samples: shapes-vqa seed 0 and shapes-caption seed 1, as quant-eval's.

    OMP_NUM_THREADS=1 python benchmarks/quantization/demo_distortion.py shapes-vlm-s runs/quantization/shapes-vlm-s-rtn \
        runs/quantization/shapes-vlm-s-awq [--method 'awq(...)'] [--samples 50] [--out results/x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from edgelmm.bench.quant_eval import CAPTION_PPL_SEED, _load
from edgelmm.methods import parse_method
from edgelmm.request import Request
from edgelmm.tasks import get_task


@torch.no_grad()
def logits_of(backend, samples) -> list[tuple[torch.Tensor, int]]:
    """Per sample: logits [positions, vocab] (float32) and the answer's token count."""
    out = []
    for s in samples:
        answer = backend.adapter.tokenizer(s.reference, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        inputs = backend.adapter.append_tokens(backend.adapter.build_inputs(Request.chat(s.prompt, s.images)), answer)
        out.append((backend.model(**inputs).logits[0, :-1].float(), answer.numel()))
    return out


def distortion(ref: list[tuple[torch.Tensor, int]], got: list[tuple[torch.Tensor, int]]) -> dict[str, float]:
    sums = dict.fromkeys(("diff_all", "norm_all", "diff_ans", "norm_ans", "kl", "agree", "positions", "answers"), 0.0)
    for (zf, n), (zq, _) in zip(ref, got):
        sums["diff_all"] += float((zq - zf).square().sum())
        sums["norm_all"] += float(zf.square().sum())
        sums["diff_ans"] += float((zq[-n:] - zf[-n:]).square().sum())
        sums["norm_ans"] += float(zf[-n:].square().sum())
        lp, lq = zf[-n:].log_softmax(-1), zq[-n:].log_softmax(-1)
        sums["kl"] += float((lp.exp() * (lp - lq)).sum())
        sums["agree"] += float((zf.argmax(-1) == zq.argmax(-1)).sum())
        sums["positions"] += zf.shape[0]
        sums["answers"] += n
    return {
        "rel_logit_error_all": (sums["diff_all"] / sums["norm_all"]) ** 0.5,
        "rel_logit_error_answers": (sums["diff_ans"] / sums["norm_ans"]) ** 0.5,
        "kl_answers_nats": sums["kl"] / sums["answers"],
        "top1_agreement_all": sums["agree"] / sums["positions"],
        "positions": sums["positions"],
        "answer_tokens": sums["answers"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="+", help="float model first, then quantized checkpoints")
    parser.add_argument("--method", action="append", default=[], help="also the first model with this method")
    parser.add_argument("--samples", type=int, default=50, help="of each task (vqa and caption)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    samples = get_task("shapes-vqa").samples(args.samples)
    samples += get_task("shapes-caption").samples(args.samples, seed=CAPTION_PPL_SEED)
    variants = [(m, None) for m in args.model] + [(args.model[0], m) for m in args.method]
    rows, ref = [], None
    for path, method in variants:
        backend, seconds = _load(path, parse_method(method) if method else None, "cpu", "auto")
        got = logits_of(backend, samples)
        ref = ref or got
        name = Path(path).name + (f" + {method}" if method else "")
        row = {"variant": name, "quantize_s": seconds, **distortion(ref, got)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        backend.close()
    print(f"{'variant':<60} rel. logit error (all / answers)   KL answers (nats)   top-1 agreement")
    for r in rows:
        print(f"{r['variant'][-60:]:<60} {r['rel_logit_error_all']:.4f} / {r['rel_logit_error_answers']:.4f}"
              f"            {r['kl_answers_nats']:.2e}            {100 * r['top1_agreement_all']:.2f} %")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
