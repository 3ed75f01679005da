"""Rendered business documents (invoices, receipts, forms) with field questions.

These stand in for DocVQA when the real dataset cannot be downloaded: a model
must read a printed field off a page image and answer in a few words, which is
what ANLS scores. Each document is generated from a seeded ``random.Random``
(seed derived from kind and index only) as a :class:`DocumentSpec`: a list of
drawing operations plus its questions. Rendering that list with Pillow and the
DejaVu fonts that ship inside matplotlib (so no system font is needed) gives
the same PNG bytes on every run with the same library versions.

Keeping the layout as data lets tests check, without OCR, that every gold
answer is text that was actually drawn, inside the page, not overlapping other
text.
"""

from __future__ import annotations

import functools
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

FontStyle = Literal["sans", "bold", "mono", "mono_bold"]

# The DejaVu faces bundled with matplotlib: always installed with our
# dependencies, wide Unicode coverage, and legible at 10-14 px.
_FONT_FILES: dict[str, str] = {
    "sans": "DejaVuSans.ttf",
    "bold": "DejaVuSans-Bold.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono_bold": "DejaVuSansMono-Bold.ttf",
}


@functools.cache
def font(style: FontStyle, size: int) -> ImageFont.FreeTypeFont:
    """A bundled DejaVu face at ``size`` pixels."""
    import matplotlib  # here, not at module level: it is slow to import (see charts.render_chart)

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _FONT_FILES[style]
    return ImageFont.truetype(str(path), size)


@dataclass(frozen=True)
class Text:
    """Text drawn at (x, y); ``anchor`` is Pillow's: "la" left, "ra" right, "ma" centred, all top-aligned."""

    x: int
    y: int
    text: str
    size: int = 12
    style: FontStyle = "sans"
    anchor: str = "la"
    fill: str = "#111111"

    def bbox(self) -> tuple[int, int, int, int]:
        """Pixel box (left, top, right, bottom) the text covers."""
        left, top, right, bottom = font(self.style, self.size).getbbox(self.text, anchor=self.anchor)
        return (self.x + int(left), self.y + int(top), self.x + int(right), self.y + int(bottom))


@dataclass(frozen=True)
class Rule:
    """A horizontal or vertical line."""

    x0: int
    y0: int
    x1: int
    y1: int
    width: int = 1
    fill: str = "#777777"


@dataclass(frozen=True)
class Box:
    """A rectangle outline (form fields, check boxes)."""

    x0: int
    y0: int
    x1: int
    y1: int
    outline: str = "#888888"


Op = Text | Rule | Box


@dataclass(frozen=True)
class Question:
    """A question about the page. ``answers[0]`` is exactly the text printed on it;
    any further answers are equivalent spellings ("1234.50" for "$1,234.50")."""

    question: str
    answers: tuple[str, ...]


DocKind = Literal["invoice", "receipt", "form"]


@dataclass(frozen=True)
class DocumentSpec:
    """Everything needed to draw one page and ask about it."""

    id: str
    kind: DocKind
    width: int
    height: int
    ops: tuple[Op, ...]
    questions: tuple[Question, ...]


def render_document(spec: DocumentSpec) -> bytes:
    """Draw the page on white and encode it as PNG (deterministic bytes)."""
    img = Image.new("RGB", (spec.width, spec.height), "white")
    draw = ImageDraw.Draw(img)
    for op in spec.ops:
        if isinstance(op, Text):
            draw.text((op.x, op.y), op.text, font=font(op.style, op.size), fill=op.fill, anchor=op.anchor)
        elif isinstance(op, Rule):
            draw.line((op.x0, op.y0, op.x1, op.y1), fill=op.fill, width=op.width)
        else:
            draw.rectangle((op.x0, op.y0, op.x1, op.y1), outline=op.outline)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------- content
# Fictional names; a few of each so that different seeds give visibly
# different pages and a model cannot answer from a memorized constant.

