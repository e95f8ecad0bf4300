"""Request bodies of the OpenAI API subset we serve, validated before anything reaches the model.

Fields that clients routinely send but that change nothing here (user, metadata, ...) are
ignored, as OpenAI-compatible servers do; fields that would change the answer and that we do not
implement (n > 1, tools, penalties, logit_bias, JSON mode) are refused, so that nobody gets a
silently different result. Extensions, as in vLLM: `top_k`; `return_token_ids` (each choice
carries its generated `token_ids` and the `prompt_token_ids` the model read);
`return_tokens_as_token_ids` (log-probability entries name tokens as "token_id:N", so a client
gets ids without the tokenizer); `prompt_logprobs` on chat (each prompt token's log-probability
with the top k). `images` on /v1/completions (data URLs, placed by the model's own image
placeholder in a text prompt, or already expanded in a token-id prompt) is ours: it lets a
client score the tokens that follow an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; every bound has an error that names it."""

    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_tokens: int = 1024  # the most a request may ask for; also chat's default
    max_context: int | None = None  # prompt + generated tokens; None: the model's own
    max_batch_size: int = 8
    max_queue: int = 256
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_connections: int = 64  # open connections at once; more get 503 before anything is read
    body_timeout_s: float = 30.0  # a request body that sends nothing for this long is dropped (408)
    verify_cache_bytes: int = 512 * 2**20  # KV held by draft-verify sessions (serve/sessions.py)
    max_verify_sessions: int = 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content (tool calls are not supported)")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 is "off" as in vLLM
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    repeat_penalty: float = 1.0  # llama.cpp's server's name for it
    min_p: float = 0.0
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("only n=1 is supported; send several requests instead")
        if (self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_p
                or self.repetition_penalty != 1.0 or self.repeat_penalty != 1.0):
            raise ValueError("presence_penalty, frequency_penalty, repetition_penalty, repeat_penalty, min_p and "
                             "logit_bias are not supported (send them off: 0, or 1 for the penalties)")
        if any(not s for s in self.stops):
            raise ValueError("stop strings must not be empty")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs cannot be streamed")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a text prompt (the tokenizer alone) or messages (the chat template too)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    images: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _prompts(self) -> CompletionRequest:
        prompts = self.prompts
        if not prompts or any(p in ("", []) for p in prompts):
            raise ValueError("the prompt is empty")
        if self.images and len(prompts) > 1:
            raise ValueError("images go with a single prompt")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 only makes sense with echo (to score the prompt)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string or token-id list each."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class VerifyRequest(_Body):
    """One round of the native draft-verify protocol (serve/sessions.py)."""

    model: str | None = None
    probe: bool = False
    close: bool = False
    session: str | None = Field(None, min_length=1, max_length=128)
    messages: list[Message] | None = None  # the prompt, to open the session
    prompt: list[int] | str | None = None  # or as token ids / raw text
    images: list[str] = Field(default_factory=list)  # with `prompt`
    keep: int = Field(0, ge=0)
    tokens: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=256)
    top_logprobs: int = Field(1, ge=1, le=20)

    @model_validator(mode="after")
    def _round(self) -> VerifyRequest:
        if self.probe:
            return self
        if self.session is None:
            raise ValueError("a verify round names its session")
        if self.messages is not None and self.prompt is not None:
            raise ValueError("open a session with messages or a prompt, not both")
        if self.images and self.prompt is None:
            raise ValueError("images go with a prompt (in messages they are image_url parts)")
        if self.prompt in ("", []):
            raise ValueError("the prompt is empty")
        return self
