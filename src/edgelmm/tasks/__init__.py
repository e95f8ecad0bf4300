"""Evaluation tasks by name: built-in shapes-world tasks and your own data as JSONL.

    >>> task = get_task("shapes-vqa")
    >>> samples = task.samples(8, seed=0)
    >>> task.score("Red.", samples[0])

A new task is a `Task` subclass, listed in `edgelmm.registry.TASKS` or registered with
`@register_task("name")`.
"""

from __future__ import annotations

from edgelmm.tasks.base import Task, TaskSample, available_tasks, get_task, register_task
from edgelmm.tasks.scoring import choice_accuracy, exact_match, extract_choice, normalize_answer

__all__ = [
    "Task",
    "TaskSample",
    "available_tasks",
    "choice_accuracy",
    "exact_match",
    "extract_choice",
    "get_task",
    "normalize_answer",
    "register_task",
]
