"""Deterministic synthetic street snaps with garment ground truth, for tests, the demo and benchmarks (DESIGN §7).

Style mode lives here; the attribute mode (garments drawn independently of any style, for pretraining the tiny
backbone) is `ootd.synthetic_attributes`, which reuses this renderer through the `Wardrobe` seam.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ootd.styles import GARMENT_CLASSES, STYLES

RGB = tuple[int, int, int]
TOP, BOTTOM, OUTER, DRESS = (GARMENT_CLASSES.index(name) for name in ("top", "bottom", "outer", "dress"))
JPEG_QUALITY = 90
MIN_SIZE = 96  # below this a small figure's garments shrink to a few pixels and boxes degenerate
MIN_BOX_PX = 3  # garments hidden down to a sliver are drawn but not labelled


@dataclass(frozen=True)
class SyntheticPhoto:
    """One rendered street snap and its ground truth.

    Attributes:
        image: RGB image, size x size.
        style: the style the outfit was drawn from (None in attribute mode).
        garments: (class id into GARMENT_CLASSES, (x1, y1, x2, y2)) per visible garment; x2/y2 exclusive pixels.
        outfit_box: the exact union of the garment boxes.
        attributes: attribute mode only: attribute name → class index (`ootd.synthetic_attributes.ATTRIBUTES`).
    """

    image: Image.Image
    style: str | None
    garments: tuple[tuple[int, tuple[int, int, int, int]], ...]
    outfit_box: tuple[int, int, int, int]
    attributes: dict[str, int] | None = None


@dataclass(frozen=True)
class _Look:
    palette: tuple[RGB, ...]
    patterns: tuple[str, ...]  # repeated names weight the draw
    fit: float  # width of tops and outers relative to a regular fit
    bottoms: tuple[str, ...]
    p_dress: float
    p_outer: float
    outer_hem: tuple[float, float]  # outer length range as a fraction of figure height


# Palettes, patterns and silhouettes are deliberately distinct per style so a small model can separate the crops.
_LOOKS: dict[str, _Look] = {
    "Casual": _Look(((68, 98, 150), (236, 236, 230), (160, 160, 166), (150, 182, 212), (204, 184, 142)),
                    ("solid", "solid", "stripes_h", "denim"), 1.05, ("straight", "straight", "shorts"),
                    0.05, 0.3, (0.5, 0.58)),
    "Chic": _Look(((20, 20, 22), (56, 56, 62), (236, 230, 214), (96, 78, 66)),
                  ("solid", "solid", "solid", "pinstripe"), 0.9, ("slim", "slim", "skirt"),
                  0.2, 0.6, (0.7, 0.88)),
    "Cityboy": _Look(((34, 44, 82), (238, 238, 240), (126, 110, 90), (150, 176, 214)),
                     ("stripes_v", "stripes_v", "solid"), 1.35, ("wide", "wide"),
                     0.0, 0.4, (0.55, 0.62)),
    "Classic": _Look(((30, 38, 72), (188, 148, 96), (110, 30, 46), (234, 226, 204)),
                     ("checks", "tartan", "solid"), 1.0, ("straight", "slim"),
                     0.1, 0.75, (0.55, 0.85)),
    "Girlish": _Look(((242, 170, 192), (202, 182, 232), (250, 246, 246), (182, 212, 242)),
                     ("dots", "dots", "floral", "solid"), 0.95, ("skirt", "skirt", "shorts"),
                     0.55, 0.2, (0.5, 0.56)),
    "Gorpcore": _Look(((242, 110, 30), (22, 132, 132), (170, 202, 42), (28, 28, 30), (150, 140, 100)),
                      ("colorblock", "colorblock", "solid"), 1.2, ("wide", "straight"),
                      0.0, 0.9, (0.52, 0.62)),
    "Minimal": _Look(((246, 246, 244), (196, 196, 198), (226, 216, 200), (30, 30, 32)),
                     ("solid",), 1.0, ("straight", "slim"),
                     0.15, 0.4, (0.7, 0.86)),
    "Preppy": _Look(((28, 40, 90), (246, 246, 246), (30, 82, 52), (182, 30, 42), (232, 200, 60)),
                    ("tartan", "stripes_h", "solid"), 1.0, ("skirt", "straight"),
                    0.05, 0.45, (0.5, 0.56)),
    "Retro": _Look(((212, 160, 40), (122, 70, 34), (192, 92, 40), (90, 122, 82), (240, 226, 196)),
                   ("stripes_wide", "floral", "solid"), 1.05, ("flare", "flare", "long_skirt"),
                   0.25, 0.3, (0.54, 0.64)),
    "Romantic": _Look(((212, 150, 156), (246, 236, 222), (170, 192, 162), (128, 48, 70)),
                      ("floral", "floral", "dots", "solid"), 0.95, ("long_skirt", "skirt"),
                      0.65, 0.25, (0.5, 0.6)),
    "Sporty": _Look(((220, 30, 36), (30, 70, 202), (250, 250, 250), (20, 20, 24), (232, 242, 50)),
                    ("trim", "trim", "colorblock"), 1.1, ("slim", "shorts"),
                    0.0, 0.35, (0.5, 0.56)),
    "Street": _Look(((16, 16, 18), (84, 240, 64), (150, 60, 200), (120, 120, 124)),
                    ("graphic", "camo", "solid"), 1.45, ("wide", "wide"),
                    0.0, 0.35, (0.56, 0.64)),
    "Workwear": _Look(((150, 100, 52), (100, 100, 60), (40, 54, 88), (200, 170, 120), (222, 120, 40)),
                      ("checks", "solid", "solid", "denim"), 1.15, ("straight", "wide"),
                      0.0, 0.75, (0.54, 0.62)),
}


class Wardrobe:
    """What the renderer asks while dressing a figure; a style answers from its look (attribute mode: see
    `ootd.synthetic_attributes`). Each answer may draw from `rng`, in the order the renderer asks.

    Attributes:
        fit: width of tops and outers relative to a regular fit.
    """

    fit: float = 1.0

    def dress(self, rng: np.random.Generator) -> bool:
        """Whether the figure wears a dress (else a top and a bottom)."""
        raise NotImplementedError

    def bottom(self, rng: np.random.Generator) -> str:
        """Bottom kind: slim, straight, wide, flare, shorts, skirt or long_skirt."""
        raise NotImplementedError

    def outer_hem(self, rng: np.random.Generator) -> float | None:
        """Outer length as a fraction of figure height, or None for no outer."""
        raise NotImplementedError

    def long_sleeve(self, rng: np.random.Generator) -> bool:
        """Whether a top (not a dress) has long sleeves."""
        raise NotImplementedError

    def fill(self, cls: int, rng: np.random.Generator) -> tuple[str, list[RGB]]:
        """(pattern name, 3 colours) for a garment of class `cls`."""
        raise NotImplementedError


class _StyleWardrobe(Wardrobe):
    """A style's look; the draws are those the renderer always made, so style-mode photos stay byte-identical."""

    def __init__(self, look: _Look):
        self.look, self.fit = look, look.fit

    def dress(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.look.p_dress)

    def bottom(self, rng: np.random.Generator) -> str:
        return self.look.bottoms[int(rng.integers(len(self.look.bottoms)))]

    def outer_hem(self, rng: np.random.Generator) -> float | None:
        return float(rng.uniform(*self.look.outer_hem)) if rng.random() < self.look.p_outer else None

    def long_sleeve(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < 0.6)

    def fill(self, cls: int, rng: np.random.Generator) -> tuple[str, list[RGB]]:
        kind = self.look.patterns[int(rng.integers(len(self.look.patterns)))]
        return kind, _colors(self.look.palette, rng, 3)


