"""Domain randomisation of the synthetic renderer and the committed detector on the held-out variant (DESIGN §7)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from ootd.styles import GARMENT_CLASSES, STYLES
from ootd.synthetic import HELD_OUT, TRAINING, Randomisation, render_outfit, write_sample_data
from ootd.synthetic_domain import PRESETS
from ootd.synthetic_render import MIN_BOX_PX, _visible_boxes

# sha256 digests computed from ootd/synthetic.py as it was before domain randomisation existed (same recipe as
# below): the plain style mode, the attribute mode and a written sample set must stay byte-identical per seed.
PLAIN_RENDER_SHA = "c1ad80198571854292d2e7509f48611b86c849bb633c6a3b023830672fb6eafa"
PLAIN_ATTRIBUTE_SHA = "267fa51b1c439818decf93bc1a508d7fd76a646059faa7c5b81c4a0a1bf3fa8e"
PLAIN_DATASET_SHA = "645a5d4ad8c36b62a404b017b6031b8e7c0edba024cd48a7d48315f463326a23"  # all files but the parquet


def _union(boxes) -> tuple[int, int, int, int]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def test_plain_style_mode_is_byte_identical_to_before():
    h = hashlib.sha256()
    for i, style in enumerate(["Casual", "Street", "Romantic", "Workwear"]):
        for size in (128, 256):
            photo = render_outfit(style, np.random.default_rng([7, i, size]), size)
            h.update(photo.image.tobytes())
            h.update(repr(photo.garments).encode())
            h.update(repr(photo.outfit_box).encode())
    assert h.hexdigest() == PLAIN_RENDER_SHA


def test_attribute_mode_is_byte_identical_to_before():
    from ootd.synthetic_attributes import render_attribute_outfit

    h = hashlib.sha256()
    for i in range(4):
        photo = render_attribute_outfit(np.random.default_rng([5, i]), 160)
        h.update(photo.image.tobytes())
        h.update(repr(photo.garments).encode())
        h.update(repr(sorted(photo.attributes.items())).encode())
    assert h.hexdigest() == PLAIN_ATTRIBUTE_SHA


def test_written_sample_set_is_byte_identical_to_before(tmp_path):
    write_sample_data(tmp_path, per_style=2, seed=3, size=128)
    h = hashlib.sha256()
    for f in sorted(tmp_path.rglob("*")):
        if f.is_file() and f.suffix != ".parquet":
            h.update(str(f.relative_to(tmp_path)).encode())
            h.update(f.read_bytes())
    assert h.hexdigest() == PLAIN_DATASET_SHA


@pytest.mark.parametrize("preset", ["training", "held-out"])
def test_randomised_ground_truth_is_valid(preset):
    randomisation = PRESETS[preset]
    size = 192
    counts = []
    for i in range(26):
        photo = render_outfit(STYLES[i % 13], np.random.default_rng([21, i]), size, randomisation=randomisation)
        assert photo.image.size == (size, size) and photo.image.mode == "RGB"
        assert len(photo.garments) >= 1
        for cls, (x1, y1, x2, y2) in photo.garments:
            assert 0 <= cls < len(GARMENT_CLASSES)
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            assert x2 - x1 >= MIN_BOX_PX and y2 - y1 >= MIN_BOX_PX
        assert photo.outfit_box == _union([box for _, box in photo.garments])
        counts.append(len(photo.garments))
    assert len(set(counts)) > 1


def test_labels_cover_only_visible_garment_pixels():
    """A garment hidden under a later layer loses its label; a partly hidden one keeps only its visible box."""
    size = 64

    def layer(box, cls):
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        return (mask, (0, 0, 0), cls)

    top, bottom = GARMENT_CLASSES.index("top"), GARMENT_CLASSES.index("bottom")
    layers = [layer((10, 10, 29, 29), bottom), layer((10, 10, 29, 19), top), layer((5, 5, 40, 40), None)]
    assert _visible_boxes(layers) == []  # an occluder over everything: nothing is labelled
    layers = [layer((10, 10, 29, 29), bottom), layer((10, 10, 29, 19), top), layer((20, 0, 63, 63), None)]
    assert _visible_boxes(layers) == [(top, (10, 10, 20, 20)), (bottom, (10, 20, 20, 30))]
    layers = [layer((10, 10, 29, 29), bottom), layer((10, 10, 29, 19), top), layer((12, 0, 63, 63), None)]
    assert _visible_boxes(layers) == []  # two-pixel slivers are below MIN_BOX_PX


def test_occluders_hide_garment_pixels_in_randomised_photos():
    with_occluders = dataclasses.replace(TRAINING, occluders=(2, 2), occluder_size=(0.3, 0.3))
    without = dataclasses.replace(TRAINING, occluders=(0, 0))
    changed = 0
    for i in range(13):
        a = render_outfit(STYLES[i], np.random.default_rng([4, i]), 160, randomisation=with_occluders)
        b = render_outfit(STYLES[i], np.random.default_rng([4, i]), 160, randomisation=without)
        changed += a.garments != b.garments
        for cls, box in a.garments:  # occluders only ever shrink or remove a garment's box
            match = [other for c, other in b.garments if c == cls]
            assert match and match[0][0] <= box[0] and match[0][1] <= box[1]
            assert box[2] <= match[0][2] and box[3] <= match[0][3]
    assert changed >= 3


def test_randomised_render_is_deterministic_per_seed():
    for randomisation in (TRAINING, HELD_OUT):
        a = render_outfit("Retro", np.random.default_rng([8, 1]), 160, randomisation=randomisation)
        b = render_outfit("Retro", np.random.default_rng([8, 1]), 160, randomisation=randomisation)
        c = render_outfit("Retro", np.random.default_rng([8, 2]), 160, randomisation=randomisation)
        assert a.image.tobytes() == b.image.tobytes() and a.garments == b.garments
        assert a.image.tobytes() != c.image.tobytes()
    plain = render_outfit("Retro", np.random.default_rng([8, 1]), 160)
    randomised = render_outfit("Retro", np.random.default_rng([8, 1]), 160, randomisation=TRAINING)
    assert plain.image.tobytes() != randomised.image.tobytes()


def test_randomised_sample_set_is_reproducible_and_differs_from_the_plain_one(tmp_path):
    kwargs = {"per_style": 1, "seed": 2, "size": 128, "styles": ["Chic", "Sporty"]}
    write_sample_data(tmp_path / "a", randomisation=HELD_OUT, **kwargs)
    write_sample_data(tmp_path / "b", randomisation=HELD_OUT, **kwargs)
    write_sample_data(tmp_path / "plain", **kwargs)
    for name in ("Chic/chic_00000.jpg", "Sporty/sporty_00000.jpg"):
        held_out = (tmp_path / "a" / "images" / name).read_bytes()
        assert held_out == (tmp_path / "b" / "images" / name).read_bytes()
        assert held_out != (tmp_path / "plain" / "images" / name).read_bytes()


def test_held_out_ranges_lie_outside_the_training_ranges():
    train, held = TRAINING.ranges(), HELD_OUT.ranges()
    assert set(train) == set(held) == {f.name for f in dataclasses.fields(Randomisation)}
    for name, (low, high) in train.items():
        h_low, h_high = held[name]
        assert h_low > high or h_high < low, f"{name}: held-out {held[name]} overlaps training {train[name]}"


def test_training_ranges_contain_the_plain_renderer():
    """The plain look is the default Randomisation; training must cover it so the standard set stays in domain."""
    plain, train = Randomisation().ranges(), TRAINING.ranges()
    for name in ("height", "girth", "torso", "lean", "arm_spread", "stance", "fit", "hem", "flare", "clutter",
                 "gain", "noise"):
        assert train[name][0] <= plain[name][0] and plain[name][1] <= train[name][1], name


def test_bad_randomisation_ranges_raise():
    for kwargs in ({"height": (0.9, 0.4)}, {"torso": (0.2, 0.5)}, {"jpeg_quality": (0, 50)},
                   {"girth": (0.0, 1.0)}, {"noise": (float("nan"), 1.0)}):
        with pytest.raises(ValueError):
            Randomisation(**kwargs)


def test_add_randomised_photos_extends_the_train_split_only(tmp_path):
    from ootd.detect.training import add_randomised_photos, split_images

    base = write_sample_data(tmp_path / "base", per_style=2, seed=1, size=96, styles=["Minimal", "Street"])
    combined = add_randomised_photos(base["data_yaml"], tmp_path / "run", per_style=1, seed=9, size=96,
                                     randomisation="training")
    data = yaml.safe_load(combined.read_text())
    assert data["names"] == list(GARMENT_CLASSES) and data["nc"] == 4
    _, train = split_images(combined, "train")
    _, val = split_images(combined, "val")
    _, base_val = split_images(base["data_yaml"], "val")
    assert val == base_val
    assert len(train) == base["splits"]["train"] + 13  # every style gets its randomised photo
    assert all(Path(str(p).replace("/images/", "/labels/")).with_suffix(".txt").is_file() for p in train)
    with pytest.raises(ValueError, match="randomisation"):
        add_randomised_photos(base["data_yaml"], tmp_path / "bad", per_style=1, seed=9, size=96,
                              randomisation="extreme")


# The committed detector on held-out photos it never trained on, under the default garment-keeping rule (conf 0.1
# and 0.3 x the photo's best garment; benchmarks/detector_domain.py has the full table). Issue #14's targets are
# fallback <= 10 % and median IoU >= 0.8. On these 39 photos round 4 measured 0.783 alone and 0.800 with flip
# averaging (the 104-photo set: 0.785 and 0.803; 312 fresh photos: 0.800 and 0.812; round 3: 0.744 here), so the
# IoU bound is what the detector reaches alone, less a 0.1 margin, and flip averaging must not lose to it.
HELD_OUT_MAX_FALLBACK = 0.10
HELD_OUT_MIN_MEDIAN_IOU = 0.68


@pytest.mark.slow
def test_committed_detector_finds_outfits_on_held_out_photos(tmp_path):
    from ootd.detect.training import evaluate_outfit_boxes
    from ootd.detect.yolo import ASSETS_DIR

    summary = write_sample_data(tmp_path / "held_out", per_style=3, seed=103, size=256, val_fraction=0.0,
                                randomisation=HELD_OUT)
    assert summary["n_images"] == 39
    alone, flipped = (evaluate_outfit_boxes(ASSETS_DIR / "yolo-synthetic-garments.pt", summary["data_yaml"],
                                            split="train", flip_average=flip) for flip in (False, True))  # fmt: skip
    for m in (alone, flipped):
        assert m["n_val_images"] == 39
        assert m["n_fallback"] / m["n_val_images"] <= HELD_OUT_MAX_FALLBACK
        assert m["outfit_iou_median"] >= HELD_OUT_MIN_MEDIAN_IOU
    assert flipped["outfit_iou_mean"] >= alone["outfit_iou_mean"]  # measured +0.020 here
