"""Box math of ootd.detect.boxes: union, pad, clamp, filtering, fallback and square padding."""

from __future__ import annotations

import pytest
from PIL import Image

from ootd.detect.boxes import (
    OutfitBox,
    box_iou,
    clamp_box,
    crop_image,
    keep_boxes,
    mirror_box,
    outfit_box,
    pad_box,
    pad_to_square,
    union_box,
)


@pytest.mark.parametrize(
    ("boxes", "expected"),
    [
        ([], None),
        ([(1, 2, 3, 4)], (1.0, 2.0, 3.0, 4.0)),
        ([(10, 10, 20, 20), (15, 5, 30, 18)], (10.0, 5.0, 30.0, 20.0)),
        ([(0, 0, 5, 5), (50, 60, 70, 80)], (0.0, 0.0, 70.0, 80.0)),  # disjoint garments still form one outfit
        ([(10.5, 3.25, 12.75, 9.0), (11, 4, 12, 5)], (10.5, 3.25, 12.75, 9.0)),  # contained box changes nothing
    ],
)
def test_union_box(boxes, expected):
    assert union_box(boxes) == expected


@pytest.mark.parametrize(
    ("box", "ratio", "expected"),
    [
        ((10, 20, 30, 60), 0.0, (10.0, 20.0, 30.0, 60.0)),
        ((10, 20, 30, 60), 0.1, (8.0, 16.0, 32.0, 64.0)),  # 10% of width 20 / height 40 on each side
        ((0, 0, 100, 50), 0.5, (-50.0, -25.0, 150.0, 75.0)),  # may leave the image; clamp_box fixes that
    ],
)
def test_pad_box(box, ratio, expected):
    assert pad_box(box, ratio) == pytest.approx(expected)


def test_pad_box_rejects_negative_ratio():
    with pytest.raises(ValueError, match="pad ratio"):
        pad_box((0, 0, 1, 1), -0.1)


@pytest.mark.parametrize(
    ("box", "size", "expected"),
    [
        ((10, 20, 30, 40), (100, 100), (10, 20, 30, 40)),
        ((10.2, 20.7, 30.1, 40.9), (100, 100), (10, 20, 31, 41)),  # rounded outward: no detected pixel lost
        ((-5, -3, 120, 90), (100, 80), (0, 0, 100, 80)),
        ((30, 40, 10, 20), (100, 100), (10, 20, 30, 40)),  # swapped corners are normalised
        ((150, 150, 200, 200), (100, 100), (99, 99, 100, 100)),  # wholly outside: one pixel at the edge
        ((5, 5, 5, 5), (100, 100), (5, 5, 6, 6)),  # zero-area box still crops one pixel
        ((0, 0, 1, 1), (1, 1), (0, 0, 1, 1)),
    ],
)
def test_clamp_box(box, size, expected):
    assert clamp_box(box, *size) == expected


@pytest.mark.parametrize(
    ("box", "width", "height", "match"),
    [((0, 0, 1, 1), 0, 10, "image size"), ((0, float("nan"), 1, 1), 10, 10, "non-finite")],
)
def test_clamp_box_rejects_bad_input(box, width, height, match):
    with pytest.raises(ValueError, match=match):
        clamp_box(box, width, height)


BOXES = [(10, 10, 50, 50), (20, 60, 60, 120), (0, 0, 3, 3), (70, 70, 90, 90)]
SCORES = [0.9, 0.6, 0.95, 0.2]
CLASSES = [0, 1, 0, 2]


@pytest.mark.parametrize(
    ("class_ids", "min_score", "min_size", "expected"),
    [
        ((0, 1, 2, 3), 0.0, 0, [0, 1, 2, 3]),
        ((0, 1, 2, 3), 0.5, 0, [0, 1, 2]),  # score filter
        ((0, 1, 2, 3), 0.5, 4, [0, 1]),  # the 3x3 box is noise
        ((0,), 0.0, 0, [0, 2]),  # class filter
        ((3,), 0.0, 0, []),  # class absent from the detections
        ((), 0.0, 0, []),  # no classes wanted: nothing kept
        ((0, 1, 2), 0.6, 0, [0, 1, 2]),  # min_score is inclusive
    ],
)
def test_keep_boxes(class_ids, min_score, min_size, expected):
    assert keep_boxes(BOXES, SCORES, CLASSES, class_ids=class_ids, min_score=min_score, min_size=min_size) == expected


@pytest.mark.parametrize(
    ("class_ids", "min_size", "relative", "expected"),
    [
        ((0, 1, 2, 3), 0, 0.5, [0, 1, 2]),  # 0.2 < 0.5 x 0.95
        ((0, 1, 2, 3), 0, 0.2, [0, 1, 2, 3]),  # 0.2 >= 0.2 x 0.95
        # the best garment is the one that passes the other filters: without the 0.95 noise box it is 0.9
        ((0, 1, 2, 3), 4, 0.7, [0]),
        ((1, 2), 0, 0.4, [1]),  # relative to the wanted classes' best (0.6), not the photo's
        ((3,), 0, 0.5, []),
    ],
)
def test_keep_boxes_relative_to_the_best_garment(class_ids, min_size, relative, expected):
    assert keep_boxes(BOXES, SCORES, CLASSES, class_ids=class_ids, min_score=0.0, min_size=min_size,
                      relative_score=relative) == expected


