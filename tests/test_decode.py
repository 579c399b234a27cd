"""Unit tests of reading, hashing and guarded decoding of untrusted photo files (no Ray)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from ootd.decode import (
    DECODE,
    READ,
    InputError,
    decode,
    encode_jpeg,
    image_id,
    probe,
    read_file,
    to_rgb,
)
from tests.bad_images import encode, exif_rotated_jpeg, gray16, png_bomb, rgba_with_hole, truncated, two_tone

LIMIT = 40_000_000
RED, BLUE = (220, 20, 30), (20, 40, 220)


def _close(pixel, expected, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def _photo(size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _reject(fn, *args) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args)
    return info.value


def test_image_id_is_lowercase_sha256_hex():
    assert image_id(b"outfit") == hashlib.sha256(b"outfit").hexdigest()
    assert image_id(b"outfit") == image_id(b"outfit") != image_id(b"outfit!")


def test_read_file_returns_bytes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8abc")
    assert read_file(tmp_path / "a.jpg", max_bytes=100) == b"\xff\xd8abc"


def test_missing_file_is_a_read_error(tmp_path):
    err = _reject(read_file, tmp_path / "gone.jpg", 100)
    assert err.stage == READ and "file not found" in str(err) and "gone.jpg" in str(err)


def test_directory_is_a_read_error(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    err = _reject(read_file, tmp_path / "folder.jpg", 100)
    assert err.stage == READ and "not a regular file" in str(err)


def test_oversized_file_is_refused_before_reading(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    err = _reject(read_file, tmp_path / "big.jpg", 100)
    assert err.stage == READ and "101 bytes" in str(err) and "max_image_bytes=100" in str(err)


def test_zero_bytes_is_a_decode_error():
    err = _reject(probe, b"", LIMIT)
    assert err.stage == DECODE and "empty (0 bytes)" in str(err)


def test_text_named_jpg_is_not_an_image():
    err = _reject(decode, b"this is a shopping list, not a photo\n", LIMIT)
    assert err.stage == DECODE and "not an image" in str(err) and "this is a shoppi" in str(err)


def test_png_bomb_is_rejected_from_its_header():
    bomb = png_bomb(30000, 30000)
    assert len(bomb) < 100  # the guard never allocates the 2.7 GB the header claims
    err = _reject(probe, bomb, LIMIT)
    assert err.stage == DECODE
    assert "900,000,000 pixels" in str(err) and "max_image_pixels=40,000,000" in str(err)
    assert _reject(decode, bomb, LIMIT).stage == DECODE


def test_pixel_limit_is_ours_not_pils():
    header = probe(png_bomb(5000, 4000), LIMIT)  # 20 MP: under our limit, so the header is fine
    assert (header.format, header.width, header.height) == ("PNG", 5000, 4000)
    err = _reject(probe, png_bomb(5000, 4000), 1_000_000)
    assert "5000x4000 = 20,000,000 pixels" in str(err) and "max_image_pixels=1,000,000" in str(err)


def test_truncated_jpeg_fails_at_decode_but_passes_the_header_probe():
    data = truncated(encode(_photo((320, 240)), "JPEG", quality=95))
    assert probe(data, LIMIT).format == "JPEG"
    err = _reject(decode, data, LIMIT)
    assert err.stage == DECODE and "truncated" in str(err) and "JPEG" in str(err)


def test_good_jpeg_decodes_to_rgb():
    image = decode(encode(two_tone((64, 32), RED, BLUE), "JPEG", quality=95), LIMIT)
    assert image.mode == "RGB" and image.size == (64, 32)
    assert _close(image.getpixel((5, 16)), RED) and _close(image.getpixel((60, 16)), BLUE)


def test_exif_orientation_6_is_applied():
    # Stored 80 wide x 40 high, red left; orientation 6 = shown rotated 90 degrees clockwise: 40 x 80, red on top.
    image = decode(exif_rotated_jpeg(two_tone((80, 40), RED, BLUE), orientation=6), LIMIT)
    assert image.size == (40, 80)
    assert _close(image.getpixel((20, 5)), RED) and _close(image.getpixel((20, 75)), BLUE)


def test_rgba_alpha_is_composited_on_white():
    rgba = rgba_with_hole(Image.new("RGB", (40, 40), RED))
    image = decode(encode(rgba, "PNG"), LIMIT)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 255, 255)  # transparent (black underneath) -> white, not black
    assert image.getpixel((35, 35)) == RED


def test_half_transparent_pixels_blend_with_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert _close(to_rgb(rgba).getpixel((0, 0)), (127, 127, 127), tol=1)


def test_la_and_palette_transparency_become_white():
    la = Image.new("LA", (4, 4), (0, 0))
    assert decode(encode(la, "PNG"), LIMIT).getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((3, 3), 1)
    data = encode(pal, "PNG", transparency=0)
    image = decode(data, LIMIT)
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((3, 3)) == (200, 0, 0)


def test_grayscale_becomes_three_equal_channels():
    gray = Image.fromarray(np.full((8, 8), 90, np.uint8), mode="L")
    image = decode(encode(gray, "JPEG", quality=100), LIMIT)
    r, g, b = image.getpixel((4, 4))
    assert image.mode == "RGB" and r == g == b and abs(r - 90) <= 2


def test_sixteen_bit_gray_is_scaled_not_clipped():
    levels = Image.fromarray(np.array([[0, 128, 255]], np.uint8), mode="L")
    src = gray16(levels)
    assert src.mode == "I;16"
    image = decode(encode(src, "PNG"), LIMIT)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg_keeps_its_colours():
    cmyk = two_tone((64, 32), RED, BLUE).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert probe(data, LIMIT).mode == "CMYK"
    image = decode(data, LIMIT)
    assert image.mode == "RGB"
    assert _close(image.getpixel((5, 16)), RED, tol=20) and _close(image.getpixel((60, 16)), BLUE, tol=20)


def test_encode_jpeg_shrinks_long_side_only():
    out = Image.open(io.BytesIO(encode_jpeg(Image.new("RGB", (1000, 500), RED), max_side=512)))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (512, 256)
    small = Image.open(io.BytesIO(encode_jpeg(Image.new("RGB", (100, 60), RED), max_side=512)))
    assert small.size == (100, 60)  # never enlarged


def test_encode_jpeg_accepts_alpha():
    out = Image.open(io.BytesIO(encode_jpeg(rgba_with_hole(Image.new("RGB", (20, 20), BLUE)), max_side=64)))
    assert out.mode == "RGB" and _close(out.getpixel((2, 2)), (255, 255, 255), tol=4)
