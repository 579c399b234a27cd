"""The ingest pipeline's worker side: Ray Data UDFs (hash or download+hash, decode, detect+crop, write)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ootd.decode import DETECT, READ, InputError, decode, encode_jpeg, image_id, probe, read_file
from ootd.ingest.download import DOWNLOAD, FetchError, is_url
from ootd.ingest.near_dup import PHash, phash_bytes, phash_image
from ootd.ingest.sources import read_source
from ootd.logs import quiet_libraries
from ootd.tables import CROPS_DIR, ERRORS_DIR, TIMING, schemas, write_table

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from ootd.config import DetectConfig
    from ootd.ingest.download import FetchPolicy

JPEG_QUALITY = 92
EMPTY_HASH = {"phash": None, "phash_mirror": None, "phash_windows": None}


def hash_bytes(data: bytes, max_pixels: int) -> tuple[str, PHash]:
    """(image id, perceptual hashes) of one input's bytes, after the header probe.

    The hashes need a (reduced-scale) decode; a file that fails it is decoded fully so that its error reads the
    same as in the decode stage ("truncated or corrupt JPEG data: ...").

    Raises:
        InputError: stage `decode` for anything that is not a usable image.
    """
    probe(data, max_pixels)
    try:
        phash = phash_bytes(data)
    except Exception:  # noqa: BLE001 - PIL raises many types; decode() below names the problem
        phash = phash_image(decode(data, max_pixels))
    return image_id(data), phash


def staged_path(staging: str | Path, key: str) -> Path:
    """Where a downloaded photo waits for the crop pass: `<staging>/<id[:2]>/<id>` (content-addressed)."""
    return Path(staging) / key[:2] / key


def stage_blob(staging: str | Path, key: str, data: bytes) -> None:
    """Writes downloaded bytes under their id, atomically (two URLs of one photo write the same file)."""
    path = staged_path(staging, key)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        out = {**row, "image_id": None, **EMPTY_HASH, "stage": None, "error": None, "transient": None}
        try:
            key, phash = hash_bytes(read_source(row["source"], max_bytes), max_pixels)
            out.update(image_id=key, **phash.columns())
        except InputError as exc:
            out.update(stage=exc.stage, error=str(exc))
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=schemas()["hashed"])


class FetchHash:
    """Actor UDF of the hash pass for URLs: downloads a batch on a thread pool, hashes, stages the bytes.

    Each thread handles its download to the end (hash, probe, write to the staging folder) and keeps only the
    small row, so a batch never holds more than `threads` bodies at once. One actor's `Fetcher` enforces the
    per-host limit across its threads; the pipeline splits the overall and per-host limits over the actors.
    """

    def __init__(self, policy: FetchPolicy, threads: int, per_host: int, staging: str, max_pixels: int):
        """Opens the connection pools and the thread pool.

        Args:
            policy: download limits (`FetchPolicy.from_config`).
            threads: downloads in flight in this actor.
            per_host: downloads in flight to one host in this actor.
            staging: folder for downloaded bytes, read again by the decode stage.
            max_pixels: `data.max_image_pixels`.
        """
        from concurrent.futures import ThreadPoolExecutor

        from ootd.ingest.download import Fetcher

        self.fetcher = Fetcher(policy, per_host)
        self.threads = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fetch")
        self.staging, self.max_pixels = staging, max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows with `source`, `style` → the hash pass's rows (id and hashes, or the error)."""
        import pyarrow as pa

        rows = list(self.threads.map(self._one, batch.select(["source", "style"]).to_pylist()))
        return pa.Table.from_pylist(rows, schema=schemas()["hashed"])

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {**row, "image_id": None, **EMPTY_HASH, "stage": None, "error": None, "transient": None}
        try:
            data = self.fetcher.fetch(row["source"])
            key, phash = hash_bytes(data, self.max_pixels)
            stage_blob(self.staging, key, data)
            out.update(image_id=key, **phash.columns())
        except FetchError as exc:
            out.update(stage=exc.stage, error=str(exc), transient=exc.transient)
        except InputError as exc:
            out.update(stage=exc.stage, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one URL's surprise must not fail the batch; final, not retried
            out.update(stage=DOWNLOAD, error=f"unexpected {type(exc).__name__}: {exc}")
        return out


def decode_batch(batch: pa.Table, *, max_bytes: int, max_pixels: int, staging: str = "") -> pa.Table:
    """Decode UDF: re-reads each unique file, checks it still hashes to its id, decodes it to upright RGB pixels.

    Args:
        batch: rows with `image_id`, `source`, `style` and the near-duplicate columns (passed through).
        max_bytes: `data.max_image_bytes`.
        max_pixels: `data.max_image_pixels`.
        staging: where the hash pass left downloaded photos (URL sources are read from there, not fetched again).
    """
    import pyarrow as pa

    rows = []
    for row in batch.select(["image_id", "source", "style", "near_dup_of", *EMPTY_HASH]).to_pylist():
        start = time.perf_counter()
        out = {**row, "width": None, "height": None, "pixels": None, "stage": None, "error": None,
               "transient": None}  # fmt: skip
        try:
            if is_url(row["source"]):
                data = read_file(staged_path(staging, row["image_id"]), max_bytes)
            else:
                data = read_source(row["source"], max_bytes)
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
    crops = batch.filter(pc.invert(failed)).select(tables["crops_written"].names).cast(tables["crops_written"])
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
