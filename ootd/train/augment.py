"""Style-preserving augmentation of outfit crops for fine-tuning: flips and box jitter, never a colour change.

A style is carried by colour, pattern and silhouette, so a view may mirror the crop and move, shrink or grow its
box (what a detector's imperfect, padded box does) but must not touch hue, saturation or brightness. Views are
drawn from a seed made of the image id and the view number, so a cached view is the same in every process.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from ootd.detect.boxes import PAD_FILL

if TYPE_CHECKING:
    from PIL import Image

# Each side of the box moves by up to this fraction of the crop's width or height, inwards (a tighter box) or
# outwards (more background, filled with PAD_FILL, the neutral grey of the square padding).
BOX_JITTER = 0.12


def view_seed(image_id: str, view: int) -> int:
    """A 64-bit seed for view `view` of an image: identical in every process and on every run."""
    return int.from_bytes(hashlib.sha256(f"{image_id}/{view}".encode()).digest()[:8], "little")


def augmented_view(image: Image.Image, rng: np.random.Generator, box_jitter: float = BOX_JITTER) -> Image.Image:
    """One random view of a crop: a horizontal flip half the time and each box side moved by up to `box_jitter`.

    Args:
        image: the outfit crop.
        rng: the view's randomness (`np.random.default_rng(view_seed(image_id, view))`).
        box_jitter: largest move of one side as a fraction of the crop's side, in [0, 0.4].

    Raises:
        ValueError: a `box_jitter` outside [0, 0.4] (beyond that a view can lose most of the outfit).
    """
    from PIL import Image, ImageOps

    if not 0.0 <= box_jitter <= 0.4:
        raise ValueError(f"box_jitter must be in [0, 0.4], got {box_jitter}")
    w, h = image.size
    dx1, dy1, dx2, dy2 = rng.uniform(-box_jitter, box_jitter, 4) * np.array([w, h, w, h])
    box = (int(round(dx1)), int(round(dy1)), int(round(w - dx2)), int(round(h - dy2)))
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        box = (0, 0, w, h)
    view = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), PAD_FILL)
    # PIL's crop pads outside the image with black; paste the overlap onto the neutral fill instead.
    view.paste(image.convert("RGB").crop((max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3]))),
               (max(0, -box[0]), max(0, -box[1])))  # fmt: skip
    return ImageOps.mirror(view) if rng.random() < 0.5 else view


def views_of(image: Image.Image, image_id: str, n_views: int, box_jitter: float = BOX_JITTER) -> list[Image.Image]:
    """The crop itself (view 0) followed by `n_views - 1` augmented views, each seeded by (image id, view)."""
    return [image] + [augmented_view(image, np.random.default_rng(view_seed(image_id, v)), box_jitter)
                      for v in range(1, n_views)]  # fmt: skip
