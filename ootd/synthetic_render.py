"""The synthetic renderer both generator modes share: a dressed figure over clutter, with exact garment boxes (§7).

What the figure wears comes from a `Wardrobe` (style mode: `ootd.synthetic`; attribute mode:
`ootd.synthetic_attributes`); an optional `ootd.synthetic_domain.Randomisation` varies proportions, pose, garment
shapes, occluders, clutter and camera. Without one, every draw is the one the renderer always made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ootd.styles import GARMENT_CLASSES
from ootd.synthetic_domain import Draw, Randomisation, camera

RGB = tuple[int, int, int]
TOP, BOTTOM, OUTER, DRESS = (GARMENT_CLASSES.index(name) for name in ("top", "bottom", "outer", "dress"))
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


_SKIN: tuple[RGB, ...] = ((241, 206, 178), (224, 172, 130), (198, 140, 100), (141, 94, 62), (96, 62, 40))
_HAIR: tuple[RGB, ...] = ((24, 18, 14), (70, 44, 24), (140, 100, 56), (210, 180, 120), (40, 40, 44))


def render_figure(
    wardrobe: Wardrobe,
    background: Sequence[RGB],
    rng: np.random.Generator,
    size: int = 256,
    *,
    style: str | None = None,
    attributes: dict[str, int] | None = None,
    randomisation: Randomisation | None = None,
) -> SyntheticPhoto:
    """The renderer both modes share: a figure dressed by `wardrobe` over clutter painted from `background` colours.

    Args:
        wardrobe: answers what the figure wears.
        background: colours the clutter is painted from.
        rng: the only source of randomness.
        size: side of the square image in pixels (at least MIN_SIZE).
        style: recorded on the photo.
        attributes: recorded on the photo.
        randomisation: parameter ranges to draw proportions, pose, garment shapes, occluders, clutter and camera
            from (`ootd.synthetic_domain`); None draws the plain photo, byte-identical to earlier versions.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    draw = randomisation.sample(rng) if randomisation is not None else None
    canvas = _background(background, rng, size, draw)

    if draw is None:
        height = float(rng.uniform(0.4, 0.9)) * size
        half_width = 0.3 * height  # widest extent: flared coats, wide trousers and hands
        cx = float(rng.uniform(half_width + 2, size - half_width - 2))
        y0 = float(rng.uniform(2, size - height - 2))
        fig = _Figure(cx, y0, height)
    else:
        fig = _place(draw, rng, size)

    layers = _outfit_layers(wardrobe, fig, rng, size, draw)
    garments = _visible_boxes(layers)
    if draw is not None and draw.occluders:
        occluded = layers + _occluders(draw, fig, background, rng, size)
        hidden = _visible_boxes(occluded)
        if hidden:  # occluders never hide the whole outfit: a photo needs a ground-truth outfit box
            layers, garments = occluded, hidden
    canvas = _compose(canvas, layers)

    if draw is None:
        # Lighting and sensor noise: photos of one style should not share exact pixel values.
        gain = float(rng.uniform(0.88, 1.1))
        noise = rng.normal(0.0, 3.0, canvas.shape)
        pixels = np.clip(canvas.astype(np.float32) * gain + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        image = camera(canvas, draw, rng)
    boxes = [box for _, box in garments]
    outfit = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return SyntheticPhoto(image, style, tuple(garments), outfit, attributes)


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


class _PosedFigure(_Figure):
    """A figure with other proportions (girth, waist height) leaning by `lean` degrees about its hips."""

    def __init__(self, cx: float, y0: float, height: float, girth: float, torso: float, lean: float):
        super().__init__(cx, y0, height)
        self.girth, self.torso = girth, torso
        self.cos, self.sin = math.cos(math.radians(lean)), math.sin(math.radians(lean))

    def pt(self, x: float, y: float) -> tuple[float, float]:
        x *= self.girth
        y = y * self.torso / 0.5 if y < 0.5 else self.torso + (y - 0.5) * (1.0 - self.torso) / 0.5
        dx, dy = x * self.h, (y - 0.5) * self.h
        return (self.cx + dx * self.cos - dy * self.sin, self.y0 + 0.5 * self.h + dx * self.sin + dy * self.cos)

    def px(self, length: float) -> int:
        return max(1, round(length * self.h * self.girth))


def _place(draw: Draw, rng: np.random.Generator, size: int) -> _PosedFigure:
    """Where a randomised figure stands: inside the frame if it fits, else cut by it but with its torso in view."""
    height = draw.height * size
    half_width = 0.3 * height * draw.girth
    low, high = half_width + 2, size - half_width - 2
    if low > high:  # wider than the frame: keep the centre line in its middle third
        low, high = size / 3, 2 * size / 3
    cx = float(rng.uniform(low, high))
    low, high = sorted((2.0, size - height - 2))
    y0 = float(rng.uniform(low, high))
    return _PosedFigure(cx, y0, height, draw.girth, draw.torso, draw.lean)


def _jitter(color: RGB, rng: np.random.Generator, amount: int = 14) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)  # type: ignore[return-value]


