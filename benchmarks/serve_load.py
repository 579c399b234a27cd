"""Serve load: /v1/embed and /v1/search throughput and latency over HTTP, each beside its baseline in one run.

(a) /v1/embed (detect → crop → encode, @serve.batch) vs the same `OutfitPipeline` in a bare Python loop at its
    best batch size (the ceiling: no HTTP, no Ray, no validation);
(b) /v1/search by vector with searches batched into one Milvus call vs the same app making one Milvus call per
    request (`make_app(batch_search=False)`).
Load is a bounded closed loop from this machine (aiohttp, `--duration` seconds per concurrency level); the app
runs on a local Ray instance started here and stopped at the end. Peak RSS is sampled over this process tree.

    .venv/bin/python benchmarks/serve_load.py                       # tiny model, concurrency 1,8,32
    .venv/bin/python benchmarks/serve_load.py --backbone vit-b-16   # Marqo's ViT-B-16-SigLIP shape, random weights
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import load_summary  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

MARQO_CONFIG = REPO / "tests" / "data" / "marqo_open_clip_config.json"


class RssSampler:
    """Peak resident memory of this process and all its descendants (the local Ray node, replicas, Milvus)."""

    def __init__(self, period: float = 0.5):
        import psutil

        self._me, self._period, self.peak = psutil.Process(), period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in [self._me, *self._me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except Exception:  # noqa: BLE001 - processes come and go
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self._period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_model(backbone: str, tiny_model_cfg, out: Path) -> Path:
    """A model dir for `tiny`, or for Marqo-FashionSigLIP's exact architecture with random weights."""
    import torch

    from ootd.model.encoder import StyleEncoder, new_model_version

    torch.manual_seed(0)
    version = new_model_version()
    if backbone == "tiny":
        encoder = StyleEncoder.from_config(tiny_model_cfg)
    else:
        import open_clip

        config = json.loads(MARQO_CONFIG.read_text())
        kwargs = copy.deepcopy(config["model_cfg"])
        kwargs.pop("custom_text")
        model = open_clip.CustomTextCLIP(**kwargs)
        open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model),
                                                   **config["preprocess_cfg"], "size": 224})
        encoder = StyleEncoder(model, backbone="random:ViT-B-16-SigLIP", model_cfg=config["model_cfg"])
    return encoder.export(out / version, version=version)


def photos(n: int, size: int) -> list[bytes]:
    """n synthetic outfit photos as JPEG bytes, styles round-robin."""
    import io

    import numpy as np

    from ootd.styles import STYLES
    from ootd.synthetic import render_outfit

    out = []
    for i in range(n):
        buffer = io.BytesIO()
        render_outfit(STYLES[i % len(STYLES)], np.random.default_rng([7, i]), size=size).image.save(
            buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def clustered_vectors(n: int, dim: int, seed: int = 0):
    """n unit vectors around 13 style centres (more like real embeddings than uniform noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(13, dim))
    vectors = centres[rng.integers(0, 13, n)] + 0.6 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def fill_index(cfg, version: str, n: int) -> None:
    """A live collection of n clustered vectors for `version` (closed again so the Index replica can open it)."""
    import hashlib

    from ootd.store.milvus import MilvusStore
    from ootd.styles import STYLES

    vectors = clustered_vectors(n, cfg.model.embed_dim)
    with MilvusStore.from_config(cfg.store, dim=cfg.model.embed_dim) as store:
        name = store.ensure_collection(version)
        rows = [{"id": hashlib.sha256(str(i).encode()).hexdigest(), "embedding": v, "style": STYLES[i % 13],
                 "source": f"bench://{i}", "box": [0, 0, 1, 1], "meta": {}} for i, v in enumerate(vectors)]
        for start in range(0, n, 2000):
            store.upsert(rows[start:start + 2000], collection=name)
        store.swap_alias(name)


def bare_loop(cfg, model_dir: Path, images: list[bytes], batch_sizes: list[int], threads: list[int],
              seconds: float) -> dict[tuple[int, int], float]:
    """Images/s of `OutfitPipeline.run` called directly, per (torch threads, batch size): the ceiling /v1/embed
    is held against. Thread counts are tried because OpenMP threads spin badly when other work shares the cores."""
    import torch

    from ootd.serve.pipeline import OutfitPipeline

    pipeline = OutfitPipeline(cfg, model_dir)
    pipeline.run(images[:2])  # warm-up: lazy inits, allocator
    rates = {}
    for t in threads:
        torch.set_num_threads(t)
        for bs in batch_sizes:
            done, start, i = 0, time.perf_counter(), 0
            while time.perf_counter() - start < seconds or done == 0:
                batch = [images[(i + k) % len(images)] for k in range(bs)]
                i += bs
                results = pipeline.run(batch)
                assert all("embedding" in r for r in results)
                done += bs
            rates[(t, bs)] = done / (time.perf_counter() - start)
            print(f"bare loop threads={t} batch={bs}: {rates[(t, bs)]:.1f} img/s", flush=True)
    return rates


def milvus_direct(cfg, dim: int, batch: int, seconds: float) -> tuple[float, float]:
    """Queries/s of the store itself: `batch` single-query calls vs one call with `batch` queries."""
    from ootd.store.milvus import MilvusStore

    queries = clustered_vectors(batch, dim, seed=2)
    rates = []
    with MilvusStore.from_config(cfg.store, dim=dim) as store:
        store.search(queries, 10)  # warm-up: loads the (sealed, indexed) segments
        for calls in ([q[None, :] for q in queries], [queries]):
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or done == 0:
                for call in calls:
                    store.search(call, 10)
                done += batch
            rates.append(done / (time.perf_counter() - start))
    return rates[0], rates[1]


async def _handle_load(concurrency: int, seconds: float, dim: int) -> dict[str, float]:
    """Closed-loop load on the Index deployment through a DeploymentHandle (no HTTP, no ingress)."""
    from ray import serve

    from ootd.serve.app import APP_NAME

    handle = serve.get_deployment_handle("Index", app_name=APP_NAME)
    queries = [{"vector": v.tolist(), "top_k": 10, "styles": None, "exclude_ids": None, "model_version": None}
               for v in clustered_vectors(512, dim, seed=1)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        k = w
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            result = await handle.search.remote(queries[k % len(queries)])
            assert "hits" in result, result
            latencies.append(time.perf_counter() - start)
            k += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    return load_summary(latencies, elapsed)


def handle_levels(levels: list[int], seconds: float, dim: int) -> dict[int, dict[str, float]]:
    asyncio.run(_handle_load(2, min(3.0, seconds), dim))
    return {c: asyncio.run(_handle_load(c, seconds, dim)) for c in levels}


async def _load(url: str, concurrency: int, seconds: float, make_request) -> dict[str, float]:
    """Closed-loop load: `concurrency` workers send back-to-back requests for `seconds`."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def worker(w: int) -> None:
            nonlocal errors
            k = w
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                async with make_request(session, url, k) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - start)
                k += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return load_summary(latencies, elapsed, errors)


