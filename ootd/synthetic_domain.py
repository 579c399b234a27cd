"""Domain randomisation for the synthetic renderer: parameter ranges, their per-photo draws and camera effects (§7).

Detector training data is drawn with `TRAINING`; `HELD_OUT` lies outside every one of its ranges and is only ever
used to measure how far the detector generalises (`benchmarks/detector_domain.py`). Without a `Randomisation`
the renderer draws exactly what it always drew, so style-mode photos stay byte-identical per seed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageFilter

Range = tuple[float, float]


@dataclass(frozen=True)
class Randomisation:
    """Closed ranges (low, high) each photo draws its parameters from, uniformly; the defaults are the plain
    renderer's values, so `Randomisation()` is the plain look drawn through the randomised code path.

    Attributes:
        height: figure height as a fraction of the image side (above ~0.97 the figure is cut by the frame).
        girth: horizontal scale of body and garments.
        torso: waist height as a fraction of figure height (0.5: the plain proportions; larger: shorter legs).
        lean: tilt of the whole figure in degrees, either side.
        arm_spread: how far the hands reach out from the shoulders, in figure heights.
        stance: extra half distance between the feet, in figure heights.
        fit: width of tops and outers, multiplying the wardrobe's fit.
        hem: shift of every hem (tops, bottoms, dresses, outers) in figure heights; positive is longer.
        flare: multiplier of skirt, dress and trouser widths at the hem.
        occluders: objects in front of the figure (poles, bags, passers-by, signs); a whole number is drawn.
        occluder_size: occluder size in figure heights.
        clutter: background shapes; a whole number is drawn.
        random_colours: share of clutter colours drawn uniformly instead of from the background palette.
        gain: global brightness factor.
        cast: per-channel colour cast, either way, as a fraction of the gain.
        gradient: strength of a linear light fall-off across the photo in a random direction.
        noise: sensor noise standard deviation in grey levels.
        blur: Gaussian blur radius in pixels.
        jpeg_quality: quality of a JPEG round trip before the photo is returned; a whole number is drawn.
    """

    height: Range = (0.4, 0.9)
    girth: Range = (1.0, 1.0)
    torso: Range = (0.5, 0.5)
    lean: Range = (0.0, 0.0)
    arm_spread: Range = (0.02, 0.07)
    stance: Range = (0.0, 0.05)
    fit: Range = (1.0, 1.0)
    hem: Range = (0.0, 0.0)
    flare: Range = (1.0, 1.0)
    occluders: Range = (0, 0)
    occluder_size: Range = (0.1, 0.3)
    clutter: Range = (10, 19)
    random_colours: Range = (0.0, 0.0)
    gain: Range = (0.88, 1.1)
    cast: Range = (0.0, 0.0)
    gradient: Range = (0.0, 0.0)
    noise: Range = (3.0, 3.0)
    blur: Range = (0.0, 0.0)
    jpeg_quality: Range = (90, 90)

    def __post_init__(self) -> None:
        for f in fields(self):
            low, high = getattr(self, f.name)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"Randomisation.{f.name} must be a finite (low, high) with low <= high, "
                                 f"got {(low, high)}")
        if self.height[0] <= 0.1 or self.girth[0] <= 0 or self.fit[0] <= 0 or self.flare[0] <= 0:
            raise ValueError("height, girth, fit and flare must be positive (height above 0.1)")
        if not (0.3 <= self.torso[0] and self.torso[1] <= 0.7):
            raise ValueError(f"torso must lie within [0.3, 0.7], got {self.torso}")
        if not (1 <= self.jpeg_quality[0] and self.jpeg_quality[1] <= 100):
            raise ValueError(f"jpeg_quality must lie within [1, 100], got {self.jpeg_quality}")

    def ranges(self) -> dict[str, Range]:
        """Parameter name → (low, high)."""
        return {f.name: tuple(getattr(self, f.name)) for f in fields(self)}  # type: ignore[misc]

    def sample(self, rng: np.random.Generator) -> Draw:
        """One photo's parameters, all drawn from `rng` up front (in field order)."""

        def u(name: str) -> float:
            low, high = getattr(self, name)
            return float(rng.uniform(low, high))

        def n(name: str) -> int:
            low, high = getattr(self, name)
            return int(rng.integers(math.ceil(low), math.floor(high) + 1))

        values = {}
        for f in fields(self):
            count = f.name in ("occluders", "clutter", "jpeg_quality")
            values[f.name] = n(f.name) if count else u(f.name)
        values["lean"] *= 1.0 if rng.random() < 0.5 else -1.0
        values["cast"] = tuple(float(c) for c in rng.uniform(-values["cast"], values["cast"], 3))
        values["gradient_angle"] = float(rng.uniform(0, 2 * math.pi))
        return Draw(**values)


