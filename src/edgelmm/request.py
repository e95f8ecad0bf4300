"""What a user asks a model: one request, in exactly one of three forms (as vLLM takes prompts).

    Request.chat("What color is the circle?", images=[img])              # one user turn
    Request(messages=[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image", "image": img},
                                                   {"type": "text", "text": "And now?"}]}])
    Request(text="USER: <image>\\nWhat color? ASSISTANT:", images=[img])  # the model's own text
    Request(token_ids=[1, 3148, 1001, ...], images=[img])                # used exactly as given

`messages` are OpenAI-style turns (roles system, developer, user, assistant; content a string or
a list of parts) with images inside the conversation where they appear, as decoded images
(`{"type": "image", "image": PIL.Image}`): every backend renders them with the model's own chat
template. `text` skips the template; `token_ids` skip the tokenizer too. Both take `images` for
the image placeholders they hold (for token ids: already expanded, as the model's processor
expands them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgelmm.errors import RequestError

ROLES = ("system", "developer", "user", "assistant")


@dataclass(kw_only=True)
class Request:
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    images: list[Any] = field(default_factory=list)  # for text / token_ids requests
    id: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("messages", "text", "token_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise RequestError(f"a request holds exactly one of messages, text or token_ids, got {given or 'none'}")
        self.images = list(self.images)
        if self.messages is not None:
            if self.images:
                raise RequestError("a chat request carries its images inside its messages",
                                   "put {'type': 'image', 'image': img} parts where the images belong")
            self.messages = [_check_message(i, m) for i, m in enumerate(self.messages)]
            if not self.messages:
                raise RequestError("a chat request needs at least one message")
        elif self.token_ids is not None:
            if not self.token_ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.token_ids):
                raise RequestError("token_ids must be a non-empty list of token ids (integers >= 0)")
        elif not isinstance(self.text, str) or not self.text:
            raise RequestError("text must be a non-empty string")

    @classmethod
    def chat(cls, text: str, images: list[Any] | tuple[Any, ...] = (), system: str | None = None,
             id: str | None = None) -> Request:
        """One user turn: its images first, then its text (the layout VLMs are trained on)."""
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": text})
        messages = [{"role": "system", "content": system}] if system else []
        return cls(messages=[*messages, {"role": "user", "content": content}], id=id)

    @property
    def kind(self) -> str:
        return "messages" if self.messages is not None else "text" if self.text is not None else "token_ids"

    def all_images(self) -> list[Any]:
        """The request's images in the order the model reads them."""
        if self.messages is None:
            return list(self.images)
        return [part["image"] for message in self.messages if isinstance(message["content"], list)
                for part in message["content"] if part["type"] == "image"]


def _check_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"{where} must be a dict with a role in {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image" and part.get("image") is not None:
            parts.append({"type": "image", "image": part["image"]})
        else:
            raise RequestError(f"{where}.content[{j}]: a part is {{'type': 'text', 'text': str}} or "
                               "{'type': 'image', 'image': decoded image}")
    return {"role": message["role"], "content": parts}
