"""The shapes world as evaluation tasks: exact answers, so exact match is a fair score.

Only evaluation seeds are accepted (below `TRAIN_SEED_BASE`): the demo models were trained on
seeds at or above it, so a score here is never measured on training pictures.
"""

from __future__ import annotations

from edgelmm.demo import shapes
from edgelmm.errors import EdgelmmError
from edgelmm.tasks.base import Task, TaskSample
from edgelmm.tasks.scoring import exact_match


class _ShapesTask(Task):
    world_task: str  # the `shapes.generate` task

    def samples(self, n: int, seed: int = 0) -> list[TaskSample]:
        if not 0 <= seed < shapes.TRAIN_SEED_BASE:
            raise EdgelmmError(
                f"task '{self.name}': seed {seed} is not an evaluation seed",
                f"use a seed in 0..{shapes.TRAIN_SEED_BASE - 1}; larger seeds are training data",
            )
        return [
            TaskSample(id=f"{seed}-{i}", prompt=s.question, reference=s.answer, images=[s.image], kind=s.kind)
            for i, s in enumerate(shapes.generate(n, seed, task=self.world_task))
        ]

    def score(self, output: str, sample: TaskSample) -> float:
        return exact_match(output, sample.reference)


class ShapesVQA(_ShapesTask):
    """Colour, shape, count, position and yes/no questions, balanced over the kinds."""

    name = "shapes-vqa"
    world_task = "vqa"


class ShapesCaption(_ShapesTask):
    """One canonical caption per picture; exact match needs every shape, in order."""

    name = "shapes-caption"
    world_task = "caption"
    max_new_tokens = 64  # the longest caption is 32 tokens and its end token; 24 cut a quarter of them
