"""The shapes world: synthetic pictures of coloured shapes with questions whose answers are exact.

It exists so that the demo models can be trained in minutes and scored by exact match: every
answer follows from the scene, every question is asked only when its answer is unique, and a
seed fixes everything.

Scenes are 96×96 RGB images holding 1–4 shapes, each in its own cell of a 3×3 grid (with
jitter), so that a position such as "top left" or "center" names one cell without doubt.

Answer conventions: colours and shapes are single lowercase words, counts are digits ("0"–"4"),
positions are "<row> <column>" with rows top/middle/bottom and columns left/center/right,
except the middle cell, which is "center"; yes/no questions answer "yes" or "no". A caption
lists every shape in row-major cell order: "a red circle at the top left, an orange square at
the center."

Seed convention — training and evaluation never share a seed:
  * evaluation uses seeds below `TRAIN_SEED_BASE` (the bundled results use 0..999);
  * training streams use seeds >= `TRAIN_SEED_BASE` (see `edgelmm.demo.train`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 3
TRAIN_SEED_BASE = 1_000_000

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
VQA_KINDS = ("color", "shape", "count", "position", "exists")
TASKS = ("vqa", "caption")
CAPTION_PROMPT = "Describe the image."

_SUPERSAMPLE = 2  # draw at 2× and box-downsample: smooth edges at almost no cost
_CELL = IMAGE_SIZE // GRID


@dataclass(frozen=True)
class Shape:
    """One drawn shape; `x`, `y` (centre) and `half` (half-extent) are in image pixels."""

    color: str
    shape: str
    cell: int  # 0..8, row-major
    x: float
    y: float
    half: float

    @property
    def position(self) -> str:
        return position_name(self.cell)


@dataclass
class Sample:
    """One question about one picture; `shapes` is the scene it was drawn from, in cell order."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    shapes: tuple[Shape, ...]


@dataclass
class Conversation:
    """Several questions about one picture, asked in turn (a multi-turn chat, as in LLaVA's
    instruction data); `turns` holds (question, answer, kind)."""

    image: Image.Image
    turns: list[tuple[str, str, str]]
    shapes: tuple[Shape, ...]


def position_name(cell: int) -> str:
    row, col = divmod(cell, GRID)
    return "center" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"


def caption(shapes: tuple[Shape, ...]) -> str:
    """The one canonical caption of a scene (row-major order), so exact match is meaningful."""
    parts = (f"{_article(s.color)} {s.color} {s.shape} at the {s.position}"
             for s in sorted(shapes, key=lambda s: s.cell))
    return ", ".join(parts) + "."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _scene(rng: random.Random) -> tuple[Shape, ...]:
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(1, 4)))
    shapes = []
    for cell in cells:
        row, col = divmod(cell, GRID)
        half = rng.uniform(7.0, 12.0)
        slack = _CELL / 2 - half - 1  # keep the whole shape inside its cell
        shapes.append(Shape(
            color=rng.choice(tuple(COLORS)), shape=rng.choice(SHAPES), cell=cell,
            x=(col + 0.5) * _CELL + rng.uniform(-slack, slack),
            y=(row + 0.5) * _CELL + rng.uniform(-slack, slack), half=half,
        ))
    return tuple(shapes)


def _render(shapes: tuple[Shape, ...], rng: random.Random) -> Image.Image:
    k = _SUPERSAMPLE
    grey = rng.randint(222, 250)
    background = tuple(min(255, grey + rng.randint(-6, 6)) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), background)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[s.color])
        x, y, h = s.x * k, s.y * k, s.half * k
        if s.shape == "circle":
            draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:
            draw.polygon(((x, y - h), (x - h, y + h), (x + h, y + h)), fill=fill)
    return image.reduce(k)


def _unique(shapes: tuple[Shape, ...], key) -> list[Shape]:
    """Shapes that `key` singles out: a question naming key(s) then refers to exactly one shape."""
    keys = [key(s) for s in shapes]
    return [s for s, k in zip(shapes, keys) if keys.count(k) == 1]


def _question(kind: str, shapes: tuple[Shape, ...], rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of this kind about the scene, or None when the scene cannot ask it."""
    if kind == "caption":
        return CAPTION_PROMPT, caption(shapes)
    if kind == "color":
        targets = _unique(shapes, lambda s: s.shape)
        if not targets:
            return None
        t = rng.choice(targets)
        return f"What color is the {t.shape}?", t.color
    if kind == "shape":
        targets = _unique(shapes, lambda s: s.color)
        if not targets:
            return None
        t = rng.choice(targets)
        return f"What shape is the {t.color} object?", t.shape
    if kind == "position":
        targets = _unique(shapes, lambda s: (s.color, s.shape))
        if not targets:
            return None
        t = rng.choice(targets)
        return f"Where is the {t.color} {t.shape}?", t.position
    if kind == "count":
        if rng.random() < 0.5:
            return "How many shapes are there?", str(len(shapes))
        # mostly colours that are present, so that answers other than "0" are common
        color = rng.choice([s.color for s in shapes] if rng.random() < 0.75 else tuple(COLORS))
        return f"How many {color} shapes are there?", str(sum(s.color == color for s in shapes))
    # exists: balanced yes/no
    present = {(s.color, s.shape) for s in shapes}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        answer = "no"
    return f"Is there {_article(color)} {color} {shape}?", answer


def generate(n: int, seed: int, task: str = "vqa") -> list[Sample]:
    """`n` samples, the same for the same (n, seed, task).

    "vqa" cycles through `VQA_KINDS` so that the kinds are exactly balanced; "caption" asks
    `CAPTION_PROMPT` about every picture. A scene that cannot ask the chosen kind is redrawn.
    """
    if task not in TASKS:
        raise ValueError(f"unknown shapes-world task {task!r}: expected one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        kind = "caption" if task == "caption" else VQA_KINDS[i % len(VQA_KINDS)]
        while True:
            shapes = _scene(rng)
            if (qa := _question(kind, shapes, rng)) is not None:
                break
        samples.append(Sample(_render(shapes, rng), qa[0], qa[1], kind, shapes))
    return samples


def conversations(n: int, seed: int, turns: int, caption_fraction: float = 0.25,
                  kind_weights: tuple[float, ...] | None = None) -> list[Conversation]:
    """`n` pictures with up to `turns` distinct questions each (kinds drawn at random, in
    proportion to `kind_weights` over `VQA_KINDS` if given; a kind the scene cannot ask is
    skipped), plus the caption request with probability `caption_fraction`, in random order.
    The same for the same arguments."""
    if turns < 1:
        raise ValueError(f"a conversation needs at least one turn, got {turns}")
    if kind_weights is not None and (len(kind_weights) != len(VQA_KINDS) or min(kind_weights) < 0 or not any(kind_weights)):
        raise ValueError(f"kind_weights needs {len(VQA_KINDS)} weights >= 0, not all 0 ({', '.join(VQA_KINDS)})")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shapes = _scene(rng)
        qas: list[tuple[str, str, str]] = []
        if rng.random() < caption_fraction:
            qas.append((CAPTION_PROMPT, caption(shapes), "caption"))
        asked: set[str] = set()
        for _ in range(4 * turns):
            if len(asked) == turns:
                break
            kind = rng.choice(VQA_KINDS) if kind_weights is None else rng.choices(VQA_KINDS, kind_weights)[0]
            qa = _question(kind, shapes, rng)
            if qa is not None and qa[0] not in asked:
                asked.add(qa[0])
                qas.append((qa[0], qa[1], kind))
        rng.shuffle(qas)
        out.append(Conversation(_render(shapes, rng), qas, shapes))
    return out
