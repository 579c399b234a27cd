"""The ingest pipeline's worker side: Ray Data UDFs (hash, decode, detect+crop, write)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ootd.decode import DETECT, READ, InputError, decode, encode_jpeg, image_id, probe, read_file
from ootd.logs import quiet_libraries
from ootd.tables import CROPS_DIR, ERRORS_DIR, TIMING, schemas, write_table

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from ootd.config import DetectConfig

JPEG_QUALITY = 92


def hash_batch(batch: pa.Table, *, max_bytes: int, max_pixels: int) -> pa.Table:
    """Hash-pass UDF: reads each file, hashes it and probes its header; bad inputs become error rows.

    The header probe runs here so that two empty files or two text files are errors, not "duplicates".

    Args:
        batch: rows with `source` and `style`.
        max_bytes: `data.max_image_bytes`.
        max_pixels: `data.max_image_pixels`.
    """
    import pyarrow as pa

    rows = []
    for row in batch.select(["source", "style"]).to_pylist():
        out = {**row, "image_id": None, "stage": None, "error": None}
        try:
            data = read_file(row["source"], max_bytes)
            probe(data, max_pixels)
            out["image_id"] = image_id(data)
        except InputError as exc:
            out.update(stage=exc.stage, error=str(exc))
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=schemas()["hashed"])


def decode_batch(batch: pa.Table, *, max_bytes: int, max_pixels: int) -> pa.Table:
    """Decode UDF: re-reads each unique file, checks it still hashes to its id, decodes it to upright RGB pixels.

    Args:
        batch: rows with `image_id`, `source`, `style`.
        max_bytes: `data.max_image_bytes`.
        max_pixels: `data.max_image_pixels`.
    """
    import pyarrow as pa

    rows = []
    for row in batch.select(["image_id", "source", "style"]).to_pylist():
        start = time.perf_counter()
        out = {**row, "width": None, "height": None, "pixels": None, "stage": None, "error": None}
        try:
            data = read_file(row["source"], max_bytes)
            if image_id(data) != row["image_id"]:
                raise InputError(READ, "file changed between hashing and decoding (errors are final: remove it from "
                                       "errors/ to ingest it again)")
            image = decode(data, max_pixels)
            out.update(width=image.width, height=image.height, pixels=image.tobytes())
        except InputError as exc:
            out.update(stage=exc.stage, error=str(exc))
        out["t_decode"] = time.perf_counter() - start
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=schemas()["decoded"])


class DetectCrop:
    """Actor UDF: loads the detector once, then turns decoded pixels into outfit boxes and JPEG crops."""

    def __init__(self, detect: DetectConfig, crop_max_side: int, threads: int = 1):
        """Loads the detector weights.

        Args:
            detect: the detect section of the config.
            crop_max_side: long-side limit of the stored crop (`data.crop_max_side`).
            threads: torch threads; one per reserved CPU, so several actors share the cores without contention.
        """
        import torch

        from ootd.detect.yolo import Detector

        quiet_libraries()
        torch.set_num_threads(max(1, threads))
        self.detector = Detector(detect)
        self.crop_max_side = crop_max_side

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Detects, crops and encodes every decoded row; rows that failed earlier pass through unchanged."""
        import numpy as np
        import pyarrow as pa

        rows = batch.to_pylist()
        todo = [r for r in rows if r["error"] is None]
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in todo]
        start = time.perf_counter()
        found_boxes = self._outfit_boxes(images)
        per_image = (time.perf_counter() - start) / max(1, len(todo))
        for row, image, found in zip(todo, images, found_boxes, strict=True):
            row["t_detect"] = per_image
            if isinstance(found, Exception):
                row.update(stage=DETECT, error=f"detector failed: {type(found).__name__}: {found}")
                continue
            start = time.perf_counter()
            row.update(
                box=list(found.box),
                det_score=found.score,
                n_garments=found.n_garments,
                fallback=found.fallback,
                crop=encode_jpeg(_crop(image, found.box), self.crop_max_side, JPEG_QUALITY),
                t_crop=time.perf_counter() - start,
            )
        for row in rows:
            row.pop("pixels", None)  # pixels never travel past this stage
        return pa.Table.from_pylist(rows, schema=schemas()["cropped"])

    def _outfit_boxes(self, images: list[np.ndarray]) -> list[Any]:
        """One batched call; if it fails, one call per image, so a bad image costs only its own row."""
        if not images:
            return []
        try:
            return self.detector.outfit_boxes(images)
        except Exception:  # noqa: BLE001 - isolate the culprit below
            results: list[Any] = []
            for image in images:
                try:
                    results.extend(self.detector.outfit_boxes([image]))
                except Exception as exc:  # noqa: BLE001 - recorded as this row's detect error
                    results.append(exc)
            return results


def _crop(image: np.ndarray, box: tuple[int, int, int, int]) -> Any:
    """The outfit region as a PIL image (boxes are already clamped to the image by ootd.detect.boxes)."""
    from PIL import Image

    x1, y1, x2, y2 = box
    return Image.fromarray(image[y1:y2, x1:x2])


def write_batch(batch: pa.Table, *, out_dir: str, run_id: str) -> pa.Table:
    """Writer UDF: splits a batch into the crops and errors tables, writes each atomically, returns its counts.

    Args:
        batch: rows from `DetectCrop`.
        out_dir: the ingest output folder.
        run_id: prefix of the files written by this run.

    Returns:
        One row, `stats`: JSON with rows, fallback, per_style, errors_by_stage, busy_seconds, files.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = schemas()
    failed = pc.is_valid(batch.column("stage"))
    crops = batch.filter(pc.invert(failed)).select(tables["crops"].names).cast(tables["crops"])
    errors = batch.filter(failed).select(tables["errors"].names)
    files = []
    if crops.num_rows:
        files.append(str(write_table(crops, Path(out_dir) / CROPS_DIR, run_id)))
    if errors.num_rows:
        files.append(str(write_table(errors, Path(out_dir) / ERRORS_DIR, run_id)))
    stats = stats_row(
        rows=crops.num_rows,
        fallback=sum(crops.column("fallback").to_pylist()),
        per_style=Counter(style_key(s) for s in crops.column("style").to_pylist()),
        errors_by_stage=Counter(errors.column("stage").to_pylist()),
        busy_seconds={name[2:]: pc.sum(batch.column(name)).as_py() or 0.0 for name in TIMING},
        files=files,
    )
    return pa.table({"stats": [json.dumps(stats)]})


class WriteTables:
    """Actor UDF around `write_batch`: a long-lived writer is started with the pipeline, not after the last crop.

    A plain task would need a fresh worker process once the final rows arrive, adding seconds of start-up to
    the end of every run; one writer keeps up easily since writing a file of crops is far cheaper than detecting
    them.
    """

    def __init__(self, out_dir: str, run_id: str):
        """Remembers where to write.

        Args:
            out_dir: the ingest output folder.
            run_id: prefix of the files written by this run.
        """
        self.out_dir, self.run_id = out_dir, run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Writes one batch (see `write_batch`) and returns its counts."""
        return write_batch(batch, out_dir=self.out_dir, run_id=self.run_id)


def stats_row(**counts: Any) -> dict[str, Any]:
    """The counts one writer reports; missing keys default to zero/empty."""
    base: dict[str, Any] = {"rows": 0, "fallback": 0, "per_style": {}, "errors_by_stage": {},
                            "busy_seconds": {}, "files": []}  # fmt: skip
    return {**base, **counts}


def style_key(style: str | None) -> str:
    """Summary key of a style label; unlabeled inputs are counted under `unlabeled`."""
    return style if style is not None else "unlabeled"
