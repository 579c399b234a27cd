"""Measurement: pHash distances of edited copies vs distinct photos, to choose `data.near_dup_threshold`.

For every synthetic demo photo (`write_sample_data(out, per_style=60, seed=0, size=256)`: 780 photos) four
copies are made: resized to 50 %, recompressed at JPEG quality 40, cropped by 5 % (two ways: 5 % off the left and
top edges, and 2.5 % off every edge) and mirrored left-right. The distance of each copy to its original (the
either-orientation distance of `ootd.ingest.near_dup.distance`) must be at most the threshold; every pair of
distinct originals must be above it. Prints both distributions and the merges at each candidate threshold, and
the groups `assign_near_dups` forms over originals + copies at the chosen one.

Run: .venv/bin/python benchmarks/near_dup_threshold.py [--per-style 60] [--seed 0] [--threshold 20] [--hash-size 8]
(several minutes on 2 cores: the grouping is rerun at every candidate threshold).
Writes benchmarks/results/near_dup_threshold.md.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

REQUIRED = ("resize50", "jpeg_q40", "crop5_corner", "crop5_centre", "mirror")


def edited_copies(data: bytes) -> dict[str, bytes]:
    """The edits a crawler meets: rescaled, recompressed, slightly cropped and mirrored re-posts of a photo.

    The names in REQUIRED must be grouped with their original; the others show where the threshold stops.
    """
    from PIL import Image, ImageOps

    def jpeg(image: Image.Image, quality: int = 90) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    def crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
        w, h = image.size
        return image.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))

    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    return {
        "resize50": jpeg(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)),
        "jpeg_q40": jpeg(image, quality=40),
        "crop5_corner": jpeg(crop(image, 0.05, 0.05, 0, 0)),  # 5 % of each side, off the left and top
        "crop5_centre": jpeg(crop(image, 0.025, 0.025, 0.025, 0.025)),  # 5 % of each side, off all four edges
        "mirror": jpeg(ImageOps.mirror(image)),
        "mirror+crop5": jpeg(ImageOps.mirror(crop(image, 0, 0, 0.05, 0.05))),
        "crop2.5_corner": jpeg(crop(image, 0.025, 0.025, 0, 0)),
        "crop5_left_only": jpeg(crop(image, 0.05, 0, 0, 0)),
        "crop5_top_only": jpeg(crop(image, 0, 0.05, 0, 0)),
        "crop7.5_corner": jpeg(crop(image, 0.075, 0.075, 0, 0)),
        "crop10_centre": jpeg(crop(image, 0.05, 0.05, 0.05, 0.05)),
    }


def pairwise_distances(hashes):
    """`ootd.ingest.near_dup.distance` of every pair i < j (numpy, all pairs at once)."""
    import numpy as np

    from ootd.ingest.near_dup import HashArrays

    packed = HashArrays(hashes)
    return packed.distances(packed)[np.triu_indices(len(hashes), k=1)].astype(int)


def set_hash_size(size: int) -> None:
    """Switches the library's hash to size x size bits for this process (a measurement knob, not a setting)."""
    import ootd.ingest.near_dup as nd

    nd.HASH_SIZE, nd.HASH_BITS, nd.WORDS = size, size * size, -(-size * size // 64)
    nd._dct_matrix.cache_clear()


def histogram(values, top: int) -> str:
    """`distance:count` pairs up to `top`, then the count above."""
    counts = Counter(int(v) for v in values)
    parts = [f"{d}:{counts[d]}" for d in range(top + 1) if counts[d]]
    above = sum(c for d, c in counts.items() if d > top)
    return " ".join(parts) + (f" (>{top}: {above})" if above else "")


def grouping(members, threshold: int, names) -> tuple[int, int, int]:
    """(groups, false merges, originals split) when `assign_near_dups` groups originals + the copies in `names`.

    A false merge is a group holding photos of two distinct originals; a split original has photos in two groups.
    """
    from ootd.ingest.near_dup import assign_near_dups

    chosen = [m for m in members if m[3] in names or m[3] == "original"]
    reps = assign_near_dups([(i, h) for i, h, _, _ in chosen], threshold)
    origin = {i: k for i, _, k, _ in chosen}
    by_rep: dict[str, set[int]] = {}
    groups_of: dict[int, set[str]] = {}
    for i, rep in reps.items():
        by_rep.setdefault(rep or i, set()).add(origin[i])
        groups_of.setdefault(origin[i], set()).add(rep or i)
    false_merges = sum(len(ks) - 1 for ks in by_rep.values())
    return len(by_rep), false_merges, sum(len(g) > 1 for g in groups_of.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-style", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threshold", type=int, default=None, help="default: ootd.ingest.near_dup.DEFAULT_THRESHOLD")
    p.add_argument("--hash-size", type=int, default=None, help="compare another hash size (bits = size^2)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "near_dup_threshold.md")
    args = p.parse_args(argv)
    if args.hash_size:
        set_hash_size(args.hash_size)

    import numpy as np

    from ootd.decode import image_id
    from ootd.ingest import near_dup
    from ootd.ingest.near_dup import DEFAULT_THRESHOLD, distance, phash_bytes
    from ootd.synthetic import write_sample_data

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_data(tmp, per_style=args.per_style, seed=args.seed, size=args.size)
        originals = [f.read_bytes() for f in sorted((Path(tmp) / "images").rglob("*.jpg"))]
    hashes = [phash_bytes(d) for d in originals]
    copy_d: dict[str, list[int]] = {}
    members = []  # (image id, hash, index of its original, edit name)
    for k, (data, h) in enumerate(zip(originals, hashes, strict=True)):
        members.append((image_id(data), h, k, "original"))
        for name, copy in edited_copies(data).items():
            ch = phash_bytes(copy)
            copy_d.setdefault(name, []).append(distance(h, ch))
            members.append((image_id(copy), ch, k, name))
    pair_d = pairwise_distances(hashes)

    def row(label: str, values) -> str:
        a = np.asarray(values)
        return (f"| {label} | {len(a)} | {a.min()} | {np.median(a):.0f} | {np.percentile(a, 99):.0f} | {a.max()} | "
                f"{histogram(a, max(30, int(a.min()) + 12))} |")

    lines = [f"# pHash near-duplicate distances: {len(originals)} synthetic photos (per_style={args.per_style}, "
             f"seed={args.seed}, size={args.size})", "",
             f"Distance = `ootd.ingest.near_dup.distance` ({near_dup.HASH_BITS}-bit DCT pHash, either orientation, "
             "whole photo vs whole photo or vs 95 % sub-windows). Required edits are marked *.", "",
             "| pairs | n | min | p50 | p99 | max | histogram (distance:count) |", "|---|---|---|---|---|---|---|"]
    lines += [row(("*" if name in REQUIRED else "") + f"copy: {name}", v) for name, v in copy_d.items()]
    lines.append(row("distinct originals", pair_d))
    worst_required = max(max(copy_d[name]) for name in REQUIRED)
    lines += ["", "Grouping (`assign_near_dups`) of the originals + their required copies at each threshold:", "",
              "| threshold | required copies beyond it | other copies beyond it | distinct original pairs within | "
              "false merges | originals split |", "|---|---|---|---|---|---|"]
    for t in range(max(0, worst_required - 4), int(pair_d.min()) + 3):
        missed = {name: int((np.asarray(v) > t).sum()) for name, v in copy_d.items()}
        required = sum(n for name, n in missed.items() if name in REQUIRED)
        other = sum(n for name, n in missed.items() if name not in REQUIRED)
        _, merges, split = grouping(members, t, REQUIRED)
        lines.append(f"| {t}{' (chosen)' if t == threshold else ''} | {required} | {other} | "
                     f"{int((pair_d <= t).sum())} | {merges} | {split} |")
    lines.append("")
    groups, merges, split = grouping(members, threshold, tuple(copy_d))
    lines.append(f"- every copy (required and other) grouped at threshold {threshold}: {groups} groups for "
                 f"{len(originals)} originals, {merges} false merges, {split} originals split over groups.")
    lines.append(f"- closest distinct pair: {pair_d.min()} bits; farthest required copy: {worst_required} bits.")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