_SKIN: tuple[RGB, ...] = ((241, 206, 178), (224, 172, 130), (198, 140, 100), (141, 94, 62), (96, 62, 40))
_HAIR: tuple[RGB, ...] = ((24, 18, 14), (70, 44, 24), (140, 100, 56), (210, 180, 120), (40, 40, 44))


def render_outfit(style: str, rng: np.random.Generator, size: int = 256) -> SyntheticPhoto:
    """Draws one figure wearing a `style` outfit at a random place and scale over a cluttered background.

    Args:
        style: one of ootd.styles.STYLES.
        rng: the only source of randomness, so a seeded generator gives an identical photo.
        size: side of the square image in pixels (at least MIN_SIZE).

    Raises:
        ValueError: unknown style or too small a size.
    """
    if style not in _LOOKS:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    others = [c for name, look in _LOOKS.items() if name != style for c in look.palette]
    return render_figure(_StyleWardrobe(_LOOKS[style]), others, rng, size, style=style)


def render_figure(
    wardrobe: Wardrobe,
    background: Sequence[RGB],
    rng: np.random.Generator,
    size: int = 256,
    *,
    style: str | None = None,
    attributes: dict[str, int] | None = None,
) -> SyntheticPhoto:
    """The renderer both modes share: a figure dressed by `wardrobe` over clutter painted from `background` colours.

    Args:
        wardrobe: answers what the figure wears.
        background: colours the clutter is painted from.
        rng: the only source of randomness.
        size: side of the square image in pixels (at least MIN_SIZE).
        style: recorded on the photo.
        attributes: recorded on the photo.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    canvas = _background(background, rng, size)

    height = float(rng.uniform(0.4, 0.9)) * size
    half_width = 0.3 * height  # widest extent: flared coats, wide trousers and hands
    cx = float(rng.uniform(half_width + 2, size - half_width - 2))
    y0 = float(rng.uniform(2, size - height - 2))
    fig = _Figure(cx, y0, height)

    layers = _outfit_layers(wardrobe, fig, rng, size)
    canvas = _compose(canvas, layers)
    garments = _visible_boxes(layers)

    # Lighting and sensor noise: photos of one style should not share exact pixel values.
    gain = float(rng.uniform(0.88, 1.1))
    noise = rng.normal(0.0, 3.0, canvas.shape)
    pixels = np.clip(canvas.astype(np.float32) * gain + noise, 0, 255).astype(np.uint8)
    boxes = [box for _, box in garments]
    outfit = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return SyntheticPhoto(Image.fromarray(pixels, "RGB"), style, tuple(garments), outfit, attributes)


class _Figure:
    """Maps figure coordinates (x in heights from the centre line, y in heights from the head top) to pixels."""

    def __init__(self, cx: float, y0: float, height: float):
        self.cx, self.y0, self.h = cx, y0, height

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.h, self.y0 + y * self.h)

    def poly(self, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.pt(x, y) for x, y in points]

    def px(self, length: float) -> int:
        return max(1, round(length * self.h))


def _jitter(color: RGB, rng: np.random.Generator, amount: int = 14) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)  # type: ignore[return-value]


def _colors(palette: Sequence[RGB], rng: np.random.Generator, k: int) -> list[RGB]:
    order = rng.permutation(len(palette))
    return [_jitter(palette[order[i % len(palette)]], rng) for i in range(k)]


def _background(others: Sequence[RGB], rng: np.random.Generator, size: int) -> np.ndarray:
    """A street-ish clutter of walls, signs and blobs painted from `others` (style mode: the other styles' palettes)."""
    pick = lambda: _jitter(others[int(rng.integers(len(others)))], rng, 20)  # noqa: E731
    img = Image.new("RGB", (size, size), pick())
    draw = ImageDraw.Draw(img)
    edges = np.sort(rng.uniform(0, size, int(rng.integers(1, 4))))
    for x1, x2 in zip(edges, [*edges[1:], size], strict=True):  # building facades
        draw.rectangle((x1, 0, x2, size), fill=pick())
    draw.rectangle((0, int(rng.uniform(0.6, 0.92) * size), size, size), fill=pick())
    for _ in range(int(rng.integers(10, 20))):
        x, y = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.35, 2) * size
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle((x, y, x + w, y + h), fill=pick())
        elif kind == 1:
            draw.ellipse((x, y, x + w, y + h), fill=pick())
        elif kind == 2:
            draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=pick())
        else:  # a striped awning or sign, so patterns alone do not give the figure away
            stripe, colors = max(2, int(w / 6)), (pick(), pick())
            for i, sx in enumerate(range(int(x), int(x + w), stripe)):
                draw.rectangle((sx, y, sx + stripe - 1, y + h * 0.5), fill=colors[i % 2])
    return np.asarray(img, dtype=np.uint8).copy()