def run_levels(url: str, levels: list[int], seconds: float, make_request) -> dict[int, dict[str, float]]:
    asyncio.run(_load(url, 2, min(3.0, seconds), make_request))  # warm-up: replicas, connections, batch loops
    return {c: asyncio.run(_load(url, c, seconds, make_request)) for c in levels}


def embed_request(images: list[bytes]):
    import aiohttp

    def make(session, url, k):
        form = aiohttp.FormData()
        form.add_field("image", images[k % len(images)], filename="photo.jpg", content_type="image/jpeg")
        return session.post(f"{url}/v1/embed", data=form)

    return make


def search_request(dim: int, n: int = 512):
    queries = [json.dumps({"vector": v.tolist(), "top_k": 10}) for v in clustered_vectors(n, dim, seed=1)]

    def make(session, url, k):
        return session.post(f"{url}/v1/search", data=queries[k % n], headers={"content-type": "application/json"})

    return make


def deploy(cfg, model_dir: Path, port: int, batch_search: bool) -> str:
    import urllib.request

    from ray import serve

    from ootd.serve.app import APP_NAME, make_app

    serve.run(make_app(cfg, model_dir=model_dir, batch_search=batch_search), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{url}/readyz", timeout=120) as resp:
        assert json.loads(resp.read())["ready"], "app not ready"
    return url


def fmt_table(title: str, ours: str, base: str, rows: list[tuple]) -> list[str]:
    lines = [f"### {title}", "", f"| concurrency | {ours} req/s | p50 ms | p99 ms | {base} | ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    for c, r, baseline_text, ratio in rows:
        lines.append(f"| {c} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {baseline_text} | {ratio:.2f} |"
                     + (f" ({r['errors']} errors)" if r["errors"] else ""))
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["tiny", "vit-b-16"], default="tiny")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrency levels")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per level")
    parser.add_argument("--index-size", type=int, default=20_000, help="vectors in the searched collection")
    parser.add_argument("--photos", type=int, default=52, help="distinct synthetic photos sent to /v1/embed")
    parser.add_argument("--photo-size", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8,16,32", help="bare-loop batch sizes tried for the ceiling")
    parser.add_argument("--threads", default="1,2", help="torch thread counts tried for the bare-loop ceiling")
    parser.add_argument("--max-batch-size", type=int, default=16, help="serve.max_batch_size of the Encoder")
    parser.add_argument("--encoder-replicas", type=int, default=2)
    parser.add_argument("--encoder-cpus", type=float, default=0.9, help="CPUs reserved per Encoder replica")
    parser.add_argument("--search-batch-wait", type=float, default=None,
                        help="serve.search_batch_wait_s of the Index (default: the config's)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: embed, search")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.md"))
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    skip = set(filter(None, args.skip.split(",")))

    import ray
    import torch
    from ray import serve

    from ootd.config import load_config, with_overrides
    from ootd.model.modeldir import model_info

    work = Path(tempfile.mkdtemp(prefix="ootd-serve-load-"))
    port = free_port()
    cfg = load_config("tiny", [
        f"store.uri={work / 'milvus.db'}", f"store.media={work / 'media'}", f"data.workdir={work}",
        f"serve.min_replicas={args.encoder_replicas}", f"serve.max_replicas={args.encoder_replicas}",
        f"serve.encoder_num_cpus={args.encoder_cpus}", f"serve.max_batch_size={args.max_batch_size}",
        "serve.ingress_num_cpus=0.05", "serve.index_num_cpus=0.05", f"serve.port={port}",
    ])  # fmt: skip
    if args.search_batch_wait is not None:
        cfg = with_overrides(cfg, [f"serve.search_batch_wait_s={args.search_batch_wait}"])
    model_dir = export_model(args.backbone, cfg.model, work / "models")
    version, _ = model_info(model_dir)
    if args.backbone != "tiny":
        cfg = with_overrides(cfg, ["model.embed_dim=128"])
    images = photos(args.photos, args.photo_size)
    fill_index(cfg, version, args.index_size)
    lines = [f"## serve_load ({args.backbone} encoder, {platform.machine()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, {args.duration:.0f} s per level, index of {args.index_size:,} vectors, "
             f"Index batch wait {cfg.serve.search_batch_wait_s * 1000:.0f} ms)", ""]

    load_start = os.getloadavg()[0]
    with RssSampler() as rss:
        ceiling: dict = {}
        if "embed" not in skip:
            sizes = [int(b) for b in args.batch_sizes.split(",")]
            ceiling = bare_loop(cfg, model_dir, images, sizes, [int(t) for t in args.threads.split(",")],
                                args.duration)
        direct = milvus_direct(cfg, cfg.model.embed_dim, max(levels), args.duration) if "search" not in skip else ()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        embed, http, via_handle = {}, {}, {}
        try:
            url = deploy(cfg, model_dir, port, batch_search=True)
            if "embed" not in skip:
                embed = run_levels(url, levels, args.duration, embed_request(images))
                print("embed:", embed, flush=True)
            if "search" not in skip:
                from ootd.serve.app import APP_NAME

                for batch_search in (True, False):
                    if not batch_search:
                        serve.delete(APP_NAME)  # frees the Milvus Lite file for the next Index replica
                        url = deploy(cfg, model_dir, port, batch_search=False)
                    http[batch_search] = run_levels(url, levels, args.duration, search_request(cfg.model.embed_dim))
                    via_handle[batch_search] = handle_levels(levels, args.duration, cfg.model.embed_dim)
                    print(f"search batch_search={batch_search}: http {http[batch_search]} "
                          f"handle {via_handle[batch_search]}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

    if ceiling:
        (best_threads, best_bs), best = max(ceiling.items(), key=lambda kv: kv[1])
        lines += fmt_table(
            f"(a) POST /v1/embed vs the same pipeline in a bare loop (best: {best:.1f} img/s at batch {best_bs}, "
            f"{best_threads} torch thread(s); app: {args.encoder_replicas} Encoder replicas × {args.encoder_cpus} "
            f"CPU (1 torch thread each), max_batch_size {args.max_batch_size})",
            "/v1/embed", "bare loop img/s",
            [(c, r, f"{best:.1f}", r["rps"] / best) for c, r in embed.items()])
        lines += ["bare loop img/s (threads, batch): "
                  + ", ".join(f"({t}, {b}): {v:.1f}" for (t, b), v in ceiling.items()), ""]
    if http:
        for title, runs in (("over HTTP (POST /v1/search by vector, top_k 10)", http),
                            ("Index deployment through a DeploymentHandle (no HTTP, no ingress)", via_handle)):
            lines += fmt_table(f"(b) search {title}: batched into one Milvus call vs one call per request",
                               "batched", "one call/request req/s",
                               [(c, runs[True][c], f"{runs[False][c]['rps']:.1f}",
                                 runs[True][c]["rps"] / runs[False][c]["rps"]) for c in levels])
            lines += ["one call per request, latency ms (p50 / p99): " + ", ".join(
                f"c={c}: {runs[False][c]['p50']:.1f} / {runs[False][c]['p99']:.1f}" for c in levels), ""]
        lines += [f"Milvus Lite alone (same collection, in this process): {max(levels)} single-query calls "
                  f"{direct[0]:.0f} queries/s vs one {max(levels)}-query call {direct[1]:.0f} queries/s "
                  f"(ratio {direct[1] / direct[0]:.1f})", ""]
    lines += [f"Peak RSS (this process + Ray node, replicas, Milvus Lite): {rss.peak / 2**20:,.0f} MiB", "",
              f"Load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}: the client, the app "
              "and anything else on the machine share its cores; compare ratios from one run only.", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.backbone == "tiny" or not out.exists():
        out.write_text(text)
    else:
        out.write_text(out.read_text().rstrip() + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
