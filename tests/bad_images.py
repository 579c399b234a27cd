"""Test helper: bytes of deliberately awkward image files (bombs, truncation, odd modes, EXIF rotation)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """`image` saved in `fmt` (JPEG, PNG, ...)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` share of a file, as a download cut off midway leaves it."""
    return data[: int(len(data) * keep)]


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A ~70-byte PNG whose IHDR claims `width` x `height` pixels (with a valid CRC, so only the size is wrong)."""
    data = bytearray(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    # Signature (8) + IHDR length (4) + type (4); then 13 bytes of IHDR data and its CRC.
    start = 16
    assert bytes(data[12:16]) == b"IHDR"
    data[start : start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : start + 13])) & 0xFFFFFFFF
    data[start + 13 : start + 17] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    """JPEG of `image` as stored by a camera held sideways: pixels unrotated, EXIF Orientation set."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(image.convert("RGB"), "JPEG", quality=95, exif=exif.tobytes())


def two_tone(size: tuple[int, int], first: tuple[int, int, int], second: tuple[int, int, int]) -> Image.Image:
    """An RGB image whose left half is `first` and right half is `second`."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = first
    arr[:, w // 2 :] = second
    return Image.fromarray(arr)


def rgba_with_hole(image: Image.Image) -> Image.Image:
    """`image` with an alpha channel whose top-left quarter is fully transparent and painted black underneath."""
    rgba = image.convert("RGBA")
    arr = np.array(rgba)
    h, w = arr.shape[:2]
    arr[: h // 2, : w // 2] = (0, 0, 0, 0)
    return Image.fromarray(arr, "RGBA")


def gray16(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale (I;16) version of `image`, using the full 0..65535 range."""
    values = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(values.astype("<u2"))  # uint16 arrays become mode I;16
