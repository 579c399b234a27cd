"""Measurement: the URL download stage (`ootd.ingest.download.Fetcher`) and the near-duplicate stage's cost per photo.

Download: a threaded HTTP server on 127.0.0.1 (a free port, a background thread of this process) serves N distinct
synthetic outfit JPEGs (`ootd.synthetic.render_outfit`) and sleeps `--latency-ms` before each answer. All N URLs
are fetched through the real `Fetcher` (policy `FetchPolicy.from_config` of the `tiny` config with
`data.allow_private_hosts=true`), one row per setting: one caller with per_host 1, then `data.download_concurrency`
caller threads with the configured `data.download_per_host`, then with per_host raised to the concurrency (every
URL here is on one host, so the per-host limit is the cap). The same settings are also run through the hash pass's
Ray Data UDF, `ootd.ingest.stages.FetchHash` (download + probe + pHash + staging write on its thread pool), called
directly in this process: no Ray cluster, so no actor start-up or object-store cost. Every body is compared with
what the server sent. Only 127.0.0.1 is ever contacted: the `Fetcher` rows resolve through a stub that refuses
any other host, and `FetchHash` is only given literal 127.0.0.1 URLs (the server never redirects).

Near-dup: `ootd.ingest.near_dup.phash_bytes` per photo over the same N photos, then `assign_near_dups` (all-pairs
Hamming distances in numpy, then connected components) over N hashes and larger sets padded with hashes of
randomised noise photos (distinct seeds), to show how the grouping scales.

Run: .venv/bin/python benchmarks/download_near_dup.py [--photos 200] [--latency-ms 50] [--group-photos 2000]
(about a minute on 2 cores). Writes benchmarks/results/download_near_dup.md.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

HOST = "127.0.0.1"  # the only address this benchmark sends traffic to
ROW_TIMEOUT_S = 120.0  # longest one download row may take before its unfinished URLs count as failures
SERVER_SOCKET_TIMEOUT_S = 30.0  # an idle keep-alive connection's server thread ends after this


def render_photos(n: int, size: int = 256, seed: int = 0) -> list[bytes]:
    """N distinct synthetic outfit photos as JPEG bytes (styles in turn, one seeded generator per photo)."""
    import numpy as np

    from ootd.styles import STYLES
    from ootd.synthetic import JPEG_QUALITY, render_outfit

    photos = []
    for k in range(n):
        image = render_outfit(STYLES[k % len(STYLES)], np.random.default_rng(seed * 1_000_003 + k), size).image
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        photos.append(buf.getvalue())
    if len(set(photos)) != n:
        raise RuntimeError("synthetic photos are not distinct")
    return photos


def noise_photos(n: int, seed: int, size: int = 256) -> list[bytes]:
    """N randomised photos (blocky colour noise of a random grid, JPEG): cheap distinct inputs for the grouping."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(n):
        cells = int(rng.integers(4, 17))
        grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        image = Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        photos.append(buf.getvalue())
    return photos


