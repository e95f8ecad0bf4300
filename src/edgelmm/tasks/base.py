"""The task interface and its registry by name (`edgelmm.registry.TASKS`).

As in lm-evaluation-harness, a task is a class registered under a name: a new task is one
module plus its line in the registry table, or `@register_task("my-task")` on a class of the
user's own (in a plug-in module).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgelmm.config import TaskSpec
from edgelmm.errors import EdgelmmError
from edgelmm.registry import TASKS


@dataclass
class TaskSample:
    """One prompt with its images and reference answer.

    `kind` groups samples for per-kind accuracy (the shapes world's question kinds, a
    benchmark's categories); `meta` carries whatever a task's scorer needs besides the reference.
    """

    id: str
    prompt: str
    reference: str
    images: list[Any] = field(default_factory=list)  # PIL images
    kind: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A source of samples plus the rule that scores an output against a sample."""

    name: ClassVar[str]
    needs_path: ClassVar[bool] = False  # file-based tasks read their samples from `path`
    max_new_tokens: ClassVar[int | None] = None  # the answer limit the task needs, where the user sets none

    def __init__(self, path: str | Path | None = None):
        if self.needs_path and path is None:
            raise EdgelmmError(f"task '{self.name}' needs a file", "set 'path' on the task (or pass --task-file)")
        if not self.needs_path and path is not None:
            raise EdgelmmError(f"task '{self.name}' reads no file, but a path was given: {path}", "remove 'path'")
        self.path = Path(path) if path is not None else None

    @property
    def label(self) -> str:
        """The name in results and reports; file tasks add the file's stem so two files differ."""
        return f"{self.name}:{self.path.stem}" if self.path else self.name

    @abstractmethod
    def samples(self, n: int, seed: int = 0) -> list[TaskSample]:
        """At most `n` samples, the same for the same (n, seed)."""

    @abstractmethod
    def score(self, output: str, sample: TaskSample) -> float:
        """The score of one output, in [0, 1]."""


T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        cls.name = name
        TASKS.register(name, cls)
        return cls

    return wrap


def available_tasks() -> list[str]:
    return TASKS.names()


def get_task(spec: TaskSpec | str) -> Task:
    """The task a config entry names, constructed (file tasks read and check their file here)."""
    spec = TaskSpec(name=spec) if isinstance(spec, str) else spec
    return TASKS.get(spec.name)(spec.path)
