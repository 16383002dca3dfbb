"""Seeded synthetic scenes - coloured shapes on a noisy grid - and instructions with reference answers.

A scene is a `GRID` x `GRID` board of `CELL`-pixel cells; each object has a colour, a shape, a size and a cell.
No two objects share a (colour, shape) pair. Rows and columns are numbered from 1, top-left first. Every answer is a
plain string of space-separated vocabulary words.

Questions name cells by position ("how many shapes are in row 2 ?", "what is left of the shape in row 2 column 3 ?"),
not by content ("how many shapes are blue ?", "what is left of the blue square ?"): the embedded model's 4-layer
decoder, trained from scratch on 2 CPU cores, never learned to pick image tokens by a question's colour or shape
words (the model card has the measurements), while it reads cells by position near-perfectly. Every answer still
depends on specific image tokens, which is what a KV-cache eviction can lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

GRID = 4
CELL = 16
IMAGE_SIZE = GRID * CELL
MIN_OBJECTS, MAX_OBJECTS = 4, 6

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 190),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# two words each, so that every relation question has the same length
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left of": (0, -1),
    "right of": (0, 1),
    "just above": (-1, 0),
    "just below": (1, 0),
}
KINDS = ("describe", "count", "lookup", "relation")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NOTHING = "nothing"


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    row: int  # 1-based
    col: int  # 1-based

    def phrase(self) -> str:
        """'a large red circle' (5 words with the article)."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]

    def at(self, row: int, col: int) -> SceneObject | None:
        for obj in self.objects:
            if (obj.row, obj.col) == (row, col):
                return obj
        return None

    def in_line(self, axis: str, line: int) -> list[SceneObject]:
        """Objects in row `line` (axis "row") or column `line` (axis "column"), in reading order."""
        return [o for o in self.sorted_objects() if (o.row if axis == "row" else o.col) == line]

    def sorted_objects(self) -> list[SceneObject]:
        """Objects in reading order (row by row, left to right): the order of the description."""
        return sorted(self.objects, key=lambda o: (o.row, o.col))


@dataclass(frozen=True)
class Instruction:
    """One task for one scene: `kind` is in `KINDS`, `question` the instruction text, `answer` the reference."""

    kind: str
    question: str
    answer: str


