"""llama.cpp in process (llama-cpp-python) on a GGUF file: CPU, or CUDA/Metal with GPU layers.

    load(ModelSpec(path="shapes-vlm-s.gguf"), backend="llamacpp")      # from `edgelmm export gguf`
    load(ModelSpec(path="shapes-vlm-s", options={"gguf": "s.gguf"}), backend="llamacpp")

The decode loop is ours, not llama-cpp-python's `create_completion`, for three reasons: the
chat template is rendered from the GGUF exactly as transformers renders it (so both engines read
the same token ids), the clock is stamped when each token's logits exist (the same point the
torch backend stamps), and greedy / temperature / top-k / top-p mean what they mean in every
other backend. Only the language model is in the GGUF: requests with images are refused.

It also implements the server's TextAccess (raw prompts, chat rendering, scoring), so
`edgelmm serve model.gguf --backend llamacpp` serves /v1/completions; scoring (echo,
top_logprobs) needs `logits_all: true`, which keeps every position's logits.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgelmm.backends.base import Backend, Counts, Request, Result, Timings, TokenEvent
from edgelmm.backends.openai_backend import engine_options
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError, MissingExtraError

OPTIONS = {
    "gguf": None,  # the GGUF file; default: spec.path when it ends in .gguf
    "n_ctx": 2048,  # capped at the model's trained context
    "n_threads": None,  # default: every core
    "n_batch": 512,
    "n_gpu_layers": 0,  # -1: all layers on the GPU (a CUDA/Metal build of llama-cpp-python)
    "logits_all": False,  # keep every position's logits: needed for scoring (echo, top_logprobs)
    "seed": 0,
}
CHAT_PARTS_KEY = "edgelmm.chat_content_parts"
EOS_KEY = "edgelmm.eos_token_ids"  # written by `edgelmm export gguf`: transformers' stop tokens


def _fields(path: Path) -> dict[str, Any]:
    """GGUF metadata as Python values, read without loading weights."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MissingExtraError("the llamacpp backend", "llamacpp", "gguf") from None
    wanted = ("general.architecture", EOS_KEY)
    fields = GGUFReader(path).fields
    found = {key: fields[key].contents() for key in wanted if key in fields}
    arch = found.get("general.architecture")
    if f"{arch}.context_length" in fields:
        found["context_length"] = int(fields[f"{arch}.context_length"].contents())
    return found


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else temperature, then top-k, then top-p (nucleus), then a draw."""
    if params.greedy:
        return int(np.argmax(logits))
    logprobs = _log_softmax(logits.astype(np.float64) / params.temperature)
    order = np.argsort(-logprobs)
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(logprobs[order])
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p * probs.sum())) + 1
        order, probs = order[:keep], probs[:keep]
    return int(rng.choice(order, p=probs / probs.sum()))


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self) -> None:
        super().__init__()
        self.llm: Any = None
        self.options: dict[str, Any] = {}
        self.raw = False  # the TextAccess raw view: prompts are the model's whole text
        self._template: Any = None
        self._llama_cpp: Any = None
        self._eos: set[int] = set()  # end-of-generation tokens (EOS, EOT, ...)

    # ------------------------------------------------------------ lifecycle
    def load(self, spec: ModelSpec) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise MissingExtraError("the llamacpp backend", "llamacpp", "llama_cpp") from None
        options = engine_options(spec, OPTIONS, self.name)
        path = Path(options["gguf"] or spec.path).expanduser()
        if path.suffix != ".gguf":
            raise EdgelmmError(f"the llamacpp backend needs a GGUF file, got '{path}'",
                               "export one with `edgelmm export gguf MODEL OUT.gguf` and pass it as the model or options.gguf")
        if not path.is_file():
            raise EdgelmmError(f"GGUF file not found: {path}", "check the path, or export it with `edgelmm export gguf`")
        if any(m.strip() != "none" for m in spec.methods):
            raise EdgelmmError("the llamacpp backend cannot apply edgelmm methods to a GGUF",
                               "quantize at export instead (edgelmm export gguf --outtype q8_0)")
        metadata = _fields(path)
        trained = metadata.get("context_length", 0)
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=min(options["n_ctx"], trained or options["n_ctx"]), n_batch=options["n_batch"],
            n_threads=options["n_threads"] or os.cpu_count(), n_gpu_layers=options["n_gpu_layers"],
            logits_all=options["logits_all"], seed=options["seed"], verbose=False,
        )
        self._llama_cpp, self.spec, self.options = llama_cpp, spec, options
        self._template = self._compile_template(self.llm.metadata.get("tokenizer.chat_template"))
        self._eos = set(metadata.get(EOS_KEY) or []) or self._end_of_generation()

    def close(self) -> None:
        if self.llm is not None and not self.raw:
            self.llm.close()
        self.llm = None

    def device_name(self) -> str:
        threads = self.options.get("n_threads") or os.cpu_count()
        gpu = f", {self.options['n_gpu_layers']} GPU layers" if self.options.get("n_gpu_layers") else ""
        return f"cpu (llama.cpp, {threads} threads{gpu})"

    # ------------------------------------------------------------ tokens and templates
    def _compile_template(self, source: str | None) -> Any:
        """The GGUF's chat template in the same sandboxed Jinja set-up transformers uses."""
        if not source:
            return None
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise EdgelmmError(f"the model's chat template rejects this conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(source)

    def _end_of_generation(self) -> set[int]:
        """llama.cpp's own end-of-generation set (EOS, EOT, and tokens it recognises by their text)."""
        vocab = self._llama_cpp.llama_model_get_vocab(self.llm.model)
        n = self.llm.n_vocab()
        return {t for t in range(n) if self._llama_cpp.llama_vocab_is_eog(vocab, t)} or {self.llm.token_eos()}

    def _special_text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""

    @property
    def max_context(self) -> int:
        return self.llm.n_ctx()

    def raw_backend(self) -> Backend:
        view = copy.copy(self)
        view.raw = True
        return view

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self._template is None:
            raise EdgelmmError("the GGUF has no chat template (tokenizer.chat_template)", "send a raw prompt to /v1/completions")
        return self._template.render(
            messages=messages, add_generation_prompt=True,
            bos_token=self._special_text(self.llm.token_bos()), eos_token=self._special_text(self.llm.token_eos()),
        )

    def _text(self, request: Request) -> str:
        if request.images:
            raise EdgelmmError("the llamacpp backend runs the language model only (the GGUF holds no vision tower)",
                               "send text-only requests, or use the torch backend for images")
        if self.raw:
            return request.prompt
        parts = self.llm.metadata.get(CHAT_PARTS_KEY) == "true"
        content: Any = [{"type": "text", "text": request.prompt}] if parts else request.prompt
        return self.render_chat([{"role": "user", "content": content}])

    def prompt_ids(self, request: Request, raw: bool) -> list[int]:
        text = (self.raw_backend() if raw else self)._text(request)
        bos = self._special_text(self.llm.token_bos())
        add_bos = self.llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" and not (bos and text.startswith(bos))
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def decode(self, token_ids: list[int]) -> str:
        return self.llm.detokenize(token_ids, special=True).decode("utf-8", errors="replace")

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [self.decode([t]) for t in token_ids]

    def score(self, prompt: Request | list[int], raw: bool, continuation: list[int], top: int) -> tuple[list[int], list[Any]]:
        from edgelmm.serve.text import TokenScore

        if not self.options["logits_all"]:
            raise EdgelmmError("scoring tokens (echo, top_logprobs) with the llamacpp backend needs every position's logits",
                               "load it with options: {logits_all: true}")
        ids = prompt if isinstance(prompt, list) else self.prompt_ids(prompt, raw)
        full = list(ids) + list(continuation)
        self.llm.reset()
        self.llm.eval(full)
        logprobs = np.stack([_log_softmax(row.astype(np.float64)) for row in self.llm.scores[: len(full) - 1]])
        texts = self.token_texts(full)
        scores = [TokenScore(full[0], texts[0], None)]
        for i, token in enumerate(full[1:]):
            best = np.argsort(-logprobs[i])[:top] if top else []
            alternatives = [(self.decode([int(b)]), float(logprobs[i, b])) for b in best]
            scores.append(TokenScore(token, texts[i + 1], float(logprobs[i, token]), alternatives))
        return list(ids), scores

    # ------------------------------------------------------------ generation
    def _last_logits(self) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy()

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        if self.llm is None:
            raise EdgelmmError("the llamacpp backend has no model loaded", "call load(spec) first")
        from edgelmm.utils.memory import PeakMemory

        t0 = time.perf_counter()
        prompt = self.prompt_ids(request, self.raw)
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise EdgelmmError(f"prompt ({len(prompt)} tokens) plus {params.max_new_tokens} new tokens exceed "
                               f"the context of {self.max_context}", "raise options.n_ctx or shorten the prompt")
        rng = np.random.default_rng(params.seed if params.seed is not None else self.options["seed"])
        eos = self._eos
        ids: list[int] = []
        logprobs: list[float] = []
        stamps: list[float] = []
        text, finish = "", "length"
        with PeakMemory("cpu") as peak:
            self.llm.reset()
            self.llm.eval(prompt)
            for _ in range(params.max_new_tokens):
                logits = self._last_logits()
                stamps.append(time.perf_counter())
                token = pick(logits, params, rng)
                if token in eos:
                    finish = "stop"
                    break
                ids.append(token)
                logprob = float(_log_softmax(logits.astype(np.float64))[token]) if params.logprobs else None
                if logprob is not None:
                    logprobs.append(logprob)
                decoded = self.llm.detokenize(ids).decode("utf-8", errors="replace")
                delta = "" if decoded.endswith("\ufffd") else decoded[len(text):]
                text = text if decoded.endswith("\ufffd") else decoded
                stop = next((s for s in params.stop if s in decoded), None)
                if stop is not None:
                    finish = "stop"
                    break
                yield TokenEvent(token, delta, logprob, stamps[-1] - t0)
                if len(ids) < params.max_new_tokens:
                    self.llm.eval([token])
        final = self.llm.detokenize(ids).decode("utf-8", errors="replace")
        for stop in params.stop:
            cut = final.find(stop)
            if cut >= 0:
                final = final[:cut]
        if len(final) > len(text) and final.startswith(text):
            yield TokenEvent(None, final[len(text):], None, time.perf_counter() - t0)
        end = time.perf_counter()
        result = Result(
            text=final, token_ids=ids, logprobs=logprobs if params.logprobs else None,
            timings=Timings.from_stamps(t0, stamps[: max(len(ids), 1)], end),
            counts=Counts(len(prompt), 0, len(ids)), peak_memory_bytes=peak.bytes, finish_reason=finish,
        )
        yield TokenEvent(None, "", None, end - t0, result=result)

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """One request after another: llama-cpp-python runs one sequence per context."""
        return self.generate_sequentially(requests, params)
