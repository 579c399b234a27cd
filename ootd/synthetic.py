"""Style mode of the synthetic street snaps: each style's look and `render_outfit` (DESIGN §7).

The renderer is `ootd.synthetic_render` (with the optional domain randomisation of `ootd.synthetic_domain`), set
writing is `ootd.synthetic_dataset` and the attribute mode (garments drawn independently of any style, for
pretraining the tiny backbone) is `ootd.synthetic_attributes`; their public names are importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ootd.styles import STYLES
from ootd.synthetic_dataset import JPEG_QUALITY, write_sample_data
from ootd.synthetic_domain import HELD_OUT, TRAINING, Randomisation
from ootd.synthetic_render import (
    BOTTOM,
    DRESS,
    MIN_BOX_PX,
    MIN_SIZE,
    OUTER,
    RGB,
    TOP,
    SyntheticPhoto,
    Wardrobe,
    _colors,
    _jitter,
    render_figure,
)

__all__ = [
    "BOTTOM", "DRESS", "HELD_OUT", "JPEG_QUALITY", "MIN_BOX_PX", "MIN_SIZE", "OUTER", "RGB", "TOP", "TRAINING",
    "Randomisation", "SyntheticPhoto", "Wardrobe", "render_figure", "render_outfit", "write_sample_data",
    "_jitter",
]


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


def render_outfit(
    style: str,
    rng: np.random.Generator,
    size: int = 256,
    *,
    randomisation: Randomisation | None = None,
    wardrobe: Wardrobe | None = None,
) -> SyntheticPhoto:
    """Draws one figure wearing a `style` outfit at a random place and scale over a cluttered background.

    Args:
        style: one of ootd.styles.STYLES.
        rng: the only source of randomness, so a seeded generator gives an identical photo.
        size: side of the square image in pixels (at least MIN_SIZE).
        randomisation: domain randomisation ranges (`ootd.synthetic_domain`); None: the plain photo, byte-identical
            per seed to earlier versions.
        wardrobe: where the garments come from; None: the style's own. A subclass of the style's wardrobe that
            records each draw gives the photo's true attributes (benchmarks/attribute_ceiling.py).

    Raises:
        ValueError: unknown style or too small a size.
    """
    if style not in _LOOKS:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    others = [c for name, look in _LOOKS.items() if name != style for c in look.palette]
    return render_figure(wardrobe or _StyleWardrobe(_LOOKS[style]), others, rng, size, style=style,
                         randomisation=randomisation)
