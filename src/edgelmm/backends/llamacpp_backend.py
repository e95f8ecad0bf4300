"""llama.cpp in process (llama-cpp-python) on a GGUF file: CPU, or CUDA/Metal with GPU layers.

    load(ModelSpec(path="shapes-vlm-s.gguf"), backend="llamacpp")      # from `edgelmm export gguf`
    load(ModelSpec(path="shapes-vlm-s", options={"gguf": "s.gguf"}), backend="llamacpp")

    load(ModelSpec(path="s.gguf", options={"mmproj": "s-mmproj.gguf"}), backend="llamacpp")  # with images

The decode loop is ours, not llama-cpp-python's `create_completion`, for three reasons: the
chat template is rendered from the GGUF exactly as transformers renders it (so both engines read
the same token ids), the clock is stamped when each token's logits exist (the same point the
torch backend stamps), and greedy / temperature / top-k / top-p mean what they mean in every
other backend. Prompt log-probabilities need `logits_all: true`, which keeps every position's
logits.

Images go through llama.cpp's multimodal library (libmtmd, shipped with llama-cpp-python) when
the model is loaded with its projector (`options.mmproj`, from `edgelmm export gguf --mmproj`):
the prompt is rendered as for text, each image placeholder of the template (`<image>`) becomes
mtmd's media marker, mtmd splits the prompt into text and image chunks, the text chunks run
through the same context as every prompt and each image chunk is encoded by the vision tower
and decoded into the context at its place; decoding then goes on as for text. Without a
projector, requests with images are refused. Image prompts have no prompt log-probabilities
(mtmd writes no logits for image positions), and token-id prompts cannot carry images here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgelmm.backends.base import Backend, Detokenizer, Request, Result, TokenEvent, TokenScore, check_context
from edgelmm.backends.cache_keys import prompt_keys
from edgelmm.backends.engines import engine_options, no_methods
from edgelmm.backends.sampling import Decoded, decode_tokens, finish_stream, prompt_scores
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError, MissingExtraError, RequestError

OPTIONS = {
    "gguf": None,  # the GGUF file; default: spec.path when it ends in .gguf
    "n_ctx": 2048,  # capped at the model's trained context
    "n_threads": None,  # default: every core
    "n_batch": 512,
    "n_gpu_layers": 0,  # -1: all layers on the GPU (a CUDA/Metal build of llama-cpp-python)
    "logits_all": False,  # keep every position's logits: needed for prompt log-probabilities
    # llama.cpp's fused attention in the language model (mtmd picks its own for the vision tower);
    # off by default: on the demo models' CPU runs it decoded slower, for the same answers
    # (benchmarks/engines/README.md)
    "flash_attn": False,
    "seed": 0,
    "mmproj": None,  # the vision tower and projector GGUF (edgelmm export gguf --mmproj): images
    # MiB of prompt states kept in llama-cpp-python's LlamaRAMCache (LRU by bytes): a prompt that
    # begins as a kept one (a chat's next turn) restores it and reads only the rest; 0: off
    "prompt_cache_mb": 0,
    "prompt_cache_file": None,  # the kept states are read from here at load and written here on close
}
# edgelmm's own GGUF metadata, written by `edgelmm export gguf` and read here
CHAT_PARTS_KEY = "edgelmm.chat_content_parts"  # the chat template reads a list of content parts (a VLM's)
EOS_KEY = "edgelmm.eos_token_ids"  # the tokens transformers stops at
IMAGE_KEY = "edgelmm.image_token"  # the text the chat template writes where an image goes
IMAGE_TOKENS_KEY = "edgelmm.image_seq_length"  # visual tokens per image the language model was trained on


def _fields(path: Path) -> dict[str, Any]:
    """GGUF metadata as Python values, read without loading weights."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MissingExtraError("the llamacpp backend", "llamacpp", "gguf") from None
    wanted = ("general.architecture", EOS_KEY, IMAGE_KEY, IMAGE_TOKENS_KEY)
    fields = GGUFReader(path).fields
    found = {key: fields[key].contents() for key in wanted if key in fields}
    arch = found.get("general.architecture")
    if f"{arch}.context_length" in fields:
        found["context_length"] = int(fields[f"{arch}.context_length"].contents())
    return found


