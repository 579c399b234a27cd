"""Pure box math for outfit crops: union, pad, clamp, filter, square-pad (PIL only; no Ray, no torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in source pixels


@dataclass(frozen=True)
class OutfitBox:
    """The region of a photo that holds the outfit.

    Attributes:
        box: integer pixel box (x1, y1, x2, y2) inside the image, x2 > x1 and y2 > y1.
        score: the highest confidence among the kept garment boxes (0.0 on fallback).
        n_garments: how many garment boxes formed the union.
        fallback: True when nothing was kept and the box is the whole image.
    """

    box: tuple[int, int, int, int]
    score: float
    n_garments: int
    fallback: bool


def union_box(boxes: Sequence[Box]) -> Box | None:
    """The smallest box containing every box, or None for no boxes.

    Args:
        boxes: boxes as (x1, y1, x2, y2).
    """
    if len(boxes) == 0:
        return None
    x1 = min(float(b[0]) for b in boxes)
    y1 = min(float(b[1]) for b in boxes)
    x2 = max(float(b[2]) for b in boxes)
    y2 = max(float(b[3]) for b in boxes)
    return (x1, y1, x2, y2)


def pad_box(box: Box, ratio: float) -> Box:
    """Grows a box by `ratio` of its width/height on each side.

    Args:
        box: (x1, y1, x2, y2).
        ratio: fraction of the box's own size added on each side; 0 keeps it unchanged.

    Raises:
        ValueError: for a negative ratio.
    """
    if ratio < 0:
        raise ValueError(f"pad ratio must be >= 0, got {ratio}")
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * ratio, (y2 - y1) * ratio
    return (x1 - dx, y1 - dy, x2 + dx, y2 + dy)


def clamp_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Rounds a box outward to whole pixels and clips it to the image; never returns an empty box.

    Outward rounding (floor the origin, ceil the far corner) keeps every detected pixel inside the crop.
    A box that lies wholly outside the image, or collapses to nothing, becomes at least one pixel wide/high
    at the nearest edge so that cropping never fails.

    Args:
        box: (x1, y1, x2, y2), possibly outside the image.
        width: image width in pixels (>= 1).
        height: image height in pixels (>= 1).

    Raises:
        ValueError: for a non-positive image size or a box with non-finite coordinates.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not all(math.isfinite(float(v)) for v in box):
        raise ValueError(f"box has non-finite coordinates: {box}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1:
        x1, x2 = x2, x1
    if y2 < y1:
        y1, y2 = y2, y1
    ix1 = min(max(math.floor(x1), 0), width - 1)
    iy1 = min(max(math.floor(y1), 0), height - 1)
    ix2 = max(min(math.ceil(x2), width), ix1 + 1)
    iy2 = max(min(math.ceil(y2), height), iy1 + 1)
    return (ix1, iy1, ix2, iy2)


def keep_boxes(
    boxes: Sequence[Box],
    scores: Sequence[float],
    classes: Sequence[int],
    *,
    class_ids: Sequence[int],
    min_score: float,
    min_size: float,
    relative_score: float = 0.0,
) -> list[int]:
    """Indices of the boxes that count as garments.

    Args:
        boxes: (x1, y1, x2, y2) per detection.
        scores: confidence per detection.
        classes: class id per detection.
        class_ids: classes that form the outfit; an empty sequence keeps nothing.
        min_score: detections below this confidence are dropped.
        min_size: detections narrower or shorter than this (px) are noise, not garments.
        relative_score: detections below this fraction of the photo's best garment score are dropped too.

    Raises:
        ValueError: when boxes, scores and classes differ in length.
    """
    if not (len(boxes) == len(scores) == len(classes)):
        raise ValueError(f"boxes, scores and classes differ in length: {len(boxes)}, {len(scores)}, {len(classes)}")
    wanted = {int(c) for c in class_ids}
    garments = []
    for i, (box, score, cls) in enumerate(zip(boxes, scores, classes, strict=True)):
        w, h = float(box[2]) - float(box[0]), float(box[3]) - float(box[1])
        if int(cls) in wanted and float(score) >= min_score and w >= min_size and h >= min_size:
            garments.append(i)
    if not garments or relative_score <= 0:
        return garments
    floor = relative_score * max(float(scores[i]) for i in garments)
    return [i for i in garments if float(scores[i]) >= floor]


def mirror_box(box: Box, width: int) -> Box:
    """The box in the left-right mirror image of a photo `width` pixels wide (and back: it is its own inverse)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (width - x2, y1, width - x1, y2)


