"""Attribute mode of the synthetic generator: garments drawn independently of any style, with their labels (§7).

The tiny backbone pretrains here (`ootd.train.pretrain`): every garment's class, colour family, pattern and
silhouette is sampled on its own, uniformly, from vocabularies that span what the 13 styles use, so the backbone
learns garment attributes without ever seeing the style taxonomy it is later fine-tuned on. No style, style
palette or style probability is consulted anywhere in this module; the renderer is `ootd.synthetic_render`'s.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ootd.synthetic_render import BOTTOM, OUTER, RGB, SyntheticPhoto, Wardrobe, _jitter, render_figure

# Colour families with a few shades each; together they cover every style palette, but a family is one label.
COLOR_FAMILIES: dict[str, tuple[RGB, ...]] = {
    "black": ((18, 18, 20), (40, 40, 44)),
    "white": ((248, 248, 246), (236, 232, 222)),
    "grey": ((120, 120, 124), (160, 160, 166), (196, 196, 198)),
    "navy": ((28, 38, 88), (36, 46, 80)),
    "blue": ((30, 70, 202), (68, 98, 150), (150, 182, 212)),
    "red": ((220, 30, 36), (182, 30, 42), (112, 30, 46)),
    "pink": ((242, 170, 192), (212, 150, 156)),
    "purple": ((150, 60, 200), (202, 182, 232)),
    "green": ((30, 82, 52), (90, 122, 82), (84, 220, 64), (170, 202, 42)),
    "teal": ((22, 132, 132), (100, 190, 180)),
    "yellow": ((232, 200, 60), (212, 160, 40), (232, 242, 50)),
    "orange": ((242, 110, 30), (222, 120, 40), (192, 92, 40)),
    "brown": ((150, 100, 52), (122, 70, 34), (96, 78, 66)),
    "beige": ((204, 184, 142), (226, 216, 200), (240, 226, 196)),
}
FAMILIES = tuple(COLOR_FAMILIES)
PATTERNS = ("solid", "stripes_h", "stripes_v", "stripes_wide", "pinstripe", "checks", "tartan", "dots", "floral",
            "graphic", "camo", "colorblock", "trim", "denim")  # fmt: skip
# The chest print sits under an open outer's front and above the waist: only tops and dresses can show it.
_PATTERNS_OF = {"upper": PATTERNS, "bottom": tuple(p for p in PATTERNS if p != "graphic"),
                "outer": tuple(p for p in PATTERNS if p != "graphic")}  # fmt: skip
BOTTOMS = ("slim", "straight", "wide", "flare", "shorts", "skirt", "long_skirt")
FITS = {"slim": (0.88, 0.95), "regular": (1.0, 1.1), "oversized": (1.3, 1.45)}  # top/outer width ranges
OUTER_LENGTHS = {"short": (0.5, 0.6), "long": (0.72, 0.88)}  # hem as a fraction of figure height
P_DRESS, P_OUTER = 0.25, 0.5

NONE = "none"  # the class of a garment's attributes when the garment is absent
# Attribute name → class names; labels are indices into these tuples.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "dress": ("no", "yes"),
    "upper_color": FAMILIES,  # the top, or the dress
    "upper_pattern": PATTERNS,
    "sleeve": ("short", "long"),  # a dress always has short sleeves
    "fit": tuple(FITS),
    "bottom": (NONE, *BOTTOMS),
    "bottom_color": (NONE, *FAMILIES),
    "bottom_pattern": (NONE, *_PATTERNS_OF["bottom"]),
    "outer": (NONE, *OUTER_LENGTHS),
    "outer_color": (NONE, *FAMILIES),
    "outer_pattern": (NONE, *_PATTERNS_OF["outer"]),
}


def sample_attributes(rng: np.random.Generator) -> dict[str, int]:
    """Draws one outfit's attributes, each garment property on its own (no style, no correlation between them).

    Returns:
        Attribute name → class index into `ATTRIBUTES[name]`; the `none` class marks an absent garment.
    """

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    dress = bool(rng.random() < P_DRESS)
    sleeve, fit = pick(("short", "long")), pick(tuple(FITS))
    upper = (pick(FAMILIES), pick(_PATTERNS_OF["upper"]))
    bottom = (pick(BOTTOMS), pick(FAMILIES), pick(_PATTERNS_OF["bottom"]))
    outer = pick(tuple(OUTER_LENGTHS)) if rng.random() < P_OUTER else NONE
    outer_fill = (pick(FAMILIES), pick(_PATTERNS_OF["outer"]))
    names = {
        "dress": "yes" if dress else "no", "upper_color": upper[0], "upper_pattern": upper[1],
        "sleeve": "short" if dress else sleeve, "fit": fit,
        "bottom": NONE if dress else bottom[0], "bottom_color": NONE if dress else bottom[1],
        "bottom_pattern": NONE if dress else bottom[2],
        "outer": outer, "outer_color": NONE if outer == NONE else outer_fill[0],
        "outer_pattern": NONE if outer == NONE else outer_fill[1],
    }  # fmt: skip
    return {name: ATTRIBUTES[name].index(value) for name, value in names.items()}


def attribute_names(labels: Mapping[str, int]) -> dict[str, str]:
    """Class names of an attribute label dict (for reports and debugging)."""
    return {name: ATTRIBUTES[name][index] for name, index in labels.items()}


class _AttributeWardrobe(Wardrobe):
    """Dresses the figure exactly as sampled attributes say; only shades and secondary colours are left to rng."""

    def __init__(self, labels: Mapping[str, int], rng: np.random.Generator):
        self.names = attribute_names(labels)
        self.fit = float(rng.uniform(*FITS[self.names["fit"]]))
        outer = self.names["outer"]
        self.hem = None if outer == NONE else float(rng.uniform(*OUTER_LENGTHS[outer]))

    def dress(self, rng: np.random.Generator) -> bool:
        return self.names["dress"] == "yes"

    def bottom(self, rng: np.random.Generator) -> str:
        return self.names["bottom"]

    def outer_hem(self, rng: np.random.Generator) -> float | None:
        return self.hem

    def long_sleeve(self, rng: np.random.Generator) -> bool:
        return self.names["sleeve"] == "long"

    def fill(self, cls: int, rng: np.random.Generator) -> tuple[str, list[RGB]]:
        slot = {BOTTOM: "bottom", OUTER: "outer"}.get(cls, "upper")
        family, kind = self.names[f"{slot}_color"], self.names[f"{slot}_pattern"]
        others = [f for f in FAMILIES if f != family]  # secondary colours must contrast with the labelled one
        second = [others[i] for i in rng.choice(len(others), 2, replace=False)]
        colors = [_shade(f, rng) for f in (family, *second)]
        if kind == "colorblock":  # the renderer paints colour 1 below the split: most of any garment's area
            colors[0], colors[1] = colors[1], colors[0]
        return kind, colors


def _shade(family: str, rng: np.random.Generator) -> RGB:
    shades = COLOR_FAMILIES[family]
    return _jitter(shades[int(rng.integers(len(shades)))], rng, 10)


def render_attribute_outfit(rng: np.random.Generator, size: int = 256) -> SyntheticPhoto:
    """One figure whose garments follow freshly sampled attributes, over clutter in colours of every family.

    Args:
        rng: the only source of randomness: a seeded generator gives an identical photo and labels.
        size: side of the square image in pixels (at least `ootd.synthetic.MIN_SIZE`).

    Returns:
        A photo with `style` None and `attributes` set (name → class index into `ATTRIBUTES`).
    """
    labels = sample_attributes(rng)
    wardrobe = _AttributeWardrobe(labels, rng)
    clutter = [shade for shades in COLOR_FAMILIES.values() for shade in shades]
    return render_figure(wardrobe, clutter, rng, size, attributes=labels)
