"""Near-duplicate photos: DCT perceptual hashes per photo (whole, mirror, sub-windows), grouped by Hamming distance.

The hash is pHash as `imagehash.phash(hash_size=12)` computes it: grayscale, 32x32 Lanczos thumbnail, 2-D DCT-II,
the 12x12 lowest frequencies, one bit per coefficient above their median. It is implemented here with a cosine
matrix in numpy because that is all it is: no extra dependency (imagehash also pulls in PyWavelets), and the DCT
coefficients are at hand to derive the hash of the mirrored photo for free (mirroring flips the sign of the odd
horizontal frequencies), so a flipped copy costs no second thumbnail. A flip moves pHash bits a lot and a 5 % crop
moves them nearly as far as the gap to a distinct photo, so each photo also keeps the hashes of five 95 %
sub-windows, and a whole photo is compared with the other's windows too (`distance`).

Grouping takes connected components of the "within `threshold`" graph, found blockwise with numpy over the packed
hashes (7 x 18 bytes a photo, no pixels), so the groups do not depend on the order photos arrive in; the smallest
id represents a group. Components rather than "join the nearest representative": the crop-aware distance is not a
metric (two crops of one photo can be farther apart than each is from the photo), and leader clustering split
copies of one photo over groups and merged copies of distinct ones in the measurement.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# 144-bit hash from the 12x12 low frequencies of a 32x32 thumbnail. The classic 8x8 (64 bits) also groups every
# required copy, but distinct synthetic photos come within 10 bits of each other's copies (2 bits of margin
# over the copies' 4): 12x12 leaves 30 bits between the farthest copy (6) and the first false merge (36).
HASH_SIZE, THUMB_SIZE = 12, 32
HASH_BITS = HASH_SIZE * HASH_SIZE
WORDS = -(-HASH_BITS // 64)  # uint64 words per hash in the packed arrays
# JPEGs are decoded at the largest DCT scaling that keeps at least this many pixels a side: well above the
# thumbnail, so a photo and its half-size copy are resampled from similar detail.
DRAFT_SIZE = 4 * THUMB_SIZE
# Sub-windows hashed beside the whole photo: 95 % of each side at the four corners and the centre. A re-post
# cropped by a few percent is close to one of them while its whole-photo hash may be 20+ bits away.
WINDOW_FRACTION = 0.95
WINDOW_ANCHORS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
# Chosen by measurement (benchmarks/near_dup_threshold.py, results/near_dup_threshold.md): required copies of the
# 780 demo photos are within 6 bits, the first false merge appears at 36.
DEFAULT_THRESHOLD = 20


@dataclass(frozen=True)
class PHash:
    """Perceptual hashes of one photo: the whole photo, its mirror image, and its sub-windows (HASH_BITS-bit ints)."""

    value: int
    mirror: int
    windows: tuple[int, ...] = ()

    def columns(self) -> dict[str, Any]:
        """The crops-table columns: `phash`, `phash_mirror` (HASH_BITS / 4 hex digits), `phash_windows` (list)."""
        return {"phash": _hex(self.value), "phash_mirror": _hex(self.mirror),
                "phash_windows": [_hex(w) for w in self.windows]}  # fmt: skip

    @classmethod
    def from_columns(cls, phash: str, phash_mirror: str, phash_windows: list[str] | None) -> PHash:
        """Parses the crops-table form written by `columns`."""
        return cls(int(phash, 16), int(phash_mirror, 16), tuple(int(w, 16) for w in phash_windows or ()))


def _hex(value: int) -> str:
    return f"{value:0{HASH_BITS // 4}x}"


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return (a ^ b).bit_count()


def distance(a: PHash, b: PHash) -> int:
    """Hamming distance of two photos, allowing for a mirror and for one being a slight crop of the other.

    The smallest of: whole vs whole (either orientation), and the whole of either photo (either orientation)
    vs a sub-window of the other. Window vs window is not compared: it would only add chances of a false merge.
    """
    best = min(hamming(a.value, b.value), hamming(a.value, b.mirror), hamming(a.mirror, b.value))
    for whole, parts in ((a, b.windows), (b, a.windows)):
        for window in parts:
            best = min(best, hamming(whole.value, window), hamming(whole.mirror, window))
    return best


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """Rows k of the (unnormalised, as scipy's default) DCT-II: C[k, n] = 2 cos(pi (2n + 1) k / 2N), k < HASH_SIZE."""
    import numpy as np

    n = np.arange(THUMB_SIZE)
    k = np.arange(HASH_SIZE)[:, None]
    return 2.0 * np.cos(np.pi * (2 * n + 1) * k / (2 * THUMB_SIZE))


def _low_frequencies(gray: Image.Image, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The lowest DCT frequencies of the 32x32 thumbnail of a grayscale image (or of `box` in it: float pixels,
    so a window is resampled exactly instead of rounded to the pixel grid of a small draft)."""
    import numpy as np
    from PIL import Image

    thumb = gray.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS, box=box)
    dct = _dct_matrix()
    return dct @ np.asarray(thumb, dtype=np.float64) @ dct.T

def _bits(coefficients: np.ndarray) -> int:
    """One bit per coefficient above the median, row-major, first coefficient in the top bit (imagehash's order)."""
    import numpy as np

    flags = (coefficients > float(np.median(coefficients))).ravel()
    value = 0
    for flag in flags:
        value = (value << 1) | int(flag)
    return value


def phash_image(image: Image.Image) -> PHash:
    """pHash of a PIL image, of its mirror and of its sub-windows.

    Args:
        image: any PIL image (alpha and 16-bit modes are flattened the way `ootd.decode.to_rgb` shows them).
    """
    import numpy as np

    from ootd.decode import to_rgb

    gray = image if image.mode == "L" else to_rgb(image).convert("L")
    low = _low_frequencies(gray)
    # Mirroring left-right multiplies horizontal frequency k by (-1)^k: exact for the DCT of the same thumbnail.
    mirrored = low * (-1.0) ** np.arange(HASH_SIZE)[None, :]
    width, height = gray.size
    cw, ch = width * WINDOW_FRACTION, height * WINDOW_FRACTION
    windows = []
    for ax, ay in WINDOW_ANCHORS:
        x, y = (width - cw) * ax, (height - ch) * ay
        windows.append(_bits(_low_frequencies(gray, (x, y, x + cw, y + ch))))
    return PHash(_bits(low), _bits(mirrored), tuple(windows))


def phash_bytes(data: bytes) -> PHash:
    """pHash of encoded image bytes (see `phash_image`), decoding only what the 32x32 thumbnails need.

    JPEGs are decoded at reduced scale (PIL `draft`: 1/2 to 1/8 in the DCT domain, several times cheaper than a
    full decode); EXIF orientation is applied so a rotated copy hashes like the upright photo. Call
    `ootd.decode.probe` first: this function trusts the header (pixel limit) it checked.

    Args:
        data: the file bytes.

    Raises:
        Exception: whatever PIL raises for bytes it cannot decode (callers turn it into a decode error).
    """
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller's probe applied our limit
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (DRAFT_SIZE, DRAFT_SIZE))
            img.load()
            try:
                upright = ImageOps.exif_transpose(img) or img
            except Exception:  # noqa: BLE001 - decode() keeps such photos as stored; so does the hash
                upright = img
            return phash_image(upright)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has a ufunc; older numpy counts bytes through a table)."""
    import numpy as np

    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], np.uint8)
    return table[x[..., None].view(np.uint8)].sum(axis=-1, dtype=np.uint8)


class HashArrays:
    """Many photos' hashes as uint64 words, for all-pairs comparisons in numpy."""

    def __init__(self, hashes: list[PHash]):
        """Packs `hashes`; a hash without windows uses its whole-photo value in their place (no extra matches).

        Args:
            hashes: one per photo.
        """
        import numpy as np

        n, n_windows = len(hashes), len(WINDOW_ANCHORS)
        self.value = np.array([_words(h.value) for h in hashes], np.uint64).reshape(n, WORDS)
        self.mirror = np.array([_words(h.mirror) for h in hashes], np.uint64).reshape(n, WORDS)
        self.windows = np.array(
            [[_words(w) for w in (h.windows if len(h.windows) == n_windows else (h.value,) * n_windows)]
             for h in hashes], np.uint64,
        ).reshape(n, n_windows, WORDS)  # fmt: skip

    def __len__(self) -> int:
        return len(self.value)

    def rows(self, start: int, stop: int) -> HashArrays:
        """A slice of the photos (views, no copy)."""
        part = object.__new__(HashArrays)
        part.value, part.mirror = self.value[start:stop], self.mirror[start:stop]
        part.windows = self.windows[start:stop]
        return part

    def distances(self, other: HashArrays) -> np.ndarray:
        """[len(self), len(other)] `distance` of every pair (the same combinations, vectorised).

        The cost is in the 23 broadcast comparisons, not in the hash width: filtering on the first word first
        measured no faster.
        """
        import numpy as np

        def bits(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return _popcount(x[:, None, :] ^ y[None, :, :]).sum(axis=-1, dtype=np.uint16)

        best = np.minimum(bits(self.value, other.value), bits(self.value, other.mirror))
        np.minimum(best, bits(self.mirror, other.value), out=best)
        for k in range(self.windows.shape[1]):
            for whole in (self.value, self.mirror):
                np.minimum(best, bits(whole, other.windows[:, k]), out=best)
            for whole in (other.value, other.mirror):
                np.minimum(best, bits(self.windows[:, k], whole), out=best)
        return best


def _words(value: int) -> list[int]:
    """A hash as WORDS uint64 words, most significant first."""
    return [(value >> (64 * (WORDS - 1 - k))) & 0xFFFFFFFFFFFFFFFF for k in range(WORDS)]


# Elements of one block comparison (rows x columns): bounds the temporaries to a few tens of MB.
BLOCK_ELEMENTS = 1 << 22


def assign_near_dups(
    new: Iterable[tuple[str, PHash]],
    threshold: int,
    existing: Iterable[tuple[str, PHash, str | None]] = (),
) -> dict[str, str | None]:
    """Groups new photos with each other and with earlier groups; each group gets one representative.

    Two photos within `threshold` (`distance`) are in one group, transitively (connected components, so the
    result does not depend on the order photos arrive in). A group of new photos only is represented by its
    smallest image id. Earlier rows are never rewritten: a new photo joining earlier groups points to the
    smallest earlier representative among them, and earlier groups it bridges keep their own representatives.

    Memory: 7 hashes (7 x WORDS x 8 bytes) per photo plus blocks of `BLOCK_ELEMENTS`. Time: quadratic, new x all
    photos (5,000 new photos took ~12 s on 2 shared cores); a multi-index hash is the next step for crawls of
    hundreds of thousands.

    Args:
        new: (image_id, hash) of photos not yet in the crops table; ids unique.
        threshold: `data.near_dup_threshold`.
        existing: (image_id, hash, near_dup_of) of crops-table rows of earlier runs.

    Returns:
        image_id -> representative's image_id, or None for a photo that represents its own group.
    """
    import numpy as np

    new = sorted(new, key=lambda item: item[0])
    existing = list(existing)
    ids = [i for i, _ in new] + [i for i, _, _ in existing]
    if not new:
        return {}
    arrays = HashArrays([h for _, h in new] + [h for _, h, _ in existing])
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    n_new = len(new)
    block = max(1, BLOCK_ELEMENTS // (len(ids) * WORDS))
    for start in range(0, n_new, block):
        stop = min(n_new, start + block)
        rows, cols = np.nonzero(arrays.rows(start, stop).distances(arrays) <= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            a, b = root(start + r), root(c)
            if a != b:
                parent[max(a, b)] = min(a, b)
    # Each component's representative: the smallest earlier representative in it, else its smallest new id.
    earlier: dict[int, str] = {}
    for k, (image_id, _, near_dup_of) in enumerate(existing):
        key = root(n_new + k)
        rep = near_dup_of or image_id
        earlier[key] = min(earlier.get(key, rep), rep)
    chosen: dict[int, str] = {}
    for k in range(n_new):  # ids ascending, so the first new id seen in a component is its smallest
        chosen.setdefault(root(k), earlier.get(root(k), ids[k]))
    result = {}
    for k in range(n_new):
        rep = chosen[root(k)]
        result[ids[k]] = None if rep == ids[k] else rep
    return result
