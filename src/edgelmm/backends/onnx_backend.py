"""ONNX Runtime on an export directory from `edgelmm export onnx`: CPU, or CUDA where present.

    load("runs/shapes-vlm-s.onnx", backend="onnx")
    load(ModelSpec(path="out/qwen2-vl.onnx", options={"providers": "cuda,cpu"}), backend="onnx")

The directory holds everything the runtime needs (`config.json` with its manifest, the graphs,
the tokenizer and processor files): nothing is read from the source checkpoint. Inputs are built
as the torch backend builds them, with the family's own processor and chat template (through the
model adapter, which needs no weights for that), so both backends read the same token ids. A VLM
runs vision graph -> image features placed at the image tokens' rows of the embeddings -> the
language-model graph; M-RoPE positions (Qwen2-VL) are computed here as transformers computes them.

The prompt is read in one pass (the graph's axes are dynamic), or with `prefill: profiles` in
chunks of the export's prefill lengths (a rest shorter than every length padded, its padding
dropped from the cache), as an engine compiled for those profiles runs it; then one token per
step, the KV cache passed from each step's outputs to the next step's inputs.
Decoding, sampling, logprobs and stops are `backends/sampling.py`'s, shared with llama.cpp.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from edgelmm.backends.base import AdapterTokens, Backend, Detokenizer, Request, Result, TokenEvent, check_context
from edgelmm.backends.engines import engine_options, no_methods
from edgelmm.backends.sampling import Decoded, decode_tokens, finish_stream, prompt_scores
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError, MissingExtraError, RequestError

MANIFEST_KEY = "edgelmm_onnx"  # the export's manifest, inside its config.json
FORMAT_VERSION = 1
OPTIONS = {
    # execution providers in order of preference: "auto" (CUDA where onnxruntime has it, then CPU)
    # or a comma-separated list of cuda, tensorrt, cpu
    "providers": "auto",
    "threads": None,  # intra-op threads; default: onnxruntime's (one per core)
    # let onnxruntime's threads spin-wait between ops (onnxruntime's own default). Off here: on a
    # small edge CPU the spinning threads starve the processor and the rest of the process
    # (demo VLM on 2 cores: TTFT 14.0 ms off, 20.3 ms on; benchmarks/export/)
    "spin": False,
    # "whole": the prompt in one pass (the graph's axes are dynamic); "profiles": in chunks of the
    # export's prefill lengths, padded where shorter than all, as an engine compiled for them runs
    "prefill": "whole",
    "seed": 0,
}
PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}


def read_manifest(path: Path) -> dict[str, Any]:
    """config.json of an export directory with its manifest checked; one line on anything else."""
    file = path / "config.json"
    if not path.is_dir() or not file.is_file():
        raise EdgelmmError(f"{path} is not an ONNX export directory (no config.json)",
                           "make one with `edgelmm export onnx MODEL OUT_DIR`")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgelmmError(f"{file}: unreadable JSON ({exc})", "export the model again") from None
    manifest = config.get(MANIFEST_KEY) if isinstance(config, dict) else None
    if not isinstance(manifest, dict):
        raise EdgelmmError(f"{path} is not an edgelmm ONNX export (config.json has no '{MANIFEST_KEY}' manifest)",
                           "make one with `edgelmm export onnx MODEL OUT_DIR`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EdgelmmError(f"{path}: export format {manifest.get('format_version')} is not the one this edgelmm reads "
                           f"({FORMAT_VERSION})", "export the model again with this version")
    for part in ("language_model", "embedding", "vision"):
        name = (manifest.get(part) or {}).get("file")
        if name and not (path / name).is_file():
            raise EdgelmmError(f"{path}: the manifest names {name}, which is missing", "export the model again")
    return config


def mrope_positions(ids: np.ndarray, grids: np.ndarray | None, image_token: int, merge: int) -> np.ndarray:
    """Qwen2-VL's 3-D positions [3, len] for one prompt: text advances all three axes together;
    an image's tokens take (0, row, column) of its merged grid after the text before it, and the
    text after an image resumes past its largest position (transformers' get_rope_index, images)."""
    out, start, i, image = [], 0, 0, 0
    while i < len(ids):
        if ids[i] == image_token:
            t, h, w = (int(v) for v in grids[image])  # type: ignore[index]
            h, w = h // merge, w // merge
            axes = np.stack([np.repeat(np.arange(t), h * w), np.tile(np.repeat(np.arange(h), w), t), np.tile(np.arange(w), t * h)])
            out.append(axes + start)
            start = int(out[-1].max()) + 1
            i += t * h * w
            image += 1
            continue
        end = i
        while end < len(ids) and ids[end] != image_token:
            end += 1
        out.append(np.broadcast_to(np.arange(start, start + end - i), (3, end - i)))
        start += end - i
        i = end
    return np.concatenate(out, axis=1).astype(np.int64)


class OnnxBackend(AdapterTokens, Backend):
    name = "onnx"
    known_options = OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self.adapter: Any = None
        self.processor: Any = None
        self.manifest: dict[str, Any] = {}
        self.options: dict[str, Any] = {}
        self.sessions: dict[str, Any] = {}
        self._table: np.ndarray | None = None  # the embedding table, when the export keeps it outside the graphs
        self._eos: set[int] = set()
        self._ort: Any = None

    # ------------------------------------------------------------ lifecycle
    def load(self, spec: ModelSpec) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("the onnx backend", "onnx", "onnxruntime") from None
        options = engine_options(spec, OPTIONS, self.name)
        if options["prefill"] not in ("whole", "profiles"):
            raise EdgelmmError(f"unknown prefill mode '{options['prefill']}' for the onnx backend", "use whole or profiles")
        no_methods(spec, self.name, "apply methods before export (quantize, then `edgelmm export onnx --weights int4`)")
        path = Path(spec.path).expanduser()
        config = read_manifest(path)
        manifest = config[MANIFEST_KEY]
        providers = self._providers(ort, options["providers"])
        settings = ort.SessionOptions()
        if options["threads"]:
            settings.intra_op_num_threads = int(options["threads"])
        settings.log_severity_level = 3
        if not options["spin"]:
            settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {}
        for part in ("language_model", "embedding", "vision"):
            file = (manifest.get(part) or {}).get("file")
            if file:
                try:
                    sessions[part] = ort.InferenceSession(str(path / file), settings, providers=providers)
                except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
                    first = str(exc).strip().splitlines()[0][:300]
                    raise EdgelmmError(f"onnxruntime cannot load {path / file}: {first}", "export the model again") from None
        table = (manifest.get("embedding") or {}).get("table")
        if table:
            from safetensors.numpy import load_file

            self._table = load_file(str(path / table))["weight"]
        self.adapter, self.processor = self._adapter(path, config)
        self.spec, self.manifest, self.options, self.sessions, self._ort = spec, manifest, options, sessions, ort
        self._eos = set(self.adapter.eos_token_ids())

    @staticmethod
    def _providers(ort: Any, choice: str) -> list[str]:
        available = ort.get_available_providers()
        if choice == "auto":
            return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        names = [c.strip() for c in str(choice).split(",") if c.strip()]
        unknown = [n for n in names if n not in PROVIDERS]
        if unknown or not names:
            raise EdgelmmError(f"unknown execution provider(s) {', '.join(unknown) or '(none)'}",
                               f"give a comma-separated list of {', '.join(PROVIDERS)}, or auto")
        missing = [n for n in names if PROVIDERS[n] not in available]
        if missing:
            raise EdgelmmError(f"this onnxruntime has no {', '.join(missing)} execution provider (it has {', '.join(available)})",
                               "install onnxruntime-gpu for CUDA, or use providers: cpu")
        return [PROVIDERS[n] for n in names]

    @staticmethod
    def _adapter(path: Path, config: dict[str, Any]) -> tuple[Any, Any]:
        """The family's adapter over the export's own config and processor (no weights: it builds inputs)."""
        from transformers import AutoConfig, GenerationConfig

        from edgelmm.models.registry import adapter_class

        cls = adapter_class(config["model_type"])
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        generation = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
        processor = cls.load_processor(path, config["model_type"])
        return cls(SimpleNamespace(config=hf_config, generation_config=generation), processor), processor

    def close(self) -> None:
        self.sessions, self.adapter, self.processor, self._table = {}, None, None, None

    def device_name(self) -> str:
        session = self.sessions.get("language_model")
        provider = session.get_providers()[0] if session is not None else "none"
        threads = self.options.get("threads") or "default"
        return f"onnxruntime {self._ort.__version__ if self._ort else ''} ({provider}, {threads} threads)"

    @property
    def max_context(self) -> int | None:
        return int(self.manifest["max_kv"]) if self.manifest else None

    # ------------------------------------------------------------ the graphs
    def _embed(self, ids: np.ndarray) -> np.ndarray:
        if self._table is not None:
            return self._table[ids]
        return self.sessions["embedding"].run(None, {"input_ids": ids})[0]

    def _image_features(self, inputs: dict[str, Any]) -> np.ndarray:
        vision = self.manifest["vision"]
        pixels = inputs["pixel_values"].numpy().astype(self.manifest["dtype"])
        if "grid" in vision:  # Qwen2-VL: patches of every image in a row, each image one fixed grid
            grids = inputs["image_grid_thw"].numpy()
            if any(list(g) != vision["grid"] for g in grids):
                raise RequestError(f"an image's patch grid {grids.tolist()} is not the {vision['grid']} the vision graph was "
                                   f"exported for", "resize images to the export's image size")
        elif list(pixels.shape[1:]) != vision["pixel_shape"]:
            raise RequestError(f"the processor made images of shape {list(pixels.shape[1:])}; the vision graph takes "
                               f"{vision['pixel_shape']}", "export the model at the processor's image size")
        features = self.sessions["vision"].run(None, {"pixel_values": pixels})[0]
        return features.reshape(-1, features.shape[-1])

    def _inputs(self, request: Request) -> tuple[dict[str, Any], list[int], int]:
        """The processor's inputs, the prompt's ids and its visual tokens."""
        images = request.all_images()
        if images and "vision" not in self.sessions:
            raise RequestError("this ONNX export has no vision graph: it takes text only", "send text-only requests")
        if images and self.manifest["vision"].get("resize_to"):
            request = _resized(request, tuple(self.manifest["vision"]["resize_to"]))
        inputs = self.adapter.build_inputs(request)
        ids = inputs["input_ids"][0].tolist()
        visual = int(self.adapter.image_token_mask(inputs["input_ids"]).sum())
        return inputs, ids, visual

    def _positions(self, ids: np.ndarray, inputs: dict[str, Any]) -> tuple[np.ndarray, int]:
        """Positions of the prompt ([1, n], or [3, 1, n] for M-RoPE) and the offset decoding adds to
        a token's index (0, or M-RoPE's rope delta)."""
        if not self.manifest["language_model"]["mrope"]:
            return np.arange(len(ids), dtype=np.int64)[None], 0
        grids = inputs["image_grid_thw"].numpy() if "image_grid_thw" in inputs else None
        merge = int(self.adapter.config.vision_config.spatial_merge_size)
        positions = mrope_positions(ids, grids, int(self.adapter.image_token_id), merge)
        return positions[:, None, :], int(positions.max()) + 1 - len(ids)

    def _run(self, x: np.ndarray, positions: np.ndarray, past: list[np.ndarray], real: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """One pass of the language model over `x` (ids or embeddings, [1, n]) whose first `real`
        positions are real and the rest padding: logits of the real ones and the cache grown by them."""
        lm = self.manifest["language_model"]
        n = x.shape[1]
        cached = past[0].shape[2]
        feed = {lm["input"]: x, "attention_mask": np.concatenate([np.ones((1, cached + real), np.int64),
                                                                   np.zeros((1, n - real), np.int64)], axis=1)}
        feed["position_ids"] = positions
        for i in range(lm["layers"]):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        logits, *present = self.sessions["language_model"].run(None, feed)
        if real < n:
            present = [p[:, :, : cached + real] for p in present]
        return logits[0, :real], present

    def _empty_cache(self) -> list[np.ndarray]:
        lm = self.manifest["language_model"]
        empty = np.zeros((1, lm["kv_heads"], 0, lm["head_dim"]), dtype=self.manifest["dtype"])
        return [empty] * (2 * lm["layers"])

    def _chunks(self, length: int) -> list[tuple[int, int]]:
        """(real, fed) sizes that cover a prompt of `length`: the longest prefill length that fits,
        repeatedly; a rest shorter than every length is fed padded to the shortest."""
        if self.options["prefill"] == "whole":
            return [(length, length)]
        lens = sorted(self.manifest["prefill_lens"], reverse=True)
        out, left = [], length
        while left > 0:
            size = next((s for s in lens if s <= left), None)
            out.append((size, size) if size is not None else (left, lens[-1]))
            left -= size if size is not None else left
        return out

    def _prefill(self, inputs: dict[str, Any], ids: list[int], want_all: bool) -> tuple[np.ndarray, list[np.ndarray], int]:
        """The prompt through the language model, chunk by chunk: logits (every position's when
        `want_all`, else the last one's), the cache, and the decoding position offset."""
        lm = self.manifest["language_model"]
        array = np.asarray([ids], dtype=np.int64)
        positions, delta = self._positions(array[0], inputs)
        if lm["input"] == "inputs_embeds":
            x = self._embed(array)
            mask = self.adapter.image_token_mask(inputs["input_ids"])[0].numpy()
            if mask.any():
                features = self._image_features(inputs)
                if features.shape[0] != int(mask.sum()):
                    raise RequestError(f"the vision graph made {features.shape[0]} image features for {int(mask.sum())} image tokens")
                x = x.copy()
                x[0, mask] = features
        else:
            x = array
        past, rows, start = self._empty_cache(), [], 0
        for real, fed in self._chunks(len(ids)):
            piece = x[:, start: start + real]
            where = positions[..., start: start + real]
            if fed > real:  # pad with copies of the last position: padding is masked and dropped from the cache
                piece = np.concatenate([piece, np.repeat(piece[:, -1:], fed - real, axis=1)], axis=1)
                where = np.concatenate([where, np.repeat(where[..., -1:], fed - real, axis=-1)], axis=-1)
            logits, past = self._run(piece, where, past, real)
            rows.append(logits if want_all else logits[-1:])
            start += real
        return np.concatenate(rows), past, delta

    # ------------------------------------------------------------ generation
    def stream(self, request: Request, params: SamplingParams) -> Iterator[TokenEvent]:
        from edgelmm.utils.memory import PeakMemory

        self._check()
        t0 = time.perf_counter()
        inputs, prompt, visual = self._inputs(request)
        check_context(len(prompt), params, self.max_context)
        if params.prompt_logprobs is not None and visual:
            raise RequestError("the onnx backend gives no prompt log-probabilities for image prompts",
                               "use the torch backend to score prompts with images")
        lm = self.manifest["language_model"]
        detok = Detokenizer(self.adapter.decode, params.stop, self._eos)
        out = Decoded()
        scores = None
        with PeakMemory("cpu") as peak:
            logits, past, delta = self._prefill(inputs, prompt, params.prompt_logprobs is not None)
            if params.prompt_logprobs is not None:
                scores = prompt_scores(prompt, logits[:-1], params.prompt_logprobs)
            length = len(prompt)

            def advance(token: int) -> np.ndarray:
                nonlocal past, length
                ids = np.asarray([[token]], dtype=np.int64)
                x = self._embed(ids) if lm["input"] == "inputs_embeds" else ids
                where = np.full((3, 1, 1) if lm["mrope"] else (1, 1), length + delta, dtype=np.int64)
                step, past = self._run(x, where, past, 1)
                length += 1
                return step[-1]

            yield from decode_tokens(logits[-1], advance, params, self.options["seed"], detok, t0, out)
        yield from finish_stream(out, detok, params, t0, prompt, visual, peak.bytes, scores)

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        """One request after another (each its own cache)."""
        return self.generate_sequentially(requests, params)


def _resized(request: Request, size: tuple[int, int]) -> Request:
    """The request with every image resized to the vision graph's fixed size (width, height)."""
    def fit(image: Any) -> Any:
        return image if image.size == size else image.convert("RGB").resize(size)

    if request.messages is None:
        return Request(text=request.text, token_ids=request.token_ids, images=[fit(i) for i in request.images], id=request.id)
    messages = [{**m, "content": [{**p, "image": fit(p["image"])} if p["type"] == "image" else p for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in request.messages]
    return Request(messages=messages, id=request.id)
