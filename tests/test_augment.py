"""Style-preserving views: flips and box jitter only, identical per (image id, view), never a colour change."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ootd.train.augment import PAD_FILL, augmented_view, view_seed, views_of


def _striped_crop() -> Image.Image:
    pixels = np.zeros((90, 40, 3), dtype=np.uint8)
    pixels[:, :] = (200, 40, 40)
    pixels[::6] = (30, 30, 160)  # a pattern the view must keep, pixel for pixel
    return Image.fromarray(pixels)


def test_views_keep_every_colour_and_add_only_the_neutral_pad():
    crop = _striped_crop()
    allowed = {(200, 40, 40), (30, 30, 160), PAD_FILL}
    for view in views_of(crop, "ab" * 32, 12)[1:]:
        colours = {tuple(c) for c in np.asarray(view).reshape(-1, 3)}
        assert colours <= allowed
        assert {(200, 40, 40), (30, 30, 160)} <= colours
        w, h = view.size  # each side moves by at most 12 % of the crop's side
        assert 40 * 0.76 - 1 <= w <= 40 * 1.24 + 1 and 90 * 0.76 - 1 <= h <= 90 * 1.24 + 1


def test_views_are_the_same_in_every_process_and_differ_between_views():
    crop = _striped_crop()
    first, again = views_of(crop, "cd" * 32, 6), views_of(crop, "cd" * 32, 6)
    assert first[0] is crop
    for a, b in zip(first, again, strict=True):
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert len({np.asarray(v).tobytes() for v in first}) == 6
    assert view_seed("cd" * 32, 1) != view_seed("cd" * 32, 2) != view_seed("ef" * 32, 1)


def test_flips_happen_about_half_the_time():
    crop = _striped_crop()
    flipped = 0
    for seed in range(200):
        view = augmented_view(crop, np.random.default_rng(seed), box_jitter=0.0)
        assert view.size == crop.size
        flipped += not np.array_equal(np.asarray(view), np.asarray(crop))
    # the stripes are horizontal, so only a crop with a marker shows a flip: add one and count again
    marked = np.asarray(crop).copy()
    marked[:, :3] = (0, 200, 0)
    crop = Image.fromarray(marked)
    flips = sum(
        not np.array_equal(np.asarray(augmented_view(crop, np.random.default_rng(s), box_jitter=0.0)), marked)
        for s in range(200)
    )
    assert flipped == 0 and 70 <= flips <= 130


def test_box_jitter_out_of_range_is_refused():
    with pytest.raises(ValueError, match="box_jitter"):
        augmented_view(_striped_crop(), np.random.default_rng(0), box_jitter=0.5)


def test_views_follow_the_configured_box_jitter():
    crop = _striped_crop()
    for view in views_of(crop, "ab" * 32, 8, box_jitter=0.0)[1:]:
        assert view.size == crop.size  # no jitter: the crop or its mirror
    wide = views_of(crop, "ab" * 32, 8, box_jitter=0.3)[1:]
    assert all(40 * 0.4 - 1 <= v.size[0] <= 40 * 1.6 + 1 for v in wide)
    assert max(abs(v.size[0] - 40) for v in wide) > 40 * 0.24  # beyond the default's reach
