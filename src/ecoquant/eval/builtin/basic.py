"""Pages a tiny model can learn to read on a CPU: large printed fields, simple charts, shapes.

Why: the realistic documents and charts of the built-in suite need a real
vision-language model; a model small enough to train on two CPU cores scores
0 on them, and a recovery of 0 / 0 says nothing about a quantizer. These pages
ask the same kinds of question (read a field, read a chart, look at the
picture) at a scale such a model can learn, so a trained tiny model has real
scores and a quantized copy can lose some of them.

Every page is a 128 x 128 RGB image, which Gemma-4's image processor at the
smallest budget (``max_soft_tokens=70``) keeps as it is: 64 soft tokens, one
per 16-pixel square. What the question is about is drawn large (printed
values 30 px high, bars 18 px wide, shapes 25-72 px): a model trained from
scratch learns to read a thing much sooner when it covers several soft
tokens than when it hides in one of 64 (measured while building the trained
fixture: a 12-pixel shape's colour was still at chance after 750 steps).

======================  =====  ================  ==================================================
task                    half   metric            the question
======================  =====  ================  ==================================================
``basic_label``         doc    anls              one or two printed fields (CODE, PRICE, DATE);
                                                 "What is the price?" -> ``4.50``
``basic_form``          doc    anls              a small form (Name, City, Item);
                                                 "What is the city on the form?" -> ``Oslo``
``basic_bar_choice``    image  mc_accuracy       3-5 coloured bars; which is highest (options: the
                                                 bars' colours, left to right)
``basic_bar_value``     image  relaxed_accuracy  the height of a named bar, 1-5 grid units
``basic_count``         image  relaxed_accuracy  how many circles (or squares), 1-4
``basic_colour``        image  exact_match       the colour of the one shape
======================  =====  ================  ==================================================

Each answer depends on the image: the field values, bar heights, counts and
colours are drawn at random per page, so a model that ignores the picture can
only guess (``tests/test_basic_pages.py`` measures the best such guess).

Pages are generated from ``random.Random(f"ecoquant-basic/{split}/{kind}/{index}")``:
the split (``"train"`` or ``"eval"``) is part of every seed, so training pages
and evaluation pages come from disjoint seeds, and page ``index`` of a split is
the same whatever else is generated.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from PIL import Image, ImageDraw

from ecoquant.eval.builtin.documents import font
from ecoquant.eval.tasks import CHOICE_LETTERS, PROMPT_DEFAULTS, ImageRef, Sample, Task

Split = Literal["train", "eval"]

SIZE = 128
"""Pages are SIZE x SIZE pixels: 64 soft tokens at Gemma-4's smallest image budget (see the module docstring)."""
GLYPH_PX, GLYPH_PITCH = 30, 22
"""Label values: bold monospace of this size, one character every GLYPH_PITCH pixels."""

#: Colours the image tasks use, name -> RGB. Far apart in RGB so that a small
#: vision tower tells them apart; none is white (the background) or grey (grid lines).
COLOURS: MappingProxyType[str, str] = MappingProxyType(
    {
        "red": "#d62728",
        "green": "#2ca02c",
        "blue": "#1f5fd4",
        "orange": "#ff9a0e",
        "purple": "#8c3fbd",
        "black": "#111111",
    }
)

# Field values: short codes avoid look-alike glyphs (0/O, 1/I) so that a
# misread is the model's fault, not the font's.
_CODE_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Lena", "Omar")
_CITIES = ("Oslo", "Paris", "Rome", "Lima", "Cairo", "Dublin", "Quito", "Tokyo", "Delhi", "Perth", "Riga", "Bern")
_ITEMS = ("lamp", "chair", "table", "clock", "radio", "kettle", "mirror", "sofa", "desk", "bike", "piano", "vase")