class PhotoServer:
    """Serves `photos[i]` at /photo/<i>.jpg on 127.0.0.1 after `latency_s`, HTTP/1.1 keep-alive, in a thread.

    Counts requests and the most requests in flight at once (what the client's per-host limit allows through).
    """

    def __init__(self, photos: list[bytes], latency_s: float):
        """Binds a free port on 127.0.0.1 and starts serving in a daemon thread."""
        self.photos, self.latency_s = photos, latency_s
        self.lock = threading.Lock()
        self.requests = self.in_flight = self.peak_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as an image CDN would: the Fetcher's pools reuse connections
            timeout = SERVER_SOCKET_TIMEOUT_S
            # http.server writes headers and body in two sends: with Nagle on, the body waits for the client's
            # delayed ACK (~40 ms on Linux), which measured 94 ms a request instead of 54 at 50 ms latency.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
                server.enter()
                try:
                    time.sleep(server.latency_s)
                    body = server.body(self.path)
                finally:
                    server.leave()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default backlog of 5 drops SYNs when 16 callers connect at once
            daemon_threads = True

        self.httpd = Server((HOST, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def url(self, k: int) -> str:
        """The URL of photo k."""
        return f"http://{HOST}:{self.port}/photo/{k}.jpg"

    def body(self, path: str) -> bytes | None:
        """The photo a request path names, or None."""
        name = path.rsplit("/", 1)[-1].removesuffix(".jpg")
        return self.photos[int(name)] if name.isdigit() and int(name) < len(self.photos) else None

    def enter(self) -> None:
        """Counts a request starting."""
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        """Counts a request answered."""
        with self.lock:
            self.in_flight -= 1

    def reset(self) -> None:
        """Zeroes the counters before a row."""
        with self.lock:
            self.requests = self.peak_in_flight = 0

    def close(self) -> None:
        """Stops serving and closes the listening socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def loopback_only(host, port, *args, **kwargs):
    """`socket.getaddrinfo` for 127.0.0.1 only: any other host raises, so no request can leave the machine."""
    if host != HOST:
        raise socket.gaierror(socket.EAI_NONAME, f"benchmark resolves only {HOST}, not {host!r}")
    return socket.getaddrinfo(host, port, *args, **kwargs)


def peak_rss_mib() -> float:
    """This process's peak resident set so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fetch_row(data, urls: list[str], photos: list[bytes]) -> dict:
    """Fetches every URL with `data.download_concurrency` caller threads sharing one `Fetcher`.

    The Fetcher gets the config's policy and `data.download_per_host`, as one download actor does.

    Returns:
        seconds, errors (FetchError or unfinished by ROW_TIMEOUT_S) and mismatches (body differs from the photo).
    """
    from ootd.ingest.download import Fetcher, FetchError, FetchPolicy

    fetcher = Fetcher(FetchPolicy.from_config(data), data.download_per_host, resolve=loopback_only)
    bodies: list[bytes | None] = [None] * len(urls)
    failed = [False] * len(urls)  # one slot per URL: no shared counter between threads

    def one(k: int) -> None:
        try:
            bodies[k] = fetcher.fetch(urls[k])
        except FetchError:
            failed[k] = True

    pool = ThreadPoolExecutor(max_workers=data.download_concurrency, thread_name_prefix="caller")
    start = time.perf_counter()
    futures = [pool.submit(one, k) for k in range(len(urls))]
    _, unfinished = wait(futures, timeout=ROW_TIMEOUT_S)
    seconds = time.perf_counter() - start
    pool.shutdown(wait=False, cancel_futures=True)
    fetcher.close()
    mismatches = sum(b is not None and b != p for b, p in zip(bodies, photos, strict=True))
    return {"seconds": seconds, "errors": sum(failed) + len(unfinished), "mismatches": mismatches}


def fetch_hash_row(data, urls: list[str], photos: list[bytes]) -> dict:
    """Runs the hash pass's URL UDF (`FetchHash`) over every URL in the pipeline's batches, without Ray.

    Threads, per-host limit and batch size are the ones `ootd.ingest.pipeline` gives each actor. A row counts as a
    mismatch when its image id or staged file differs from the photo the server sent.
    """
    import pyarrow as pa

    from ootd.decode import image_id
    from ootd.ingest.download import FetchPolicy
    from ootd.ingest.pipeline import FETCH_ROWS_PER_THREAD
    from ootd.ingest.stages import FetchHash, staged_path

    if any(not u.startswith(f"http://{HOST}:") for u in urls):  # FetchHash resolves with socket.getaddrinfo
        raise ValueError(f"only {HOST} URLs are fetched")
    actors = data.download_actors
    threads = -(-data.download_concurrency // actors)
    per_host = max(1, data.download_per_host // actors)
    per_batch = threads * FETCH_ROWS_PER_THREAD
    expected = {u: image_id(p) for u, p in zip(urls, photos, strict=True)}
    with tempfile.TemporaryDirectory() as staging:
        udf = FetchHash(FetchPolicy.from_config(data), threads, per_host, staging, data.max_image_pixels)
        rows = []
        start = time.perf_counter()
        for lo in range(0, len(urls), per_batch):
            if time.perf_counter() - start > ROW_TIMEOUT_S:
                break
            batch = pa.Table.from_pylist([{"source": u, "style": None} for u in urls[lo:lo + per_batch]],
                                         schema=pa.schema([("source", pa.string()), ("style", pa.string())]))
            rows += udf(batch).to_pylist()
        seconds = time.perf_counter() - start
        udf.fetcher.close()
        udf.threads.shutdown(wait=True)
        sent = dict(zip(urls, photos, strict=True))
        errors = sum(r["stage"] is not None for r in rows) + len(urls) - len(rows)
        mismatches = sum(
            r["stage"] is None
            and (r["image_id"] != expected[r["source"]]
                 or staged_path(staging, r["image_id"]).read_bytes() != sent[r["source"]])
            for r in rows
        )  # fmt: skip
    return {"seconds": seconds, "errors": errors, "mismatches": mismatches, "threads": threads, "per_host": per_host}


def download_rows(cfg, server: PhotoServer, photos: list[bytes]) -> list[dict]:
    """The download measurements: each setting through `Fetcher` directly, then through `FetchHash`."""
    from ootd.config import with_overrides

    urls = [server.url(k) for k in range(len(photos))]
    conc = cfg.data.download_concurrency
    settings = [
        ("concurrency 1", ["data.download_concurrency=1", "data.download_per_host=1"]),
        ("configured", []),
        (f"per_host raised to {conc}", [f"data.download_per_host={conc}"]),
    ]
    rows = []
    for api, run in (("Fetcher", fetch_row), ("FetchHash UDF", fetch_hash_row)):
        for label, overrides in settings:
            data = with_overrides(cfg, overrides).data
            server.reset()
            result = run(data, urls, photos)
            rows.append({"api": api, "setting": label, "callers": data.download_concurrency,
                         "per_host": data.download_per_host, "photos": len(urls), **result,
                         "server_peak": server.peak_in_flight, "requests": server.requests,
                         "rss": peak_rss_mib()})  # fmt: skip
    return rows


def phash_times(photos: list[bytes]) -> list[float]:
    """Seconds of `phash_bytes` for each photo (after one untimed call that loads PIL and the DCT matrix)."""
    from ootd.ingest.near_dup import phash_bytes

    phash_bytes(photos[0])
    times = []
    for data in photos:
        start = time.perf_counter()
        phash_bytes(data)
        times.append(time.perf_counter() - start)
    return times


def grouping_rows(hashes: list, threshold: int, sizes: list[int], repeats: int) -> list[dict]:
    """Median seconds of packing (`HashArrays`) and of `assign_near_dups` over the first n hashes, per size."""
    from ootd.ingest.near_dup import HashArrays, assign_near_dups

    rows = []
    for n in sizes:
        items = [(f"{k:08d}", h) for k, h in enumerate(hashes[:n])]
        pack, group, groups = [], [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            HashArrays([h for _, h in items])
            pack.append(time.perf_counter() - start)
            start = time.perf_counter()
            reps = assign_near_dups(items, threshold)
            group.append(time.perf_counter() - start)
            groups = sum(rep is None for rep in reps.values())
        rows.append({"n": n, "pack": statistics.median(pack), "group": statistics.median(group), "groups": groups})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=200, help="photos served and fetched (N)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="server delay before each answer")
    p.add_argument("--group-photos", type=int, default=2000, help="largest hash set grouped (padded with noise)")
    p.add_argument("--repeats", type=int, default=3, help="grouping runs per size (median reported)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "download_near_dup.md")
    args = p.parse_args(argv)
    if args.photos < 1 or args.group_photos < 1 or args.latency_ms < 0:
        p.error("--photos and --group-photos must be positive, --latency-ms not negative")

    import numpy as np

    from ootd.config import load_config, with_overrides
    from ootd.ingest.near_dup import phash_bytes

    load_before = os.getloadavg()
    cfg = with_overrides(load_config(args.config), ["data.allow_private_hosts=true"])
    photos = render_photos(args.photos)
    server = PhotoServer(photos, args.latency_ms / 1000)
    try:
        from ootd.ingest.download import Fetcher, FetchPolicy

        warm = Fetcher(FetchPolicy.from_config(cfg.data), resolve=loopback_only)  # imports urllib3, untimed
        warm.fetch(server.url(0))
        warm.close()
        down = download_rows(cfg, server, photos)
    finally:
        server.close()
    times = np.asarray(phash_times(photos)) * 1000
    hashes = [phash_bytes(d) for d in photos]
    hashes += [phash_bytes(d) for d in noise_photos(max(0, args.group_photos - len(hashes)), seed=1)]
    sizes = sorted({min(args.photos, args.group_photos), args.group_photos // 2, args.group_photos} - {0})
    groups = grouping_rows(hashes, cfg.data.near_dup_threshold, sizes, args.repeats)
    load_after = os.getloadavg()

    sizes_kb = [len(d) / 1024 for d in photos]
    base = {r["api"]: r["photos"] / r["seconds"] for r in down if r["setting"] == "concurrency 1"}
    lines = [f"Machine: {os.cpu_count()} cores (nproc), load average 1/5/15 min before "
             + " / ".join(f"{x:.2f}" for x in load_before) + ", after " + " / ".join(f"{x:.2f}" for x in load_after)
             + " (shared machine: another job was running; the HTTP server shares this process and its GIL).", "",
             f"## Download stage: {args.photos} distinct JPEGs ({min(sizes_kb):.0f}-{max(sizes_kb):.0f} KiB, mean "
             f"{statistics.mean(sizes_kb):.0f}) from a threaded HTTP/1.1 server on 127.0.0.1 sleeping "
             f"{args.latency_ms:g} ms per request", "",
             "APIs measured: `ootd.ingest.download.Fetcher.fetch` (one Fetcher shared by the caller threads, policy "
             f"`FetchPolicy.from_config` of `{args.config}` + `data.allow_private_hosts=true`), and the Ray Data "
             "hash-pass UDF `ootd.ingest.stages.FetchHash` called directly in-process (no Ray: download + probe + "
             "pHash + staging write, batches of threads x 4 rows as the pipeline sends one actor). `ideal` = "
             "min(callers, per_host) / latency. Server peak = most requests the server saw in flight at once.", "",
             "| API | setting | callers | per_host | photos | seconds | photos/s | ideal photos/s | vs concurrency 1 | "
             "server peak in flight | errors | body mismatches | peak RSS (process, so far) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in down:
        rate = r["photos"] / r["seconds"]
        ideal = min(r["callers"], r["per_host"]) / (args.latency_ms / 1000) if args.latency_ms else float("inf")
        lines.append(f"| {r['api']} | {r['setting']} | {r['callers']} | {r['per_host']} | {r['photos']} | "
                     f"{r['seconds']:.2f} | {rate:.1f} | {ideal:.0f} | {rate / base[r['api']]:.2f}x | "
                     f"{r['server_peak']} | {r['errors']} | {r['mismatches']} | {r['rss']:.0f} MiB |")
    conf = next(r for r in down if r["api"] == "Fetcher" and r["setting"] == "configured")
    raised = next(r for r in down if r["api"] == "Fetcher" and r["setting"].startswith("per_host"))
    lines += ["", f"Every URL is on one host, so `data.download_per_host={conf['per_host']}` caps the requests in "
              f"flight (server peak {conf['server_peak']}), not `data.download_concurrency={conf['callers']}`: the "
              f"configured Fetcher row is {conf['photos'] / conf['seconds'] / base['Fetcher']:.2f}x concurrency 1, "
              f"per_host {raised['per_host']} is {raised['photos'] / raised['seconds'] / base['Fetcher']:.2f}x. "
              "`FetchHash` adds probe + pHash + a staging write per photo on the same GIL. Peak RSS is the process "
              "high-water mark so far (the FetchHash rows' jump is mostly importing pyarrow and the stage modules)."]
    lines += ["", f"## Near-dup stage: `phash_bytes` over the same {args.photos} photos", "",
              "| photos | mean ms/photo | p50 ms/photo | p90 ms/photo | total s |", "|---:|---:|---:|---:|---:|",
              f"| {len(times)} | {times.mean():.2f} | {np.percentile(times, 50):.2f} | {np.percentile(times, 90):.2f} "
              f"| {times.sum() / 1000:.2f} |", "",
              f"Grouping: `assign_near_dups(new, threshold={cfg.data.near_dup_threshold})` over the first n hashes "
              f"({args.photos} outfit photos, then hashes of randomised noise photos with distinct seeds); "
              f"`HashArrays` packing timed separately (it is inside `assign_near_dups` too). Median of "
              f"{args.repeats} runs.", "",
              "| hashes n | HashArrays s | assign_near_dups s | ms per photo | ns per pair (n^2) | groups |",
              "|---:|---:|---:|---:|---:|---:|"]
    for g in groups:
        lines.append(f"| {g['n']:,} | {g['pack']:.3f} | {g['group']:.3f} | {g['group'] / g['n'] * 1000:.2f} | "
                     f"{g['group'] / g['n'] ** 2 * 1e9:.0f} | {g['groups']:,} |")
    largest = groups[-1]
    per_pair = largest["group"] / largest["n"] ** 2
    lines += ["", f"Per-photo grouping cost grows linearly with n (all pairs). Extrapolated at "
              f"{per_pair * 1e9:.0f} ns/pair: 10,000 photos ~{per_pair * 1e8:.0f} s, 100,000 photos "
              f"~{per_pair * 1e10 / 60:.0f} min.", "",
              "Reproduce: `.venv/bin/python benchmarks/download_near_dup.py "
              f"--photos {args.photos} --latency-ms {args.latency_ms:g} --group-photos {args.group_photos}`"]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
