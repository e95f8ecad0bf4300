"""The in-process PyTorch/transformers backend: every adapter's model, on CPU or CUDA, hookable.

Generation goes through transformers' `generate`, so every family's own input handling
(M-RoPE positions, pixel values at prefill only, caches) is the library's. Timings come from a
logits processor that stamps the clock each time the model has produced the logits of a new
token (after a CUDA synchronize), which is where a user would start the next step's wait.
"""

from __future__ import annotations

import platform
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from edgelmm.backends.base import Backend, Counts, Request, Result, Timings, TokenEvent
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.methods import apply_method
from edgelmm.models.loader import load_model
from edgelmm.utils.memory import PeakMemory


class _StepClock(LogitsProcessor):
    """Stamps the time of every decode step and, on request, keeps the model's log-probabilities.

    It runs first among the processors, so the log-probabilities are those of the model itself,
    before temperature or top-k/top-p reshape them.
    """

    def __init__(self, device: torch.device, keep_logprobs: bool):
        self.device = device
        self.keep_logprobs = keep_logprobs
        self.stamps: list[float] = []
        self.logprobs: list[torch.Tensor] = []  # per step, [batch, vocab]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.keep_logprobs:
            self.logprobs.append(torch.log_softmax(scores.float(), dim=-1))
        return scores


class _QueueStreamer(BaseStreamer):
    """Hands each new token to the consuming thread; the first `put` is the prompt and is skipped."""

    def __init__(self) -> None:
        self.queue: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.queue.put(None)


class _Cancelled(StoppingCriteria):
    """Ends generation between two tokens once the stream's consumer has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self) -> None:
        super().__init__()
        self.model: torch.nn.Module | None = None
        self.processor: Any = None
        self.adapter: Any = None
        self.device = torch.device("cpu")

    # ------------------------------------------------------------ lifecycle
    def load(self, spec: ModelSpec) -> None:
        model, processor, adapter, device = load_model(spec)
        for method in spec.methods:
            model = apply_method(method, model, adapter)
            adapter.model = model
        self.spec, self.model, self.processor, self.adapter, self.device = spec, model, processor, adapter, device

    def close(self) -> None:
        self.model = self.processor = self.adapter = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"

    # ------------------------------------------------------------ generation
    def _check(self, requests: list[Request]) -> None:
        if self.model is None:
            raise EdgelmmError("the torch backend has no model loaded", "call load(spec) first")
        if not self.adapter.multimodal and any(r.images for r in requests):
            raise EdgelmmError(
                f"model '{self.spec.display_name}' is a text-only language model and cannot take images",
                "drop the images or load a vision-language model",
            )

    def _generate_kwargs(
        self, inputs: dict[str, torch.Tensor], params: SamplingParams, clock: _StepClock, cancel: threading.Event | None = None
    ) -> dict[str, Any]:
        tokenizer = self.adapter.tokenizer
        eos = self.adapter.eos_token_ids()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        # A fresh config: model-shipped defaults (sampling on, repetition penalties) must not leak
        # in. When sampling, transformers' own warpers are switched off and ours run after the clock.
        neutral = {} if params.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            repetition_penalty=1.0,
            eos_token_id=eos or None,
            pad_token_id=pad,
            **neutral,
        )
        processors = LogitsProcessorList([clock])
        if not params.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        kwargs: dict[str, Any] = {**inputs, "generation_config": config, "logits_processor": processors}
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=tokenizer)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return kwargs

    def _prepare(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        inputs = self.adapter.build_batch([(r.prompt, list(r.images)) for r in requests])
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()
        }

    def _finish(
        self,
        row_ids: list[int],
        row_logprobs: list[float] | None,
        prompt_tokens: int,
        visual_tokens: int,
        stamps: list[float],
        t0: float,
        t_end: float,
        peak: int | None,
        params: SamplingParams,
    ) -> Result:
        """Trim a row at its end of sequence or stop string and attach its timings."""
        eos = set(self.adapter.eos_token_ids())
        finish = "length"
        for j, token in enumerate(row_ids):
            if token in eos:
                row_ids, finish = row_ids[:j], "stop"
                break
        text = self.adapter.decode(row_ids)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return Result(
            text=text,
            token_ids=row_ids,
            logprobs=row_logprobs[: len(row_ids)] if row_logprobs is not None else None,
            timings=Timings.from_stamps(t0, stamps[: max(len(row_ids), 1)], t_end),
            counts=Counts(prompt_tokens, visual_tokens, len(row_ids)),
            peak_memory_bytes=peak,
            finish_reason=finish,
        )

    def _token_counts(self, inputs: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        visual = self.adapter.image_token_mask(ids) & mask
        return mask.sum(1).tolist(), visual.sum(1).tolist()

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        if not requests:
            return []
        self._check(requests)
        t0 = time.perf_counter()
        inputs = self._prepare(requests)
        prompt_len = inputs["input_ids"].shape[1]
        clock = _StepClock(self.device, params.logprobs)
        with PeakMemory(self.device) as peak:
            sequences = self.model.generate(**self._generate_kwargs(inputs, params, clock))
        t_end = time.perf_counter()
        new = sequences[:, prompt_len:].tolist()
        prompts, visuals = self._token_counts(inputs)
        results = []
        for row, ids in enumerate(new):
            logprobs = None
            if params.logprobs:
                logprobs = [float(step[row, tok]) for step, tok in zip(clock.logprobs, ids)]
            results.append(
                self._finish(ids, logprobs, prompts[row], visuals[row], clock.stamps, t0, t_end, peak.bytes, params)
            )
        return results

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        """Yield each token as the model produces it; generation runs in a worker thread.

        Closing the iterator early (a client that went away) stops generation at the next token.
        """
        self._check([request])
        t0 = time.perf_counter()
        inputs = self._prepare([request])
        clock = _StepClock(self.device, params.logprobs)
        streamer = _QueueStreamer()
        failure: list[BaseException] = []
        peak = PeakMemory(self.device)
        cancel = threading.Event()

        def work() -> None:
            try:
                with torch.inference_mode(), peak:
                    self.model.generate(**self._generate_kwargs(inputs, params, clock, cancel), streamer=streamer)
            except BaseException as exc:  # handed to the consumer below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        eos = set(self.adapter.eos_token_ids())
        ids: list[int] = []
        logprobs: list[float] = []
        text = ""
        try:
            while (token := streamer.queue.get()) is not None:
                if token in eos:
                    continue
                ids.append(token)
                logprob = float(clock.logprobs[len(ids) - 1][0, token]) if params.logprobs else None
                if logprob is not None:
                    logprobs.append(logprob)
                decoded = self.adapter.decode(ids)
                if decoded.endswith("\ufffd"):  # inside a multi-byte character: wait for its end
                    delta = ""
                else:
                    delta, text = decoded[len(text) :], decoded
                yield TokenEvent(token, delta, logprob, time.perf_counter() - t0)
        finally:  # also when the consumer closes the stream early
            cancel.set()
            worker.join()
        if failure:
            raise failure[0]
        prompts, visuals = self._token_counts(inputs)
        result = self._finish(
            ids, logprobs if params.logprobs else None, prompts[0], visuals[0],
            clock.stamps, t0, time.perf_counter(), peak.bytes, params,
        )
        if len(result.text) > len(text):
            yield TokenEvent(None, result.text[len(text):], None, time.perf_counter() - t0)
        yield TokenEvent(None, "", None, time.perf_counter() - t0, result=result)