@dataclass(frozen=True)
class Draw:
    """One photo's randomised parameters (see `Randomisation`; `lean` signed, `cast` per channel)."""

    height: float
    girth: float
    torso: float
    lean: float
    arm_spread: float
    stance: float
    fit: float
    hem: float
    flare: float
    occluders: int
    occluder_size: float
    clutter: int
    random_colours: float
    gain: float
    cast: tuple[float, float, float]
    gradient: float
    noise: float
    blur: float
    jpeg_quality: int
    gradient_angle: float


# Detector training: a wide neighbourhood of the plain renderer (which it contains, so the standard set stays in
# domain), with occluders, clutter of any colour and camera effects.
TRAINING = Randomisation(
    height=(0.3, 1.0), girth=(0.85, 1.2), torso=(0.44, 0.56), lean=(0.0, 8.0), arm_spread=(0.0, 0.12),
    stance=(0.0, 0.08), fit=(0.85, 1.2), hem=(-0.05, 0.05), flare=(0.75, 1.3), occluders=(0, 2),
    occluder_size=(0.1, 0.3), clutter=(4, 30), random_colours=(0.0, 0.6), gain=(0.65, 1.3), cast=(0.0, 0.1),
    gradient=(0.0, 0.3), noise=(0.0, 8.0), blur=(0.0, 1.2), jpeg_quality=(35, 95),
)

# Measurement only, never training: every range lies outside TRAINING's (close-up figures cut by the frame;
# broad, long-waisted, leaning figures with arms and feet apart; slim tops over longer, wider hems; several small
# occluders; denser clutter mostly in arbitrary colours; over-exposed, tinted, blurred, heavily compressed).
HELD_OUT = Randomisation(
    height=(1.03, 1.12), girth=(1.22, 1.32), torso=(0.57, 0.61), lean=(9.0, 13.0), arm_spread=(0.13, 0.18),
    stance=(0.09, 0.12), fit=(0.72, 0.82), hem=(0.06, 0.1), flare=(1.35, 1.6), occluders=(3, 4),
    occluder_size=(0.04, 0.08), clutter=(32, 40), random_colours=(0.65, 0.85), gain=(1.32, 1.42),
    cast=(0.11, 0.16), gradient=(0.32, 0.42), noise=(9.0, 11.0), blur=(1.3, 1.7), jpeg_quality=(22, 32),
)

PRESETS: dict[str, Randomisation] = {"training": TRAINING, "held-out": HELD_OUT}


def camera(canvas: np.ndarray, draw: Draw, rng: np.random.Generator) -> Image.Image:
    """Lighting (gain, colour cast, light fall-off), sensor noise, blur and a JPEG round trip."""
    size_y, size_x = canvas.shape[:2]
    yy, xx = np.mgrid[0:size_y, 0:size_x].astype(np.float32)
    ramp = ((xx / size_x - 0.5) * math.cos(draw.gradient_angle) + (yy / size_y - 0.5) * math.sin(draw.gradient_angle))
    light = draw.gain * (1.0 + 2.0 * draw.gradient * ramp)[..., None] * (1.0 + np.asarray(draw.cast, np.float32))
    noise = rng.normal(0.0, draw.noise, canvas.shape) if draw.noise > 0 else 0.0
    pixels = np.clip(canvas.astype(np.float32) * light + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if draw.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(draw.blur))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=draw.jpeg_quality)
    with Image.open(io.BytesIO(buf.getvalue())) as decoded:
        return decoded.convert("RGB")
