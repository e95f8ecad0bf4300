"""`edgelmm collab run` (one request) and `edgelmm chat` (a terminal chat), both through a Router.

The chat keeps the conversation and sends it whole each turn, so the cloud sees the same context
as the edge. Lines starting with `/` are commands: `/image PATH` attaches a picture to the next
message, `/reset` starts over, `/quit` (or end of input) leaves. After each answer a line says
who answered, how sure the edge was, and how long each side took.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edgelmm.collab.client import CloudSettings
from edgelmm.collab.policy import Policy
from edgelmm.collab.router import Routed
from edgelmm.collab.session import Session
from edgelmm.config import ModelSpec, SamplingParams
from edgelmm.errors import EdgelmmError
from edgelmm.request import Request


def _image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise EdgelmmError(f"cannot read the image {path}: {exc}") from None


def answer_once(edge: ModelSpec, edge_backend: str, cloud: CloudSettings | None, policy: Policy, prompt: str,
                images: list[str], max_tokens: int) -> Routed:
    pictures = [_image(p) for p in images]

    async def run() -> Routed:
        async with Session(edge, cloud, edge_backend) as session:
            router = await session.router(policy)
            return await router.answer(Request.chat(prompt, pictures), SamplingParams(max_new_tokens=max_tokens))

    return asyncio.run(run())


def describe(routed: Routed) -> str:
    """One line: who answered, the edge's confidence, each side's time."""
    parts = [routed.served_by]
    if routed.confidence is not None:
        parts.append(f"confidence {routed.confidence:.2f}")
    if routed.edge_s is not None:
        parts.append(f"edge {1000 * routed.edge_s:.0f} ms")
    if routed.cloud_s is not None:
        parts.append(f"cloud {1000 * routed.cloud_s:.0f} ms")
    parts.append(f"total {1000 * routed.total_s:.0f} ms")
    if routed.reason:
        parts.append(routed.reason)
    return " · ".join(parts)


def chat(edge: ModelSpec, edge_backend: str, cloud: CloudSettings | None, policy: Policy, max_tokens: int,
         system: str | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    params = SamplingParams(max_new_tokens=max_tokens)

    async def run() -> None:
        async with Session(edge, cloud, edge_backend) as session:
            router = await session.router(policy)
            console.print(f"[bold]edgelmm chat[/] · edge {escape(edge.display_name)} · policy {escape(policy.label())}"
                          + (f" · cloud {escape(cloud.base_url)}" if cloud else "")
                          + "  [dim](/image PATH, /reset, /quit)[/]")
            history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
            pending: list[Any] = []
            while True:
                try:
                    line = await asyncio.to_thread(console.input, "[bold cyan]you>[/] ")
                except EOFError:
                    return
                line = line.strip()
                if not line:
                    continue
                if line in ("/quit", "/exit"):
                    return
                if line == "/reset":
                    history, pending = history[:1] if system else [], []
                    console.print("[dim]conversation cleared[/]")
                    continue
                if line.startswith("/image "):
                    path = line[7:].strip()
                    try:
                        pending.append(_image(path))
                    except EdgelmmError as exc:
                        console.print(f"[red]{escape(str(exc))}[/]")
                        continue
                    console.print(f"[dim]image {escape(Path(path).name)} goes with your next message[/]")
                    continue
                content = [*({"type": "image", "image": i} for i in pending), {"type": "text", "text": line}]
                turn = {"role": "user", "content": content}
                try:
                    routed = await router.answer(Request(messages=[*history, turn]), params)
                except EdgelmmError as exc:
                    console.print(f"[red]{escape(str(exc))}[/]")
                    continue
                history += [turn, {"role": "assistant", "content": routed.result.text}]
                pending = []
                console.print(f"[bold green]{routed.served_by}>[/] {escape(routed.result.text)}")
                console.print(f"[dim]{escape(describe(routed))}[/]")

    asyncio.run(run())