def make_scene(seed: int) -> Scene:
    """Draw a scene from `seed` alone (the same seed gives the same scene everywhere)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([int(seed), 0])
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    pairs = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    colours = list(COLOURS)
    objects = []
    for cell, pair in zip(cells, pairs, strict=True):
        objects.append(
            SceneObject(
                colour=colours[int(pair) // len(SHAPES)],
                shape=SHAPES[int(pair) % len(SHAPES)],
                size=SIZES[int(rng.integers(2))],
                row=int(cell) // GRID + 1,
                col=int(cell) % GRID + 1,
            )
        )
    background = tuple(int(v) for v in rng.integers(40, 100, size=3))
    return Scene(seed=int(seed), objects=tuple(objects), background=background)


def render(scene: Scene) -> np.ndarray:
    """The scene as a (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 image: shapes drawn over a noisy background, then pixel
    noise and a small random offset per object so that patches are not pixel-identical templates."""
    rng = np.random.default_rng([scene.seed, 1])
    base = np.asarray(scene.background, dtype=np.float32)
    img = base + rng.normal(0.0, 18.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        half = (6.5 if obj.size == "large" else 3.5) + rng.uniform(-0.5, 0.5)
        cx = (obj.col - 1) * CELL + CELL / 2 + rng.uniform(-1.0, 1.0)
        cy = (obj.row - 1) * CELL + CELL / 2 + rng.uniform(-1.0, 1.0)
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter, strict=True))
        box = (cx - half, cy - half, cx + half, cy + half)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        else:
            bar = max(1.0, half / 2.5)
            draw.rectangle((cx - half, cy - bar, cx + half, cy + bar), fill=fill)
            draw.rectangle((cx - bar, cy - half, cx + bar, cy + half), fill=fill)
    out = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, 8.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def describe(scene: Scene) -> str:
    """The full description: the object count, then every object with size, colour, shape and cell."""
    parts = [f"there are {NUMBER_WORDS[len(scene.objects)]} shapes ."]
    for obj in scene.sorted_objects():
        parts.append(f"{obj.phrase()} at row {obj.row} column {obj.col} .")
    return " ".join(parts)


def instruction(scene: Scene, kind: str, seed: int | None = None) -> Instruction:
    """An instruction of `kind` about `scene` with its reference answer; `seed` picks the question (by default the
    scene's seed). Questions of one kind always have the same number of words."""
    if kind not in KINDS:
        raise ValueError(f"unknown instruction kind {kind!r}; expected one of {KINDS}")
    rng = np.random.default_rng([scene.seed if seed is None else int(seed), 2, KINDS.index(kind)])
    if kind == "describe":
        return Instruction(kind, "describe the image .", describe(scene))
    if kind == "count":
        axis = "row" if rng.random() < 0.5 else "column"
        line = int(rng.integers(GRID)) + 1
        n = len(scene.in_line(axis, line))
        return Instruction(kind, f"how many shapes are in {axis} {line} ?", NUMBER_WORDS[n])
    if kind == "lookup":
        if rng.random() < 0.75:
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            row, col = obj.row, obj.col
        else:
            row, col = (int(v) + 1 for v in rng.integers(GRID, size=2))
        found = scene.at(row, col)
        return Instruction(kind, f"what is in row {row} column {col} ?", found.phrase() if found else NOTHING)
    # relation: a shape named by its cell and a direction whose neighbouring cell is on the board; prefer neighbours
    # that hold a shape, so that "nothing" is not the usual answer
    pairs = [(o, d) for o in scene.objects for d in DIRECTIONS if _on_board(*_step(o.row, o.col, d))]
    with_neighbour = [(o, d) for o, d in pairs if _neighbour(scene, o, d) is not None]
    pool = with_neighbour if with_neighbour and rng.random() < 0.7 else pairs
    obj, direction = pool[int(rng.integers(len(pool)))]
    question = f"what is {direction} the shape in row {obj.row} column {obj.col} ?"
    return Instruction(kind, question, relation_answer(scene, obj, direction))


def relation_answer(scene: Scene, obj: SceneObject, direction: str) -> str:
    """'row 2 column 2 , a small red circle': first the neighbouring cell (one step: move from the named cell), then
    what is in it (a second step: look that cell up), or 'nothing'. Stating the intermediate cell splits the two-step
    question into two one-step ones; the answer is still checked in full."""
    row, col = _step(obj.row, obj.col, direction)
    found = scene.at(row, col)
    return f"row {row} column {col} , {found.phrase() if found else NOTHING}"


def focus_cells(scene: Scene, ins: Instruction) -> list[tuple[int, int]]:
    """The cells (row, col) a question is about, in reading order: for `count` every cell of the asked row or column
    that holds a shape (as many as the answer says), for `lookup` the asked cell, for `relation` the neighbouring
    cell. Training supervises the model's state at the end of the prompt with them
    (`bench.embedded.train.FocusProbe`); a description is about every object and has none."""
    words = ins.question.split()
    if ins.kind == "count":  # "how many shapes are in <row|column> <n> ?"
        axis, line = words[5], int(words[6])
        return [(o.row, o.col) for o in scene.in_line(axis, line)]
    if ins.kind == "lookup":  # "what is in row <r> column <c> ?"
        return [(int(words[4]), int(words[6]))]
    if ins.kind == "relation":  # "what is <direction> the shape in row <r> column <c> ?"
        return [_step(int(words[8]), int(words[10]), " ".join(words[2:4]))]
    if ins.kind == "describe":
        return []
    raise ValueError(f"unknown instruction kind {ins.kind!r}; expected one of {KINDS}")


def cell_index(row: int, col: int) -> int:
    """The 0-based raster index of a (1-based) cell: the position of its image token among the GRID * GRID."""
    return (row - 1) * GRID + col - 1


def _step(row: int, col: int, direction: str) -> tuple[int, int]:
    dr, dc = DIRECTIONS[direction]
    return row + dr, col + dc


def _on_board(row: int, col: int) -> bool:
    return 1 <= row <= GRID and 1 <= col <= GRID


def _neighbour(scene: Scene, obj: SceneObject, direction: str) -> SceneObject | None:
    """The object in the cell directly `direction` of `obj` (same row or column, one step), if any."""
    return scene.at(*_step(obj.row, obj.col, direction))


def vocabulary() -> list[str]:
    """Every word an instruction or answer can use (the tokenizer's vocabulary, special tokens aside)."""
    words = {"there", "are", "shapes", "shape", ".", ",", "?", "a", "at", "row", "column", "describe", "the", "image",
             "how", "many", "what", "is", "in", NOTHING}
    words.update(COLOURS, SHAPES, SIZES, NUMBER_WORDS)
    words.update(w for phrase in DIRECTIONS for w in phrase.split())
    words.update(str(i) for i in range(1, GRID + 1))
    return sorted(words)