_COMPANIES = (
    "Northwind Supply Co.",
    "Blue Heron Printing",
    "Alder & Finch Ltd.",
    "Cedar Valley Farms",
    "Orion Office Goods",
    "Granite Peak Tools",
)
_STORES = ("FRESH MART", "CORNER GROCER", "SUNRISE DELI", "PINE MARKET", "BAYSIDE FOODS", "METRO GROCERY")
_STREETS = ("Harbor Rd", "Oak Ave", "Mill St", "Elm Blvd", "Station Rd", "Lake Dr")
_CITIES = ("Riverton", "Lakewood", "Fairview", "Ashford", "Brookside", "Milford")
_FIRST = ("Maria", "James", "Aisha", "Tomas", "Elena", "Kenji", "Laura", "Samuel")
_LAST = ("Garcia", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Brennan", "Silva")
_ITEMS = (
    ("Printer paper", 4.5, 9.0),
    ("Toner cartridge", 39.0, 89.0),
    ("Desk lamp", 18.0, 45.0),
    ("USB-C cable", 6.0, 15.0),
    ("Notebook A5", 2.0, 6.0),
    ("Office chair", 95.0, 240.0),
    ("Stapler", 7.0, 16.0),
    ("Monitor stand", 22.0, 60.0),
)
_GROCERIES = (
    ("MILK 1L", 0.9, 1.8),
    ("BREAD", 1.5, 3.5),
    ("EGGS x12", 2.5, 4.5),
    ("COFFEE", 4.0, 9.0),
    ("APPLES", 1.8, 4.2),
    ("CHEESE", 3.0, 7.5),
    ("RICE 2KG", 2.6, 5.0),
    ("TEA", 1.9, 4.0),
)
_PAYMENTS = ("VISA", "CASH", "MASTERCARD", "DEBIT")
_FORM_TITLES = (("MEMBERSHIP APPLICATION", "Community Library"), ("REGISTRATION FORM", "Sports Club"))
_MEMBERSHIP_TYPES = ("Adult", "Student", "Senior")

# Seeds are (kind offset + index) so that a page does not change when the
# suite size changes or another kind gains pages.
_SEED_BASE: dict[str, int] = {"invoice": 10_000, "receipt": 20_000, "form": 30_000}


def _money(x: float) -> str:
    return f"${x:,.2f}"


def _money_answers(x: float) -> tuple[str, ...]:
    """The printed amount first, then the spellings a model may reasonably give."""
    variants = (_money(x), f"{x:,.2f}", f"{x:.2f}", f"${x:.2f}")
    return tuple(dict.fromkeys(variants))  # de-duplicate, keep order


def _date(rng: random.Random, year: int = 2024) -> tuple[int, int, int]:
    return (year, rng.randint(1, 12), rng.randint(1, 28))


def _pick_questions(pool: Sequence[Question], index: int, per_doc: int) -> tuple[Question, ...]:
    """Rotate through the pool so that consecutive pages ask about different fields."""
    return tuple(pool[(per_doc * index + k) % len(pool)] for k in range(per_doc))


def make_invoice(index: int, questions_per_doc: int = 2) -> DocumentSpec:
    """An A4-ish invoice: header fields, 3-4 line items, subtotal, tax, total."""
    rng = random.Random(_SEED_BASE["invoice"] + index)
    w, h, m = 384, 448, 16
    company = rng.choice(_COMPANIES)
    address = f"{rng.randint(2, 98)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}"
    number = f"INV-{rng.randint(1000, 9999)}"
    y, mo, d = _date(rng)
    date = f"{y}-{mo:02d}-{d:02d}"
    due = f"{y}-{mo % 12 + 1:02d}-{d:02d}" if mo < 12 else f"{y + 1}-01-{d:02d}"
    client = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    client_city = rng.choice(_CITIES)
    items = rng.sample(_ITEMS, rng.randint(3, 4))
    rows = []
    for name, lo, hi in items:
        qty = rng.randint(1, 5)
        price = round(rng.uniform(lo, hi), 2)
        rows.append((name, qty, price, round(qty * price, 2)))
    subtotal = round(sum(r[3] for r in rows), 2)
    tax = round(subtotal * 0.08, 2)
    total = round(subtotal + tax, 2)

    ops: list[Op] = [
        Text(m, 14, "INVOICE", 22, "bold"),
        Text(w - m, 16, company, 12, "bold", "ra"),
        Text(w - m, 33, address, 10, "sans", "ra", "#444444"),
        Rule(m, 56, w - m, 56),
        Text(m, 66, "Invoice No:", 11, "bold"),
        Text(100, 66, number, 11),
        Text(m, 84, "Date:", 11, "bold"),
        Text(100, 84, date, 11),
        Text(m, 102, "Due date:", 11, "bold"),
        Text(100, 102, due, 11),
        Text(220, 66, "Bill to:", 11, "bold"),
        Text(220, 84, client, 11),
        Text(220, 102, client_city, 11),
        Rule(m, 126, w - m, 126),
        Text(m, 134, "Description", 11, "bold"),
        Text(224, 134, "Qty", 11, "bold", "ra"),
        Text(300, 134, "Unit price", 11, "bold", "ra"),
        Text(w - m, 134, "Amount", 11, "bold", "ra"),
        Rule(m, 152, w - m, 152, fill="#bbbbbb"),
    ]
    row_y = 160
    for name, qty, price, amount in rows:
        ops += [
            Text(m, row_y, name, 12),
            Text(224, row_y, str(qty), 12, anchor="ra"),
            Text(300, row_y, _money(price), 12, anchor="ra"),
            Text(w - m, row_y, _money(amount), 12, anchor="ra"),
        ]
        row_y += 22
    ops += [
        Rule(m, 252, w - m, 252),
        Text(290, 262, "Subtotal", 12, anchor="ra"),
        Text(w - m, 262, _money(subtotal), 12, anchor="ra"),
        Text(290, 282, "Tax (8%)", 12, anchor="ra"),
        Text(w - m, 282, _money(tax), 12, anchor="ra"),
        Rule(200, 302, w - m, 302, fill="#bbbbbb"),
        Text(290, 310, "TOTAL", 14, "bold", "ra"),
        Text(w - m, 310, _money(total), 14, "bold", "ra"),
        Text(m, 360, "Payment terms: 30 days", 10, fill="#444444"),
        Text(w // 2, 420, "Thank you for your business.", 10, anchor="ma", fill="#444444"),
    ]
    pool = (
        Question("What is the invoice number?", (number,)),
        Question("What is the total amount?", _money_answers(total)),
        Question("What is the invoice date?", (date,)),
        Question("Who is the invoice billed to?", (client,)),
        Question("Which company issued the invoice?", (company, company.rstrip("."))),
        Question("What is the due date?", (due,)),
    )
    return DocumentSpec(
        f"invoice-{index}", "invoice", w, h, tuple(ops), _pick_questions(pool, index, questions_per_doc)
    )


def make_receipt(index: int, questions_per_doc: int = 2) -> DocumentSpec:
    """A narrow till receipt in a monospaced face: store, date/time, items, total, payment."""
    rng = random.Random(_SEED_BASE["receipt"] + index)
    w, h, m = 288, 448, 16
    store = rng.choice(_STORES)
    address = f"{rng.randint(2, 98)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}"
    y, mo, d = _date(rng)
    date = f"{mo:02d}/{d:02d}/{y}"
    time = f"{rng.randint(8, 20):02d}:{rng.randint(0, 59):02d}"
    items = rng.sample(_GROCERIES, rng.randint(3, 5))
    rows = [(name, round(rng.uniform(lo, hi), 2)) for name, lo, hi in items]
    subtotal = round(sum(p for _, p in rows), 2)
    tax = round(subtotal * 0.05, 2)
    total = round(subtotal + tax, 2)
    payment = rng.choice(_PAYMENTS)

    ops: list[Op] = [
        Text(w // 2, 16, store, 16, "mono_bold", "ma"),
        Text(w // 2, 40, address, 10, "mono", "ma", "#333333"),
        Rule(m, 62, w - m, 62),
        Text(m, 72, f"DATE {date}", 12, "mono"),
        Text(w - m, 72, f"TIME {time}", 12, "mono", "ra"),
        Rule(m, 94, w - m, 94),
    ]
    row_y = 104
    for name, price in rows:
        ops += [Text(m, row_y, name, 12, "mono"), Text(w - m, row_y, f"{price:.2f}", 12, "mono", "ra")]
        row_y += 20
    ops += [
        Rule(m, 212, w - m, 212),
        Text(m, 222, "SUBTOTAL", 12, "mono"),
        Text(w - m, 222, f"{subtotal:.2f}", 12, "mono", "ra"),
        Text(m, 242, "TAX 5%", 12, "mono"),
        Text(w - m, 242, f"{tax:.2f}", 12, "mono", "ra"),
        Text(m, 266, "TOTAL", 15, "mono_bold"),
        Text(w - m, 266, _money(total), 15, "mono_bold", "ra"),
        Rule(m, 292, w - m, 292),
        Text(m, 302, f"PAID BY {payment}", 12, "mono"),
        Text(w // 2, 400, "THANK YOU!", 13, "mono_bold", "ma"),
    ]
    pool = (
        Question("What is the total on the receipt?", _money_answers(total)),
        Question("What is the name of the store?", (store,)),
        Question("What is the date on the receipt?", (date,)),
        Question("How was the purchase paid?", (payment,)),
        Question("At what time was the purchase made?", (time,)),
    )
    return DocumentSpec(
        f"receipt-{index}", "receipt", w, h, tuple(ops), _pick_questions(pool, index, questions_per_doc)
    )


def make_form(index: int, questions_per_doc: int = 2) -> DocumentSpec:
    """A filled-in application form: labelled boxes with values and one ticked check box."""
    rng = random.Random(_SEED_BASE["form"] + index)
    w, h, m = 384, 448, 16
    title, org_kind = _FORM_TITLES[index % len(_FORM_TITLES)]
    city = rng.choice(_CITIES)
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    name = f"{first} {last}"
    y, mo, d = _date(rng, rng.randint(1950, 2005))
    dob = f"{y}-{mo:02d}-{d:02d}"
    phone_digits = f"555{rng.randint(0, 9999999):07d}"
    phone = f"({phone_digits[:3]}) {phone_digits[3:6]}-{phone_digits[6:]}"
    email = f"{first[0].lower()}.{last.lower()}@example.com"
    member_id = f"M-{rng.randint(10000, 99999)}"
    member_type = rng.choice(_MEMBERSHIP_TYPES)
    fields = (
        ("Full name", name),
        ("Date of birth", dob),
        ("Phone", phone),
        ("Email", email),
        ("City", city),
        ("Member ID", member_id),
    )

    ops: list[Op] = [
        Text(w // 2, 14, title, 17, "bold", "ma"),
        Text(w // 2, 38, f"{city} {org_kind}", 11, "sans", "ma", "#444444"),
        Rule(m, 60, w - m, 60),
    ]
    field_y = 70
    for label, value in fields:
        ops += [
            Text(m, field_y, label, 10, "sans", fill="#555555"),
            Box(m, field_y + 14, w - m, field_y + 38),
            Text(m + 6, field_y + 19, value, 13),
        ]
        field_y += 50
    ops.append(Text(m, field_y + 4, "Membership type:", 11, "bold"))
    box_x = 140
    for kind in _MEMBERSHIP_TYPES:
        ops.append(Box(box_x, field_y + 4, box_x + 12, field_y + 16))
        if kind == member_type:
            ops.append(Text(box_x + 6, field_y + 4, "X", 11, "bold", "ma"))
        ops.append(Text(box_x + 18, field_y + 4, kind, 11))
        box_x += 80
    pool = (
        Question(
            "What is the phone number on the form?",
            (phone, f"{phone_digits[:3]}-{phone_digits[3:6]}-{phone_digits[6:]}", phone_digits),
        ),
        Question("What is the applicant's full name?", (name,)),
        Question("What is the date of birth?", (dob,)),
        Question("Which city is written on the form?", (city,)),
        Question("What is the email address?", (email,)),
        Question("What is the member ID?", (member_id,)),
        Question("Which membership type is checked?", (member_type,)),
    )
    return DocumentSpec(f"form-{index}", "form", w, h, tuple(ops), _pick_questions(pool, index, questions_per_doc))


DOCUMENT_MAKERS: dict[DocKind, Callable[[int, int], DocumentSpec]] = {
    "invoice": make_invoice,
    "receipt": make_receipt,
    "form": make_form,
}
"""Kind -> ``maker(index, questions_per_doc)``; the suite takes ``size`` pages of each."""