def test_keep_boxes_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        keep_boxes(BOXES, SCORES[:2], CLASSES, class_ids=(0,), min_score=0.0, min_size=0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # union of the two big garments (the noise box and the low-score one are dropped)
        ({"class_ids": (0, 1, 2), "min_score": 0.5, "min_size": 4}, OutfitBox((10, 10, 60, 120), 0.9, 2, False)),
        # padded by 10% of the union (50 x 110) on each side, then clamped to the 100x125 image
        (
            {"class_ids": (0, 1, 2), "min_score": 0.5, "min_size": 4, "pad": 0.1},
            OutfitBox((5, 0, 65, 125), 0.9, 2, False),
        ),
        ({"class_ids": (0,), "min_score": 0.0, "min_size": 0}, OutfitBox((0, 0, 50, 50), 0.95, 2, False)),
        # nothing kept: the whole image, flagged
        ({"class_ids": (3,)}, OutfitBox((0, 0, 100, 125), 0.0, 0, True)),
        ({"class_ids": ()}, OutfitBox((0, 0, 100, 125), 0.0, 0, True)),
        ({"class_ids": (0, 1, 2), "min_score": 0.99}, OutfitBox((0, 0, 100, 125), 0.0, 0, True)),
    ],
)
def test_outfit_box(kwargs, expected):
    assert outfit_box(BOXES, SCORES, CLASSES, width=100, height=125, **kwargs) == expected


def test_mirror_box_is_its_own_inverse():
    assert mirror_box((10, 5, 30, 40), 100) == (70, 5, 90, 40)
    assert mirror_box(mirror_box((10.5, 5, 30.25, 40), 100), 100) == (10.5, 5, 30.25, 40)


def test_flip_averaged_outfit_box_is_the_mean_of_both_views_unions():
    # The mirror view found the right sleeve the upright view missed: in mirror pixels (100 wide), (20, 10, 55, 120)
    # is (45, 10, 80, 120) upright; union upright (10, 10, 60, 120), so the mean is (27.5, 10, 70, 120).
    kept = {"class_ids": (0, 1, 2), "min_score": 0.5, "min_size": 4}
    mirrored = ([(20, 10, 55, 120)], [0.8], [1])
    assert outfit_box(BOXES, SCORES, CLASSES, width=100, height=125, mirrored=mirrored, **kept) == OutfitBox(
        (27, 10, 70, 120), 0.9, 2, False)  # outward rounding of the origin
    # A view that keeps nothing is left out of the mean; both empty: the whole image, flagged.
    none = ([], [], [])
    assert outfit_box(BOXES, SCORES, CLASSES, width=100, height=125, mirrored=none, **kept) == outfit_box(
        BOXES, SCORES, CLASSES, width=100, height=125, **kept)
    assert outfit_box([], [], [], width=100, height=125, mirrored=mirrored, **kept) == OutfitBox(
        (45, 10, 80, 120), 0.8, 1, False)
    assert outfit_box([], [], [], width=100, height=125, mirrored=none, **kept).fallback


def test_outfit_box_of_no_detections_is_whole_image():
    assert outfit_box([], [], [], width=37, height=19, class_ids=(0, 1)) == OutfitBox((0, 0, 37, 19), 0.0, 0, True)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
        ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("size", "mode", "side", "offset"),
    [
        ((40, 100), "RGB", 100, (30, 0)),  # tall: borders left and right
        ((100, 40), "RGB", 100, (0, 30)),  # wide: borders top and bottom
        ((41, 100), "L", 100, (29, 0)),  # odd difference, grayscale converted to RGB
        ((64, 64), "RGBA", 64, (0, 0)),
    ],
)
def test_pad_to_square(size, mode, side, offset):
    colour = {"RGB": (200, 10, 30), "L": 200, "RGBA": (200, 10, 30, 255)}[mode]
    image = Image.new(mode, size, colour)
    square = pad_to_square(image, fill=(1, 2, 3))
    assert square.mode == "RGB"
    assert square.size == (side, side)
    inside = square.getpixel(offset)
    assert inside == ((200, 200, 200) if mode == "L" else (200, 10, 30))
    if size[0] != size[1]:
        assert square.getpixel((0, 0)) == (1, 2, 3)
        assert square.getpixel((side - 1, side - 1)) == (1, 2, 3)
        # the image is centred: the far edge of the pasted image is the last non-fill pixel
        far = (offset[0] + size[0] - 1, offset[1] + size[1] - 1)
        assert square.getpixel(far) != (1, 2, 3)


def test_pad_to_square_default_fill_is_neutral_grey():
    assert pad_to_square(Image.new("RGB", (10, 20), (0, 0, 0))).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize(
    ("box", "expected_size"),
    [((10, 20, 30, 60), (20, 40)), ((-10, -10, 30, 30), (30, 30)), ((90, 90, 200, 200), (10, 10))],
)
def test_crop_image(box, expected_size):
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    image.putpixel((max(box[0], 0), max(box[1], 0)), (255, 0, 0))
    crop = crop_image(image, box)
    assert crop.size == expected_size
    assert crop.getpixel((0, 0)) == (255, 0, 0)  # the crop starts at the box's (clamped) origin
