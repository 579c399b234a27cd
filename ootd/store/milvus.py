"""Milvus access for ootd: one collection per model version behind a live alias (the only pymilvus import)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ootd.store.rows import (
    MAX_SOURCE_BYTES,
    Hit,
    check_ids,
    check_name,
    check_row,
    check_top_k,
    check_vectors,
    filter_expr,
)
from ootd.styles import STYLES

if TYPE_CHECKING:
    from ootd.config import StoreConfig

COLLECTION_PREFIX = "ootd_"
OUTPUT_FIELDS = ["style", "source", "box", "meta"]
# Rows per upsert RPC: ~1 MB messages, far below gRPC limits, few enough round trips.
UPSERT_BATCH = 2_000
# Ids per `id in [...]` expression: keeps expressions short on servers with expression-length limits.
ID_BATCH = 1_000
_NOT_LOADED = 101  # Milvus error code: collection not loaded
CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")
SERVER_SCHEMES = ("http://", "https://", "tcp://")  # anything else is a Milvus Lite file

# Milvus Lite runs in-process, one server per file and process; it holds the file's lock until released,
# so the last store to close a file releases it for other processes (a later job, a restarted replica).
_lite_users: dict[str, int] = {}
_lite_lock = threading.Lock()


class MilvusStore:
    """Outfit embeddings in Milvus: `ootd_<version>` collections, alias `ootd` on the live one.

    Writes and reads name a collection or default to the alias, so searches never mix model versions and a
    re-index fills a new collection before `swap_alias` makes it live. A Milvus Lite file is open in one
    process at a time, and its search cost grows with the row count per call whatever the number of queries
    (benchmarks/results/milvus_scale.md): batch queries into one `search` call.
    """

    def __init__(
        self,
        uri: str,
        token: str = "",
        *,
        alias: str = "ootd",
        dim: int = 128,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 200,
        search_ef: int = 64,
        search_consistency: str = "Session",
    ):
        """Connects to Milvus.

        Args:
            uri: `http(s)://host:port` or `tcp://host:port` for a server; a path ending in `.db` for a
                Milvus Lite file (its parent directory is created).
            token: server credentials (`user:password` or an API key); ignored by Milvus Lite.
            alias: name of the alias that marks the live collection.
            dim: embedding dimension of every collection this store creates or writes.
            hnsw_m: HNSW graph degree.
            hnsw_ef_construction: HNSW build-time candidate list size.
            search_ef: HNSW search-time candidate list size (raised to top_k when smaller).
            search_consistency: Milvus consistency level of searches. `Strong` waits for the server's next time
                tick on every search (~200 ms on Milvus 2.3 standalone: p50 200 ms vs 3 ms, measured);
                `Session` sees this client's own writes at once (the Index replica that acknowledged them)
                and other clients' within the tick; reads by id and counts stay Strong.

        Raises:
            ValueError: for a malformed URI, alias or parameter.
            ConnectionError: when the server or file cannot be opened.
        """
        check_name(alias, "alias")
        if dim < 1 or hnsw_m < 2 or hnsw_ef_construction < 1 or search_ef < 1:
            raise ValueError(f"bad store parameters: dim={dim} hnsw_m={hnsw_m} "
                             f"hnsw_ef_construction={hnsw_ef_construction} search_ef={search_ef}")
        if search_consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"search_consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
        self.alias, self.dim, self.search_consistency = alias, dim, search_consistency
        self.hnsw_m, self.hnsw_ef_construction, self.search_ef = hnsw_m, hnsw_ef_construction, search_ef
        self.uri, self._lite_path = _resolve_uri(uri)
        from pymilvus import MilvusClient

        if self._lite_path:
            _acquire_lite(self._lite_path)
        try:
            self._client = MilvusClient(uri=self.uri, token=token, timeout=30)
        except Exception as exc:
            if self._lite_path:
                _release_lite(self._lite_path)
                raise ConnectionError(
                    f"cannot open Milvus Lite file {self._lite_path}: {exc}. A Milvus Lite file is used by one "
                    "process at a time; to share it run `milvus-lite server --data-dir DIR --port PORT` and set "
                    "store.uri=http://127.0.0.1:PORT"
                ) from exc
            raise ConnectionError(f"cannot reach Milvus at {self.uri}: {exc}") from exc
        self._closed = False
        self._ready: set[str] = set()  # names whose load state this store has checked

    @classmethod
    def from_config(cls, store: StoreConfig, dim: int = 128) -> MilvusStore:
        """A store for the `store` config section and the model's embedding dimension."""
        return cls(store.uri, store.token, alias=store.alias, dim=dim, hnsw_m=store.hnsw_m,
                   hnsw_ef_construction=store.hnsw_ef_construction, search_ef=store.search_ef,
                   search_consistency=store.search_consistency)

    @staticmethod
    def collection_name(model_version: str) -> str:
        """The collection that holds the vectors of one model version."""
        check_name(model_version, "model version")
        return COLLECTION_PREFIX + model_version

    # -- collections and the alias ------------------------------------------------------------------------------

    def ensure_collection(self, model_version: str) -> str:
        """Creates (schema, HNSW index) and loads the version's collection if needed; returns its name.

        Raises:
            ValueError: if the collection exists with another embedding dimension.
        """
        name = self.collection_name(model_version)
        if self._client.has_collection(name):
            existing = self._collection_dim(name)
            if existing != self.dim:
                raise ValueError(f"collection {name} holds {existing}-d embeddings, this store writes {self.dim}-d")
            self._client.load_collection(name)
            return name
        from pymilvus import DataType

        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("style", DataType.VARCHAR, max_length=64)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        schema.add_field("box", DataType.ARRAY, element_type=DataType.INT64, max_capacity=4)
        schema.add_field("created_at", DataType.INT64)
        schema.add_field("meta", DataType.JSON)
        index = self._client.prepare_index_params()
        index.add_index("embedding", index_type="HNSW", metric_type="COSINE",
                        params={"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction})
        # Strong consistency: a count or search right after an upsert/delete sees it (serve acknowledges writes).
        self._client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
        self._client.load_collection(name)
        return name

    def swap_alias(self, collection: str) -> None:
        """Points the alias at `collection` in one Milvus call (readers see the old or the new, never a mix).

        Raises:
            ValueError: if the collection does not exist.
        """
        check_name(collection, "collection")
        if not self._client.has_collection(collection) or collection == self.alias:
            raise ValueError(f"cannot point alias {self.alias!r} at {collection!r}: no such collection")
        if self.alias in self._aliases():
            self._client.alter_alias(collection, self.alias)
        else:
            self._client.create_alias(collection, self.alias)

    def live_collection(self) -> str | None:
        """The collection the alias points at, or None before the first index run."""
        if self.alias not in self._aliases():
            return None
        return self._client.describe_alias(self.alias)["collection_name"]

    def model_version(self) -> str | None:
        """The model version of the live collection, or None."""
        live = self.live_collection()
        return live[len(COLLECTION_PREFIX):] if live and live.startswith(COLLECTION_PREFIX) else None

    def list_versions(self) -> list[str]:
        """Model versions that have a collection, oldest first (versions sort by their timestamp)."""
        names = self._client.list_collections()
        return sorted(n[len(COLLECTION_PREFIX):] for n in names if n.startswith(COLLECTION_PREFIX))

    def drop_collection(self, collection: str) -> None:
        """Drops a collection that is not live; a missing one is a no-op.

        Raises:
            ValueError: if the alias points at it (swap the alias first).
        """
        check_name(collection, "collection")
        if collection == self.alias or collection == self.live_collection():
            raise ValueError(f"{collection} is live (alias {self.alias!r}); swap the alias before dropping it")
        if self._client.has_collection(collection):
            self._client.drop_collection(collection)

    # -- rows ---------------------------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[dict], collection: str | None = None) -> int:
        """Inserts or replaces rows by id; every row is validated before anything is written.

        Args:
            rows: dicts with `id` (sha256 hex), `embedding` (dim floats, L2-normalised), `style` (a STYLES
                name, "" or None if unknown), `source`, `box` (4 ints), `meta` (JSON-able dict) and optional
                `created_at` (unix seconds, now if absent). A repeated id keeps its last row.
            collection: target collection; None writes to the live one.

        Returns:
            The number of distinct ids written.

        Raises:
            ValueError: naming the first bad row; nothing is written then.
            LookupError: if `collection` is None and no collection is live.
        """
        now = int(time.time())
        clean = {}
        for i, row in enumerate(rows):
            checked = check_row(i, row, self.dim, now)
            clean.pop(checked["id"], None)  # re-insert so a repeated id takes its last position and value
            clean[checked["id"]] = checked
        if not clean:
            return 0
        # Writes resolve the alias once, so one call never straddles a swap.
        name = self._resolve(collection, concrete=True)
        data = list(clean.values())
        for start in range(0, len(data), UPSERT_BATCH):
            self._client.upsert(name, data[start:start + UPSERT_BATCH])
        return len(data)

    def get(self, ids: Sequence[str], collection: str | None = None) -> list[dict]:
        """Rows by id (with `embedding` as float32 array and `box` as a tuple), in request order; missing ids
        are left out.

        Raises:
            ValueError: for an id that is not lowercase sha256 hex.
        """
        wanted = check_ids(ids)
        name = self._resolve(collection)
        found: dict[str, dict] = {}
        for start in range(0, len(wanted), ID_BATCH):
            batch = wanted[start:start + ID_BATCH]
            for row in self._call(collection, self._client.get, name, ids=batch):
                found[row["id"]] = _row_out(row)
        return [found[i] for i in dict.fromkeys(wanted) if i in found]

    def delete(self, ids: Sequence[str], collection: str | None = None) -> int:
        """Deletes rows by id; returns how many of them existed.

        Raises:
            ValueError: for an id that is not lowercase sha256 hex (nothing is deleted then).
        """
        wanted = list(dict.fromkeys(check_ids(ids)))
        if not wanted:
            return 0
        name = self._resolve(collection, concrete=True)
        deleted = 0
        for start in range(0, len(wanted), ID_BATCH):
            # Milvus reports the ids it was asked to delete, not those that existed: look first.
            batch = wanted[start:start + ID_BATCH]
            present = [r["id"] for r in self._call(name, self._client.get, name, ids=batch, output_fields=["id"])]
            if present:
                self._client.delete(name, ids=present)
                deleted += len(present)
        return deleted

    def flush(self, collection: str | None = None) -> None:
        """Seals written rows into indexed segments; the index job calls it before `swap_alias` so a new
        collection goes live with its HNSW index built rather than growing segments."""
        self._client.flush(self._resolve(collection, concrete=True))

    def count(self, collection: str | None = None) -> int:
        """Rows in the collection, reflecting every acknowledged upsert and delete."""
        name = self._resolve(collection)
        return self._count(collection, name, "")

    def count_by_style(self, collection: str | None = None) -> dict[str, int]:
        """Row count per style ("" for unlabeled rows), styles with no rows left out."""
        name = self._resolve(collection)
        counts = {}
        for style in ("", *STYLES):  # upsert admits only these, so they cover every row
            n = self._count(collection, name, f"style == {json.dumps(style)}")
            if n:
                counts[style] = n
        return counts

    def search(
        self,
        vectors: np.ndarray | Sequence[Sequence[float]],
        top_k: int,
        *,
        styles: Sequence[str] | None = None,
        exclude_ids: Sequence[str] | None = None,
        collection: str | None = None,
    ) -> list[list[Hit]]:
        """Nearest outfits by cosine similarity for many query vectors in one Milvus call.

        Args:
            vectors: (Q, dim) query embeddings (a single (dim,) vector counts as Q=1).
            top_k: hits per query, 1..16384.
            styles: keep only these STYLES names; None or empty keeps all.
            exclude_ids: ids never returned (e.g. the query outfit itself).
            collection: collection to search; None searches the live one.

        Returns:
            Q lists of at most top_k hits, best (highest score) first.

        Raises:
            ValueError: for a bad vector shape or value, top_k, style name or id.
            LookupError: if `collection` is None and no collection is live.
        """
        queries = check_vectors(vectors, self.dim)
        check_top_k(top_k)
        expr = filter_expr(styles, exclude_ids)
        name = self._resolve(collection)
        if len(queries) == 0:
            return []
        params = {"metric_type": "COSINE", "params": {"ef": max(self.search_ef, int(top_k))}}
        result = self._call(collection, self._client.search, name, data=queries.tolist(), filter=expr,
                            limit=int(top_k), output_fields=OUTPUT_FIELDS, search_params=params,
                            anns_field="embedding", consistency_level=self.search_consistency)
        return [sorted((_hit(h) for h in hits), key=lambda h: -h.score) for hits in result]

    # -- connection ---------------------------------------------------------------------------------------------

    def ping(self) -> bool:
        """Whether Milvus answers right now."""
        try:
            self._client.list_collections(timeout=5)
            return True
        except Exception:
            return False

    def close(self) -> None:
        """Closes the connection (and releases a Milvus Lite file once its last store in this process closes)."""
        if self._closed:
            return
        self._closed = True
        self._client.close()
        if self._lite_path:
            _release_lite(self._lite_path)

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------

    def _aliases(self) -> list[str]:
        return list(self._client.list_aliases().get("aliases", []))

    def _collection_dim(self, name: str) -> int:
        for f in self._client.describe_collection(name)["fields"]:
            if f["name"] == "embedding":
                return int(f["params"]["dim"])
        raise ValueError(f"collection {name} has no `embedding` field: not an ootd collection")

    def _resolve(self, collection: str | None, concrete: bool = False) -> str:
        """The name to pass to Milvus: the collection, the alias itself (reads; resolved server-side in the
        same call), or the collection behind the alias (writes)."""
        if collection is not None:
            check_name(collection, "collection")
            return collection
        if not concrete:
            return self.alias
        live = self.live_collection()
        if live is None:
            raise self._no_live()
        return live

    def _call(self, collection: str | None, fn: Any, name: str, **kwargs: Any) -> Any:
        """Runs a read on `name` (a collection, or the alias when `collection` is None).

        Milvus Lite reopens a file with its collections released, so the first read of a name loads it if needed
        (checked up front: a failed RPC is logged loudly by pymilvus); a later "not loaded" (someone released it,
        the alias moved to a released collection) is loaded and retried once.
        """
        if name not in self._ready:
            target = self._resolve(collection, concrete=True)
            from pymilvus.client.types import LoadState

            if self._client.get_load_state(target)["state"] != LoadState.Loaded:
                self._client.load_collection(target)
            self._ready.add(name)
        try:
            return fn(name, **kwargs)
        except Exception as exc:
            if collection is None and self.live_collection() is None:
                raise self._no_live() from None
            if getattr(exc, "code", None) != _NOT_LOADED:
                raise
        self._client.load_collection(self._resolve(collection, concrete=True))
        return fn(name, **kwargs)

    def _count(self, collection: str | None, name: str, expr: str) -> int:
        rows = self._call(collection, self._client.query, name, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def _no_live(self) -> LookupError:
        return LookupError(f"no live collection (alias {self.alias!r} does not exist): run `ootd index` first")


def is_server_uri(uri: str) -> bool:
    """Whether `store.uri` names a Milvus server (many processes may connect) rather than a Milvus Lite file."""
    return (uri or "").strip().startswith(SERVER_SCHEMES)


# -- helpers ----------------------------------------------------------------------------------------------------------


def _resolve_uri(uri: str) -> tuple[str, str | None]:
    """(uri for pymilvus, Milvus Lite path or None)."""
    uri = (uri or "").strip()
    if not uri:
        raise ValueError("store.uri is empty: give a Milvus Lite path (*.db) or http://host:port")
    if is_server_uri(uri):
        return uri, None
    if "://" in uri:
        raise ValueError(f"unsupported Milvus URI {uri!r}: use http://, https://, tcp:// or a *.db path")
    if not uri.endswith(".db"):
        raise ValueError(f"Milvus Lite path {uri!r} must end in .db (or pass http://host:port for a server)")
    path = Path(uri).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path), str(path)


def _acquire_lite(path: str) -> None:
    with _lite_lock:
        _lite_users[path] = _lite_users.get(path, 0) + 1


def _release_lite(path: str) -> None:
    with _lite_lock:
        _lite_users[path] -= 1
        if _lite_users[path] > 0:
            return
        del _lite_users[path]
        from milvus_lite import server_manager_instance

        server_manager_instance.release_server(path)


def _row_out(row: dict) -> dict:
    out = dict(row)
    out["embedding"] = np.asarray(row["embedding"], dtype=np.float32)
    out["box"] = tuple(int(v) for v in row["box"])
    return out


def _hit(h: Any) -> Hit:
    entity = h["entity"]
    return Hit(id=h["id"], score=float(h["distance"]), style=entity.get("style") or "",
               source=entity.get("source") or "", box=tuple(int(v) for v in entity.get("box") or (0, 0, 0, 0)),
               meta=dict(entity.get("meta") or {}))