def _image_key(key: tuple[str, int]) -> int:
    """An image position's prompt-cache key as an id no token has (llama-cpp-python keys are ids)."""
    return -1 - (int(key[0][:12], 16) * 4096 + key[1]) % 2**62


def write_states(cache: Any, path: Path) -> None:
    """The kept prompt states to one safetensors file (atomically): keys, state bytes, ids, scores."""
    from safetensors.numpy import save

    from edgelmm.utils.io import atomic_write_bytes

    tensors, meta = {}, {"format": "edgelmm-llamacpp-prompt-cache"}
    for i, (key, state) in enumerate(cache.cache_state.items()):
        tensors[f"{i}.key"] = np.asarray(key, dtype=np.int64)
        tensors[f"{i}.state"] = np.frombuffer(state.llama_state, dtype=np.uint8)
        tensors[f"{i}.input_ids"] = np.asarray(state.input_ids)
        tensors[f"{i}.scores"] = np.asarray(state.scores, dtype=np.float32)
        meta[f"{i}"] = json.dumps({"n_tokens": int(state.n_tokens), "seed": int(state.seed)})
    atomic_write_bytes(path, save(tensors, metadata=meta))


def read_states(cache: Any, path: Path) -> None:
    from llama_cpp.llama import LlamaState
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "edgelmm-llamacpp-prompt-cache":
                raise EdgelmmError(f"{path}: not an edgelmm llama.cpp prompt cache", "give a file this backend wrote")
            for i in sorted(int(k) for k in meta if k.isdigit()):
                info = json.loads(meta[str(i)])
                blob = f.get_tensor(f"{i}.state").tobytes()
                cache[tuple(int(t) for t in f.get_tensor(f"{i}.key"))] = LlamaState(
                    input_ids=f.get_tensor(f"{i}.input_ids"), scores=f.get_tensor(f"{i}.scores"),
                    n_tokens=info["n_tokens"], llama_state=blob, llama_state_size=len(blob), seed=info["seed"])
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise EdgelmmError(f"{path}: cannot read the prompt cache ({exc})", "delete it, or give a file this backend wrote") from None


def _chunk_tokens(mtmd: Any, chunk: Any) -> list[int]:
    """The token ids of one of mtmd's text chunks."""
    import ctypes

    count = ctypes.c_size_t(0)
    pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
    return [pointer[j] for j in range(count.value)]