def _colors(palette: Sequence[RGB], rng: np.random.Generator, k: int) -> list[RGB]:
    order = rng.permutation(len(palette))
    return [_jitter(palette[order[i % len(palette)]], rng) for i in range(k)]


def _background(others: Sequence[RGB], rng: np.random.Generator, size: int, rand: Draw | None = None) -> np.ndarray:
    """A street-ish clutter of walls, signs and blobs painted from `others` (style mode: the other styles' palettes).

    Randomised, the clutter count varies, some colours are drawn uniformly and wires/poles join the shapes.
    """

    def pick() -> RGB:
        if rand is not None and rng.random() < rand.random_colours:
            return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]
        return _jitter(others[int(rng.integers(len(others)))], rng, 20)

    img = Image.new("RGB", (size, size), pick())
    draw = ImageDraw.Draw(img)
    edges = np.sort(rng.uniform(0, size, int(rng.integers(1, 4))))
    for x1, x2 in zip(edges, [*edges[1:], size], strict=True):  # building facades
        draw.rectangle((x1, 0, x2, size), fill=pick())
    draw.rectangle((0, int(rng.uniform(0.6, 0.92) * size), size, size), fill=pick())
    n_shapes = int(rng.integers(10, 20)) if rand is None else rand.clutter
    for _ in range(n_shapes):
        x, y = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.35, 2) * size
        kind = int(rng.integers(4 if rand is None else 5))
        if kind == 0:
            draw.rectangle((x, y, x + w, y + h), fill=pick())
        elif kind == 1:
            draw.ellipse((x, y, x + w, y + h), fill=pick())
        elif kind == 2:
            draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=pick())
        elif kind == 3:  # a striped awning or sign, so patterns alone do not give the figure away
            stripe, colors = max(2, int(w / 6)), (pick(), pick())
            for i, sx in enumerate(range(int(x), int(x + w), stripe)):
                draw.rectangle((sx, y, sx + stripe - 1, y + h * 0.5), fill=colors[i % 2])
        else:  # wires and poles: thin straight edges at any angle
            draw.line((x, y, x + w * float(rng.uniform(-2, 2)), y + h * 2), fill=pick(),
                      width=int(rng.integers(1, 5)))
    return np.asarray(img, dtype=np.uint8).copy()


