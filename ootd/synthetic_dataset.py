"""Writing synthetic photo sets to disk: folder-per-style images, a YOLO garment dataset and a manifest (§7)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ootd.styles import GARMENT_CLASSES, STYLES
from ootd.synthetic_domain import Randomisation
from ootd.synthetic_render import MIN_SIZE

JPEG_QUALITY = 90


def _val_indices(per_style: int, val_fraction: float) -> set[int]:
    """Evenly spaced val picks by index, so growing per_style never moves an earlier image between splits."""
    picks = {i for i in range(per_style) if int((i + 1) * val_fraction + 0.5) > int(i * val_fraction + 0.5)}
    if not picks and val_fraction > 0 and per_style >= 2:
        picks = {per_style - 1}  # a tiny set still needs every style in both splits
    return picks


def _yolo_label(garments: Sequence[tuple[int, tuple[int, int, int, int]]], size: int) -> str:
    lines = []
    for cls, (x1, y1, x2, y2) in garments:
        cx, cy, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines) + "\n"


def write_sample_data(
    out: str | Path,
    per_style: int = 20,
    seed: int = 0,
    size: int = 256,
    val_fraction: float = 0.2,
    styles: Sequence[str] = STYLES,
    *,
    overwrite: bool = False,
    randomisation: Randomisation | None = None,
) -> dict:
    """Writes a folder-per-style photo set, a YOLO garment dataset and a manifest, byte-identical per seed.

    Layout under `out`: `images/<Style>/<style>_<idx:05d>.jpg`, `yolo/{images,labels}/{train,val}/`,
    `yolo/data.yaml` (no `path` key: pass its absolute path to ultralytics) and `manifest.parquet`.

    Args:
        out: output folder (created).
        per_style: photos per style.
        seed: base seed; image i of style s uses the generator seeded by (seed, index of s in STYLES, i).
        size: side of every square photo in pixels.
        val_fraction: share of each style's photos in the val split (by index, so every style has both splits).
        styles: the styles to draw, a subset of ootd.styles.STYLES.
        overwrite: replace the images/, yolo/ and manifest.parquet of an earlier run instead of refusing.
        randomisation: draw every photo with these parameter ranges (`ootd.synthetic_domain`, e.g. `TRAINING`
            for detector data, `HELD_OUT` to measure it); None writes the plain set, byte-identical per seed.

    Returns:
        Summary: `out`, `images_dir`, `yolo_dir`, `data_yaml`, `manifest`, `n_images`, `per_style` (count per
        style), `splits` (count per split), `seed`, `size`.

    Raises:
        ValueError: bad counts, fractions, sizes or style names.
        FileExistsError: `out` already holds a sample set and overwrite is False.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ootd.synthetic import render_outfit

    styles = list(styles)
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles or len(set(styles)) != len(styles):
        raise ValueError(f"styles must be distinct names from {', '.join(STYLES)}; got {styles}")
    if per_style < 1:
        raise ValueError(f"per_style must be at least 1, got {per_style}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    root = Path(out)
    ours = [root / "images", root / "yolo", root / "manifest.parquet"]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{root} already holds sample data ({existing[0].name}); pass overwrite=True or "
                              "choose an empty folder")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for sub in ("images/train", "images/val", "labels/train", "labels/val"):
        (root / "yolo" / sub).mkdir(parents=True, exist_ok=True)

    val = _val_indices(per_style, val_fraction)
    rows: list[dict] = []
    for style in styles:
        style_dir = root / "images" / style
        style_dir.mkdir(parents=True, exist_ok=True)
        for idx in range(per_style):
            rng = np.random.default_rng([seed, STYLES.index(style), idx])
            photo = render_outfit(style, rng, size, randomisation=randomisation)
            name = f"{style.lower()}_{idx:05d}"
            split = "val" if idx in val else "train"
            buf = _jpeg(photo.image)
            (style_dir / f"{name}.jpg").write_bytes(buf)
            (root / "yolo" / "images" / split / f"{name}.jpg").write_bytes(buf)
            (root / "yolo" / "labels" / split / f"{name}.txt").write_text(_yolo_label(photo.garments, size))
            rows.append({
                "path": f"images/{style}/{name}.jpg", "style": style, "split": split, "width": size,
                "height": size, "garment_classes": [cls for cls, _ in photo.garments],
                "garment_boxes": [list(box) for _, box in photo.garments], "outfit_box": list(photo.outfit_box),
            })
    (root / "yolo" / "data.yaml").write_text(
        "# ootd synthetic garments; no `path` key, so ultralytics resolves these against this file's folder.\n"
        "train: images/train\nval: images/val\nnc: 4\n"
        f"names: [{', '.join(GARMENT_CLASSES)}]\n"
    )
    rows.sort(key=lambda r: r["path"])
    schema = pa.schema([
        ("path", pa.string()), ("style", pa.string()), ("split", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("garment_classes", pa.list_(pa.int32())),
        ("garment_boxes", pa.list_(pa.list_(pa.int32()))), ("outfit_box", pa.list_(pa.int32())),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "manifest.parquet")
    splits = {"train": sum(r["split"] == "train" for r in rows), "val": sum(r["split"] == "val" for r in rows)}
    return {
        "out": str(root), "images_dir": str(root / "images"), "yolo_dir": str(root / "yolo"),
        "data_yaml": str(root / "yolo" / "data.yaml"), "manifest": str(root / "manifest.parquet"),
        "n_images": len(rows), "per_style": {s: per_style for s in styles}, "splits": splits,
        "seed": seed, "size": size,
    }


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)  # no exif/ICC: the bytes depend on pixels only
    return buf.getvalue()
