"""LMDeploy in process: the TurboMind or PyTorch-engine `pipeline`, CUDA only.

    load(ModelSpec(path="OpenGVLab/InternVL2_5-2B", options={"engine": "turbomind"}), backend="lmdeploy")

Engine settings come from the hardware profile (`engine.max_context` -> session_len,
`engine.gpu_memory_utilization` -> cache_max_entry_count, `engine.enforce_eager` -> the PyTorch
engine's eager_mode) and `spec.options` override them. Note that TurboMind applies
cache_max_entry_count to the memory left *after* the weights, vLLM's gpu_memory_utilization to
all of it. The mapping is two pure functions (`engine_config`, `generation_config`),
unit-tested without LMDeploy. Streaming uses `pipeline.stream_infer`, so per-token times are
real.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from edgelmm.backends.base import Backend, Counts, Request, Result, Timings, TokenEvent
from edgelmm.backends.engines import cuda_engine_profile, engine_options, openai_messages
from edgelmm.config import EngineDefaults, HardwareProfile, ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError, MissingExtraError

ENGINES = ("turbomind", "pytorch")
OPTIONS = {
    "engine": "turbomind",
    "hardware": None,  # profile name or YAML path; default: the profile matching the GPU
    "session_len": None,  # default: the profile's engine.max_context
    "cache_max_entry_count": None,  # default: the profile's engine.gpu_memory_utilization
    "enforce_eager": None,  # PyTorch engine only; default: the profile's engine.enforce_eager
    "model_format": None,  # TurboMind only: "hf", "awq", "gptq"
    "quant_policy": 0,  # KV-cache quantization: 0 (off), 4 or 8 bits
    "tp": 1,
}


def engine_config(spec: ModelSpec, profile: HardwareProfile | None) -> tuple[str, dict[str, Any]]:
    """(engine, keyword arguments of TurbomindEngineConfig / PytorchEngineConfig)."""
    options = engine_options(spec, OPTIONS, "lmdeploy")
    engine = options["engine"]
    if engine not in ENGINES:
        raise EdgelmmError(f"unknown lmdeploy engine '{engine}'", f"choose one of: {', '.join(ENGINES)}")
    if options["quant_policy"] not in (0, 4, 8):
        raise EdgelmmError(f"quant_policy must be 0, 4 or 8, got {options['quant_policy']}")
    defaults = profile.engine if profile else EngineDefaults()
    args: dict[str, Any] = {
        "session_len": options["session_len"] or defaults.max_context,
        "cache_max_entry_count": options["cache_max_entry_count"] or defaults.gpu_memory_utilization,
        "tp": options["tp"],
        "quant_policy": options["quant_policy"],
        "dtype": "auto" if spec.dtype in ("auto", "float32") else spec.dtype,
    }
    if engine == "turbomind" and options["model_format"]:
        args["model_format"] = options["model_format"]
    if engine == "pytorch":
        args["eager_mode"] = defaults.enforce_eager if options["enforce_eager"] is None else bool(options["enforce_eager"])
    return engine, args


def generation_config(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of `lmdeploy.GenerationConfig`. LMDeploy samples only with do_sample and
    keeps top_k=50 by default: both are set so that temperature 0 is greedy and top_k 0 is off."""
    args: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens, "do_sample": not params.greedy,
        "temperature": params.temperature if not params.greedy else 1.0,
        "top_p": params.top_p, "top_k": params.top_k,
    }
    if params.seed is not None:
        args["random_seed"] = params.seed
    if params.stop:
        args["stop_words"] = list(params.stop)
    if params.wants_logprobs:
        args["logprobs"] = max(params.top_logprobs, 1)
    return args


def prompt(request: Request) -> tuple[Any, bool]:
    """LMDeploy's prompt form and whether the pipeline should apply the chat template: OpenAI-form
    messages (images as data URLs), which it renders itself, or a raw text prompt with its images."""
    if request.messages is not None:
        return openai_messages(request), True
    if request.token_ids is not None:
        raise EdgelmmError("the lmdeploy backend takes messages or text, not token ids",
                           "send text, or use the torch, llamacpp or vllm backend for token-id prompts")
    return ((request.text, list(request.images)) if request.images else request.text), False


class LMDeployBackend(Backend):
    name = "lmdeploy"
    known_options = OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self.pipe: Any = None
        self._gen_cls: Any = None
        self.engine = ""

    def load(self, spec: ModelSpec) -> None:
        try:
            import lmdeploy
        except ImportError:
            raise MissingExtraError("the lmdeploy backend", "lmdeploy", "lmdeploy") from None
        profile = cuda_engine_profile(spec, OPTIONS, "lmdeploy", "LMDeploy's own options (e.g. model_format: awq)")
        self.engine, args = engine_config(spec, profile)
        config_cls = lmdeploy.TurbomindEngineConfig if self.engine == "turbomind" else lmdeploy.PytorchEngineConfig
        self.pipe = lmdeploy.pipeline(spec.path, backend_config=config_cls(**args), log_level="ERROR")
        self._gen_cls = lmdeploy.GenerationConfig
        self.spec = spec

    def close(self) -> None:
        if self.pipe is not None and hasattr(self.pipe, "close"):
            self.pipe.close()
        self.pipe = None

    def device_name(self) -> str:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
        return f"cuda ({gpu}, LMDeploy {self.engine})"

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        if self.pipe is None:
            raise EdgelmmError("the lmdeploy backend has no model loaded", "call load(spec) first")
        if params.prompt_logprobs is not None or params.top_logprobs:
            raise EdgelmmError("the lmdeploy backend returns no prompt or top log-probabilities",
                               "use the torch, llamacpp or vllm backend for scoring")
        engine_prompt, template = prompt(request)
        t0 = time.perf_counter()
        stamps: list[float] = []
        ids: list[int] = []
        logprobs: list[float] = []
        text, finish, prompt_tokens = "", "length", 0
        gen_config = self._gen_cls(**generation_config(params))
        for out in self.pipe.stream_infer([engine_prompt], gen_config=gen_config, do_preprocess=template):
            now = time.perf_counter()
            new_ids = list(out.token_ids or [])
            stamps += [now] * len(new_ids)
            ids += new_ids
            for step, token in zip(out.logprobs or [], new_ids):
                logprobs.append(step[token])
            text += out.text
            prompt_tokens = out.input_token_len or prompt_tokens
            finish = out.finish_reason or finish
            single = len(new_ids) == 1
            yield TokenEvent(new_ids[0] if single else None, out.text, logprobs[-1] if single and logprobs else None, now - t0)
        end = time.perf_counter()
        result = Result(
            text=text, token_ids=ids, logprobs=logprobs if params.wants_logprobs else None,
            timings=Timings.from_stamps(t0, stamps, end),
            counts=Counts(prompt_tokens, 0, len(ids)),
            peak_memory_bytes=None,  # TurboMind reserves its cache up front; a peak says nothing
            finish_reason="stop" if finish == "stop" else "length",
        )
        yield TokenEvent(None, "", None, end - t0, result=result)

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """One request at a time through stream_infer, so every result has real token times."""
        return self.generate_sequentially(requests, params)
