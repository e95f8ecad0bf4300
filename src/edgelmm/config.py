"""Typed configuration: model specs, sampling, hardware profiles and benchmark matrices.

Every schema forbids unknown keys, so a typo in a YAML file is an error that names the file and
the key instead of a setting that is silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from edgelmm.errors import EdgelmmError
from edgelmm.registry import METHODS

# configs/ at the repository root; the package reaches it through the src/edgelmm/configs link.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, protected_namespaces=(), arbitrary_types_allowed=True)


def as_method(value: Any) -> Any:
    """A method object from its spec string ('fastv(k=2, keep=0.25)'); method objects pass."""
    if not isinstance(value, str):
        if not hasattr(value, "apply"):
            raise ValueError(f"expected a method spec such as 'fastv(k=2, keep=0.25)', got {value!r}")
        return value
    try:
        return METHODS.build(value)
    except EdgelmmError as exc:
        raise ValueError(str(exc)) from None


# A method in a schema: parsed (and checked) once, when the config is read; written back as its spec.
MethodField = Annotated[Any, BeforeValidator(as_method), PlainSerializer(str, return_type=str)]


class ModelSpec(Schema):
    """What to load: a bundled demo name, a local Hugging Face directory, or an engine's model id."""

    path: str
    name: str | None = None  # display name in reports; defaults to the last path component
    dtype: DType = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: Device = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    methods: list[MethodField] = Field(default_factory=list)  # e.g. ["fastv(k=2, keep=0.25)"], applied at load
    options: dict[str, Any] = Field(default_factory=dict)  # engine-specific settings

    @property
    def display_name(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name


class SamplingParams(Schema):
    """How to decode, and which log-probabilities to return. temperature 0 means greedy.

    max_new_tokens 0 scores the prompt without generating (with prompt_logprobs). Generation ends
    at the model's end-of-sequence token (kept in the result's token ids and logprobs, left out of
    its text, as vLLM does), at a stop string (cut from the text), or after max_new_tokens.
    logprobs: each generated token's log-probability; top_logprobs: also the k most likely
    tokens at each step; prompt_logprobs: each prompt token's log-probability given the ones
    before it (the first has none), with the k most likely tokens at each position.
    """

    max_new_tokens: int = Field(32, ge=0, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    stop: list[str] = Field(default_factory=list)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _something_to_do(self) -> SamplingParams:
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_new_tokens 0 only scores the prompt: ask for prompt_logprobs too")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        """Generated tokens' log-probabilities are returned (top_logprobs implies them)."""
        return self.logprobs or self.top_logprobs > 0


# ---------------------------------------------------------------- hardware profiles


class MemorySpec(Schema):
    capacity_gb: float = Field(gt=0)
    usable_fraction: float = Field(gt=0, le=1)  # share left for the model after OS / runtime
    bandwidth_gbs: float = Field(gt=0)


class ComputeSpec(Schema):
    """Peak dense throughput (no sparsity), in TFLOP/s or TOP/s; None where not published."""

    fp16_tflops: float | None = Field(None, gt=0)
    bf16_tflops: float | None = Field(None, gt=0)
    fp32_tflops: float | None = Field(None, gt=0)
    int8_tops: float | None = Field(None, gt=0)


class EngineDefaults(Schema):
    max_context: int = Field(4096, ge=128)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = False


class HardwareProfile(Schema):
    name: str
    description: str
    kind: Literal["gpu", "soc", "cpu"]
    match: list[str] = Field(default_factory=list)  # device-name substrings that pick this profile
    memory: MemorySpec
    compute: ComputeSpec
    engine: EngineDefaults = Field(default_factory=EngineDefaults)
    sources: list[str] = Field(default_factory=list)

    @property
    def usable_bytes(self) -> float:
        return self.memory.capacity_gb * 1e9 * self.memory.usable_fraction


# ---------------------------------------------------------------- benchmark matrices


class TaskSpec(Schema):
    name: str  # a built-in task name, or "vqa-jsonl" / "mc-jsonl"
    samples: int | None = Field(None, ge=1)
    path: str | None = None  # for file-based tasks
    seed: int = 0
    max_new_tokens: int | None = Field(None, ge=1)  # this task's answer limit; default the task's own, else sampling's


class BenchConfig(Schema):
    """A matrix of models × backends × methods × tasks, measured with warm-up and repeats."""

    name: str = "bench"
    models: list[ModelSpec]
    backends: list[str] = Field(default_factory=lambda: ["torch"])
    methods: list[MethodField] = Field(default_factory=lambda: ["none"], validate_default=True)
    tasks: list[TaskSpec]
    device: Device = "auto"
    dtype: DType = "auto"
    hardware: str | None = None  # profile name; default: guessed from the device
    samples: int = Field(32, ge=1)  # default per task
    warmup: int = Field(2, ge=0)
    repeats: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_new_tokens=24))
    out: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_from_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> BenchConfig:
        for key in ("models", "backends", "methods", "tasks"):
            if not getattr(self, key):
                raise ValueError(f"'{key}' must list at least one entry")
        return self


# ---------------------------------------------------------------- loading

S = TypeVar("S", bound=BaseModel)


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if error["type"] == "missing":
        return f"missing key '{where}'"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own validators: the message says it all
        return f"key '{where}': {message}"
    return f"key '{where}': {message} (got {error.get('input')!r})"


def validate(schema: type[S], data: Any, source: str) -> S:
    """Validate `data` against `schema`, turning pydantic's report into one readable line."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors()[:3])
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise EdgelmmError(
            f"{source}: {problems}{more}",
            f"fix the {schema.__name__} fields in {source}",
        ) from None


def bundled_config(path: str | Path, kind: str = "experiments") -> Path:
    """`path` if it is a file; else the bundled config it names, from any directory: a bare name
    ('demo'), or a path as written in the repository ('configs/experiments/demo.yaml')."""
    path = Path(path)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    candidates = [CONFIGS_DIR.joinpath(*parts), CONFIGS_DIR / kind / path.name, CONFIGS_DIR / kind / f"{path.name}.yaml"]
    found = next((c for c in candidates if parts and c.is_file()), None)
    if found is None:
        names = sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.yaml"))
        raise EdgelmmError(f"config file not found: {path}", f"check the path; bundled {kind} configs: {', '.join(names)}")
    return found


def load_yaml(path: str | Path, schema: type[S]) -> S:
    path = Path(path) if schema is HardwareProfile else bundled_config(path)
    if not path.is_file():
        raise EdgelmmError(f"config file not found: {path}", "check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise EdgelmmError(f"{path}: invalid YAML{where}: {problem}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise EdgelmmError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return validate(schema, data, str(path))
