"""Test helper: a crops table (DESIGN §4) made from a synthetic set's ground-truth outfit boxes, without ingest."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_crops_table(sample_dir: str | Path, out_dir: str | Path, *, files: int = 2, unlabelled: int = 0) -> Path:
    """Writes `<out_dir>/crops/part-*.parquet` with one row per synthetic photo (crop = its outfit box).

    Args:
        sample_dir: output of `ootd.synthetic.write_sample_data`.
        out_dir: where the `crops/` folder goes.
        files: parquet files to spread the rows over (the real table has several).
        unlabelled: how many rows (the last ones) get a null style, like photos without a label.

    Returns:
        The crops folder.
    """
    sample_dir, crops = Path(sample_dir), Path(out_dir) / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_parquet(sample_dir / "manifest.parquet")
    rows = []
    for _, item in manifest.iterrows():
        path = sample_dir / item["path"]
        data = path.read_bytes()
        box = [int(v) for v in item["outfit_box"]]
        with Image.open(io.BytesIO(data)) as image:
            crop = image.convert("RGB").crop(tuple(box))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=92)
        rows.append(
            {
                "image_id": hashlib.sha256(data).hexdigest(),
                "source": str(path),
                "style": item["style"],
                "width": int(item["width"]),
                "height": int(item["height"]),
                "box": box,
                "det_score": 1.0,
                "n_garments": len(item["garment_classes"]),
                "fallback": False,
                "crop": buf.getvalue(),
            }
        )
    for row in rows[len(rows) - unlabelled :] if unlabelled else []:
        row["style"] = None
    schema = pa.schema(
        [
            ("image_id", pa.string()),
            ("source", pa.string()),
            ("style", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("box", pa.list_(pa.int32())),
            ("det_score", pa.float32()),
            ("n_garments", pa.int32()),
            ("fallback", pa.bool_()),
            ("crop", pa.binary()),
        ]
    )
    per_file = -(-len(rows) // files)
    for i in range(files):
        part = rows[i * per_file : (i + 1) * per_file]
        if part:
            pq.write_table(pa.Table.from_pylist(part, schema=schema), crops / f"part-{i:03d}.parquet")
    return crops
