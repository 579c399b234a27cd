"""The Index deployment: owns Milvus, batches searches, and group-commits writes (items log first, then Milvus).

Why writes are serialized and logged: Milvus Lite (milvus_lite 3.x, pure Python) applies gRPC calls on a thread
pool with no write lock; two concurrent upserts interleave their Arrow IPC messages in the collection's WAL
(`storage/wal.py` `WAL.write_insert`), and after a kill `_read_wal_file` keeps only the prefix before the first
invalid batch, so acknowledged rows vanish. One committer thread per replica applies every write, and each
write is fsync'd to the items log before Milvus sees it, so even a write Milvus loses is restored on start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from ootd.config import Config
from ootd.logs import quiet_libraries
from ootd.serve import metrics

log = logging.getLogger(__name__)

LIVE_TTL_S = 1.0
MAX_COMMIT = 256  # writes merged into one commit: bounds one Milvus call and one log append
# Hits fetched per wanted hit when near-duplicates may be collapsed: groups are small (a photo and its reposts).
NEAR_DUP_OVERFETCH = 3


@dataclasses.dataclass
class _Write:
    op: str  # "upsert" | "delete"
    image_id: str
    row: dict[str, Any] | None = None
    crop: bytes = b""
    model_version: str = ""


def _error(message: str, status: int = 503) -> dict[str, Any]:
    return {"error": message, "status": status}


class IndexCore:
    """The Index's work, outside Serve (so benchmarks and tests can drive it in-process)."""

    def __init__(self, config: Config, batched: bool = True, group_commit: bool | None = None):
        """Connects to Milvus, opens the items log and replays what Milvus is missing.

        Args:
            config: the store section (and model.embed_dim, serve.group_commit) is used.
            batched: batch concurrent searches (False: one Milvus call per request).
            group_commit: merge concurrent writes into one commit; default `serve.group_commit`.
        """
        from ootd.store.items_log import ItemsLog, items_log_dir
        from ootd.store.media import MediaStore
        from ootd.store.milvus import MilvusStore

        quiet_libraries()
        self.store = MilvusStore.from_config(config.store, dim=config.model.embed_dim)
        self.media = MediaStore(config.store.media)
        self.items_log = ItemsLog(items_log_dir(config))
        self.batched = batched
        self.group_commit = config.serve.group_commit if group_commit is None else group_commit
        self._live: tuple[float, str | None] = (-1.0, None)
        self._write_lock = threading.Lock()  # every Milvus write of this replica goes through it
        self._pending: list[tuple[_Write, asyncio.Future]] = []
        self._committer: asyncio.Task | None = None
        self.commits = 0  # commits run (a benchmark reads writes per commit)
        self._unacked = 0  # writes submitted and not yet answered: the items-log lag gauge
        # Only a collection indexed with its near-duplicates can return two of one group (see `_collapse`).
        self.may_hold_near_duplicates = config.store.index_near_duplicates
        self.replayed = self.replay()
        self.items_log.compact()  # the segments of replicas that died or restarted, merged (this one has none yet)

    # -- reads --------------------------------------------------------------------------------------------------

    def model_version(self) -> str | None:
        """The model version of the live collection."""
        return self.store.model_version()

    def _live_version(self) -> str | None:
        """The live model version, re-read at most every LIVE_TTL_S (two alias lookups per search would cost
        as much as the search; searches go through the alias, so they never mix versions)."""
        now = time.monotonic()
        if now - self._live[0] > LIVE_TTL_S:
            self._live = (now, self.store.model_version())
        return self._live[1]

    def search_many(self, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One Milvus call per distinct filter; a failing call is retried query by query, so one bad query fails
        only itself (422 for a bad value, 503 for Milvus)."""
        from ootd.store.rows import check_vector

        live = self._live_version()
        out: list[dict[str, Any]] = [{} for _ in queries]
        groups: dict[tuple, list[int]] = {}
        for i, q in enumerate(queries):
            if live is None:
                out[i] = _error("no live collection: run `ootd index` first")
                continue
            if q.get("model_version") and q["model_version"] != live:
                out[i] = _error(f"the live collection holds model {live} but the encoder serves "
                                f"{q['model_version']}: redeploy the app to serve {live}")
                continue
            try:
                check_vector(q["vector"], self.store.dim, "`vector`")
            except ValueError as exc:
                out[i] = _error(str(exc), 422)
                continue
            key = (tuple(sorted(q.get("styles") or ())), tuple(sorted(q.get("exclude_ids") or ())))
            groups.setdefault(key, []).append(i)
        for (styles, exclude), members in groups.items():
            try:
                self._search_group(queries, members, styles, exclude, live, out)
            except Exception:
                for i in members:  # isolate: each query alone, its own error
                    try:
                        self._search_group(queries, [i], styles, exclude, live, out)
                    except ValueError as exc:
                        out[i] = _error(str(exc), 422)
                    except Exception as exc:
                        out[i] = _error(f"Milvus search failed: {exc}")
        return out

    def _search_group(self, queries: list[dict], members: list[int], styles: tuple, exclude: tuple, live: str,
                      out: list[dict]) -> None:
        from ootd.store.rows import MILVUS_MAX_TOP_K

        top_k = max(queries[i]["top_k"] for i in members)
        collapse = [self.may_hold_near_duplicates and queries[i].get("collapse", True) for i in members]
        limit = min(MILVUS_MAX_TOP_K, top_k * NEAR_DUP_OVERFETCH) if any(collapse) else top_k
        vectors = np.asarray([queries[i]["vector"] for i in members], dtype=np.float32)
        metrics.batch("search", len(members))
        with metrics.stage("search"), metrics.milvus_call("search"):
            hits = self.store.search(vectors, limit, styles=list(styles) or None, exclude_ids=list(exclude) or None)
        for i, found, collapsed in zip(members, hits, collapse, strict=True):
            found = _collapse(found) if collapsed else found
            out[i] = {"hits": [dataclasses.asdict(h) for h in found[: queries[i]["top_k"]]], "model_version": live}

    def get(self, ids: list[str]) -> list[dict[str, Any]] | dict[str, Any]:
        """Rows by id from the live collection (an `error` dict when nothing is live)."""
        try:
            with metrics.stage("get"), metrics.milvus_call("get"):
                rows = self.store.get(ids)
        except LookupError as exc:
            return _error(str(exc))
        return [{**r, "embedding": [float(v) for v in r["embedding"]], "box": list(r["box"])} for r in rows]

    # -- writes: group commit -----------------------------------------------------------------------------------

    async def submit(self, write: _Write) -> dict[str, Any]:
        """Queues a write and returns its result once it is durable (or an `error` dict)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((write, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop())
        m, start = metrics.get(), time.monotonic()
        self._unacked += 1
        m.writes_pending.set(self._unacked)
        try:
            return await future
        finally:
            self._unacked -= 1
            m.writes_pending.set(self._unacked)
            m.write_ack_seconds.observe(time.monotonic() - start)

    async def _commit_loop(self) -> None:
        # Writes that arrive while a commit runs wait for the next one: under load each commit takes everything
        # queued (one fsync, one Milvus call); alone, a write is committed at once.
        while self._pending:
            take = MAX_COMMIT if self.group_commit else 1
            batch, self._pending = self._pending[:take], self._pending[take:]
            try:
                results = await asyncio.to_thread(self.commit, [w for w, _ in batch])
            except Exception as exc:
                log.exception("commit of %d writes failed", len(batch))
                results = [_error(f"the write could not be made durable: {exc}")] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    @metrics.stage("commit")
    def commit(self, writes: list[_Write]) -> list[dict[str, Any]]:
        """Makes writes durable in order: media, one items-log append (fsync), one Milvus upsert and delete.

        Every write resolves the live collection once, here: a concurrent alias swap cannot send one model's
        vectors into another's collection.
        """
        from ootd.store.items_log import delete_entry, upsert_entry
        from ootd.store.rows import check_row

        with self._write_lock:
            self.commits += 1
            metrics.batch("commit", len(writes))
            live = self.store.live_collection()
            if live is None:
                return [_error("no live collection: run `ootd index` first")] * len(writes)
            version = self.store.model_version()
            results: list[dict[str, Any]] = [{} for _ in writes]
            accepted, now = [], int(time.time())
            for i, w in enumerate(writes):
                if w.op == "upsert":
                    if w.model_version != version:
                        results[i] = _error(f"the live collection holds model {version}, the encoder serves "
                                            f"{w.model_version}: redeploy the app")
                        continue
                    try:
                        w.row = {**w.row, "created_at": w.row.get("created_at", now)}
                        check_row(i, w.row, self.store.dim, now)
                    except ValueError as exc:
                        results[i] = _error(str(exc), 422)
                        continue
                accepted.append(i)
            if not accepted:
                return results
            deletes = list(dict.fromkeys(writes[i].image_id for i in accepted if writes[i].op == "delete"))
            with metrics.milvus_call("get"):
                present = {r["id"] for r in self.store.get(deletes, collection=live)} if deletes else set()
            for i in accepted:  # the image first: an acknowledged item always has its crop
                if writes[i].op == "upsert":
                    # Not fsync'd one by one: the crop is in the log record fsync'd next, and replay rewrites a
                    # crop that a power loss left missing or short (the one fsync per commit stays the log's).
                    self.media.put(writes[i].image_id, writes[i].crop, sync=False)
            with metrics.stage("log_fsync"):
                self.items_log.append(
                    upsert_entry(writes[i].row, writes[i].crop, version) if writes[i].op == "upsert"
                    else delete_entry(writes[i].image_id) for i in accepted
                )  # fmt: skip
            final: dict[str, _Write] = {}  # the last op per id wins, as in the log
            for i in accepted:
                w = writes[i]
                existed = w.image_id in present
                if w.op == "upsert":
                    present.add(w.image_id)
                    results[i] = {"written": 1}
                else:
                    present.discard(w.image_id)
                    results[i] = {"deleted": int(existed)}
                final[w.image_id] = w
            rows = [w.row for w in final.values() if w.op == "upsert"]
            gone = [w.image_id for w in final.values() if w.op == "delete"]
            if rows:
                with metrics.stage("milvus_write"), metrics.milvus_call("upsert"):
                    self.store.upsert(rows, collection=live)
            if gone:
                with metrics.stage("milvus_write"), metrics.milvus_call("delete"):
                    self.store.delete(gone, collection=live)
                for image_id in gone:
                    self.media.delete(image_id)
            return results

    def replay(self) -> dict[str, int]:
        """Applies the items log's latest op per id to the live collection where Milvus lacks it.

        Upserts are restored only into the collection of the model that made their vector (a re-index merged
        the others already, re-embedded); deletes apply to any live collection. A logged crop that the media
        store lacks or holds cut short (commits store crops unsynced) is written again.

        Returns:
            How many rows were restored (`upserted`) and removed (`deleted`).
        """
        from ootd.store.items_log import milvus_row

        with self._write_lock:
            live = self.store.live_collection()
            if live is None:
                return {"upserted": 0, "deleted": 0}
            version = self.store.model_version()
            latest = self.items_log.latest()
            ups = [e for e in latest.values() if e["op"] == "upsert" and e.get("model_version") == version]
            dels = [i for i, e in latest.items() if e["op"] == "delete"]
            stored = {r["id"]: r for r in self.store.get([e["image_id"] for e in ups] + dels, collection=live)}
            missing = [e for e in ups if _differs(stored.get(e["image_id"]), e)]
            for e in ups:  # commits store crops unsynced: after a power loss one may be gone or cut short
                if self.media.size(e["image_id"]) != len(e["crop"]):
                    self.media.put(e["image_id"], e["crop"])
            if missing:
                self.store.upsert([milvus_row(e) for e in missing], collection=live)
            gone = [i for i in dels if i in stored]
            if gone:
                self.store.delete(gone, collection=live)
            for image_id in dels:
                self.media.delete(image_id)
        if missing or gone:
            log.warning("items log replay: restored %d rows and removed %d that Milvus had lost", len(missing),
                        len(gone))
        return {"upserted": len(missing), "deleted": len(gone)}

    # -- ops ----------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Model version, live collection, counts."""
        live = self.store.live_collection()
        if live is None:
            return _error("no live collection: run `ootd index` first")
        by_style = self.store.count_by_style()
        return {"model_version": self.store.model_version(), "collection": live, "count": sum(by_style.values()),
                "count_by_style": by_style, "embed_dim": self.store.dim}


def _collapse(hits: list[Any]) -> list[Any]:
    """The best hit of each near-duplicate group (`meta.near_dup_of`, set when the index keeps every member)."""
    seen: set[str] = set()
    kept = []
    for hit in hits:
        group = (hit.meta or {}).get("near_dup_of") or hit.id
        if group not in seen:
            seen.add(group)
            kept.append(hit)
    return kept


def _differs(stored: dict[str, Any] | None, entry: dict[str, Any]) -> bool:
    """Whether Milvus lacks the logged upsert (missing, or another version of the row)."""
    if stored is None:
        return True
    return (stored["style"], stored["source"], list(stored["box"]), stored["meta"]) != (
        entry["style"], entry["source"], list(entry["box"]), entry["meta"])


@serve.deployment
class Index:
    """Owns the Milvus client: reads, group-committed writes, and searches batched into one Milvus call."""

    def __init__(self, config: Config, batched: bool = True, max_batch_size: int = 64):
        """Connects to Milvus and replays the items log (see `IndexCore`).

        Args:
            config: the store and serve sections (and model.embed_dim) are used.
            batched: batch concurrent searches (False: one Milvus call per request, the benchmark baseline).
            max_batch_size: most searches merged into one call.
        """
        self.core = IndexCore(config, batched)
        self._search_batch.set_max_batch_size(max_batch_size)
        # Milvus Lite searches in Python, holding the GIL: requests reach this replica only between searches,
        # so a batch must wait a little for them or it leaves with one or two queries (serve.search_batch_wait_s).
        self._search_batch.set_batch_wait_timeout_s(config.serve.search_batch_wait_s)

    def model_version(self) -> str | None:
        """The model version of the live collection."""
        return self.core.model_version()

    async def search(self, query: dict[str, Any]) -> dict[str, Any]:
        """Searches the live collection.

        Args:
            query: `vector`, `top_k`, `styles`, `exclude_ids`, and `model_version` (the model that made the
                vector, or None for a stored or raw vector).

        Returns:
            `hits` and `model_version`, or an `error` dict with an HTTP `status`.
        """
        if self.core.batched:
            return await self._search_batch(query)
        return (await asyncio.to_thread(self.core.search_many, [query]))[0]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.02)
    async def _search_batch(self, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.core.search_many, queries)

    def get(self, ids: list[str]) -> list[dict[str, Any]] | dict[str, Any]:
        """Rows by id from the live collection (an `error` dict when nothing is live)."""
        return self.core.get(ids)

    async def upsert(self, row: dict[str, Any], crop: bytes, model_version: str) -> dict[str, Any]:
        """Writes one row (and its crop) into the live collection if it holds `model_version`'s vectors; returns
        once the write is durable."""
        return await self.core.submit(_Write("upsert", row["id"], row=row, crop=crop, model_version=model_version))

    async def delete(self, image_id: str) -> dict[str, Any]:
        """Deletes one id (row and crop); `deleted` says whether the row existed."""
        return await self.core.submit(_Write("delete", image_id))

    def stats(self) -> dict[str, Any]:
        """Model version, live collection, counts."""
        return self.core.stats()

    def ping(self) -> bool:
        """Whether Milvus answers."""
        return self.core.store.ping()
