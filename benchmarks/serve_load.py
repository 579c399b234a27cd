"""Serve load: ootd on Ray Serve, as `ootd serve` deploys it, beside a plain FastAPI peer and the bare-loop ceiling.

In one invocation, against the same photos, vectors and load client:
(i)   the bare `OutfitPipeline.run` loop at its best batch size (the ceiling: no HTTP, no Ray, no validation);
(ii)  `benchmarks/serve_peer.py`: the same pipeline behind plain FastAPI + uvicorn, one process, unbatched, Milvus
      Lite searched in-process (what a user would write without Ray);
(iii) `ootd serve --config tiny` with the shipped defaults (a subprocess: the CLI's own path, its own local Ray).
Each serves POST /v1/embed (multipart photo), /v1/search by photo (multipart) and /v1/search by vector (JSON) at
every concurrency level. The load client is one asyncio + aiohttp process (pre-encoded bodies) whose own CPU
seconds per wall second are reported: the two cores are shared by client and server. Server CPU is sampled per
process group (proxy, ingress, encoder, index, Ray's own daemons) to show where the time goes.

    .venv/bin/python benchmarks/serve_load.py                       # tiny model, concurrency 1,8,32
    .venv/bin/python benchmarks/serve_load.py --backbone vit-b-16   # Marqo's ViT-B-16-SigLIP shape, random weights
    .venv/bin/python benchmarks/serve_load.py --stores lite,standalone --kinds search_image,search_vector \
        --concurrency 32 --skip bare    # /v1/search on Milvus Lite vs a Milvus standalone server, one run
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import copy
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import load_summary  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

MARQO_CONFIG = REPO / "tests" / "data" / "marqo_open_clip_config.json"
BOUNDARY = "ootdbenchboundary"
ROUTES = {"embed": "/v1/embed", "search_image": "/v1/search", "search_vector": "/v1/search"}
TITLES = {"embed": "POST /v1/embed (photo)", "search_image": "POST /v1/search by photo (multipart)",
          "search_vector": "POST /v1/search by vector (JSON, top_k 10)"}


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
    """A live collection of n clustered vectors for `version` (closed again so a server can open it)."""
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


def bare_loop(cfg, model_dir: Path, images: list[bytes], batch_sizes: list[int], seconds: float
              ) -> dict[int, float]:
    """Images/s of `OutfitPipeline.run` called directly per batch size, torch on its default threads: the
    ceiling /v1/embed is held against."""
    from ootd.serve.pipeline import OutfitPipeline

    pipeline = OutfitPipeline(cfg, model_dir)
    pipeline.run(images[:2])  # warm-up: lazy inits, allocator
    rates = {}
    for bs in batch_sizes:
        done, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds or done == 0:
            results = pipeline.run([images[(i + k) % len(images)] for k in range(bs)])
            assert all("embedding" in r for r in results)
            i, done = i + bs, done + bs
        rates[bs] = done / (time.perf_counter() - start)
        print(f"bare loop batch={bs}: {rates[bs]:.1f} img/s", flush=True)
    return rates


# -- the load client (its own process) ---------------------------------------------------------------------------


def multipart(image: bytes, fields: dict[str, str] | None = None) -> bytes:
    """A multipart/form-data body with the photo as `image` (built once, so the client spends no CPU on it)."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def bodies(kind: str, images: list[bytes], dim: int) -> tuple[list[bytes], str]:
    """Pre-encoded request bodies of one kind and their content type."""
    if kind == "search_vector":
        return ([json.dumps({"vector": v.tolist(), "top_k": 10}).encode() for v in clustered_vectors(512, dim, 1)],
                "application/json")
    fields = {"top_k": "10"} if kind == "search_image" else None
    return [multipart(i, fields) for i in images], f"multipart/form-data; boundary={BOUNDARY}"


