"""The in-process PyTorch/transformers backend: every adapter's model, on CPU or CUDA, hookable.

Inputs come from the model adapter (the family's own processor and chat template); generation
goes through transformers' `generate`, so every family's own input handling (M-RoPE positions,
pixel values at prefill only, caches) is the library's. Two small hooks ride along each step:
a logits processor stamps the clock once the logits of a new token exist (after a CUDA
synchronize: where a user would start waiting for the next token) and keeps the model's own
log-probabilities; a stopping criterion feeds each new token to a `Detokenizer`, which ends a
row at a stop string, gives a stream its text, and stops everything once a stream's consumer
has gone away. Prompt log-probabilities come from one teacher-forced forward pass.
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from edgelmm.backends.base import (
    AdapterTokens,
    Backend,
    Counts,
    Detokenizer,
    Request,
    Result,
    Timings,
    TokenEvent,
    TokenScore,
    check_context,
)
from edgelmm.backends.decode import StaticDecoder, unsupported
from edgelmm.backends.engines import engine_options
from edgelmm.backends.kvstate import KVRunner
from edgelmm.backends.prefix_cache import PrefixCache, mrope
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.methods import apply
from edgelmm.methods.pruning import pruning_of
from edgelmm.methods.quantization import load_quantized_model
from edgelmm.models.loader import load_model, resolve_checkpoint
from edgelmm.utils.memory import PeakMemory

_SCORE_CHUNK = 256  # prompt positions whose log-softmax is taken at once (vocab-wide float32 rows)
log = logging.getLogger("edgelmm.torch")
OPTIONS = {
    # "auto": the decode engine (backends/decode.py; CUDA graphs on a GPU) where it can serve the
    # model, transformers' generate where not; "engine": the engine or an error; "generate": generate
    "decode": "auto",
    "cuda_graphs": True,  # with the engine on CUDA: capture each decode step once and replay it
    "compile": "auto",  # torch.compile the decode step (inductor); "auto": on CUDA with Triton, not on a CPU
    "max_cache_tokens": None,  # the engine's longest prompt + new tokens; default: the profile's context, at most the model's
    "hardware": None,  # the profile whose engine.max_context bounds the cache; default: matched to the device
    # PyTorch SDPA kernels attention may use on CUDA, in order of preference. cuDNN's is left out by
    # default: it builds a new plan for every new sequence length, which a server's every fresh
    # prompt pays for (measured in benchmarks/engine/). "default": PyTorch's own choice.
    "sdpa_backends": "flash,efficient,math",
    # MiB of prompts' KV kept in a radix tree and reused by later prompts that begin the same way
    # (backends/prefix_cache.py); 0: off. Serves the decode engine and KV states, batches of one.
    "prefix_cache_mb": 0,
    "prefix_cache_file": None,  # load the cache from this file at start, and save it there on close
}
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")
DECODE_MODES = ("auto", "engine", "generate")


class _StepClock(LogitsProcessor):
    """Stamps the time of every step and keeps that step's log-probabilities, before sampling.

    It runs first among the processors, so the log-probabilities are those of the model itself,
    before temperature or top-k/top-p reshape them."""

    def __init__(self, device: torch.device, keep_logprobs: bool):
        self.device = device
        self.keep_logprobs = keep_logprobs
        self.stamps: list[float] = []
        self.last: torch.Tensor | None = None  # [batch, vocab] of the step in flight

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.keep_logprobs:
            self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Rows(StoppingCriteria):
    """Per row: the tokens generated so far, their scores, a Detokenizer that ends the row at a
    stop string; and, for a stream, each token handed to the consumer as it comes."""

    def __init__(self, backend: TorchBackend, rows: int, params: SamplingParams, clock: _StepClock,
                 sink: queue.Queue[Any] | None = None, cancel: threading.Event | None = None):
        self.end_tokens = set(backend.adapter.eos_token_ids())
        self.params, self.clock, self.sink, self.cancel = params, clock, sink, cancel
        self.detok = [Detokenizer(backend.adapter.decode, params.stop, self.end_tokens) for _ in range(rows)]
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] = [[] for _ in range(rows)]
        self.top: list[list[list[tuple[int, float]]]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def add(self, tokens: list[int], chosen: list[float] | None, top: list[list[tuple[int, float]]] | None) -> bool:
        """Take one step's token per row (rows already finished ignore theirs); True when every
        row has finished or the consumer has gone away."""
        for row, token in enumerate(tokens):
            if self.done[row]:
                continue
            self.ids[row].append(token)
            if chosen is not None:
                self.logprobs[row].append(chosen[row])
            if top is not None:
                self.top[row].append(top[row])
            delta = self.detok[row].push(token)
            self.done[row] = token in self.end_tokens or self.detok[row].stopped is not None
            if self.sink is not None:
                self.sink.put(TokenEvent(token, delta, chosen[row] if chosen else None, 0.0, top[row] if top else None))
        return self.finished

    @property
    def finished(self) -> bool:
        return all(self.done) or (self.cancel is not None and self.cancel.is_set())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        """As transformers' stopping criterion, after each token of `generate`."""
        top = None
        if self.clock.last is not None and self.params.top_logprobs:
            values, indices = self.clock.last.topk(self.params.top_logprobs, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        chosen = self.clock.last.gather(1, input_ids[:, -1:])[:, 0].tolist() if self.clock.last is not None else None
        self.add(input_ids[:, -1].tolist(), chosen, top)
        stop = torch.tensor(self.done, device=input_ids.device)
        if self.finished:
            stop[:] = True
        return stop


def _sdpa_context(backends: str, device: torch.device) -> Any:
    """A context-manager factory that restricts PyTorch's SDPA to `backends` on CUDA."""
    import contextlib

    if device.type != "cuda" or backends == "default":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [b.strip() for b in str(backends).split(",") if b.strip()]
    unknown = [b for b in names if b not in SDPA_BACKENDS]
    if unknown or not names:
        raise EdgelmmError(f"unknown SDPA backend(s) {', '.join(unknown) or '(none)'}",
                           f"give a comma-separated list of {', '.join(SDPA_BACKENDS)}, or default")
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    chosen = [kinds[b] for b in names]
    return lambda: sdpa_kernel(chosen, set_priority=True)


def _compile_wanted(option: Any, device: torch.device) -> bool:
    if option == "auto":
        return device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if isinstance(option, bool):
        return option
    raise EdgelmmError(f"unknown compile setting '{option}' for the torch backend", "use auto, true or false")


class TorchBackend(AdapterTokens, Backend):
    name = "torch"
    known_options = OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self.model: torch.nn.Module | None = None
        self.processor: Any = None
        self.adapter: Any = None
        self.device = torch.device("cpu")
        self.decoder: StaticDecoder | None = None
        self.decode_fallback: str | None = None  # why the decode engine does not serve this model
        self.attention: Any = None  # a context-manager factory: the SDPA kernels attention may use
        self._kv: KVRunner | None = None
        self.prefix_cache: PrefixCache | None = None
        self._prefix_file: str | None = None

    # ------------------------------------------------------------ lifecycle
    def load(self, spec: ModelSpec) -> None:
        options = engine_options(spec, OPTIONS, self.name)
        if options["decode"] not in DECODE_MODES:
            raise EdgelmmError(f"unknown decode mode '{options['decode']}' for the torch backend",
                               f"choose one of: {', '.join(DECODE_MODES)}")
        checkpoint = resolve_checkpoint(spec.path)
        loader = load_quantized_model if checkpoint.quantization is not None else load_model
        model, processor, adapter, device = loader(spec, checkpoint)
        for method in spec.methods:
            model = apply(model, adapter, method)
            adapter.model = model
        self.spec, self.model, self.processor, self.adapter, self.device = spec, model, processor, adapter, device
        self.decoder, self.decode_fallback = None, None
        self.attention = _sdpa_context(options["sdpa_backends"], device)
        self._open_prefix_cache(options)
        if options["decode"] != "generate":
            reason = unsupported(adapter)
            if reason is not None and options["decode"] == "engine":
                raise EdgelmmError(f"the decode engine cannot serve {spec.display_name}: {reason}",
                                   "load it with options: {decode: generate}")
            if reason is not None:
                self.decode_fallback = reason
                log.info("decoding %s with transformers' generate: %s", spec.display_name, reason)
            else:
                # the hardware profile's engine context, at most the model's (longer requests are refused anyway)
                limit = options["max_cache_tokens"] or min(self._profile_context(options["hardware"]) or 4096,
                                                           self.max_context or 4096)
                self.decoder = StaticDecoder(model, adapter, device, int(limit), graphs=bool(options["cuda_graphs"]),
                                             compile=_compile_wanted(options["compile"], device))

    def _open_prefix_cache(self, options: dict[str, Any]) -> None:
        self.prefix_cache, self._prefix_file = None, options["prefix_cache_file"]
        megabytes = float(options["prefix_cache_mb"] or 0)
        if megabytes < 0:
            raise EdgelmmError(f"prefix_cache_mb must be >= 0, got {megabytes:g}", "give the cache's size in MiB, or 0 for none")
        if not megabytes:
            return
        if mrope(self.adapter.text_config):
            log.info("no prefix cache for %s: its M-RoPE positions depend on the whole prompt", self.spec.display_name)
            return
        self.prefix_cache = PrefixCache(int(megabytes * 2**20))
        if self._prefix_file and Path(self._prefix_file).is_file():
            self.prefix_cache.load(self._prefix_file, self.device)

    def _profile_context(self, hardware: str | None) -> int | None:
        from edgelmm.hardware import guess_profile, load_profile

        profile = load_profile(hardware) if hardware else guess_profile(str(self.device))
        return profile.engine.max_context if profile is not None else None

    def close(self) -> None:
        if self.prefix_cache is not None and self._prefix_file:
            self.prefix_cache.save(self._prefix_file)
        self.model = self.processor = self.adapter = self.decoder = self.prefix_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"

    # ------------------------------------------------------------ token-level access
    @property
    def max_context(self) -> int | None:
        if self.adapter is None:
            return None
        return int(getattr(self.adapter.text_config, "max_position_embeddings", 0) or 2048)

    def kv_runner(self) -> KVRunner:
        """KV states kept between calls (draft-verify, caches): see backends/kvstate.py."""
        self._check()
        if self._kv is None or self._kv.model is not self.model:
            self._kv = KVRunner(self)
        return self._kv

    # ------------------------------------------------------------ generation
    def _check(self) -> None:
        if self.model is None:
            raise EdgelmmError("the torch backend has no model loaded", "call load(spec) first")

    def prepare_inputs(self, requests: list[Request], params: SamplingParams | None) -> dict[str, torch.Tensor]:
        self._check()
        inputs = self.adapter.build_batch(requests)
        for length in inputs.get("attention_mask", inputs["input_ids"]).bool().sum(1).tolist():
            if params is not None:
                check_context(length, params, self.max_context)
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()
        }

    def _generate_kwargs(self, inputs: dict[str, torch.Tensor], params: SamplingParams, clock: _StepClock,
                         rows: _Rows) -> dict[str, Any]:
        tokenizer = self.adapter.tokenizer
        eos = self.adapter.eos_token_ids()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        # A fresh config: model-shipped defaults (sampling on, repetition penalties) must not leak
        # in. When sampling, transformers' own warpers are switched off and ours run after the clock.
        neutral = {} if params.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=not params.greedy, repetition_penalty=1.0,
            eos_token_id=eos or None, pad_token_id=pad, **neutral,
        )
        processors = LogitsProcessorList([clock])
        if not params.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return {**inputs, "generation_config": config, "logits_processor": processors,
                "stopping_criteria": StoppingCriteriaList([rows])}

    def _counts(self, inputs: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[int]]:
        """Per row: the prompt ids without padding, and the number of visual tokens."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        visual = (self.adapter.image_token_mask(ids) & mask).sum(1).tolist()
        return [row[m].tolist() for row, m in zip(ids, mask)], visual

    @torch.inference_mode()
    def _prompt_scores(self, inputs: dict[str, torch.Tensor], top: int) -> list[list[TokenScore]]:
        """Teacher-forced scores of every prompt token (left padding skipped). Under pruning, the
        positions the pruned prefill kept are scored as the model saw them; dropped ones get None."""
        logits = self.model(**inputs, use_cache=False).logits
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        pruning = pruning_of(self.model)
        if pruning is not None and pruning.last is not None and pruning.last.kept_tokens == logits.shape[1] != ids.shape[1]:
            positions = pruning.last.kept_positions.to(ids.device)
        else:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        out = []
        for row in range(ids.shape[0]):
            kept = positions[row][mask[row].gather(0, positions[row])]  # real (not padding) positions, ascending
            start = int(mask[row].long().argmax())  # the first real position: nothing precedes it
            scores: dict[int, TokenScore] = {}
            for begin in range(0, kept.numel() - 1, _SCORE_CHUNK):
                at = kept[begin: begin + _SCORE_CHUNK + 1]
                index = torch.searchsorted(positions[row].contiguous(), at[:-1])  # the logit rows of those positions
                logprobs = torch.log_softmax(logits[row, index].float(), dim=-1)
                targets = ids[row, at[1:]]
                chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
                tops = None
                if top:
                    values, indices = logprobs.topk(top, dim=-1)
                    tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
                for j, (position, token) in enumerate(zip(at[1:].tolist(), targets.tolist())):
                    scores[position] = TokenScore(token, chosen[j], tops[j] if tops else [])
            row_ids = ids[row].tolist()
            out.append([scores.get(p, TokenScore(row_ids[p], None)) for p in range(start, ids.shape[1])])
        return out

    def _result(self, rows: _Rows, row: int, prompt_ids: list[int], visual: int, prompt_scores: list[TokenScore] | None,
                clock: _StepClock, t0: float, t_end: float, peak: int | None, path: str | None) -> Result:
        ids = rows.ids[row]
        detok = rows.detok[row]
        detok.flush()
        finish, reason = "length", None
        if detok.stopped is not None:
            finish, reason = "stop", detok.stopped
        elif ids and ids[-1] in rows.end_tokens:
            finish, reason = "stop", ids[-1]
        params = rows.params
        return Result(
            text=detok.final_text, token_ids=ids,
            logprobs=rows.logprobs[row] if params.wants_logprobs else None,
            timings=Timings.from_stamps(t0, clock.stamps[: max(len(ids), 1)], t_end),
            counts=Counts(len(prompt_ids), visual, len(ids)), peak_memory_bytes=peak,
            finish_reason=finish, stop_reason=reason,
            top_logprobs=rows.top[row] if params.top_logprobs else None,
            prompt_token_ids=prompt_ids, prompt_logprobs=prompt_scores, decode_path=path,
        )

    def _decode(self, inputs: dict[str, torch.Tensor], params: SamplingParams, clock: _StepClock, rows: _Rows,
                requests: list[Request]) -> str | None:
        """Generate every row's tokens into `rows`: through the decode engine where it serves the
        model and the request fits its cache, else through transformers' generate. Returns the
        path taken ("cuda-graph" or "static", with "+compiled" where inductor built the step, or
        "generate"; None when nothing was generated)."""
        if not params.max_new_tokens:
            return None
        with self.attention():
            return self._decode_rows(inputs, params, clock, rows, requests)

    def _decode_rows(self, inputs: dict[str, torch.Tensor], params: SamplingParams, clock: _StepClock, rows: _Rows,
                     requests: list[Request]) -> str:
        decoder = self.decoder
        if decoder is None or not decoder.fits(inputs["input_ids"].shape[1], params.max_new_tokens):
            self.model.generate(**self._generate_kwargs(inputs, params, clock, rows))
            return "generate"
        prefix = self.prefix_cache if len(requests) == 1 else None
        prefilled = decoder.prefill(inputs, prefix, requests[0].all_images() if prefix is not None else ())
        for tokens, chosen, top in decoder.decode(prefilled, params.max_new_tokens, params, lambda: rows.finished):
            clock.stamps.append(time.perf_counter())
            rows.add(tokens, chosen if params.wants_logprobs else None, top if params.top_logprobs else None)
        return decoder.last_path

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        if not requests:
            return []
        t0 = time.perf_counter()
        inputs = self.prepare_inputs(requests, params)
        prompt_ids, visuals = self._counts(inputs)
        clock = _StepClock(self.device, params.wants_logprobs)
        rows = _Rows(self, len(requests), params, clock)
        with PeakMemory(self.device) as peak:
            scores = self._prompt_scores(inputs, params.prompt_logprobs) if params.prompt_logprobs is not None else None
            path = self._decode(inputs, params, clock, rows, requests)
        t_end = time.perf_counter()
        return [self._result(rows, i, prompt_ids[i], visuals[i], scores[i] if scores else None, clock, t0, t_end, peak.bytes,
                             path) for i in range(len(requests))]

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        """Yield each token as the model produces it; generation runs in a worker thread.

        Closing the iterator early (a client that went away) stops generation at the next token."""
        t0 = time.perf_counter()
        inputs = self.prepare_inputs([request], params)
        [prompt_ids], [visual] = self._counts(inputs)
        clock = _StepClock(self.device, params.wants_logprobs)
        sink: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()
        rows = _Rows(self, 1, params, clock, sink, cancel)
        peak = PeakMemory(self.device)
        scores: list[list[TokenScore]] | None = None
        path: str | None = None

        def work() -> None:
            nonlocal scores, path
            try:
                with torch.inference_mode(), peak:
                    if params.prompt_logprobs is not None:
                        scores = self._prompt_scores(inputs, params.prompt_logprobs)
                    path = self._decode(inputs, params, clock, rows, [request])
                sink.put(None)
            except BaseException as exc:  # handed to the consumer below
                sink.put(exc)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while (item := sink.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                item.time_s = time.perf_counter() - t0
                yield item
        finally:  # also when the consumer closes the stream early
            cancel.set()
            worker.join()
        tail = rows.detok[0].flush()  # text held back for a stop string that never completed
        if tail:
            yield TokenEvent(None, tail, None, time.perf_counter() - t0)
        result = self._result(rows, 0, prompt_ids, visual, scores[0] if scores else None, clock, t0, time.perf_counter(),
                              peak.bytes, path)
        yield TokenEvent(None, "", None, time.perf_counter() - t0, result=result)
