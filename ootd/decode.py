"""Reading, hashing and guarded decoding of untrusted photo files, with one clear error per bad input (no Ray)."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# Stages named in the errors table (DESIGN §4): where an input was rejected.
READ, DECODE, DETECT = "read", "decode", "detect"

# Extensions a style folder is scanned for (case-insensitive); anything else in the folder is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Background that transparent pixels are composited onto: photos shown on white pages look like this.
ALPHA_BACKGROUND = (255, 255, 255)

# Formats the serve path decodes (PIL names): what phones and browsers upload. Every other PIL plugin (TIFF and
# its libtiff codecs, PSD, ICO, EPS via Ghostscript, ...) is decoder surface an upload need not reach.
SERVE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

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


class UnsupportedFormat(InputError):
    """An image PIL can read, in a format outside the allowed ones (HTTP 415)."""


class TooManyPixels(InputError):
    """An image over the pixel limit: a decompression bomb or simply too large (HTTP 413)."""


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
    except FileNotFoundError:
        raise InputError(READ, f"file not found: {path}") from None
    except OSError as exc:
        raise InputError(READ, f"cannot read {path}: {exc}") from None
    if not path.is_file():
        raise InputError(READ, f"not a regular file: {path}")
    return read_capped(lambda: path.open("rb"), size, str(path), max_bytes)


def read_capped(open_stream: Callable[[], BinaryIO], size: int | None, name: str, max_bytes: int) -> bytes:
    """Reads a whole stream of at most `max_bytes` (`size`, when known, refuses it before reading).

    Raises:
        InputError: stage `read` for a missing, unreadable or oversized file.
    """
    if size is not None and size > max_bytes:
        raise InputError(READ, f"file is {size:,} bytes, over data.max_image_bytes={max_bytes:,}; not read")
    try:
        with open_stream() as fh:
            # Read one byte past the limit so a file that grew after its size was taken is still caught.
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(READ, f"file not found: {name}") from None
    except PermissionError as exc:
        raise InputError(READ, f"permission denied: {name} ({exc.strerror})") from None
    except OSError as exc:
        raise InputError(READ, f"cannot read {name}: {exc}") from None
    if len(data) > max_bytes:
        raise InputError(READ, f"file is over data.max_image_bytes={max_bytes:,}; not read")
    return data


def probe(data: bytes, max_pixels: int, formats: Sequence[str] | None = None,
          limit_name: str = "data.max_image_pixels") -> ImageHeader:
    """Identifies an image from its header only and applies the decompression-bomb guard.

    Cheap enough for the hashing pass: PIL parses the header lazily and no pixel is decoded, so a
    30000x30000 PNG of a few hundred bytes is rejected without allocating its 2.7 GB of pixels.

    Args:
        data: the file bytes.
        max_pixels: the largest accepted width x height (`data.max_image_pixels`).
        formats: PIL format names accepted (e.g. `SERVE_FORMATS`); None accepts every format PIL reads.
        limit_name: the config key of `max_pixels`, named in the error.

    Raises:
        InputError: stage `decode` for empty data or a non-image; `UnsupportedFormat` for a format outside
            `formats`; `TooManyPixels` for an image over the pixel limit.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(DECODE, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with Image.open(io.BytesIO(data), formats=formats) as img:
                header = ImageHeader(format=str(img.format), width=img.width, height=img.height, mode=img.mode)
    except UnidentifiedImageError:
        if formats is not None:
            _refuse_format(data, formats)
        raise InputError(DECODE, f"not an image: no known image format in the first bytes {data[:16]!r}") from None
    except Image.DecompressionBombError as exc:
        # PIL refuses at open time beyond twice its own limit; report it in terms of ours.
        found = _PIL_BOMB_PIXELS.search(str(exc))
        claimed = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL accepts"
        raise TooManyPixels(DECODE, _bomb_message(claimed, max_pixels, limit_name)) from None
    except Exception as exc:  # noqa: BLE001 - header parsers raise many types for malformed files
        raise InputError(DECODE, f"unreadable image header: {type(exc).__name__}: {exc}") from None
    pixels = header.width * header.height
    if header.width < 1 or header.height < 1:
        raise InputError(DECODE, f"image header claims an empty size {header.width}x{header.height}")
    if pixels > max_pixels:
        raise TooManyPixels(DECODE, _bomb_message(f"{header.width}x{header.height} = {pixels:,} pixels", max_pixels,
                                                  limit_name))
    return header


def _refuse_format(data: bytes, formats: Sequence[str]) -> None:
    """Names the format of an upload outside `formats` (header only, as ingest reads every file) and raises."""
    from PIL import Image

    allowed = ", ".join(formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                found = str(img.format)
    except Exception:  # noqa: BLE001 - not an image at all: the caller says so
        return
    raise UnsupportedFormat(DECODE, f"{found} images are not accepted; send one of {allowed}")


def _bomb_message(claimed: str, max_pixels: int, limit_name: str = "data.max_image_pixels") -> str:
    return f"image header claims {claimed}, over {limit_name}={max_pixels:,} (decompression-bomb guard); not decoded"


def decode(data: bytes, max_pixels: int, formats: Sequence[str] | None = None) -> Image.Image:
    """Fully decodes an image as upright 8-bit RGB.

    The header is checked first (`probe`), then every pixel is decoded so truncated files fail here and not
    later; EXIF orientation is applied, so width/height and boxes refer to the photo as people see it.

    Args:
        data: the file bytes.
        max_pixels: the largest accepted width x height (`data.max_image_pixels`).
        formats: PIL format names accepted; None: every format PIL reads.

    Raises:
        InputError: stage `decode` for anything that is not a complete, usable image.
    """
    from PIL import Image, ImageOps

    header = probe(data, max_pixels, formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
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


@dataclass(frozen=True)
class BoundedImage:
    """A photo decoded at a bounded size for serving.

    Attributes:
        image: upright 8-bit RGB, long side at most the requested `max_side` (or the photo's own size).
        width: upright width of the photo as stored (what boxes are reported in).
        height: upright height of the photo as stored.
    """

    image: Image.Image
    width: int
    height: int

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from `image` pixels to the photo's pixels."""
        return self.width / self.image.width, self.height / self.image.height


# EXIF orientation → the transpose that makes the photo upright (as `ImageOps.exif_transpose` does).
_ORIENT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
           7: "TRANSVERSE", 8: "ROTATE_90"}


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(width, height)
    return max(1, int(width * scale)), max(1, int(height * scale))


def decoded_size(data: bytes, max_side: int, formats: Sequence[str] | None = SERVE_FORMATS
                 ) -> tuple[ImageHeader, tuple[int, int]]:
    """The header, and the size `decode_bounded` would decode at (a JPEG is reduced up to 8x while it decodes).

    Header only: no pixel is decoded, so the ingress can apply the pixel limit to what a replica will hold.

    Raises:
        InputError: as `probe` (without its pixel limit).
    """
    import sys

    from PIL import Image

    header = probe(data, sys.maxsize, formats)
    if header.format != "JPEG" or max(header.width, header.height) <= max_side:
        return header, (header.width, header.height)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            img.draft("RGB", _fit(header.width, header.height, max_side))
            return header, img.size


def decode_bounded(data: bytes, max_pixels: int, max_side: int, formats: Sequence[str] | None = SERVE_FORMATS,
                   limit_name: str = "serve.max_image_pixels") -> BoundedImage:
    """Decodes an upload as upright RGB with bounded memory: what the serve path holds per photo.

    A photo no longer than `max_side` decodes exactly as `decode` does (the same pixels ingest saw). A larger
    JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (`draft`), never at full size; any other larger
    image is decoded (within `max_pixels`) and then box-reduced by an integer factor, so a batch of decoded
    uploads stays small whatever was sent.

    Args:
        data: the upload's bytes.
        max_pixels: most pixels decoded into memory at once (after the JPEG reduction).
        max_side: the long side kept (enough for the detector and the crops).
        formats: PIL format names accepted.
        limit_name: the config key of `max_pixels`, named in the error.

    Raises:
        InputError: stage `decode`; `UnsupportedFormat` and `TooManyPixels` as their names say.
    """
    from PIL import Image

    header, (width, height) = decoded_size(data, max_side, formats)
    if width * height > max_pixels:
        claimed = f"{header.width}x{header.height}" + (f", decoded at {width}x{height}," if width != header.width
                                                        else "")
        raise TooManyPixels(DECODE, _bomb_message(f"{claimed} = {width * height:,} pixels", max_pixels, limit_name))
    if max(header.width, header.height) <= max_side:
        image = decode(data, max_pixels, formats)
        return BoundedImage(image, image.width, image.height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            if header.format == "JPEG":
                img.draft("RGB", _fit(header.width, header.height, max_side))
            img.load()
    except Exception as exc:  # noqa: BLE001 - PIL decoders raise OSError, SyntaxError, ValueError, EOFError ...
        raise InputError(DECODE, f"corrupt {header.format} data: {type(exc).__name__}: {exc}") from None
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no reason to lose a readable photo
        orientation = None
    try:
        rgb = to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise InputError(DECODE, f"cannot convert {header.mode} {header.format} image to RGB: {exc}") from None
    factor = -(-max(rgb.size) // max_side)  # ceil: the draft leaves a JPEG up to twice as long as asked
    if factor >= 2:
        rgb = rgb.reduce(factor)
    swapped = orientation in (5, 6, 7, 8)
    if orientation in _ORIENT:  # the transposes of `decode`'s exif_transpose, on the reduced image
        rgb = rgb.transpose(getattr(Image.Transpose, _ORIENT[orientation]))
    width, height = (header.height, header.width) if swapped else (header.width, header.height)
    return BoundedImage(rgb, width, height)


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