@dataclass(frozen=True)
class BasicQuestion:
    """One question about a page: open (``choices`` None) or multiple choice (``answer`` a letter)."""

    question: str
    answer: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class BasicPage:
    """A drawn page and its questions; ``draw`` paints it on a white 128 x 128 canvas.

    ``description`` says everything on the page in a few words ("code K7A
    price 4.50"): not asked in evaluation; training uses it as a second,
    denser target about the same image.
    """

    id: str
    kind: str
    questions: tuple[BasicQuestion, ...]
    draw: Callable[[ImageDraw.ImageDraw], None]
    description: str = ""

    def png(self) -> bytes:
        """The page as PNG bytes (deterministic for the same Pillow version)."""
        return encode_png(self.image())

    def image(self) -> Image.Image:
        img = Image.new("RGB", (SIZE, SIZE), "white")
        self.draw(ImageDraw.Draw(img))
        return img


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def page_rng(split: Split, kind: str, index: int) -> random.Random:
    """The generator of one page; the split is part of the seed, so train and eval never share one."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return random.Random(f"ecoquant-basic/{split}/{kind}/{index}")


def _glyphs(draw: ImageDraw.ImageDraw, text: str, x: int, y: int) -> None:
    """``text`` in large bold monospace at a fixed pitch, so character ``k`` always starts at the same place."""
    face = font("mono_bold", GLYPH_PX)
    for k, ch in enumerate(text):
        draw.text((x + k * GLYPH_PITCH + GLYPH_PITCH // 2, y), ch, font=face, fill="#111111", anchor="mm")


# ---------------------------------------------------------------------- doc half


def _code(rng: random.Random) -> str:
    return "".join(rng.choice(_CODE_CHARS) for _ in range(3))


def _price(rng: random.Random) -> str:
    return f"{rng.randint(1, 9)}.{rng.randint(0, 99):02d}"


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}"


#: Label fields: printed key -> (how the question names it, value generator).
_LABEL_FIELDS: tuple[tuple[str, str, Callable[[random.Random], str]], ...] = (
    ("CODE", "code", _code),
    ("PRICE", "price", _price),
    ("DATE", "date", _date),
)

#: The two places a label field is printed (top of the key, in pixels): a
#: label's layout is fixed, like a shelf label's, and the question names the field.
_LABEL_SLOTS = (4, 68)


def make_label(split: Split, index: int) -> BasicPage:
    """A label with one or two fields, each a small key over a large value.

    Fields keep their order (CODE, PRICE, DATE) and fill the slots from the
    top; the question asks for one that is there.
    """
    rng = page_rng(split, "label", index)
    present = sorted(rng.sample(range(len(_LABEL_FIELDS)), rng.randint(1, len(_LABEL_SLOTS))))
    values = {i: _LABEL_FIELDS[i][2](rng) for i in present}
    asked = rng.choice(present)

    def draw(d: ImageDraw.ImageDraw) -> None:
        key_face = font("bold", 12)
        for slot, i in zip(_LABEL_SLOTS, present, strict=False):
            d.text((6, slot), _LABEL_FIELDS[i][0], font=key_face, fill="#333333")
            _glyphs(d, values[i], 6, slot + 36)
        d.rectangle((0, 0, SIZE - 1, SIZE - 1), outline="#888888")

    question = BasicQuestion(f"What is the {_LABEL_FIELDS[asked][1]}?", values[asked])
    description = " ".join(f"{_LABEL_FIELDS[i][1]} {values[i]}" for i in present)
    return BasicPage(f"label-{split}-{index}", "label", (question,), draw, description)


#: Form fields: printed key, how the question names it, the values it takes.
_FORM_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Name", "name", _NAMES),
    ("City", "city", _CITIES),
    ("Item", "item", _ITEMS),
)


def make_form(split: Split, index: int) -> BasicPage:
    """A small form: Name, City and Item, each a small key over a large word; the question names one."""
    rng = page_rng(split, "form", index)
    values = [rng.choice(pool) for _, _, pool in _FORM_FIELDS]
    asked = rng.randrange(len(_FORM_FIELDS))

    def draw(d: ImageDraw.ImageDraw) -> None:
        key_face, value_face = font("sans", 11), font("bold", 21)
        for k, ((key, _, _), value) in enumerate(zip(_FORM_FIELDS, values, strict=True)):
            y = 2 + 42 * k
            d.text((6, y), f"{key}:", font=key_face, fill="#555555")
            d.text((6, y + 13), value, font=value_face, fill="#111111")
            d.line((4, y + 39, SIZE - 5, y + 39), fill="#aaaaaa")

    question = BasicQuestion(f"What is the {_FORM_FIELDS[asked][1]} on the form?", values[asked])
    description = " ".join(f"{name} {value}" for (_, name, _), value in zip(_FORM_FIELDS, values, strict=True))
    return BasicPage(f"form-{split}-{index}", "form", (question,), draw, description)


# -------------------------------------------------------------------- image half

BAR_UNIT_PX = 22
"""Pixels per unit of bar height (values 1-5)."""
BAR_WIDTH_PX, BAR_GAP_PX, BAR_LEFT_PX = 18, 4, 16


def _bars(rng: random.Random) -> tuple[list[str], list[int]]:
    """Colours and distinct heights (1-5 units) of 3-5 bars, left to right."""
    n = rng.randint(3, 5)
    return rng.sample(list(COLOURS), n), rng.sample(range(1, 6), n)


def _draw_bars(d: ImageDraw.ImageDraw, colours: list[str], heights: list[int]) -> None:
    """Grid lines and unit labels 1-5 at the left, bars standing on the bottom edge."""
    face = font("sans", 10)
    for unit in range(1, 6):
        y = SIZE - 1 - unit * BAR_UNIT_PX
        d.line((BAR_LEFT_PX - 2, y, SIZE - 1, y), fill="#dddddd")
        d.text((7, y), str(unit), font=face, fill="#555555", anchor="mm")
    for k, (colour, height) in enumerate(zip(colours, heights, strict=True)):
        x = BAR_LEFT_PX + k * (BAR_WIDTH_PX + BAR_GAP_PX)
        d.rectangle((x, SIZE - 1 - height * BAR_UNIT_PX, x + BAR_WIDTH_PX - 1, SIZE - 1), fill=COLOURS[colour])
    d.line((BAR_LEFT_PX - 2, SIZE - 1, SIZE - 1, SIZE - 1), fill="#555555")


def _describe_bars(colours: list[str], heights: list[int]) -> str:
    return " ".join(f"{c} {h}" for c, h in zip(colours, heights, strict=True))


def make_bar_choice(split: Split, index: int) -> BasicPage:
    """Which of 3-5 bars is highest; the options are the bars' colours, left to right (as a legend lists them)."""
    rng = page_rng(split, "bar_choice", index)
    colours, heights = _bars(rng)
    question = BasicQuestion("Which bar is the highest?", CHOICE_LETTERS[heights.index(max(heights))], tuple(colours))
    return BasicPage(
        f"bar_choice-{split}-{index}",
        "bar_choice",
        (question,),
        lambda d: _draw_bars(d, colours, heights),
        _describe_bars(colours, heights),
    )


