"""Prometheus metrics of the Serve app, exported through Ray's metrics agent: every name, tag and bucket in one place.

Ray prefixes application metrics with `ray_` and counters get `_total`: `ootd_http_requests` is scraped as
`ray_ootd_http_requests_total`. Inside a Serve replica the `ray.serve.metrics` classes add `deployment`,
`replica` and `application` tags. The objects are made on first use in the process that records (a replica),
never at import; without a Ray worker in the process (benchmarks, the plain-uvicorn peer) every call is a no-op.
Ray's agent rebuilds a histogram's `_sum` from bucket midpoints: its counts and quantiles are exact, means are not.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Seconds. Milvus calls take ~1 ms, an encoder batch 50 ms to seconds on CPU, an HTTP request up to its timeout.
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# Items per batch: powers of two up to MAX_COMMIT (256), the largest batch any stage forms.
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# Stages timed by `stage`: the Encoder's per batch, the Index's per Milvus call or commit.
STAGES = ("decode", "detect", "crop", "embed", "search", "get", "commit", "log_fsync", "milvus_write")
# Errors that are the caller's (a bad value, nothing live), not Milvus failing: not counted as Milvus errors.
CALLER_ERRORS = (ValueError, LookupError)


@dataclass(frozen=True)
class ServeMetrics:
    """The metric objects of one process."""

    requests: Any  # Counter `ootd_http_requests{route,method,status}`
    request_seconds: Any  # Histogram `ootd_http_request_seconds{route,method}`
    stage_seconds: Any  # Histogram `ootd_stage_seconds{stage}`
    batch_size: Any  # Histogram `ootd_batch_size{kind}`
    milvus_errors: Any  # Counter `ootd_milvus_errors{op}`
    writes_pending: Any  # Gauge `ootd_items_log_pending`
    write_ack_seconds: Any  # Histogram `ootd_write_ack_seconds`


def _create() -> ServeMetrics:
    from ray.serve.metrics import Counter, Gauge, Histogram

    return ServeMetrics(
        # Traffic and errors per endpoint: rate, error ratio (4xx = clients, 5xx/503 = us). `route` is the
        # matched template (`/v1/items/{item_id}`), never the raw path, so ids do not become series.
        requests=Counter("ootd_http_requests", "HTTP requests answered by the ingress, by route template, "
                         "method and status code.", tag_keys=("route", "method", "status")),
        # What clients wait, per endpoint (p50/p99 from the buckets): the service's latency objective.
        request_seconds=Histogram("ootd_http_request_seconds", "Seconds from request to the end of the response, "
                                  "by route template and method.", boundaries=LATENCY_BUCKETS_S,
                                  tag_keys=("route", "method")),
        # Where a slow request spends its time: decode/detect/crop/embed per Encoder batch, search/get per Milvus
        # call, commit (log_fsync + milvus_write + media) per Index commit.
        stage_seconds=Histogram("ootd_stage_seconds", "Seconds per pipeline stage (Encoder: per batch; Index: "
                                "per Milvus call or commit).", boundaries=LATENCY_BUCKETS_S, tag_keys=("stage",)),
        # Whether batching works: Encoder photos per forward pass, searches per Milvus call, writes per commit.
        # Sizes stuck at 1 under load mean the batch wait or max_ongoing_requests is too small.
        batch_size=Histogram("ootd_batch_size", "Items per batch: encoder (photos per forward pass), search "
                             "(queries per Milvus call), commit (writes per group commit).",
                             boundaries=BATCH_BUCKETS, tag_keys=("kind",)),
        # Milvus failing (down, timing out, a lost collection): each becomes a 503 or a retry, so page on its rate.
        milvus_errors=Counter("ootd_milvus_errors", "Milvus calls that raised (not counting bad input), by "
                              "operation.", tag_keys=("op",)),
        # Items-log lag: writes accepted but not yet durable. Growing means commits cannot keep up (slow fsync
        # or Milvus writes); stuck above 0 with no traffic means the committer is wedged.
        writes_pending=Gauge("ootd_items_log_pending", "Writes submitted to this Index replica and not yet "
                             "acknowledged (queued or committing)."),
        # What a write waits for durability: queueing behind the running commit plus its own commit.
        write_ack_seconds=Histogram("ootd_write_ack_seconds", "Seconds from a write's submit to its ack "
                                    "(durable in the items log and Milvus, or failed).",
                                    boundaries=LATENCY_BUCKETS_S),
    )


class _Noop:
    """Stands in for every metric where no Ray worker runs: records nothing, costs a method call."""

    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    def observe(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set(self, *args: Any, **kwargs: Any) -> None:
        pass


_NOOP = ServeMetrics(*([_Noop()] * len(ServeMetrics.__dataclass_fields__)))
_made: ServeMetrics | None = None
_lock = threading.Lock()  # the Encoder records from worker threads: create the objects once


def get() -> ServeMetrics:
    """This process's metrics: real ones once Ray runs here (a replica, a driver), no-ops before.

    Without `ray.init` Ray's metrics record into nothing; checking `sys.modules` first also keeps a process that
    never imported Ray from importing it just to find out.
    """
    global _made
    if _made is not None:
        return _made
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return _NOOP  # not cached: Ray may start later in this process
    with _lock:
        if _made is None:
            _made = _create()
    return _made


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Times the block (or, as a decorator, the function) into `ootd_stage_seconds{stage=name}`, failed or not."""
    start = time.perf_counter()
    try:
        yield
    finally:
        get().stage_seconds.observe(time.perf_counter() - start, tags={"stage": name})


@contextmanager
def milvus_call(op: str) -> Iterator[None]:
    """Counts a Milvus call of the block that raised into `ootd_milvus_errors{op}` (the error still propagates)."""
    try:
        yield
    except CALLER_ERRORS:
        raise
    except Exception:
        get().milvus_errors.inc(tags={"op": op})
        raise


def batch(kind: str, size: int) -> None:
    """Records one batch of `size` items (`kind`: encoder, search or commit)."""
    if size > 0:  # the histogram's buckets start at 1; an empty batch is no batch
        get().batch_size.observe(size, tags={"kind": kind})


def http_request(route: str, method: str, status: int, seconds: float) -> None:
    """Records one answered HTTP request."""
    m = get()
    m.requests.inc(tags={"route": route, "method": method, "status": str(status)})
    m.request_seconds.observe(seconds, tags={"route": route, "method": method})