async def _load(url: str, payloads: list[bytes], ctype: str, concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` workers send back-to-back requests for `seconds`; latency, errors, client CPU."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            k = w
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                async with session.post(url, data=payloads[k % len(payloads)],
                                        headers={"content-type": ctype}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors[resp.status] = errors.get(resp.status, 0) + 1
                latencies.append(time.perf_counter() - start)
                k += concurrency

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {**load_summary(latencies, elapsed, sum(errors.values())), "client_cpu": cpu / elapsed,
            "statuses": errors, "elapsed": elapsed}


def client_run(url: str, payloads: list[bytes], ctype: str, concurrency: int, seconds: float) -> dict:
    """One load level, in the client process."""
    return asyncio.run(_load(url, payloads, ctype, concurrency, seconds))


# -- server CPU by role -------------------------------------------------------------------------------------------


def role(proc) -> str:
    """A process's part in the serving path, from its Ray process title or command line."""
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001 - gone
        return "gone"
    for key, name in (("ProxyActor", "proxy"), ("Ingress", "ingress"), ("Encoder", "encoder"),
                      ("Index", "index"), ("ServeController", "controller"), ("serve_peer", "peer")):
        if key in title:
            return name
    return "ray daemons" if any(k in title for k in ("raylet", "gcs_server", "dashboard", "log_monitor",
                                                      "runtime_env", "monitor.py")) else "other"


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of `pid` and its descendants, summed by role."""
    import psutil

    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            t = proc.cpu_times()
            name = "cli/driver" if proc.pid == pid and role(proc) == "other" else role(proc)
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


# -- the servers under test ---------------------------------------------------------------------------------------


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=10) as resp:
                if resp.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}{path} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 180) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(name: str, proc: subprocess.Popen, url: str, kinds: list[str], levels: list[int], seconds: float,
            pool, payloads: dict) -> dict:
    """Every kind × level against one server: load summaries and the server's CPU seconds per role."""
    results: dict = {}
    for kind in kinds:
        data, ctype = payloads[kind]
        pool.submit(client_run, url + ROUTES[kind], data, ctype, 2, min(3.0, seconds)).result()  # warm-up
        for c in levels:
            before, machine = tree_cpu(proc.pid), busy_cpu()
            r = pool.submit(client_run, url + ROUTES[kind], data, ctype, c, seconds).result()
            after, machine = tree_cpu(proc.pid), busy_cpu() - machine
            r["server_cpu"] = {k: (after.get(k, 0.0) - before.get(k, 0.0)) for k in after}
            # What the rest of the machine took meanwhile (other users of a shared machine): the noise floor.
            r["others_cpu"] = max(0.0, machine - sum(r["server_cpu"].values()) - r["client_cpu"] * r["elapsed"]
                                  ) / r["elapsed"]
            results[(kind, c)] = r
            print(f"{name} {kind} c={c}: {r['rps']:.1f} req/s p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms "
                  f"client cpu {r['client_cpu']:.2f} others {r['others_cpu']:.2f} errors {r['statuses']}; "
                  f"server CPU ms/request {cpu_split(r)}",
                  flush=True)
    return results


def server_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["RAY_ADDRESS"] = "local"  # its own Ray instance: never another `ray start` cluster on this machine
    return env


def run_peer(config: str, overrides: list[str], model_dir: Path, **kw) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "serve_peer.py"), "--config", config,
                             "--model-dir",
                             str(model_dir), "--port", str(port), *[a for o in overrides for a in ("--set", o)]],
                            env=server_env())
    try:
        wait_ready(f"http://127.0.0.1:{port}", "/healthz", proc)
        return measure("peer", proc, f"http://127.0.0.1:{port}", **kw)
    finally:
        stop(proc)


def run_ootd(config: str, overrides: list[str], model_dir: Path, extra: list[str], **kw) -> dict:
    """`ootd serve --config <config>` as a user runs it (plus only the store paths and a free port)."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("ootd")), "serve", "--config", config, "--model-dir", str(model_dir),
           *[a for o in [*overrides, f"serve.port={port}", *extra] for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, env=server_env())
    try:
        wait_ready(f"http://127.0.0.1:{port}", "/readyz", proc)
        return measure("ootd", proc, f"http://127.0.0.1:{port}", **kw)
    finally:
        stop(proc)


# -- report -------------------------------------------------------------------------------------------------------


def cell(r: dict) -> str:
    errors = f" ({r['errors']} errors)" if r["errors"] else ""
    return f"{r['rps']:.1f}{errors} | {r['p50']:.0f} | {r['p99']:.0f} | {r['client_cpu']:.2f} | {r['others_cpu']:.2f}"


def cpu_split(r: dict) -> str:
    """Server CPU milliseconds per request: the total, then by role (largest first)."""
    per = {k: 1000 * v / max(r["n"], 1) for k, v in r["server_cpu"].items()}
    return f"{sum(per.values()):.1f} (" + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.2) + ")"


def report(args, kinds, levels, ceiling, peer, ootd, load, store: str = "lite") -> list[str]:
    where = "Milvus Lite file" if store == "lite" else "Milvus 2.3.5 standalone server (PyPI `milvus`, same machine)"
    lines = [f"## serve_load ({args.backbone} encoder, config {args.config}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs, {args.duration:.0f} s per level, {args.photos} photos of {args.photo_size} "
             f"px, index of {args.index_size:,} vectors in a {where})", ""]
    best = max(ceiling.values()) if ceiling else None
    if ceiling:
        lines += ["Bare `OutfitPipeline.run` loop (ceiling), img/s by batch size: "
                  + ", ".join(f"{b}: {v:.1f}" for b, v in ceiling.items()) + f"; best {best:.1f}.", ""]
    blank = "- | - | - | - | -"
    for kind in kinds:
        with_ceiling = kind == "embed" and best
        lines += [f"### {TITLES[kind]}", "",
                  "| concurrency | peer req/s | p50 ms | p99 ms | client CPU | others' CPU | ootd req/s | p50 ms | "
                  "p99 ms | client CPU | others' CPU | ootd / peer |" + (" ootd / ceiling |" if with_ceiling else ""),
                  "|---:" * (12 + bool(with_ceiling)) + "|"]
        for c in levels:
            p, o = peer.get((kind, c)), ootd.get((kind, c))
            row = f"| {c} | {cell(p) if p else blank} | {cell(o) if o else blank} | "
            row += f"{o['rps'] / p['rps']:.2f} |" if p and o else "- |"
            if with_ceiling:
                row += f" {o['rps'] / best:.2f} |" if o else " - |"
            lines.append(row)
        lines.append("")
        if ootd:
            top = max(levels)
            lines += [f"Server CPU ms per request at concurrency {top}: ootd " + cpu_split(ootd[(kind, top)])
                      + (f"; peer {cpu_split(peer[(kind, top)])}" if peer else "") + ".", ""]
    lines += ["Client CPU: the load client's CPU seconds per wall second (one asyncio + aiohttp process, "
              "pre-encoded bodies). Others' CPU: cores the rest of the machine used meanwhile (other users of a "
              "shared machine): the noise under that row.",
              f"ootd: `ootd serve --config {args.config}` with its shipped defaults on its own local Ray instance; "
              "peer: `benchmarks/serve_peer.py`.", "",
              f"Load average (1 min) at start {load[0]:.1f}, at end {load[1]:.1f}: the client, the servers and "
              "anything else on the machine share its cores; compare within one run only.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["tiny", "vit-b-16"], default="tiny")
    parser.add_argument("--config", default=None, help="built-in config of peer and ootd (default: tiny for the "
                                                       "tiny backbone, default for vit-b-16)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrency levels")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per level")
    parser.add_argument("--index-size", type=int, default=20_000, help="vectors in the searched collection")
    parser.add_argument("--photos", type=int, default=52, help="distinct synthetic photos sent")
    parser.add_argument("--photo-size", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8,16", help="bare-loop batch sizes tried for the ceiling")
    parser.add_argument("--kinds", default="embed,search_image,search_vector")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: bare, peer, ootd")
    parser.add_argument("--stores", default="lite", help="comma-separated Milvus backends searched, one after the "
                        "other in this run: lite (a Milvus Lite file) and/or standalone (a local milvus-server)")
    parser.add_argument("--set", action="append", default=[], dest="extra",
                        help="extra override for ootd only (experiments; the published table uses none)")
    parser.add_argument("--out", default=None, help="default: results/serve_load.md, or "
                        "results/serve_load_milvus_backends.md when --stores names a server")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    skip = set(filter(None, args.skip.split(",")))
    stores = [s for s in args.stores.split(",") if s]
    if set(stores) - {"lite", "standalone"}:
        parser.error(f"--stores takes lite and/or standalone, got {args.stores!r}")
    args.out = args.out or str(REPO / "benchmarks" / "results" / (
        "serve_load.md" if stores == ["lite"] else "serve_load_milvus_backends.md"))
    args.config = args.config or ("tiny" if args.backbone == "tiny" else "default")

    from ootd.config import load_config
    from ootd.model.modeldir import model_info
    from ootd.store.standalone import LocalMilvus

    work = Path(tempfile.mkdtemp(prefix="ootd-serve-load-"))
    overrides = [f"store.uri={work / 'milvus.db'}", f"store.media={work / 'media'}", f"data.workdir={work}"]
    cfg = load_config(args.config, overrides)
    model_dir = export_model(args.backbone, cfg.model, work / "models")
    version, _ = model_info(model_dir)
    images = photos(args.photos, args.photo_size)
    payloads = {k: bodies(k, images, cfg.model.embed_dim) for k in kinds}

    load_start = os.getloadavg()[0]
    ceiling = {}
    if "bare" not in skip and "embed" in kinds:
        # In a worker thread, as both servers run the pipeline: torch in this process's main thread ran up to 18x
        # slower on a busy machine (its OpenMP team waits on descheduled threads), which no server sees.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            ceiling = thread.submit(bare_loop, cfg, model_dir, images, [int(b) for b in args.batch_sizes.split(",")],
                                    args.duration).result()
    kw = {"kinds": kinds, "levels": levels, "seconds": args.duration, "payloads": payloads}
    lines = []
    for store in stores:
        with contextlib.ExitStack() as stack:
            if store == "standalone":
                server = stack.enter_context(LocalMilvus(work / "standalone"))
                overrides = [f"store.uri={server.uri}", *overrides[1:]]
                cfg = load_config(args.config, overrides)
            fill_index(cfg, version, args.index_size)
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")))
            peer = {} if "peer" in skip else run_peer(args.config, overrides, model_dir, pool=pool, **kw)
            ootd = {} if "ootd" in skip else run_ootd(args.config, overrides, model_dir, args.extra, pool=pool, **kw)
        lines += report(args, kinds, levels, ceiling, peer, ootd, (load_start, os.getloadavg()[0]), store)
        ceiling = {}  # reported once, above the first backend
    text = "\n".join(lines)
    print(text)
    if args.extra or skip - {"bare"}:
        return 0  # an experiment: the published tables compare the shipped defaults with the peer
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.backbone == "tiny" or not out.exists():
        out.write_text(text)
    else:
        out.write_text(out.read_text().rstrip() + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
