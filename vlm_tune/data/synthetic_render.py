"""Drawing a synthetic chart: its data table (:mod:`vlm_tune.data.synthetic_table`) to deterministic PNG bytes.

Drawing details that matter to a model:

* White RGB background; shapes are drawn without anti-aliasing (printed text is anti-aliased). Elements
  are large and use distinct saturated colours from
  :data:`~vlm_tune.data.synthetic_table.PALETTE`. Values are distinct integers 1..10, so the largest and
  the smallest element are unique.
* Element labels are capital letters ``A, B, C, ...`` in drawing order (bars and points left to right,
  pie slices clockwise from 12 o'clock). They are printed under bars / beside slices / under points only
  when ``image_size >= 128``; at smaller sizes they are implied by order alone.
* For question type ``value`` the asked element's value is printed on the chart with PIL's default font.
  At 64 px that text is only about 8-10 px tall and hard to read, for a person and for a model.
"""

from __future__ import annotations

import io
from functools import lru_cache

from vlm_tune.data.synthetic_table import MAX_VALUE

_AXIS_RGB = (0, 0, 0)
_LINE_RGB = (90, 90, 90)
_TEXT_RGB = (0, 0, 0)


@lru_cache(maxsize=16)
def _font(image_size: int):
    from PIL import ImageFont

    size = max(10, image_size // 16)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _draw_text(draw, cx: float, cy: float, text: str, font, boxed: bool = False) -> None:
    """Draw ``text`` centred on (cx, cy); ``boxed`` puts a white box behind it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = round(cx - (right - left) / 2) - left
    y = round(cy - (bottom - top) / 2) - top
    if boxed:
        draw.rectangle((x + left - 1, y + top - 1, x + right, y + bottom), fill=(255, 255, 255))
    draw.text((x, y), text, fill=_TEXT_RGB, font=font)


def render_chart(table: dict) -> bytes:
    """Draw the chart described by ``table`` and return PNG bytes (deterministic)."""
    from PIL import Image, ImageDraw

    size: int = table["image_size"]
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(size)
    _, text_h = _text_size(draw, "0123456789ABCDEFGH", font)
    labels: list[str] = table["labels"]
    values: list[int] = table["values"]
    rgbs = [tuple(c) for c in table["rgb"]]
    printed: dict[str, int] = table["printed"]
    show_labels: bool = table["show_labels"]
    n = len(values)
    pad = max(2, size // 32)

    if table["kind"] in ("bar", "line"):
        top = pad + text_h + 2 * max(1, size // 64)  # room for a printed value above the tallest element
        bottom = size - pad - (text_h + 3 if show_labels else 0)
        left, right = pad, size - pad
        plot_h = bottom - top
        slot = (right - left) / n
        gap = max(1, size // 64)  # between an element and the value printed above it
        draw.line((left, bottom, right - 1, bottom), fill=_AXIS_RGB, width=max(1, size // 128))
        if table["kind"] == "bar":
            bar_w = max(2, round(slot * 0.72))
            for i, (v, rgb) in enumerate(zip(values, rgbs, strict=True)):
                cx = left + slot * (i + 0.5)
                x0 = round(cx - bar_w / 2)
                y0 = bottom - round(plot_h * v / MAX_VALUE)
                draw.rectangle((x0, y0, x0 + bar_w - 1, bottom - 1), fill=rgb)
                if labels[i] in printed:
                    _draw_text(draw, cx, y0 - gap - text_h / 2, str(printed[labels[i]]), font)
                if show_labels:
                    _draw_text(draw, cx, bottom + 2 + text_h / 2, labels[i], font)
        else:
            r = max(3, round(min(slot * 0.3, size / 14)))
            y_lo, y_hi = bottom - r - 1, top + r  # value 0 -> y_lo, MAX_VALUE -> y_hi
            pts = [
                (round(left + slot * (i + 0.5)), round(y_lo - (y_lo - y_hi) * v / MAX_VALUE))
                for i, v in enumerate(values)
            ]
            draw.line(pts, fill=_LINE_RGB, width=max(1, size // 64))
            for i, ((x, y), rgb) in enumerate(zip(pts, rgbs, strict=True)):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
                if labels[i] in printed:
                    _draw_text(draw, x, y - r - gap - text_h / 2, str(printed[labels[i]]), font)
                if show_labels:
                    _draw_text(draw, x, bottom + 2 + text_h / 2, labels[i], font)
    else:  # pie: slices clockwise from 12 o'clock, in label order
        import math

        margin = pad + (text_h + 4 if show_labels else 0)
        c = size / 2
        radius = c - margin
        box = (round(c - radius), round(c - radius), round(c + radius) - 1, round(c + radius) - 1)
        total = sum(values)
        start = -90.0
        mids = []
        for v, rgb in zip(values, rgbs, strict=True):
            end = start + 360.0 * v / total
            draw.pieslice(box, start, end, fill=rgb)
            mids.append(math.radians((start + end) / 2))
            start = end
        for i, a in enumerate(mids):
            if labels[i] in printed:
                rr = radius * 0.6
                _draw_text(
                    draw, c + rr * math.cos(a), c + rr * math.sin(a), str(printed[labels[i]]), font, True
                )
            if show_labels:
                rr = radius + 2 + text_h * 0.6
                _draw_text(draw, c + rr * math.cos(a), c + rr * math.sin(a), labels[i], font)

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
