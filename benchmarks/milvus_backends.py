"""Milvus Lite vs a Milvus standalone server, side by side in one run, through MilvusStore.

Measures per backend: insert rate, restart-to-ready, single-query p50/p99, QPS at concurrency 1/8/32, and recall@10
against exact search over an `ef` sweep (the smallest ef reaching 0.95 is reported). The README's advice on when
to leave Milvus Lite rests on this table.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.milvus_scale import exact_top_k, ids_for, percentile_ms  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from ootd.store.milvus import MilvusStore  # noqa: E402
from ootd.store.standalone import LocalMilvus  # noqa: E402
from ootd.styles import STYLES  # noqa: E402

INSERT_CHUNK = 10_000
EF_SWEEP = (16, 32, 64, 128, 256)
RECALL_TARGET = 0.95


def embedding_like(n: int, dim: int, rng: np.random.Generator, looks_per_style: int = 40) -> tuple[np.ndarray, ...]:
    """Unit vectors shaped like style embeddings: 13 style directions, a few dozen "looks" around each (outfits
    that resemble each other), points scattered around their look; returns (vectors, look centres, labels)."""
    styles = rng.normal(size=(len(STYLES), dim)).astype(np.float32)
    looks = np.repeat(styles, looks_per_style, axis=0) + rng.normal(scale=0.5, size=(len(STYLES) * looks_per_style,
                                                                                      dim)).astype(np.float32)
    looks /= np.linalg.norm(looks, axis=1, keepdims=True)
    labels = rng.integers(0, len(looks), size=n)
    x = looks[labels] + rng.normal(scale=0.04, size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, looks, labels


def fill(store: MilvusStore, data: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    name = store.ensure_collection("bench")
    t0 = time.perf_counter()
    for start in range(0, len(data), INSERT_CHUNK):
        stop = min(len(data), start + INSERT_CHUNK)
        rows = [{"id": i, "embedding": v, "style": STYLES[c % len(STYLES)], "source": f"bench/{start + j}.jpg"}
                for j, (i, v, c) in enumerate(zip(ids_for(start, stop), data[start:stop], labels[start:stop],
                                                  strict=True))]
        store.upsert(rows, collection=name)
    store.flush(name)
    store.swap_alias(name)
    return name, time.perf_counter() - t0


def qps(store: MilvusStore, queries: np.ndarray, threads: int, seconds: float) -> float:
    """Searches per second with `threads` callers each asking one query per call for `seconds`."""
    done = [0] * threads
    stop_at = time.perf_counter() + seconds

    def caller(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            store.search(queries[i % len(queries)], 10)
            done[k] += 1
            i += threads

    workers = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - t0)


def measure(backend: str, store_uri: str, data, labels, queries, truth, args, restart) -> dict:
    """One backend end to end; `restart()` stops and restarts it and returns a fresh store."""
    store = MilvusStore(store_uri, dim=args.dim, hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction,
                        search_ef=args.ef)
    print(f"[{backend}] inserting {len(data):,} rows ...", file=sys.stderr, flush=True)
    _, insert_s = fill(store, data, labels)
    restart_s = None
    if restart is not None:
        t0 = time.perf_counter()
        store = restart(store)
        store.search(queries[0], 10)
        restart_s = time.perf_counter() - t0
    all_ids = ids_for(0, len(data))
    recall = {}
    for ef in EF_SWEEP:
        store.search_ef = ef
        found = [[h.id for h in hits] for start in range(0, len(queries), 32)
                 for hits in store.search(queries[start:start + 32], 10)]
        recall[ef] = float(np.mean([len(set(f) & {all_ids[i] for i in t}) / 10
                                    for f, t in zip(found, truth, strict=True)]))
    store.search_ef = args.ef
    single, deadline = [], time.perf_counter() + args.budget_s
    for k, q in enumerate(queries):
        if k >= 10 and time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        store.search(q, 10)
        single.append(time.perf_counter() - t0)
    print(f"[{backend}] concurrency sweep ...", file=sys.stderr, flush=True)
    rates = {c: qps(store, queries, c, args.qps_s) for c in (1, 8, 32)}
    store.close()
    reach = [ef for ef in EF_SWEEP if recall[ef] >= RECALL_TARGET]
    return {"backend": backend, "insert_rows_s": len(data) / insert_s, "restart_s": restart_s,
            "p50_ms": percentile_ms(single, 50), "p99_ms": percentile_ms(single, 99), "qps": rates,
            "recall": recall, "ef_95": reach[0] if reach else None, "samples": len(single)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated row counts (1000000 takes ~30 min)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef", type=int, default=64, help="search ef of the latency and QPS rows")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time budget of the single-query samples")
    parser.add_argument("--qps-s", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument("--restart-timeout-s", type=float, default=1800.0,
                        help="how long a restarted server may take to answer (it replays its log first)")
    parser.add_argument("--no-server-restart", action="store_true",
                        help="skip the standalone's restart (at 1M rows on 2 cores it was not back after 16 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "milvus_backends.md"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ootd-milvus-backends-"))
    lines = [
        f"Milvus Lite (file) vs Milvus 2.3.5 standalone (PyPI `milvus`, same machine), through MilvusStore; "
        f"{args.dim}-d unit vectors shaped like style embeddings (13 styles x 40 looks, points around each look), "
        f"HNSW M={args.hnsw_m} efConstruction={args.ef_construction}; latency/QPS at ef={args.ef}, top_k=10; "
        f"recall@10 vs exact search over {args.queries} held-out queries.", "",
        "| rows | backend | insert rows/s | restart-to-ready s | p50 / p99 ms (1 query per call) | QPS c=1 | c=8 "
        "| c=32 | recall@10 at ef " + "/".join(map(str, EF_SWEEP)) + " | smallest ef ≥ 0.95 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    try:
        for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
            rng = np.random.default_rng(args.seed)
            data, looks, labels = embedding_like(n, args.dim, rng)
            picks = rng.integers(0, len(looks), size=args.queries)
            queries = looks[picks] + rng.normal(scale=0.04, size=(args.queries, args.dim)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            truth = exact_top_k(data, queries, 10)
            lite_path = str(work / f"lite_{n}.db")

            def restart_lite(store: MilvusStore, path: str = lite_path) -> MilvusStore:
                store.close()
                return MilvusStore(path, dim=args.dim, search_ef=args.ef)

            server = LocalMilvus(work / f"standalone_{n}")
            server.start()

            def restart_server(store: MilvusStore, server: LocalMilvus = server) -> MilvusStore:
                store.close()
                server.stop()
                server.start(timeout=args.restart_timeout_s)
                return MilvusStore(server.uri, dim=args.dim, search_ef=args.ef)

            try:
                results = [measure("Milvus Lite", lite_path, data, labels, queries, truth, args, restart_lite),
                           measure("standalone", server.uri, data, labels, queries, truth, args,
                                   None if args.no_server_restart else restart_server)]
            finally:
                server.stop()
            for r in results:
                lines.append(
                    f"| {n:,} | {r['backend']} | {r['insert_rows_s']:,.0f} | "
                    f"{'not measured' if r['restart_s'] is None else format(r['restart_s'], '.1f')} "
                    f"| {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['qps'][1]:.0f} | {r['qps'][8]:.0f} "
                    f"| {r['qps'][32]:.0f} | " + " / ".join(f"{r['recall'][ef]:.3f}" for ef in EF_SWEEP)
                    + f" | {r['ef_95'] or '> ' + str(EF_SWEEP[-1])} |")
            lite, srv = results
            lines.append(f"| {n:,} | **standalone / Lite** | {srv['insert_rows_s'] / lite['insert_rows_s']:.1f}x "
                         f"| | {lite['p50_ms'] / srv['p50_ms']:.1f}x faster p50 | "
                         + " | ".join(f"{srv['qps'][c] / lite['qps'][c]:.1f}x" for c in (1, 8, 32)) + " | | |")
            publish(lines + ["", f"peak RSS of the benchmark process: "
                             f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"], args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
