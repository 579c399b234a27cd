"""Reading, hashing and guarded decoding of untrusted photo files, with one clear error per bad input (no Ray)."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# Stages named in the errors table (DESIGN §4): where an input was rejected.
READ, DECODE, DETECT = "read", "decode", "detect"

# Extensions a style folder is scanned for (case-insensitive); anything else in the folder is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Background that transparent pixels are composited onto: photos shown on white pages look like this.
ALPHA_BACKGROUND = (255, 255, 255)

IMAGE_ID_PATTERN = r"^[0-9a-f]{64}$"  # DESIGN §4; also the HTTP API's path/field pattern
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class InputError(Exception):
    """One input cannot be used; `stage` and the message go to the errors table, the run goes on.

    Attributes:
        stage: `read` (the file could not be read) or `decode` (its bytes are not a usable image).
    """

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class ImageHeader:
    """What an image file claims about itself, read without decoding its pixels.

    Attributes:
        format: PIL format name (JPEG, PNG, ...).
        width: stored width in pixels (before EXIF orientation).
        height: stored height in pixels.
        mode: PIL mode of the stored pixels (RGB, RGBA, L, CMYK, I;16, P, ...).
    """

    format: str
    width: int
    height: int
    mode: str


def image_id(data: bytes) -> str:
    """The image id of DESIGN §4: lowercase hex sha256 of the file bytes.

    Args:
        data: the original file bytes.
    """
    return hashlib.sha256(data).hexdigest()


def check_image_id(value: Any) -> str:
    """Returns `value` if it is an image id (lowercase hex sha256), so it is safe in a path or an expression.

    Raises:
        ValueError: for anything else (path separators, `..`, upper case, wrong length, non-strings).
    """
    if not isinstance(value, str) or not re.fullmatch(IMAGE_ID_PATTERN, value):
        raise ValueError(f"bad image id {value!r}: ids are lowercase hex sha256 (64 chars)")
    return value


def read_file(path: str | Path, max_bytes: int) -> bytes:
    """Reads a whole input file, refusing files over the size limit before reading them.

    Args:
        path: a local file.
        max_bytes: the largest accepted file (`data.max_image_bytes`).

    Raises:
        InputError: stage `read` for a missing, unreadable or oversized file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(READ, f"not a regular file: {path}")
        if size > max_bytes:
            raise InputError(READ, f"file is {size:,} bytes, over data.max_image_bytes={max_bytes:,}; not read")
        with path.open("rb") as fh:
            # Read one byte past the limit so a file that grew after stat() is still caught.
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(READ, f"file not found: {path}") from None
    except PermissionError as exc:
        raise InputError(READ, f"permission denied: {path} ({exc.strerror})") from None
    except OSError as exc:
        raise InputError(READ, f"cannot read {path}: {exc}") from None
    if len(data) > max_bytes:
        raise InputError(READ, f"file is over data.max_image_bytes={max_bytes:,}; not read")
    return data


def probe(data: bytes, max_pixels: int) -> ImageHeader:
    """Identifies an image from its header only and applies the decompression-bomb guard.

    Cheap enough for the hashing pass: PIL parses the header lazily and no pixel is decoded, so a
    30000x30000 PNG of a few hundred bytes is rejected without allocating its 2.7 GB of pixels.

    Args:
        data: the file bytes.
        max_pixels: the largest accepted width x height (`data.max_image_pixels`).

    Raises:
        InputError: stage `decode` for empty data, a non-image or an image over the pixel limit.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(DECODE, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with Image.open(io.BytesIO(data)) as img:
                header = ImageHeader(format=str(img.format), width=img.width, height=img.height, mode=img.mode)
    except UnidentifiedImageError:
        raise InputError(DECODE, f"not an image: no known image format in the first bytes {data[:16]!r}") from None
    except Image.DecompressionBombError as exc:
        # PIL refuses at open time beyond twice its own limit; report it in terms of ours.
        found = _PIL_BOMB_PIXELS.search(str(exc))
        claimed = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL accepts"
        raise InputError(DECODE, _bomb_message(claimed, max_pixels)) from None
    except Exception as exc:  # noqa: BLE001 - header parsers raise many types for malformed files
        raise InputError(DECODE, f"unreadable image header: {type(exc).__name__}: {exc}") from None
    pixels = header.width * header.height
    if header.width < 1 or header.height < 1:
        raise InputError(DECODE, f"image header claims an empty size {header.width}x{header.height}")
    if pixels > max_pixels:
        raise InputError(DECODE, _bomb_message(f"{header.width}x{header.height} = {pixels:,} pixels", max_pixels))
    return header


def _bomb_message(claimed: str, max_pixels: int) -> str:
    return (
        f"image header claims {claimed}, over data.max_image_pixels={max_pixels:,} "
        "(decompression-bomb guard); not decoded"
    )


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decodes an image as upright 8-bit RGB.

    The header is checked first (`probe`), then every pixel is decoded so truncated files fail here and not
    later; EXIF orientation is applied, so width/height and boxes refer to the photo as people see it.

    Args:
        data: the file bytes.
        max_pixels: the largest accepted width x height (`data.max_image_pixels`).

    Raises:
        InputError: stage `decode` for anything that is not a complete, usable image.
    """
    from PIL import Image, ImageOps

    header = probe(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as exc:  # noqa: BLE001 - PIL decoders raise OSError, SyntaxError, ValueError, EOFError ...
        reason = "truncated or corrupt" if "truncated" in str(exc).lower() else "corrupt"
        raise InputError(DECODE, f"{reason} {header.format} data: {type(exc).__name__}: {exc}") from None
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no reason to lose a readable photo
        upright = img
    try:
        return to_rgb(upright if upright is not None else img)
    except Exception as exc:  # noqa: BLE001
        raise InputError(DECODE, f"cannot convert {header.mode} {header.format} image to RGB: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB the way a viewer would show it.

    Alpha (RGBA, LA, PA, P with a transparent index) is composited on white rather than dropped, so transparent
    regions do not turn black; 16/32-bit grayscale is scaled down to 8 bits rather than clipped to white;
    CMYK, YCbCr, LAB, 1-bit and L go through PIL's conversions.

    Args:
        image: a loaded PIL image.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(image), mode="L").convert("RGB")
    return image.convert("RGB")


def _to_uint8(image: Image.Image) -> np.ndarray:
    """8-bit grayscale from a 16/32-bit integer or float image, keeping its tonal range."""
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        # Mode I/F carries no declared depth: 16-bit PNGs decode to I with values up to 65535; 8-bit data
        # stored as I stays as is.
        peak = float(values.max()) if values.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def to_array(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as a contiguous uint8 HxWx3 array (what the detector takes).

    Args:
        image: an RGB PIL image.
    """
    import numpy as np

    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def encode_jpeg(image: Image.Image, max_side: int, quality: int = 92) -> bytes:
    """JPEG bytes of an image shrunk (never enlarged) to at most `max_side` on its long side.

    Args:
        image: any PIL image.
        max_side: the longest side kept (`data.crop_max_side`).
        quality: JPEG quality.
    """
    from PIL import Image

    rgb = to_rgb(image)
    long_side = max(rgb.size)
    if long_side > max_side:
        scale = max_side / long_side
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_crop(data: bytes) -> Image.Image:
    """Crop bytes written by ootd (crops table, serve pipeline) → RGB image, the same way at train, index and serve.

    Raises:
        InputError: when the bytes are not a readable image (stage `decode`).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as exc:
        raise InputError(DECODE, f"undecodable crop: {exc}") from None
