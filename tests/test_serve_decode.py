"""Bounded decoding of uploads on the serve path: format allow-list, serve pixel limit, early JPEG downscaling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ootd.decode import (
    SERVE_FORMATS,
    InputError,
    TooManyPixels,
    UnsupportedFormat,
    decode,
    decode_bounded,
    decoded_size,
)
from tests.bad_images import encode, exif_rotated_jpeg, png_bomb, two_tone

LIMIT = 16_000_000
SIDE = 2048


def _noise(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _big_jpeg(size: tuple[int, int]) -> bytes:
    return encode(two_tone(size, (220, 20, 30), (20, 40, 220)), "JPEG", quality=80)


def test_a_small_photo_decodes_exactly_as_ingest_decodes_it():
    data = encode(_noise((300, 200)), "JPEG", quality=90)
    bounded = decode_bounded(data, LIMIT, SIDE)
    assert (bounded.width, bounded.height) == (300, 200) and bounded.scale == (1.0, 1.0)
    assert np.array_equal(np.asarray(bounded.image), np.asarray(decode(data, LIMIT)))


def test_a_large_jpeg_is_reduced_by_libjpeg_while_decoding():
    data = _big_jpeg((8000, 6000))  # a 48 MP phone photo: 3x the serve limit at full size
    header, (width, height) = decoded_size(data, SIDE)
    assert (header.width, header.height) == (8000, 6000)
    assert (width, height) == (4000, 3000)  # draft at 1/2: at least SIDE long, never the full 48 MP
    bounded = decode_bounded(data, LIMIT, SIDE)
    assert max(bounded.image.size) <= SIDE and bounded.image.mode == "RGB"
    assert (bounded.width, bounded.height) == (8000, 6000)  # boxes are reported in the photo's pixels
    sx, sy = bounded.scale
    assert sx == pytest.approx(8000 / bounded.image.width) and sy == pytest.approx(6000 / bounded.image.height)
    left, right = bounded.image.getpixel((10, 10)), bounded.image.getpixel((bounded.image.width - 10, 10))
    assert left[0] > 180 and right[2] > 180  # the same picture, smaller


def test_the_pixel_limit_counts_what_is_decoded_so_a_big_png_is_refused_and_the_same_jpeg_is_not():
    size = (6000, 4000)  # 24 MP
    png = encode(Image.new("RGB", size, (40, 90, 160)), "PNG")
    with pytest.raises(TooManyPixels, match="serve.max_image_pixels=16,000,000"):
        decode_bounded(png, LIMIT, SIDE)
    assert max(decode_bounded(_big_jpeg(size), LIMIT, SIDE).image.size) <= SIDE


def test_a_large_non_jpeg_within_the_limit_is_box_reduced():
    data = encode(Image.new("RGB", (3000, 1000), (5, 200, 5)), "PNG")
    bounded = decode_bounded(data, LIMIT, SIDE)
    assert bounded.image.size == (1500, 500) and (bounded.width, bounded.height) == (3000, 1000)


def test_a_pixel_bomb_is_refused_from_its_header():
    with pytest.raises(TooManyPixels, match="decompression-bomb"):
        decode_bounded(png_bomb(30000, 30000), LIMIT, SIDE)
    with pytest.raises(TooManyPixels):  # even a JPEG at 1/8 scale can be too many pixels
        decode_bounded(_big_jpeg((4096, 2048)), 100_000, SIDE)


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "TGA"])
def test_formats_outside_the_allow_list_are_refused_by_name(fmt):
    data = encode(Image.new("RGB", (32, 32), (1, 2, 3)), fmt)
    with pytest.raises(UnsupportedFormat) as err:
        decode_bounded(data, LIMIT, SIDE)
    assert fmt in str(err.value) and "JPEG" in str(err.value)
    assert decode(data, LIMIT).size == (32, 32)  # ingest still reads them


@pytest.mark.parametrize("fmt", SERVE_FORMATS)
def test_every_allowed_format_decodes(fmt):
    bounded = decode_bounded(encode(Image.new("RGB", (40, 30), (200, 100, 50)), fmt), LIMIT, SIDE)
    assert bounded.image.size == (40, 30) and bounded.image.mode == "RGB"


def test_non_images_are_input_errors_not_format_errors():
    with pytest.raises(InputError) as err:
        decode_bounded(b"plain text, not a photo", LIMIT, SIDE)
    assert not isinstance(err.value, UnsupportedFormat) and "not an image" in str(err.value)


def test_exif_orientation_is_applied_to_the_reduced_image():
    data = exif_rotated_jpeg(two_tone((4000, 2000), (220, 20, 30), (20, 40, 220)), orientation=6)
    bounded = decode_bounded(data, LIMIT, SIDE)
    assert (bounded.width, bounded.height) == (2000, 4000)  # upright: portrait
    assert bounded.image.height > bounded.image.width and max(bounded.image.size) <= SIDE
    small = exif_rotated_jpeg(two_tone((400, 200), (220, 20, 30), (20, 40, 220)), orientation=6)
    assert decode_bounded(small, LIMIT, SIDE).image.size == decode(small, LIMIT).size == (200, 400)


def test_the_ingress_check_maps_each_refusal_to_its_status():
    from fastapi import HTTPException

    from ootd.serve.parsing import check_upload

    def status(data: bytes, limit: int = LIMIT) -> int:
        with pytest.raises(HTTPException) as err:
            check_upload(data, limit)
        return err.value.status_code

    assert status(b"") == 422
    assert status(b"plain text") == 422
    assert status(encode(Image.new("RGB", (8, 8)), "TIFF")) == 415
    assert status(png_bomb(30000, 30000)) == 413
    assert status(encode(Image.new("RGB", (6000, 4000)), "PNG")) == 413
    check_upload(_big_jpeg((6000, 4000)), LIMIT)  # decoded at 1/2: 6 MP
