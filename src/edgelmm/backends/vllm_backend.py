"""vLLM in process (`vllm.LLM`), CUDA only.

    load(ModelSpec(path="Qwen/Qwen2-VL-2B-Instruct", options={"max_model_len": 4096}), backend="vllm")

Engine settings come from the hardware profile (configs/hardware: `engine.gpu_memory_utilization`,
`engine.max_context`, `engine.enforce_eager`), named by `options.hardware` or matched to the
GPU, and any of them can be overridden in `spec.options`. The mapping from our spec to vLLM's
arguments is two pure functions (`engine_args`, `sampling_args`), unit-tested without vLLM.

vLLM's offline `LLM` runs a batch to its end and returns no per-token times: TTFT is read from
the engine's request metrics where it keeps them (else it is the end-to-end time), and the
decode time is spread evenly over the tokens. `stream` therefore yields the tokens only when the
request is done. For client-side streaming numbers, run `vllm serve` and use the openai backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from edgelmm.backends.base import Backend, Counts, Request, Result, Timings, TokenEvent, TokenScore
from edgelmm.backends.engines import cuda_engine_profile, engine_options, openai_messages
from edgelmm.config import EngineDefaults, HardwareProfile, ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError, MissingExtraError

OPTIONS = {
    "hardware": None,  # profile name or YAML path; default: the profile matching the GPU
    "gpu_memory_utilization": None,  # default: the profile's engine.gpu_memory_utilization
    "max_model_len": None,  # default: the profile's engine.max_context
    "enforce_eager": None,  # default: the profile's engine.enforce_eager
    "quantization": None,  # vLLM's method name: "awq", "gptq", "fp8", "compressed-tensors", ...
    "tensor_parallel_size": 1,
    "max_num_seqs": None,
    "max_images": 1,  # limit_mm_per_prompt: images per request
    "seed": 0,
}
DTYPES = {"auto": "auto", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def engine_args(spec: ModelSpec, profile: HardwareProfile | None) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for a spec on a device profile."""
    options = engine_options(spec, OPTIONS, "vllm")
    defaults = profile.engine if profile else EngineDefaults()
    args: dict[str, Any] = {
        "model": spec.path,
        "dtype": DTYPES[spec.dtype],
        "trust_remote_code": spec.trust_remote_code,
        "gpu_memory_utilization": options["gpu_memory_utilization"] or defaults.gpu_memory_utilization,
        "max_model_len": options["max_model_len"] or defaults.max_context,
        "enforce_eager": defaults.enforce_eager if options["enforce_eager"] is None else bool(options["enforce_eager"]),
        "tensor_parallel_size": options["tensor_parallel_size"],
        "seed": options["seed"],
        "limit_mm_per_prompt": {"image": options["max_images"]},
    }
    if options["quantization"]:
        args["quantization"] = options["quantization"]
    if options["max_num_seqs"]:
        args["max_num_seqs"] = options["max_num_seqs"]
    return args