def outfit_box(
    boxes: Sequence[Box],
    scores: Sequence[float],
    classes: Sequence[int],
    *,
    width: int,
    height: int,
    class_ids: Sequence[int],
    min_score: float = 0.0,
    min_size: float = 0,
    relative_score: float = 0.0,
    pad: float = 0.0,
    mirrored: tuple[Sequence[Box], Sequence[float], Sequence[int]] | None = None,
) -> OutfitBox:
    """The outfit region: union of the kept garment boxes, padded and clamped; the whole image if none is kept.

    Args:
        boxes: (x1, y1, x2, y2) per detection, in source pixels.
        scores: confidence per detection.
        classes: class id per detection.
        width: image width in pixels.
        height: image height in pixels.
        class_ids: classes that form the outfit.
        min_score: minimum confidence of a kept box.
        min_size: minimum width and height (px) of a kept box.
        relative_score: minimum confidence of a kept box as a fraction of the best garment's in the photo.
        pad: padding as a fraction of the union's size on each side.
        mirrored: (boxes, scores, classes) detected in the left-right mirror of the photo, in the mirror's own
            pixels. The outfit is then the mean of the two views' unions (test-time flip averaging): an edge
            one view misses, the other often finds. A view that keeps no garment is left out of the mean.
    """
    views = [(boxes, scores, classes)]
    if mirrored is not None:
        views.append(([mirror_box(b, width) for b in mirrored[0]], mirrored[1], mirrored[2]))
    found = []  # (union, best score, garments kept) per view that kept any
    for view_boxes, view_scores, view_classes in views:
        kept = keep_boxes(view_boxes, view_scores, view_classes, class_ids=class_ids, min_score=min_score,
                          min_size=min_size, relative_score=relative_score)  # fmt: skip
        if kept:
            union = union_box([view_boxes[i] for i in kept])
            assert union is not None  # kept is non-empty
            found.append((union, max(float(view_scores[i]) for i in kept), len(kept)))
    if not found:
        return OutfitBox(box=clamp_box((0, 0, width, height), width, height), score=0.0, n_garments=0, fallback=True)
    mean = tuple(sum(union[k] for union, _, _ in found) / len(found) for k in range(4))
    return OutfitBox(
        box=clamp_box(pad_box(mean, pad), width, height),  # type: ignore[arg-type]
        score=max(score for _, score, _ in found),
        n_garments=max(n for _, _, n in found),
        fallback=False,
    )


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes; 0.0 when either has no area.

    Args:
        a: (x1, y1, x2, y2).
        b: (x1, y1, x2, y2).
    """
    iw = min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0]))
    ih = min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1]))
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a = max(float(a[2]) - float(a[0]), 0.0) * max(float(a[3]) - float(a[1]), 0.0)
    area_b = max(float(b[2]) - float(b[0]), 0.0) * max(float(b[3]) - float(b[1]), 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


# The neutral grey every padding uses (square padding here, out-of-image box jitter in `ootd.train.augment`).
PAD_FILL = (127, 127, 127)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """Centres the image on a square canvas of its long side, filled with a neutral colour.

    Squaring before the backbone's resize keeps the outfit's aspect ratio (the backbone's "squash" resize
    would otherwise stretch tall crops). Non-RGB images are converted to RGB first.

    Args:
        image: any PIL image.
        fill: RGB colour of the added borders.
    """
    from PIL import Image

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    w, h = rgb.size
    if w == h:
        return rgb.copy()
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return canvas


def crop_image(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The pixels inside `box`, clamped to the image first so a slightly-out box still crops.

    Args:
        image: any PIL image.
        box: integer (x1, y1, x2, y2).
    """
    return image.crop(clamp_box(box, image.width, image.height))
