"""Float and quantized models side by side: accuracy, perplexity, weight memory and decode speed.

Each variant is a model (bundled name or checkpoint directory; quantized checkpoints load
through edgelmm's own loader, so they run the QuantLinear kernels) plus, optionally, a method
applied in memory (`rtn(bits=4)`, `awq(bits=4, group_size=128, calibration='shapes')`). Every variant is measured
the same way: weight bytes (resident storages after loading), two perplexities, task accuracy
and decode speed through the torch backend's own generate. One table, written atomically as
report.md and results.json.

The two perplexities:

* caption perplexity: the reference caption given its picture (shapes-caption, seed 1). A VLM
  that reads its pictures well is near-certain of every caption token, so this one saturates
  near 1 and quantization barely moves it.
* text perplexity: the language model alone on text, sliding window (`text_perplexity`), over a
  .txt / .jsonl file or, by default, `shapes-text`: shapes-world captions of evaluation pictures
  (seed 2) as plain text, one per paragraph, no picture and no chat template. Without the
  picture the text is not predictable, so this stays well above 1. It measures language-model
  quality only for a model trained on such text: the demo VLMs were trained on answers after a
  picture only, so for them plain text is out of distribution (perplexity above their vocabulary
  size) and quantization noise can lower it (benchmarks/quantization/README.md).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from edgelmm.backends.base import Request
from edgelmm.backends.torch_backend import TorchBackend
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.methods import Method, apply, parse_method
from edgelmm.methods.quantization import weight_bytes
from edgelmm.models.base import ModelAdapter
from edgelmm.tasks import get_task
from edgelmm.tasks.perplexity import caption_perplexity, read_text, text_perplexity
from edgelmm.utils.io import atomic_write_text

CAPTION_PPL = "shapes-caption"
SHAPES_TEXT = "shapes-text"
CAPTION_PPL_SEED = 1  # shapes-vqa accuracy uses seed 0; all three are evaluation seeds
SHAPES_TEXT_SEED = 2


@dataclass
class Row:
    variant: str
    weight_bytes: int
    language_weight_bytes: int
    caption_perplexity: float | None
    text_perplexity: float | None
    accuracy: float | None
    decode_tok_s: float | None
    quantize_s: float | None
    device: str


def _load(path: str, method: Method | None, device: str, dtype: str) -> tuple[TorchBackend, float | None]:
    """The torch backend with the model loaded, and the method applied in memory (timed)."""
    backend = TorchBackend()
    backend.load(ModelSpec(path=path, device=device, dtype=dtype))
    seconds = None
    if method is not None:
        start = time.perf_counter()
        backend.model = backend.adapter.model = apply(backend.model, backend.adapter, method)
        seconds = time.perf_counter() - start
    return backend, seconds


def _language_bytes(adapter: ModelAdapter) -> int:
    """Weights of the decoder layers alone (what quantization targets by default)."""
    return sum(weight_bytes(layer) for layer in adapter.language_layers())


def shapes_text(n: int, seed: int = SHAPES_TEXT_SEED) -> str:
    """`n` shapes-world captions of evaluation pictures as plain text, one per paragraph (what a
    .jsonl file of them would read as, see `read_text`)."""
    return "\n\n".join(s.reference for s in get_task("shapes-caption").samples(n, seed=seed))


def evaluation_text(source: str, samples: int) -> str | None:
    """The text for the text perplexity: `shapes-text` (`samples` captions), a file, or None for ''."""
    if not source:
        return None
    return shapes_text(samples) if source == SHAPES_TEXT else read_text(source)


def compare(
    models: Sequence[str],
    methods: Sequence[str | Method] = (),
    task: str = "",
    samples: int = 100,
    perplexity: str = "",
    perplexity_samples: int = 100,
    text: str = "",
    text_samples: int = 1000,
    device: str = "cpu",
    dtype: str = "auto",
    max_new_tokens: int = 8,
    out: str | Path | None = None,
) -> list[Row]:
    """One row per variant: each model as it is, then the first model with each method applied.
    Nothing is measured unless asked: `edgelmm quant-eval` asks for all three on the shapes world.

    `perplexity` is "shapes-caption" (`perplexity_samples` captions given their picture) or ""
    to skip it; `text` is "shapes-text" (`text_samples` captions as plain text), a .txt / .jsonl
    file (sliding window over the text, the language model alone) or "" to skip it; `task` is a
    registered task name, or "" to skip accuracy. Samples are drawn once, so every variant sees
    the same ones.
    """
    if perplexity not in (CAPTION_PPL, ""):
        raise EdgelmmError(
            f"unknown caption perplexity '{perplexity}': expected '{CAPTION_PPL}' or ''",
            "for perplexity on a text file use --text-ppl FILE",
        )
    parsed = [parse_method(m) for m in methods]
    variants: list[tuple[str, Method | None]] = [(m, None) for m in models] + [(models[0], m) for m in parsed]
    task_samples = get_task(task).samples(samples) if task else []
    caption_samples = get_task(CAPTION_PPL).samples(perplexity_samples, seed=CAPTION_PPL_SEED) if perplexity else []
    text_value = evaluation_text(text, text_samples)
    rows = []
    for path, method in tqdm(variants, desc="variants", unit="model", file=sys.stderr):
        backend, seconds = _load(path, method, device, dtype)
        model, adapter = backend.model, backend.adapter
        caption_ppl = text_ppl = None
        if caption_samples and not adapter.multimodal:
            raise EdgelmmError(
                f"{path} is a text-only model: caption perplexity needs images", "pass --ppl '' (and --text-ppl FILE)"
            )
        if caption_samples:
            caption_ppl = caption_perplexity(model, adapter, [(s.prompt, s.images, s.reference) for s in caption_samples]).value
        if text_value is not None:
            text_ppl = text_perplexity(model, adapter, text_value).value
        accuracy = speed = None
        if task_samples:
            scorer = get_task(task)
            params = SamplingParams(max_new_tokens=max_new_tokens)
            results = [backend.generate([Request.chat(s.prompt, s.images, id=s.id)], params)[0] for s in task_samples]
            accuracy = statistics.fmean(scorer.score(r.text, s) for r, s in zip(results, task_samples))
            steps = [d for r in results for d in r.timings.decode_s]
            speed = 1 / statistics.median(steps) if steps else None
        name = Path(path).name + (f" + {method}" if method else "")
        rows.append(Row(
            name, weight_bytes(model), _language_bytes(adapter), caption_ppl, text_ppl, accuracy, speed, seconds, backend.device_name()
        ))
        backend.close()
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "results.json", json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        atomic_write_text(out / "report.md", format_rows(rows, markdown=True) + "\n")
    return rows


def format_rows(rows: Sequence[Row], markdown: bool = False) -> str:
    """The comparison table; ratios are against the first row (the float model)."""
    base = rows[0]
    header = [
        "variant", "weights MiB", "x float", "LM layers MiB", "caption ppl", "text ppl", "accuracy %", "decode tok/s", "device",
    ]
    body = []
    for r in rows:
        body.append([
            r.variant, f"{r.weight_bytes / 2**20:.1f}", f"{r.weight_bytes / base.weight_bytes:.3f}",
            f"{r.language_weight_bytes / 2**20:.2f}", "-" if r.caption_perplexity is None else f"{r.caption_perplexity:.6f}",
            "-" if r.text_perplexity is None else f"{r.text_perplexity:.4f}",
            "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}", "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}",
            r.device,
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *body])