def make_bar_value(split: Split, index: int) -> BasicPage:
    """The value (height in grid units, 1-5) of the bar the question names by colour."""
    rng = page_rng(split, "bar_value", index)
    colours, heights = _bars(rng)
    asked = rng.randrange(len(colours))
    question = BasicQuestion(f"What is the value of the {colours[asked]} bar?", str(heights[asked]))
    return BasicPage(
        f"bar_value-{split}-{index}",
        "bar_value",
        (question,),
        lambda d: _draw_bars(d, colours, heights),
        _describe_bars(colours, heights),
    )


Shape = Literal["circle", "square", "triangle"]


def _draw_shape(d: ImageDraw.ImageDraw, shape: Shape, box: tuple[int, int, int, int], colour: str) -> None:
    fill = COLOURS[colour]
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon((((x0 + x1) // 2, y0), (x0, y1), (x1, y1)), fill=fill)


def make_count(split: Split, index: int) -> BasicPage:
    """1-4 shapes of one kind (circles or squares, as the question says), in cells of a 4 x 4 grid."""
    rng = page_rng(split, "count", index)
    kind: Shape = rng.choice(("circle", "square"))
    n = rng.randint(1, 4)
    placed = [(cell, rng.choice(list(COLOURS))) for cell in rng.sample(range(16), n)]

    def draw(d: ImageDraw.ImageDraw) -> None:
        for cell, colour in placed:
            x, y = (cell % 4) * 32, (cell // 4) * 32
            _draw_shape(d, kind, (x + 3, y + 3, x + 28, y + 28), colour)

    question = BasicQuestion(f"How many {kind}s are there?", str(n))
    return BasicPage(f"count-{split}-{index}", "count", (question,), draw, f"{n} {kind}s")


def make_colour(split: Split, index: int) -> BasicPage:
    """One large shape (circle, square or triangle) somewhere on the page; the question names it and asks its colour."""
    rng = page_rng(split, "colour", index)
    shape: Shape = rng.choice(("circle", "square", "triangle"))
    colour = rng.choice(list(COLOURS))
    size = rng.randint(40, 72)
    x, y = rng.randint(2, SIZE - size - 2), rng.randint(2, SIZE - size - 2)
    question = BasicQuestion(f"What colour is the {shape}?", colour)
    return BasicPage(
        f"colour-{split}-{index}",
        "colour",
        (question,),
        lambda d: _draw_shape(d, shape, (x, y, x + size, y + size), colour),
        f"{colour} {shape}",
    )


@dataclass(frozen=True)
class BasicKind:
    """One kind of page and how its task is asked and scored."""

    task: str
    half: Literal["doc", "image"]
    metric: str
    make: Callable[[Split, int], BasicPage]


#: The page kinds, in suite order.
BASIC_KINDS: tuple[BasicKind, ...] = (
    BasicKind("basic_label", "doc", "anls", make_label),
    BasicKind("basic_form", "doc", "anls", make_form),
    BasicKind("basic_bar_choice", "image", "mc_accuracy", make_bar_choice),
    BasicKind("basic_bar_value", "image", "relaxed_accuracy", make_bar_value),
    BasicKind("basic_count", "image", "relaxed_accuracy", make_count),
    BasicKind("basic_colour", "image", "exact_match", make_colour),
)


def page_samples(page: BasicPage, image: ImageRef) -> list[Sample]:
    """The page's questions as evaluation samples about ``image`` (its PNG file or bytes)."""
    return [
        Sample(f"{page.id}-q{k}", (image,), q.question, (q.answer,), q.choices) for k, q in enumerate(page.questions)
    ]


def basic_task(kind: BasicKind, samples: Sequence[Sample]) -> Task:
    """A task of this kind with the prompt suffix and token cap of its metric (lmms-eval's, see PROMPT_DEFAULTS)."""
    d = PROMPT_DEFAULTS[kind.metric]
    return Task(kind.task, kind.half, kind.metric, d.prompt_suffix, d.max_new_tokens, tuple(samples))