def sampling_args(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams`: temperature 0 is greedy there too; top_k -1 is
    "off" in every vLLM release (0 is refused by older ones); logprobs=k returns the chosen
    token's log-probability and the k most likely (0: the chosen one only); prompt_logprobs
    likewise for the prompt. vLLM generates at least one token: a prompt-only request asks for
    one, and the result drops it."""
    args: dict[str, Any] = {
        "n": 1, "max_tokens": max(params.max_new_tokens, 1), "temperature": params.temperature,
        "top_p": params.top_p, "top_k": params.top_k or -1, "seed": params.seed,
    }
    if params.stop:
        args["stop"] = list(params.stop)
    if params.wants_logprobs:
        args["logprobs"] = params.top_logprobs
    if params.prompt_logprobs is not None:
        args["prompt_logprobs"] = params.prompt_logprobs
    return args


def engine_prompt(request: Request) -> dict[str, Any]:
    """A text or token-id request as a vLLM prompt (TextPrompt / TokensPrompt), images attached."""
    prompt: dict[str, Any] = {"prompt": request.text} if request.text is not None else {"prompt_token_ids": request.token_ids}
    if request.images:
        prompt["multi_modal_data"] = {"image": request.images if len(request.images) > 1 else request.images[0]}
    return prompt


class VLLMBackend(Backend):
    name = "vllm"
    known_options = OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self.llm: Any = None
        self._sampling_cls: Any = None

    def load(self, spec: ModelSpec) -> None:
        try:
            from vllm import LLM
            from vllm import SamplingParams as VllmSamplingParams
        except ImportError:
            raise MissingExtraError("the vllm backend", "vllm", "vllm") from None
        profile = cuda_engine_profile(spec, OPTIONS, "vllm", "vLLM's own options (e.g. options: {quantization: awq})")
        self.llm = LLM(**engine_args(spec, profile))
        self._sampling_cls = VllmSamplingParams
        self.spec = spec

    def close(self) -> None:
        self.llm = None

    def device_name(self) -> str:
        import torch

        return f"cuda ({torch.cuda.get_device_name()}, vLLM)" if torch.cuda.is_available() else "cuda (vLLM)"

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        if self.llm is None:
            raise EdgelmmError("the vllm backend has no model loaded", "call load(spec) first")
        if not requests:
            return []
        sampling = self._sampling_cls(**sampling_args(params))
        t0 = time.perf_counter()
        chats = [i for i, r in enumerate(requests) if r.messages is not None]
        others = [i for i, r in enumerate(requests) if r.messages is None]
        outputs: dict[int, Any] = {}
        if chats:
            done = self.llm.chat([openai_messages(requests[i]) for i in chats], sampling, use_tqdm=False)
            outputs.update(zip(chats, done))
        if others:
            done = self.llm.generate([engine_prompt(requests[i]) for i in others], sampling, use_tqdm=False)
            outputs.update(zip(others, done))
        e2e = time.perf_counter() - t0
        return [self._result(outputs[i], e2e, params) for i in range(len(requests))]

    @staticmethod
    def _result(output: Any, e2e: float, params: SamplingParams) -> Result:
        completion = output.outputs[0]
        ids = list(completion.token_ids) if params.max_new_tokens else []
        metrics = getattr(output, "metrics", None)
        first, arrival = getattr(metrics, "first_token_time", None), getattr(metrics, "arrival_time", None)
        ttft = first - arrival if first and arrival else e2e
        step = (e2e - ttft) / (len(ids) - 1) if len(ids) > 1 else 0.0
        steps = list(completion.logprobs or [])[: len(ids)]
        logprobs = [step_lp[token].logprob for step_lp, token in zip(steps, ids)] if params.wants_logprobs and steps else None
        tops = None
        if params.top_logprobs and steps:
            tops = [sorted(((t, lp.logprob) for t, lp in step_lp.items()), key=lambda p: -p[1])[: params.top_logprobs]
                    for step_lp in steps]
        prompt_ids = list(output.prompt_token_ids or [])
        prompt_scores = None
        if params.prompt_logprobs is not None and output.prompt_logprobs is not None:
            prompt_scores = [
                TokenScore(token, None) if entry is None else TokenScore(
                    token, entry[token].logprob,
                    sorted(((t, lp.logprob) for t, lp in entry.items()), key=lambda p: -p[1])[: params.prompt_logprobs])
                for token, entry in zip(prompt_ids, output.prompt_logprobs)
            ]
        reason = getattr(completion, "stop_reason", None)
        return Result(
            text=completion.text if params.max_new_tokens else "", token_ids=ids, logprobs=logprobs,
            timings=Timings(ttft_s=ttft, decode_s=[step] * max(len(ids) - 1, 0), e2e_s=e2e),
            counts=Counts(len(prompt_ids), 0, len(ids)),
            peak_memory_bytes=None,  # vLLM reserves gpu_memory_utilization up front; a peak says nothing
            finish_reason="stop" if completion.finish_reason == "stop" else "length",
            stop_reason=reason, top_logprobs=tops, prompt_token_ids=prompt_ids, prompt_logprobs=prompt_scores,
        )

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        """The finished request replayed token by token (the offline API does not stream)."""
        [result] = self.generate([request], params)
        for token, logprob in zip(result.token_ids, result.logprobs or [None] * len(result.token_ids)):
            yield TokenEvent(token, "", logprob, result.timings.e2e_s)
        if result.text:
            yield TokenEvent(None, result.text, None, result.timings.e2e_s)
        yield TokenEvent(None, "", None, result.timings.e2e_s, result=result)
