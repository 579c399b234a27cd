"""Index job: crops table + items log → Ray Data embedding actors → Milvus upsert (one writer) → live alias."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ootd.config import Config, absolute_paths, save_config
from ootd.decode import InputError, decode_crop
from ootd.logs import quiet_libraries
from ootd.model.modeldir import model_info
from ootd.placement import device_gpus, resolve_device
from ootd.store.media import MediaStore
from ootd.store.rows import check_fields
from ootd.tables import CROP_COLUMNS, crops_files, write_rows

log = logging.getLogger(__name__)

# Rows per Milvus upsert from the driver: large enough to amortise the RPC, small enough to stream.
UPSERT_ROWS = 512
# Beside the crops-table columns: the JSON meta an API item was written with ("" for crops-table rows).
EXTRA_META = "extra_meta"
# After the alias moves, how long a commit that resolved the old collection may still be running before its log
# record is final (a commit takes milliseconds; this is generous).
CATCH_UP_GRACE_S = 2.0


class EmbedCrops:
    """Ray Data actor: decodes crops, embeds them with the model dir loaded once, and stores the crop bytes.

    Rows that cannot be indexed (undecodable crop, bad id, unknown style) come back with an `error` message and
    a zero embedding, so one bad row never fails the batch it travels in.
    """

    def __init__(self, model_dir: str, media_url: str, precision: str, batch_size: int, device: str = "cpu",
                 runtime: str = "torch"):
        from ootd.model.export import load
        from ootd.model.runtime import build_embedder

        quiet_libraries()
        self.encoder = load(model_dir, device=device)
        # The Serve Encoder embeds with the same runtime, so a photo indexed here and searched there agree.
        self.embedder = build_embedder(self.encoder, runtime, precision, device)
        self.media = MediaStore(media_url)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        n = len(batch["image_id"])
        errors = [""] * n
        images: list[Image.Image] = []
        ok_rows: list[int] = []
        for i in range(n):
            try:
                _check_fields(batch, i)
                images.append(decode_crop(bytes(batch["crop"][i])))
                ok_rows.append(i)
            except (ValueError, InputError) as exc:
                errors[i] = str(exc)
        embeddings = np.zeros((n, self.encoder.embed_dim), dtype=np.float32)
        if images:
            embeddings[ok_rows] = self.embedder.embed(images, batch_size=self.batch_size)
        for i in ok_rows:
            # Media first: a row that reaches Milvus always has its image.
            # Not synced: a crash re-runs the job, and the crop stays in the crops table.
            self.media.put(str(batch["image_id"][i]), bytes(batch["crop"][i]), sync=False)
        return {
            "image_id": np.asarray([str(v) for v in batch["image_id"]], dtype=object),
            "source": np.asarray([_text(v) for v in batch["source"]], dtype=object),
            "style": np.asarray([_text(v) for v in batch["style"]], dtype=object),
            "box": np.asarray([_box(v) for v in batch["box"]], dtype=np.int64).reshape(n, 4),
            "meta": np.asarray([json.dumps(_row_meta(batch, i)) for i in range(n)], dtype=object),
            "embedding": embeddings,
            "error": np.asarray(errors, dtype=object),
        }


def run_index(
    config: Config,
    crops_dir: str | Path,
    model_dir: str | Path,
    *,
    out: str | Path | None = None,
    limit: int | None = None,
    swap: bool = True,
    concurrency: int | None = None,
    num_cpus: float | None = None,
    batch_size: int = 32,
    device: str | None = None,
    upsert_rows: int = UPSERT_ROWS,
) -> dict[str, Any]:
    """Embeds every crop and every API item with one model and makes the result the live collection.

    Crops are read and embedded by a Ray Data actor pool (the model dir loaded once per actor); the driver
    iterates the embedded stream and upserts it in batches into `ootd_<version>`, because an embedded Milvus Lite
    file accepts one process only. The alias moves only after every row is written, so an interrupted run leaves
    the previous collection serving. Re-running upserts by id: no duplicates.

    The crops table is merged with the items log (the API's writes, latest op per id wins): API items are
    re-embedded from their logged crops, and ids whose latest op is a delete are left out, so a re-index keeps
    API items and keeps deletes deleted. Of a near-duplicate group (ingest's `near_dup_of`) only the
    representative is indexed unless `store.index_near_duplicates` (then each member's meta names its group, and
    search collapses it). API writes the serving app makes while this job runs go to the old
    collection and the log: the job applies the log's new records to the new collection before the alias moves,
    and once more `CATCH_UP_GRACE_S` after (for a commit that resolved the old collection just before the move).
    At the end the items log is compacted (segments of writers that are gone merged, latest record per id).

    Args:
        config: the resolved config (store, model precision, data.workdir).
        crops_dir: the crops table folder written by ingest (`*.parquet`).
        model_dir: an exported model dir.
        out: where `index_summary.json`, `config.yaml` and `index_errors.parquet` go; default
            `<workdir>/index/<version>`.
        limit: index only the first N crops (a smoke run).
        swap: move the live alias at the end (False leaves the new collection for a later `swap_alias`).
        concurrency: embedding actors; default `detect.concurrency` (the ingest-time actor pool size).
        num_cpus: CPUs per embedding actor; default `detect.num_cpus`.
        batch_size: crops per actor call and per encoder forward pass.
        device: torch device for the actors; default `model.device` (`auto`: cuda when the cluster has a GPU).
            A cuda device reserves one GPU per actor.
        upsert_rows: rows per Milvus upsert (the driver holds at most about this many rows at once).

    Returns:
        The summary also written to `index_summary.json`.

    Raises:
        FileNotFoundError: when the crops dir has no parquet files or the model dir is not an export.
    """
    import pyarrow as pa
    import ray

    from ootd.store.items_log import ItemsLog, items_log_dir
    from ootd.store.milvus import MilvusStore, is_server_uri

    started = time.monotonic()
    config = absolute_paths(config)
    crops_dir, model_dir = Path(crops_dir).absolute(), Path(model_dir).absolute()
    version, dim = model_info(model_dir)
    files = [str(p) for p in crops_files(crops_dir)]
    out = Path(out).absolute() if out else Path(config.data.workdir) / "index" / version
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")

    ds = ray.data.read_parquet(files, columns=CROP_COLUMNS, override_num_blocks=min(len(files),
                                                                                   config.data.num_blocks))
    if limit is not None:
        ds = ds.limit(limit)
    items_log = ItemsLog(items_log_dir(config))
    latest = items_log.latest()
    api_items = [_crops_row(e, version) for e in latest.values() if e["op"] == "upsert"]
    seen = {image_id: e["seq"] for image_id, e in latest.items()}  # what the fill applies; later records are caught up
    log_counts = {"api_items": len(api_items), "deleted": sum(e["op"] == "delete" for e in latest.values())}
    del latest  # the crops travel in the dataset now
    groups = _near_duplicates(files)
    keep_duplicates = config.store.index_near_duplicates
    skip = set(seen) if keep_duplicates else set(seen) | set(groups)
    ds = ds.map_batches(_drop_logged, fn_kwargs={"skip": skip, "groups": groups if keep_duplicates else {}},
                        batch_format="pyarrow")
    if api_items:
        ds = ds.union(ray.data.from_arrow(pa.Table.from_pylist(api_items, schema=_input_schema())))
        del api_items
    device = resolve_device(device or config.model.device)
    ds = ds.map_batches(
        EmbedCrops,
        fn_constructor_kwargs={"model_dir": str(model_dir), "media_url": config.store.media,
                               "precision": config.model.precision, "batch_size": batch_size, "device": device,
                               "runtime": config.model.runtime},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency or config.detect.concurrency,
        num_cpus=config.detect.num_cpus if num_cpus is None else num_cpus,
        num_gpus=device_gpus(device),
    )

    written, error_rows = 0, []
    with MilvusStore.from_config(config.store, dim=dim) as store:
        collection = store.ensure_collection(version)
        previous = store.live_collection()
        for batch in ds.iter_batches(batch_size=upsert_rows, batch_format="numpy", prefetch_batches=1):
            rows, failed = _rows_of(batch)
            error_rows += failed
            written += store.upsert(rows, collection=collection)
        catch_up = _CatchUp(items_log, seen, lambda: EmbedCrops(str(model_dir), config.store.media,
                                                                config.model.precision, batch_size, device,
                                                                config.model.runtime))
        caught = catch_up(store, collection, version)
        moved = False
        if swap and written:
            store.flush(collection)  # sealed and indexed before readers see it
            store.swap_alias(collection)
            moved = True
            if is_server_uri(config.store.uri):  # a Lite file has one process: no app writes beside this job
                time.sleep(CATCH_UP_GRACE_S)
            caught += catch_up(store, collection, version)
        error_rows += catch_up.errors
        summary = {
            "model_version": version,
            "model_dir": str(model_dir),
            "crops_dir": str(crops_dir),
            "collection": collection,
            "previous_live": previous,
            "live": store.live_collection(),
            "alias_moved": moved,
            "written": written,
            "errors": len(error_rows),
            "near_duplicates": {"members": len(groups), "indexed": keep_duplicates},
            "items_log": {**log_counts, "caught_up": caught, "read_at_seq": max(seen.values(), default=0)},
            "count": store.count(collection=collection),
            "count_by_style": store.count_by_style(collection=collection),
            "store": config.store.uri,
            "media": config.store.media,
            "seconds": round(time.monotonic() - started, 2),
            "out": str(out),
        }
    summary["items_log"]["compaction"] = items_log.compact()
    if error_rows:
        write_rows(error_rows, out / "index_errors.parquet", "index_errors")
    (out / "index_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("indexed %d crops into %s (%d errors); live: %s", written, collection, len(error_rows), summary["live"])
    return summary


class _CatchUp:
    """Applies the items log's records made since the fill read it (API writes during the job) to a collection.

    Upserts are re-embedded in this process with the job's model (an `EmbedCrops` built on first need: usually
    there are none or a few); deletes are applied as they are. Called before and after the alias moves.
    """

    def __init__(self, items_log: Any, seen: dict[str, int], make_embedder: Any):
        self.items_log, self.seen, self.make_embedder = items_log, seen, make_embedder
        self.embedder: EmbedCrops | None = None
        self.errors: list[dict] = []

    def __call__(self, store: Any, collection: str, version: str) -> int:
        import pyarrow as pa

        changed = [e for image_id, e in self.items_log.latest().items() if self.seen.get(image_id) != e["seq"]]
        if not changed:
            return 0
        upserts = [_crops_row(e, version) for e in changed if e["op"] == "upsert"]
        if upserts:
            self.embedder = self.embedder or self.make_embedder()
            table = pa.Table.from_pylist(upserts, schema=_input_schema())
            rows, failed = _rows_of(self.embedder({c: table[c].to_numpy(zero_copy_only=False)
                                                   for c in table.column_names}))
            self.errors += failed
            store.upsert(rows, collection=collection)
        gone = [e["image_id"] for e in changed if e["op"] == "delete"]
        if gone:
            store.delete(gone, collection=collection)
        self.seen.update((e["image_id"], e["seq"]) for e in changed)
        log.info("caught up %d API writes made during the job (%d upserts, %d deletes) into %s", len(changed),
                 len(upserts), len(gone), collection)
        return len(changed)


def _rows_of(batch: dict[str, np.ndarray]) -> tuple[list[dict], list[dict]]:
    """Milvus rows for the good crops of an embedded batch, error records for the rest."""
    rows, failed = [], []
    for i, image_id in enumerate(batch["image_id"]):
        if batch["error"][i]:
            failed.append({"source": batch["source"][i], "stage": "index", "error": batch["error"][i],
                           "image_id": image_id})
            continue
        rows.append({"id": image_id, "embedding": batch["embedding"][i], "style": batch["style"][i],
                     "source": batch["source"][i], "box": [int(v) for v in batch["box"][i]],
                     "meta": json.loads(batch["meta"][i])})
    return rows, failed


def _check_fields(batch: dict[str, np.ndarray], i: int) -> None:
    """Raises ValueError for a row Milvus would reject, so it becomes an error row instead of failing a batch."""
    box = batch["box"][i]
    check_fields(i, {"id": batch["image_id"][i], "style": _text(batch["style"][i]), "source": _text(batch["source"][i]),
                     "box": [] if box is None else list(box), "meta": _row_meta(batch, i)}, now=0)
    crop = batch["crop"][i]
    if crop is None or len(crop) == 0:
        raise ValueError("empty crop bytes")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _box(value: Any) -> list[int]:
    try:
        box = [int(v) for v in value]
    except (TypeError, ValueError):
        return [0, 0, 0, 0]
    return box if len(box) == 4 else [0, 0, 0, 0]


def _row_meta(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """The detection facts, under the meta an API item was written with (its own keys kept)."""
    extra = batch[EXTRA_META][i] if EXTRA_META in batch else ""
    return {**_meta(batch, i), **(json.loads(extra) if extra else {})}


def _input_schema() -> Any:
    """The crops-table schema plus the API items' meta column: both inputs of the embedding stage."""
    import pyarrow as pa

    from ootd.tables import schemas

    return schemas()["crops"].append(pa.field(EXTRA_META, pa.string()))


def _near_duplicates(files: list[str]) -> dict[str, str]:
    """image id → its group representative, for the crops-table rows that are near-duplicates of another."""
    from ootd.tables import read_files_columns

    table = read_files_columns(files, ["image_id", "near_dup_of"])
    return {i: g for i, g in zip(table["image_id"], table["near_dup_of"], strict=True) if g and g != i}


def _drop_logged(batch: Any, skip: set[str], groups: dict[str, str]) -> Any:
    """Leaves out the crops-table rows whose id the items log decides (re-added through the API, or deleted) and
    near-duplicates that are not indexed; a near-duplicate that is carries its group in its meta."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = _input_schema()
    if skip:
        batch = batch.filter(pc.invert(pc.is_in(batch["image_id"], value_set=pa.array(sorted(skip)))))
    batch = batch.select([f.name for f in schema if f.name != EXTRA_META])
    extra = [json.dumps({"near_dup_of": groups[i]}) if i in groups else "" for i in batch["image_id"].to_pylist()]
    batch = batch.append_column(EXTRA_META, pa.array(extra, pa.string()))
    return batch.cast(schema)


def _crops_row(entry: dict[str, Any], version: str) -> dict[str, Any]:
    """A crops-table row (plus its meta) for an API item in the items log, to re-embed with model `version`."""
    from ootd.store.items_log import CROP_FIELDS

    meta = {**entry.get("meta", {}), "model_version": version}
    return {**{k: entry[k] for k in CROP_FIELDS}, EXTRA_META: json.dumps(meta)}


def _meta(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """What Milvus keeps beside the vector: detection facts and the source image size."""
    return {
        "width": int(batch["width"][i]),
        "height": int(batch["height"][i]),
        "det_score": float(batch["det_score"][i]),
        "n_garments": int(batch["n_garments"][i]),
        "fallback": bool(batch["fallback"][i]),
    }