class LlamaCppBackend(Backend):
    name = "llamacpp"
    known_options = OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self.llm: Any = None
        self.options: dict[str, Any] = {}
        self._template: Any = None
        self._llama_cpp: Any = None
        self._eos: set[int] = set()  # end-of-generation tokens (EOS, EOT, ...)
        self._mtmd: Any = None  # the mtmd context, with a projector
        self._mtmd_lib: Any = None  # llama_cpp.mtmd_cpp, once a projector is loaded
        self._image_text = "<image>"
        self._image_id = -1  # its token id, once a projector is loaded
        self._metadata: dict[str, Any] = {}
        self.prompt_cache: Any = None  # llama_cpp.LlamaRAMCache, keyed by prompt keys (images by content hash)
        self.cache_hits = self.cache_misses = self.cache_hit_tokens = 0

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
        no_methods(spec, self.name, "quantize at export instead (edgelmm export gguf --outtype q8_0)")
        metadata = _fields(path)
        trained = metadata.get("context_length", 0)
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=min(options["n_ctx"], trained or options["n_ctx"]), n_batch=options["n_batch"],
            n_threads=options["n_threads"] or os.cpu_count(), n_gpu_layers=options["n_gpu_layers"],
            logits_all=options["logits_all"], flash_attn=bool(options["flash_attn"]), seed=options["seed"], verbose=False,
        )
        self._llama_cpp, self.spec, self.options = llama_cpp, spec, options
        self._template = self._compile_template(self.llm.metadata.get("tokenizer.chat_template"))
        self._eos = set(metadata.get(EOS_KEY) or []) or self._end_of_generation()
        self._image_text = metadata.get(IMAGE_KEY) or "<image>"
        self._metadata = metadata
        if options["mmproj"]:
            self._load_projector(Path(options["mmproj"]).expanduser())
        if options["prompt_cache_mb"]:
            self.prompt_cache = llama_cpp.LlamaRAMCache(capacity_bytes=int(float(options["prompt_cache_mb"]) * 2**20))
            if options["prompt_cache_file"] and Path(options["prompt_cache_file"]).is_file():
                read_states(self.prompt_cache, Path(options["prompt_cache_file"]))

    def _load_projector(self, path: Path) -> None:
        """mtmd on the projector GGUF, after checking it was made for this language model."""
        import llama_cpp.mtmd_cpp as mtmd

        if not path.is_file():
            raise EdgelmmError(f"mmproj file not found: {path}", "export it with `edgelmm export gguf MODEL OUT --mmproj OUT-mmproj.gguf`")
        from gguf import GGUFReader

        reader = GGUFReader(path)
        arch = reader.fields.get("general.architecture")
        projection = next((t for t in reader.tensors if t.name == "mm.2.weight"), None)
        if arch is None or arch.contents() != "clip" or projection is None:
            raise EdgelmmError(f"{path} is not a LLaVA multimodal projector (architecture 'clip' with mm.* tensors)")
        width = int(projection.shape[-1])  # ggml order: [in, out]
        if width != self.llm.n_embd():
            raise EdgelmmError(f"{path} projects images to width {width}, but the language model's embeddings are "
                               f"{self.llm.n_embd()} wide: it was made for another model")
        size, patch = (int(reader.fields[f"clip.vision.{k}"].contents()) for k in ("image_size", "patch_size"))
        expected = self._metadata.get(IMAGE_TOKENS_KEY)
        if expected is not None and (size // patch) ** 2 != int(expected):
            raise EdgelmmError(f"{path} makes {(size // patch) ** 2} tokens per image, but the language model was "
                               f"trained on {expected}: it was made for another model")
        image_ids = self.llm.tokenize(self._image_text.encode(), add_bos=False, special=True)
        if not image_ids:
            raise EdgelmmError(f"the language model has no '{self._image_text}' token for images")
        self._image_id = image_ids[0]
        from llama_cpp._logger import llama_log_callback

        # mtmd logs through llama-cpp-python's own callback, which prints only errors unless verbose
        mtmd.mtmd_log_set(llama_log_callback, None)
        mtmd.mtmd_helper_log_set(llama_log_callback, None)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = bool(self.options["n_gpu_layers"])
        params.n_threads = self.options["n_threads"] or os.cpu_count()
        params.print_timings = False
        context = mtmd.mtmd_init_from_file(str(path).encode(), self.llm.model, params)
        if not context or not mtmd.mtmd_support_vision(context):
            raise EdgelmmError(f"llama.cpp could not load the projector {path}", "export it again with `edgelmm export gguf --mmproj`")
        self._mtmd, self._mtmd_lib = context, mtmd

    def close(self) -> None:
        if self.prompt_cache is not None and self.options.get("prompt_cache_file"):
            write_states(self.prompt_cache, Path(self.options["prompt_cache_file"]))
        self.prompt_cache = None
        if self._mtmd is not None:
            self._mtmd_lib.mtmd_free(self._mtmd)
            self._mtmd = None
        if self.llm is not None:
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
    def max_context(self) -> int | None:
        return self.llm.n_ctx() if self.llm is not None else None

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self._template is None:
            raise RequestError("the GGUF has no chat template (tokenizer.chat_template)", "send a raw text prompt")
        parts = self.llm.metadata.get(CHAT_PARTS_KEY) == "true"
        converted = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                if any(p["type"] == "image" for p in content):
                    self._require_projector()
                content = content if parts else "".join(p["text"] for p in content)
            elif parts:
                content = [{"type": "text", "text": content}]
            converted.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
        return self._template.render(
            messages=converted, add_generation_prompt=True,
            bos_token=self._special_text(self.llm.token_bos()), eos_token=self._special_text(self.llm.token_eos()),
        )

    def _require_projector(self) -> None:
        if self._mtmd is None:
            raise RequestError("this llamacpp model has no vision part: the GGUF holds the language model only",
                               "load it with options: {mmproj: FILE} (edgelmm export gguf MODEL OUT --mmproj FILE), "
                               "or send text-only requests")

    def prompt_token_ids(self, request: Request) -> list[int]:
        if self.llm is None:
            raise EdgelmmError("the llamacpp backend has no model loaded", "call load(spec) first")
        if request.all_images():
            with self._image_prompt(request) as (_, ids, _):
                return ids
        if request.token_ids is not None:
            vocab = self.llm.n_vocab()
            bad = next((t for t in request.token_ids if t >= vocab), None)
            if bad is not None:
                raise RequestError(f"token id {bad} is outside the model's vocabulary (ids 0..{vocab - 1})")
            return list(request.token_ids)
        text = self.render_chat(request.messages) if request.messages is not None else request.text
        return self.llm.tokenize(text.encode(), add_bos=self._adds_bos(text), special=True)

    def _adds_bos(self, text: str) -> bool:
        """Whether tokenizing this prompt text adds BOS: as the GGUF says, unless the text has it."""
        bos = self._special_text(self.llm.token_bos())
        return self.llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" and not (bos and text.startswith(bos))

    def decode(self, token_ids: list[int]) -> str:
        return self.llm.detokenize(token_ids, special=True).decode("utf-8", errors="replace")

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [self.decode([t]) for t in token_ids]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        add_bos = add_special_tokens and self.llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.decode(token_ids)

    def tokenizer_info(self) -> dict[str, Any]:
        return {"tokenizer_class": "llama.cpp", "bos_token": self._special_text(self.llm.token_bos()),
                "eos_token": self._special_text(self.llm.token_eos()), "pad_token": None,
                "chat_template": self.llm.metadata.get("tokenizer.chat_template"), "model_max_length": self.max_context}

    def _prompt_scores(self, ids: list[int], top: int) -> list[TokenScore]:
        """Teacher-forced scores of the prompt just evaluated (llm.eval(ids) with logits_all)."""
        if not self.options["logits_all"]:
            raise RequestError("prompt log-probabilities with the llamacpp backend need every position's logits",
                               "load it with options: {logits_all: true}")
        return prompt_scores(ids, self.llm.scores[: len(ids) - 1], top)

    # ------------------------------------------------------------ images
    @contextmanager
    def _image_prompt(self, request: Request) -> Iterator[tuple[Any, list[int], int]]:
        """(mtmd's text and image chunks of an image request, the prompt's ids with the image
        token at each image position as the torch backend reports them, its visual token count);
        the chunks are freed when the block ends."""
        import ctypes

        self._require_projector()
        mtmd = self._mtmd_lib
        if request.token_ids is not None:
            raise RequestError("token-id prompts with images are not run by the llamacpp backend",
                               "send the images with messages or a text prompt")
        images = request.all_images()
        text = self.render_chat(request.messages) if request.messages is not None else request.text
        marker = mtmd.mtmd_default_marker().decode()
        if text.count(self._image_text) != len(images):
            raise RequestError(f"the prompt has {text.count(self._image_text)} image placeholders "
                               f"('{self._image_text}') for {len(images)} images")
        prompt = mtmd.mtmd_input_text()
        encoded = text.replace(self._image_text, marker).encode()
        prompt.text, prompt.text_len = encoded, len(encoded)
        prompt.add_special = self._adds_bos(text)
        prompt.parse_special = True
        bitmaps = []
        for image in images:
            rgb = image.convert("RGB")
            data = rgb.tobytes()
            bitmaps.append(mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            try:
                array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
                if mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(prompt), array, len(bitmaps)) != 0:
                    raise RequestError("llama.cpp could not split the prompt into text and images")
            finally:
                for bitmap in bitmaps:
                    mtmd.mtmd_bitmap_free(bitmap)
            ids: list[int] = []
            visual = 0
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    ids += _chunk_tokens(mtmd, chunk)
                else:
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    ids += [self._image_id] * n
                    visual += n
            yield chunks, ids, visual
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _evaluate_prompt(self, request: Request, params: SamplingParams) -> tuple[list[int], int]:
        """Run the request's prompt through the context (from the longest kept prompt state that
        it begins with, where the prompt cache is on): its ids and visual tokens."""
        if not request.all_images():
            prompt = self.prompt_token_ids(request)
            check_context(len(prompt), params, self.max_context)
            start = self._restore(prompt, [False] * len(prompt))
            self.llm.eval(prompt[start:])
            self._remember(prompt)
            return prompt, 0
        if params.prompt_logprobs is not None:
            raise RequestError("the llamacpp backend gives no prompt log-probabilities for image prompts",
                               "use the torch backend to score prompts with images")
        with self._image_prompt(request) as (chunks, prompt, visual):
            check_context(len(prompt), params, self.max_context)
            mask = [t == self._image_id for t in prompt]
            keys = [int(k) if isinstance(k, int) else _image_key(k) for k in prompt_keys(prompt, mask, request.all_images())]
            start = self._restore(keys, mask)
            self._eval_chunks(chunks, start)
            self._remember(keys)
        return prompt, visual

    def _restore(self, keys: list[int], image_mask: list[bool]) -> int:
        """Load the kept state that shares the longest prefix with `keys` and cut it back to that
        prefix (never into an image, always one token short); the positions restored (0: reset)."""
        cache = self.prompt_cache
        found = cache._find_longest_prefix_key(tuple(keys)) if cache is not None else None
        if found is None:
            self.llm.reset()
            if cache is not None:
                self.cache_misses += 1
            return 0
        common = min(self.llm.longest_token_prefix(found, keys), len(keys) - 1)
        images = [i for i, m in enumerate(image_mask) if m]
        if images and images[0] < common <= images[-1]:
            common = images[0]
        self.llm.load_state(cache[found])
        self.llm._ctx.kv_cache_seq_rm(-1, common, -1)
        self.llm.n_tokens = common
        self.cache_hits += common > 0
        self.cache_misses += common == 0
        self.cache_hit_tokens += common
        return common

    def _remember(self, keys: list[int]) -> None:
        if self.prompt_cache is not None:
            self.prompt_cache[tuple(keys)] = self.llm.save_state()

    def _eval_chunks(self, chunks: Any, skip: int = 0) -> None:
        """Text chunks through llm.eval, image chunks through mtmd, at consecutive positions; the
        first `skip` positions are already in the context (a restored state)."""
        import ctypes

        mtmd = self._mtmd_lib
        llama_cpp = self._llama_cpp
        position = 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                tokens = _chunk_tokens(mtmd, chunk)
                if position + len(tokens) > skip:
                    self.llm.eval(tokens[max(0, skip - position):])
                position += len(tokens)
                continue
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            position += n
            if position <= skip:
                continue
            past = llama_cpp.llama_pos(0)
            start = self.llm.n_tokens
            status = mtmd.mtmd_helper_eval_chunk_single(self._mtmd, self.llm.ctx, chunk, llama_cpp.llama_pos(start),
                                                         llama_cpp.llama_seq_id(0), self.llm.n_batch, True,
                                                         ctypes.byref(past))
            if status != 0:
                raise EdgelmmError(f"llama.cpp failed to encode an image (error {status})")
            self.llm.n_tokens = past.value

    # ------------------------------------------------------------ generation
    def _last_logits(self) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy()

    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        from edgelmm.utils.memory import PeakMemory

        t0 = time.perf_counter()
        detok = Detokenizer(lambda ids: self.llm.detokenize(ids).decode("utf-8", errors="replace"), params.stop, self._eos)
        out = Decoded()
        scores = None

        def advance(token: int) -> np.ndarray:
            self.llm.eval([token])
            return self._last_logits()

        with PeakMemory("cpu") as peak:
            prompt, visual = self._evaluate_prompt(request, params)
            if params.prompt_logprobs is not None:
                scores = self._prompt_scores(prompt, params.prompt_logprobs)
            yield from decode_tokens(self._last_logits(), advance, params, self.options["seed"], detok, t0, out)
        yield from finish_stream(out, detok, params, t0, prompt, visual, peak.bytes, scores)

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """One request after another: llama-cpp-python runs one sequence per context."""
        return self.generate_sequentially(requests, params)