def _pattern(kind: str, colors: list[RGB], fig: _Figure, rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-canvas texture; garments take it through their masks, so patterns stay continuous across seams."""
    c = [np.array(col, dtype=np.uint8) for col in colors]
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(3.0, fig.h * float(rng.uniform(0.035, 0.06)))
    out = np.empty((size, size, 3), np.uint8)
    out[:] = c[0]
    if kind in ("stripes_h", "stripes_v", "stripes_wide"):
        axis = xx if kind == "stripes_v" else yy
        step = period * (2.0 if kind == "stripes_wide" else 1.0)
        out[((axis - fig.y0) // (step / 2)) % 2 == 1] = c[1]
    elif kind == "pinstripe":
        out[(xx % period) < 1] = c[1]
    elif kind == "checks":
        out[((xx // period) + (yy // period)) % 2 == 1] = c[1]
    elif kind == "tartan":
        vert, horiz = (xx % period) < period * 0.35, (yy % period) < period * 0.35
        out[vert ^ horiz] = c[1]
        out[vert & horiz] = c[2]
    elif kind == "dots":
        r = period * 0.22
        out[((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < r * r] = c[1]
    elif kind in ("floral", "graphic", "camo"):
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        if kind == "graphic":  # one big chest print
            x, y = fig.pt(0, 0.28)
            r = fig.h * 0.06
            draw.rectangle((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=colors[1])
            draw.ellipse((x - r * 0.5, y - r * 0.5, x + r * 0.5, y + r * 0.5), fill=colors[2])
        else:
            blob = period * (0.45 if kind == "floral" else 1.2)
            for _ in range(60 if kind == "floral" else 40):
                x, y = fig.pt(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(0.1, 1.0)))
                draw.ellipse((x - blob, y - blob, x + blob, y + blob), fill=colors[1 + int(rng.integers(2))])
        out = np.asarray(img, dtype=np.uint8).copy()
    elif kind == "colorblock":
        split = fig.y0 + fig.h * float(rng.uniform(0.25, 0.33))
        out[yy > split] = c[1]
        out[(yy > split) & (yy < split + period * 0.6)] = c[2]
    elif kind == "trim":  # track stripes down the sides of sleeves and legs
        for side in (-1, 1):
            for x_rel in (0.13, 0.075):
                x = fig.cx + side * x_rel * fig.h
                out[np.abs(xx - x) < max(1.0, fig.h * 0.008)] = c[1]
    elif kind == "denim":
        shade = rng.integers(-14, 15, (size, size, 1)) + (((xx + yy) % 4) < 1)[..., None] * 12
        out = np.clip(out.astype(np.int16) + shade, 0, 255).astype(np.uint8)
    return out


def _mask(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size, size), 0)
    return img, ImageDraw.Draw(img)


def _outfit_layers(wardrobe: Wardrobe, fig: _Figure, rng: np.random.Generator, size: int) -> list[tuple]:
    """The figure as (mask, fill, garment class or None) layers in painting order, body first."""
    skin, hair = _jitter(_SKIN[int(rng.integers(len(_SKIN)))], rng, 8), _HAIR[int(rng.integers(len(_HAIR)))]
    shoes = _jitter(((20, 20, 20), (240, 240, 240), (110, 70, 40))[int(rng.integers(3))], rng)
    sw = 0.1  # shoulder half width
    stance = float(rng.uniform(0.0, 0.05))
    spread = float(rng.uniform(0.02, 0.07))
    hands = [(side * (sw + spread), 0.46) for side in (-1, 1)]
    feet = [(side * (0.05 + stance), 0.95) for side in (-1, 1)]
    layers: list[tuple] = []

    body, draw = _mask(size)
    for side, (fx, fy) in zip((-1, 1), feet, strict=True):
        draw.line([fig.pt(side * 0.045, 0.5), fig.pt(fx, fy)], fill=255, width=fig.px(0.045))
    for side, (hx, hy) in zip((-1, 1), hands, strict=True):
        draw.line([fig.pt(side * sw, 0.17), fig.pt(hx, hy)], fill=255, width=fig.px(0.035))
        draw.ellipse([*fig.pt(hx - 0.02, hy - 0.02), *fig.pt(hx + 0.02, hy + 0.025)], fill=255)
    draw.rectangle([*fig.pt(-0.018, 0.1), *fig.pt(0.018, 0.17)], fill=255)
    draw.ellipse([*fig.pt(-0.042, 0.015), *fig.pt(0.042, 0.125)], fill=255)
    layers.append((body, skin, None))
    head, draw = _mask(size)
    draw.pieslice([*fig.pt(-0.05, 0.0), *fig.pt(0.05, 0.1)], 180, 360, fill=255)
    draw.ellipse([*fig.pt(-0.03, 0.015), *fig.pt(0.03, 0.04)], fill=255)
    feet_mask, draw = _mask(size)
    for fx, fy in feet:
        draw.ellipse([*fig.pt(fx - 0.035, fy - 0.012), *fig.pt(fx + 0.035, fy + 0.045)], fill=255)
    layers += [(head, hair, None), (feet_mask, shoes, None)]

    def sleeves(draw: ImageDraw.ImageDraw, reach: float, width: float) -> None:
        for side, (hx, hy) in zip((-1, 1), hands, strict=True):
            sx, sy = side * sw * min(wardrobe.fit, 1.25), 0.17
            draw.line([fig.pt(sx, sy), fig.pt(sx + (hx - sx) * reach, sy + (hy - sy) * reach)],
                      fill=255, width=fig.px(width))

    def garment(cls: int, paint) -> None:
        mask, draw = _mask(size)
        paint(draw)
        kind, colors = wardrobe.fill(cls, rng)
        layers.append((mask, _pattern(kind, colors, fig, rng, size), cls))

    wear_dress = wardrobe.dress(rng)
    f = wardrobe.fit
    if wear_dress:
        hem, flare = float(rng.uniform(0.62, 0.9)), float(rng.uniform(0.12, 0.2))

        def paint_dress(draw: ImageDraw.ImageDraw) -> None:
            draw.polygon(fig.poly([(-sw, 0.15), (sw, 0.15), (0.08, 0.42), (flare, hem), (-flare, hem),
                                   (-0.08, 0.42)]), fill=255)
            sleeves(draw, 0.3, 0.045)

        garment(DRESS, paint_dress)
    else:
        kind = wardrobe.bottom(rng)

        def paint_bottom(draw: ImageDraw.ImageDraw) -> None:
            if kind in ("skirt", "long_skirt"):
                hem = 0.7 if kind == "skirt" else 0.86
                flare = 0.14 if kind == "skirt" else 0.17
                draw.polygon(fig.poly([(-0.085, 0.47), (0.085, 0.47), (flare, hem), (-flare, hem)]), fill=255)
                return
            hem = 0.66 if kind == "shorts" else 0.95
            half = {"slim": 0.022, "straight": 0.035, "wide": 0.065, "flare": 0.075, "shorts": 0.05}[kind]
            for side, (fx, _) in zip((-1, 1), feet, strict=True):
                ax = fx if kind != "shorts" else side * 0.07
                draw.polygon(fig.poly([(side * 0.09, 0.47), (0, 0.47), (0, 0.56), (ax - side * half, hem),
                                       (ax + side * half, hem)]), fill=255)

        top_hem = 0.5 + 0.1 * max(0.0, f - 1.0)
        long_sleeve = wardrobe.long_sleeve(rng)

        def paint_top(draw: ImageDraw.ImageDraw) -> None:
            draw.polygon(fig.poly([(-sw * f, 0.15), (sw * f, 0.15), (0.1 * f, top_hem), (-0.1 * f, top_hem)]),
                         fill=255)
            sleeves(draw, 0.9 if long_sleeve else 0.4, 0.05 * f)

        garment(BOTTOM, paint_bottom)
        garment(TOP, paint_top)
    outer_hem = wardrobe.outer_hem(rng)
    if outer_hem is not None:
        hem = outer_hem
        gap = float(rng.uniform(0.025, 0.045))
        flare = 0.02 + 0.08 * max(0.0, hem - 0.6)

        def paint_outer(draw: ImageDraw.ImageDraw) -> None:
            for side in (-1, 1):
                draw.polygon(fig.poly([(side * sw * f * 1.05, 0.145), (side * gap, 0.16), (side * gap, hem),
                                       (side * (0.11 * f + flare), hem)]), fill=255)
            sleeves(draw, 0.95, 0.058 * f)

        garment(OUTER, paint_outer)
    return layers


def _compose(canvas: np.ndarray, layers: list[tuple]) -> np.ndarray:
    for mask, fill, _ in layers:
        m = np.asarray(mask) > 0
        canvas[m] = fill[m] if isinstance(fill, np.ndarray) else fill
    return canvas


def _visible_boxes(layers: list[tuple]) -> list[tuple[int, tuple[int, int, int, int]]]:
    """Tight boxes of each garment's pixels left visible by the layers painted over it (K-Fashion-like labels)."""
    covered = None
    found = []
    for mask, _, cls in reversed(layers):
        m = np.asarray(mask) > 0
        if cls is not None:
            visible = m if covered is None else m & ~covered
            rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
            if rows.size and cols.size:
                box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
                if box[2] - box[0] >= MIN_BOX_PX and box[3] - box[1] >= MIN_BOX_PX:
                    found.append((cls, box))
        covered = m if covered is None else covered | m
    return sorted(found)


def _val_indices(per_style: int, val_fraction: float) -> set[int]:
    """Evenly spaced val picks by index, so growing per_style never moves an earlier image between splits."""
    picks = {i for i in range(per_style) if int((i + 1) * val_fraction + 0.5) > int(i * val_fraction + 0.5)}
    if not picks and val_fraction > 0 and per_style >= 2:
        picks = {per_style - 1}  # a tiny set still needs every style in both splits
    return picks


def _yolo_label(garments: Sequence[tuple[int, tuple[int, int, int, int]]], size: int) -> str:
    lines = []
    for cls, (x1, y1, x2, y2) in garments:
        cx, cy, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines) + "\n"


