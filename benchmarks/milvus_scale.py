"""Milvus Lite at scale through MilvusStore: insert, HNSW search latency and recall vs exact numpy, reopen time."""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ootd.store.milvus import MilvusStore  # noqa: E402
from ootd.styles import STYLES  # noqa: E402

INSERT_CHUNK = 10_000  # rows handed to one upsert call (the store splits them into RPC batches)


def clustered_vectors(n: int, centres: np.ndarray, spread: float, rng: np.random.Generator):
    """Unit vectors drawn around the given centres (one per style), like style embeddings; with their labels."""
    labels = rng.integers(0, len(centres), size=n)
    x = centres[labels] + rng.normal(scale=spread, size=(n, centres.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def ids_for(start: int, stop: int) -> list[str]:
    return [hashlib.sha256(f"bench-{i}".encode()).hexdigest() for i in range(start, stop)]


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k (data and queries are unit vectors), in chunks to bound memory."""
    out = []
    for start in range(0, len(queries), 64):
        sims = queries[start:start + 64] @ data.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def cold_reopen(path: str, dim: int, query: np.ndarray) -> tuple[float, float, int]:
    """A fresh Python process opens the file and searches once: (open+search s, process wall s, its peak RSS MiB)."""
    # The child reads its own VmHWM: RUSAGE_CHILDREN would report the parent's size at fork, kept across exec.
    code = (
        "import json, re, sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from ootd.store.milvus import MilvusStore\n"
        "t1 = time.perf_counter(); s = MilvusStore(sys.argv[2], dim=int(sys.argv[3]))\n"
        "hits = s.search(json.loads(sys.argv[4]), 10)\n"
        "t2 = time.perf_counter(); s.close()\n"
        "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "print(json.dumps([t2 - t1, len(hits[0]), hwm]))\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(REPO), path, str(dim), json.dumps(query.tolist())],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    open_search, n_hits, child_rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert n_hits == 10, out.stdout
    return open_search, wall, child_rss


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> dict:
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(len(STYLES), args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data, labels = clustered_vectors(n, centres, args.spread, rng)
    queries, _ = clustered_vectors(args.queries, centres, args.spread, rng)  # fresh points, not in the index
    path = str(workdir / f"scale_{n}.db")
    store = MilvusStore(path, dim=args.dim, hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction,
                        search_ef=args.ef)
    name = store.ensure_collection("bench")
    print(f"[{n}] inserting ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    for start in range(0, n, INSERT_CHUNK):
        stop = min(n, start + INSERT_CHUNK)
        rows = [{"id": i, "embedding": v, "style": STYLES[c], "source": f"bench/{start + j}.jpg", "box": (0, 0, 1, 1),
                 "meta": {}} for j, (i, v, c) in enumerate(zip(ids_for(start, stop), data[start:stop],
                                                                labels[start:stop], strict=True))]
        store.upsert(rows, collection=name)
        if args.verbose and (stop // INSERT_CHUNK) % 10 == 0:
            print(f"  {stop} rows {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.flush(name)
    flush_s = time.perf_counter() - t0
    store.swap_alias(name)
    assert store.count() == n, store.count()
    print(f"[{n}] inserted in {insert_s:.1f}s, flushed in {flush_s:.1f}s; searching ...", file=sys.stderr, flush=True)

    all_ids = ids_for(0, n)
    store.search(queries[:1], 10)  # first search after load: not a steady-state latency
    # Recall over every query, asked in batches (HNSW answers a batch exactly as it answers each query).
    found = [[h.id for h in hits] for start in range(0, len(queries), args.batch)
             for hits in store.search(queries[start:start + args.batch], 10)]
    truth = exact_top_k(data, queries, 10)
    recall = float(np.mean([len(set(f) & {all_ids[i] for i in t}) / 10 for f, t in zip(found, truth, strict=True)]))
    # Single-query latency: every query, unless the time budget runs out first (each call costs O(rows) in Lite).
    single, exact_times, deadline = [], [], time.perf_counter() + args.latency_budget_s
    for k, q in enumerate(queries):
        if k >= 10 and time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        (hits,) = store.search(q, 10)
        single.append(time.perf_counter() - t0)
        assert len(hits) == 10
        t0 = time.perf_counter()
        exact_top_k(data, q[None, :], 10)
        exact_times.append(time.perf_counter() - t0)

    batch = queries[: args.batch]
    singles, batched = [], []
    deadline = time.perf_counter() + args.latency_budget_s
    while not singles or (len(singles) < args.batch_reps and time.perf_counter() < deadline):
        t0 = time.perf_counter()
        for q in batch:
            store.search(q, 10)
        singles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = store.search(batch, 10)
        batched.append(time.perf_counter() - t0)
        assert len(results) == len(batch)
    singles_s, batched_s = float(np.median(singles)), float(np.median(batched))

    t0 = time.perf_counter()
    store.close()
    close_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reopened = MilvusStore(path, dim=args.dim, search_ef=args.ef)
    (hits,) = reopened.search(queries[0], 10)
    reopen_s = time.perf_counter() - t0
    assert len(hits) == 10
    reopened.close()
    cold_s, cold_wall_s, child_rss = cold_reopen(path, args.dim, queries[0])
    disk_mib = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
    return {
        "n": n, "insert_s": insert_s, "flush_s": flush_s, "rows_per_s": n / (insert_s + flush_s),
        "latency_queries": len(single), "batch_reps": len(singles),
        "p50_ms": percentile_ms(single, 50), "p99_ms": percentile_ms(single, 99),
        "exact_p50_ms": percentile_ms(exact_times, 50), "recall": recall,
        "singles_ms": singles_s * 1e3, "batched_ms": batched_s * 1e3, "batch_ratio": singles_s / batched_s,
        "close_s": close_s, "reopen_s": reopen_s, "cold_s": cold_s, "cold_wall_s": cold_wall_s,
        "child_rss_mib": child_rss, "disk_mib": disk_mib,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(results: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"Milvus Lite (file) via MilvusStore, {args.dim}-d unit vectors in {len(STYLES)} gaussian clusters "
        f"(spread {args.spread}), HNSW M={args.hnsw_m} efConstruction={args.ef_construction}, search ef={args.ef}, "
        f"top_k=10, recall over {args.queries} held-out queries. Baseline: exact numpy search (one query) over the "
        "same vectors; batch: one call with the queries vs one call per query.\n\n"
        "| rows | insert s (rows/s) | flush s | p50 / p99 ms single query (n) | exact numpy p50 ms | Milvus/numpy p50 "
        f"| recall@10 | {args.batch} single calls ms | 1 call x{args.batch} ms | batch speed-up "
        "| close s | reopen+1st search s (same proc) | new proc: open+search / wall s | disk MiB "
        "| peak RSS MiB (bench / new proc) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['n']:,} | {r['insert_s']:.1f} ({r['rows_per_s']:,.0f}) | {r['flush_s']:.1f} "
        f"| {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ({r['latency_queries']}) | {r['exact_p50_ms']:.1f} "
        f"| {r['p50_ms'] / r['exact_p50_ms']:.2f}x | {r['recall']:.3f} | {r['singles_ms']:.0f} | {r['batched_ms']:.0f} "
        f"| {r['batch_ratio']:.1f}x | {r['close_s']:.2f} | {r['reopen_s']:.2f} "
        f"| {r['cold_s']:.2f} / {r['cold_wall_s']:.2f} "
        f"| {r['disk_mib']:.0f} | {r['rss_mib']:.0f} / {r['child_rss_mib']} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated row counts")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="queries in the batched-search comparison")
    parser.add_argument("--batch-reps", type=int, default=5, help="repeats of the batch comparison (budget allowing)")
    parser.add_argument("--latency-budget-s", type=float, default=120.0,
                        help="time budget per size for single-query latency samples and for the batch comparison")
    parser.add_argument("--spread", type=float, default=0.06, help="per-dimension gaussian noise around centres")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="where the .db files go (default: a temp dir, removed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "milvus_scale.md"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ootd-milvus-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in sizes:
            t0 = time.perf_counter()
            results.append(run_size(n, args, workdir))
            print(f"[{n}] done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            text = table(results, args)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)  # after every size, so a long run keeps what it measured
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