def _pattern(kind: str, colors: list[RGB], fig: _Figure, rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-canvas texture; garments take it through their masks, so patterns stay continuous across seams."""
    c = [np.array(col, dtype=np.uint8) for col in colors]
    # A column and a row of coordinates that broadcast to the grid: the same int64 values as np.mgrid's, so the same
    # pixels, at a fraction of the work (pretraining renders ~17k of these photos per stage).
    yy, xx = np.arange(size)[:, None], np.arange(size)[None, :]
    period = max(3.0, fig.h * float(rng.uniform(0.035, 0.06)))
    out = np.empty((size, size, 3), np.uint8)
    out[:] = c[0]

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        out[np.broadcast_to(mask, (size, size))] = colour  # a row- or column-only mask spans the whole grid

    if kind in ("stripes_h", "stripes_v", "stripes_wide"):
        axis = xx if kind == "stripes_v" else yy
        step = period * (2.0 if kind == "stripes_wide" else 1.0)
        paint(((axis - fig.y0) // (step / 2)) % 2 == 1, c[1])
    elif kind == "pinstripe":
        paint((xx % period) < 1, c[1])
    elif kind == "checks":
        paint(((xx // period) + (yy // period)) % 2 == 1, c[1])
    elif kind == "tartan":
        vert, horiz = (xx % period) < period * 0.35, (yy % period) < period * 0.35
        paint(vert ^ horiz, c[1])
        paint(vert & horiz, c[2])
    elif kind == "dots":
        r = period * 0.22
        paint(((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < r * r, c[1])
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
        paint(yy > split, c[1])
        paint((yy > split) & (yy < split + period * 0.6), c[2])
    elif kind == "trim":  # track stripes down the sides of sleeves and legs
        for side in (-1, 1):
            for x_rel in (0.13, 0.075):
                x = fig.cx + side * x_rel * fig.h
                paint(np.abs(xx - x) < max(1.0, fig.h * 0.008), c[1])
    elif kind == "denim":
        shade = rng.integers(-14, 15, (size, size, 1)) + (((xx + yy) % 4) < 1)[..., None] * 12
        out = np.clip(out.astype(np.int16) + shade, 0, 255).astype(np.uint8)
    return out


def _mask(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (size, size), 0)
    return img, ImageDraw.Draw(img)


def _outfit_layers(
    wardrobe: Wardrobe, fig: _Figure, rng: np.random.Generator, size: int, rand: Draw | None = None
) -> list[tuple]:
    """The figure as (mask, fill, garment class or None) layers in painting order, body first.

    Randomised, `rand` sets arm spread, stance, fit, hem lengths and flares; the neutral values (x * 1.0, x + 0.0)
    of the plain path leave every coordinate bit-identical.
    """
    skin, hair = _jitter(_SKIN[int(rng.integers(len(_SKIN)))], rng, 8), _HAIR[int(rng.integers(len(_HAIR)))]
    shoes = _jitter(((20, 20, 20), (240, 240, 240), (110, 70, 40))[int(rng.integers(3))], rng)
    sw = 0.1  # shoulder half width
    stance = float(rng.uniform(0.0, 0.05))
    spread = float(rng.uniform(0.02, 0.07))
    hem_shift, flare_k, f = 0.0, 1.0, wardrobe.fit
    if rand is not None:  # the plain draws above are kept, then overridden, so the rng stream stays aligned
        stance, spread, hem_shift, flare_k, f = rand.stance, rand.arm_spread, rand.hem, rand.flare, f * rand.fit
    hands = [(side * (sw + spread), 0.46) for side in (-1, 1)]
    feet = [(side * (0.05 + stance), 0.95) for side in (-1, 1)]
    layers: list[tuple] = []

    def length(hem: float) -> float:  # a shifted hem never passes the ankles nor rises above the waist
        return hem if rand is None else min(0.95, max(0.5, hem + hem_shift))

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
            sx, sy = side * sw * min(f, 1.25), 0.17
            draw.line([fig.pt(sx, sy), fig.pt(sx + (hx - sx) * reach, sy + (hy - sy) * reach)],
                      fill=255, width=fig.px(width))

    def garment(cls: int, paint) -> None:
        mask, draw = _mask(size)
        paint(draw)
        kind, colors = wardrobe.fill(cls, rng)
        layers.append((mask, _pattern(kind, colors, fig, rng, size), cls))

    wear_dress = wardrobe.dress(rng)
    if wear_dress:
        hem, flare = float(rng.uniform(0.62, 0.9)), float(rng.uniform(0.12, 0.2))
        hem, flare = length(hem), flare * flare_k

        def paint_dress(draw: ImageDraw.ImageDraw) -> None:
            draw.polygon(fig.poly([(-sw, 0.15), (sw, 0.15), (0.08, 0.42), (flare, hem), (-flare, hem),
                                   (-0.08, 0.42)]), fill=255)
            sleeves(draw, 0.3, 0.045)

        garment(DRESS, paint_dress)
    else:
        kind = wardrobe.bottom(rng)

        def paint_bottom(draw: ImageDraw.ImageDraw) -> None:
            if kind in ("skirt", "long_skirt"):
                hem = length(0.7 if kind == "skirt" else 0.86)
                flare = (0.14 if kind == "skirt" else 0.17) * flare_k
                draw.polygon(fig.poly([(-0.085, 0.47), (0.085, 0.47), (flare, hem), (-flare, hem)]), fill=255)
                return
            hem = 0.66 if kind == "shorts" else 0.95
            hem = length(hem) if kind == "shorts" else hem  # trousers end at the ankles whatever the shift
            half = {"slim": 0.022, "straight": 0.035, "wide": 0.065, "flare": 0.075, "shorts": 0.05}[kind] * flare_k
            for side, (fx, _) in zip((-1, 1), feet, strict=True):
                ax = fx if kind != "shorts" else side * 0.07
                draw.polygon(fig.poly([(side * 0.09, 0.47), (0, 0.47), (0, 0.56), (ax - side * half, hem),
                                       (ax + side * half, hem)]), fill=255)

        top_hem = 0.5 + 0.1 * max(0.0, f - 1.0)
        top_hem = top_hem if rand is None else min(0.7, max(0.4, top_hem + hem_shift))
        long_sleeve = wardrobe.long_sleeve(rng)

        def paint_top(draw: ImageDraw.ImageDraw) -> None:
            draw.polygon(fig.poly([(-sw * f, 0.15), (sw * f, 0.15), (0.1 * f, top_hem), (-0.1 * f, top_hem)]),
                         fill=255)
            sleeves(draw, 0.9 if long_sleeve else 0.4, 0.05 * f)

        garment(BOTTOM, paint_bottom)
        garment(TOP, paint_top)
    outer_hem = wardrobe.outer_hem(rng)
    if outer_hem is not None:
        hem = length(outer_hem)
        gap = float(rng.uniform(0.025, 0.045))
        flare = (0.02 + 0.08 * max(0.0, hem - 0.6)) * flare_k

        def paint_outer(draw: ImageDraw.ImageDraw) -> None:
            for side in (-1, 1):
                draw.polygon(fig.poly([(side * sw * f * 1.05, 0.145), (side * gap, 0.16), (side * gap, hem),
                                       (side * (0.11 * f + flare), hem)]), fill=255)
            sleeves(draw, 0.95, 0.058 * f)

        garment(OUTER, paint_outer)
    return layers


def _occluders(draw: Draw, fig: _Figure, background: Sequence[RGB], rng: np.random.Generator,
               size: int) -> list[tuple]:
    """Things in front of the figure (poles, bags, a passer-by's shoulder, a held sign), as unlabelled layers."""
    layers = []
    for _ in range(draw.occluders):
        mask, paint = _mask(size)
        s = draw.occluder_size * float(rng.uniform(0.7, 1.3))
        x, y = float(rng.uniform(-0.25, 0.25)), float(rng.uniform(0.15, 0.95))
        kind = int(rng.integers(4))
        if kind == 0:  # a pole or lamp post crossing the whole frame
            px, _ = fig.pt(x, y)
            half = max(1.0, s * 0.15 * fig.h)
            paint.rectangle((px - half, 0, px + half, size), fill=255)
        elif kind == 1:  # a bag hanging from a hand or shoulder
            paint.rounded_rectangle([*fig.pt(x - s / 2, y - s / 3), *fig.pt(x + s / 2, y + s / 3)],
                                    radius=max(1, fig.px(s / 8)), fill=255)
        elif kind == 2:  # a passer-by's shoulder or head in the foreground
            paint.ellipse([*fig.pt(x - s, y - s * 0.7), *fig.pt(x + s, y + s * 0.7)], fill=255)
        else:  # a cup, phone or sign held in front
            paint.rectangle([*fig.pt(x - s / 3, y - s / 2), *fig.pt(x + s / 3, y + s / 2)], fill=255)
        if background and rng.random() < 0.5:
            colour = _jitter(background[int(rng.integers(len(background)))], rng, 20)
        else:
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        layers.append((mask, colour, None))
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