def write_sample_data(
    out: str | Path,
    per_style: int = 20,
    seed: int = 0,
    size: int = 256,
    val_fraction: float = 0.2,
    styles: Sequence[str] = STYLES,
    *,
    overwrite: bool = False,
) -> dict:
    """Writes a folder-per-style photo set, a YOLO garment dataset and a manifest, byte-identical per seed.

    Layout under `out`: `images/<Style>/<style>_<idx:05d>.jpg`, `yolo/{images,labels}/{train,val}/`,
    `yolo/data.yaml` (no `path` key: pass its absolute path to ultralytics) and `manifest.parquet`.

    Args:
        out: output folder (created).
        per_style: photos per style.
        seed: base seed; image i of style s uses the generator seeded by (seed, index of s in STYLES, i).
        size: side of every square photo in pixels.
        val_fraction: share of each style's photos in the val split (by index, so every style has both splits).
        styles: the styles to draw, a subset of ootd.styles.STYLES.
        overwrite: replace the images/, yolo/ and manifest.parquet of an earlier run instead of refusing.

    Returns:
        Summary: `out`, `images_dir`, `yolo_dir`, `data_yaml`, `manifest`, `n_images`, `per_style` (count per
        style), `splits` (count per split), `seed`, `size`.

    Raises:
        ValueError: bad counts, fractions, sizes or style names.
        FileExistsError: `out` already holds a sample set and overwrite is False.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    styles = list(styles)
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles or len(set(styles)) != len(styles):
        raise ValueError(f"styles must be distinct names from {', '.join(STYLES)}; got {styles}")
    if per_style < 1:
        raise ValueError(f"per_style must be at least 1, got {per_style}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    root = Path(out)
    ours = [root / "images", root / "yolo", root / "manifest.parquet"]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{root} already holds sample data ({existing[0].name}); pass overwrite=True or "
                              "choose an empty folder")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for sub in ("images/train", "images/val", "labels/train", "labels/val"):
        (root / "yolo" / sub).mkdir(parents=True, exist_ok=True)

    val = _val_indices(per_style, val_fraction)
    rows: list[dict] = []
    for style in styles:
        style_dir = root / "images" / style
        style_dir.mkdir(parents=True, exist_ok=True)
        for idx in range(per_style):
            rng = np.random.default_rng([seed, STYLES.index(style), idx])
            photo = render_outfit(style, rng, size)
            name = f"{style.lower()}_{idx:05d}"
            split = "val" if idx in val else "train"
            buf = _jpeg(photo.image)
            (style_dir / f"{name}.jpg").write_bytes(buf)
            (root / "yolo" / "images" / split / f"{name}.jpg").write_bytes(buf)
            (root / "yolo" / "labels" / split / f"{name}.txt").write_text(_yolo_label(photo.garments, size))
            rows.append({
                "path": f"images/{style}/{name}.jpg", "style": style, "split": split, "width": size,
                "height": size, "garment_classes": [cls for cls, _ in photo.garments],
                "garment_boxes": [list(box) for _, box in photo.garments], "outfit_box": list(photo.outfit_box),
            })
    (root / "yolo" / "data.yaml").write_text(
        "# ootd synthetic garments; no `path` key, so ultralytics resolves these against this file's folder.\n"
        "train: images/train\nval: images/val\nnc: 4\n"
        f"names: [{', '.join(GARMENT_CLASSES)}]\n"
    )
    rows.sort(key=lambda r: r["path"])
    schema = pa.schema([
        ("path", pa.string()), ("style", pa.string()), ("split", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("garment_classes", pa.list_(pa.int32())),
        ("garment_boxes", pa.list_(pa.list_(pa.int32()))), ("outfit_box", pa.list_(pa.int32())),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "manifest.parquet")
    splits = {"train": sum(r["split"] == "train" for r in rows), "val": sum(r["split"] == "val" for r in rows)}
    return {
        "out": str(root), "images_dir": str(root / "images"), "yolo_dir": str(root / "yolo"),
        "data_yaml": str(root / "yolo" / "data.yaml"), "manifest": str(root / "manifest.parquet"),
        "n_images": len(rows), "per_style": {s: per_style for s in styles}, "splits": splits,
        "seed": seed, "size": size,
    }


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)  # no exif/ICC: the bytes depend on pixels only
    return buf.getvalue()
