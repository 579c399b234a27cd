"""Write throughput of the Index write path on Milvus Lite: group commit vs one commit per write vs the old path.

All three run side by side in one process on fresh Lite files, with the same rows and the same concurrency:
- `group commit`: `IndexCore.submit` (media, one items-log fsync and one Milvus call per merged group);
- `commit per write`: the same durable path with `group_commit=False` (one fsync and one Milvus call per write);
- `old (unsafe)`: concurrent `MilvusStore.upsert` calls per write with no log, as the Index did before: fast but
  it interleaves Milvus Lite's WAL, so after a kill the acknowledged rows are lost (shown by `lost after kill`).

`python benchmarks/write_durability.py --writes 200 --concurrency 16`
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ootd.config import load_config, with_overrides  # noqa: E402

DIM = 128


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    outfit = {"box": [0, 0, 64, 64], "det_score": 0.9, "n_garments": 2, "fallback": False, "width": 64, "height": 64}
    return [{"id": hashlib.sha256(f"bench-{seed}-{i}".encode()).hexdigest(), "embedding": v.tolist(), "style": "Chic",
             "source": f"bench:{i}", "box": [0, 0, 64, 64], "meta": {"outfit": outfit}} for i, v in enumerate(vectors)]


def config(root: Path):
    return with_overrides(load_config("tiny"), [f"store.uri={root / 'm.db'}", f"store.media={root / 'media'}",
                                                f"data.workdir={root}"])


def durable(root: Path, data: list[dict], concurrency: int, group: bool) -> dict:
    from ootd.serve.index_deployment import IndexCore, _Write

    core = IndexCore(config(root), group_commit=group)
    core.store.swap_alias(core.store.ensure_collection("v1"))
    crop = bytes(20_000)  # a typical crop JPEG's size

    async def run() -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(row: dict) -> None:
            async with gate:
                result = await core.submit(_Write("upsert", row["id"], row=row, crop=crop, model_version="v1"))
                assert result == {"written": 1}, result

        await asyncio.gather(*(one(r) for r in data))

    start = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - start
    core.store.close()
    return {"writes_per_s": len(data) / seconds, "commits": core.commits}


def old_path(root: Path, data: list[dict], concurrency: int) -> dict:
    from ootd.store.milvus import MilvusStore

    store = MilvusStore(str(root / "m.db"), dim=DIM)
    name = store.ensure_collection("v1")
    store.swap_alias(name)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda r: store.upsert([r], collection=name), data))
    seconds = time.perf_counter() - start
    store.close()
    return {"writes_per_s": len(data) / seconds, "commits": len(data)}


_KILLED_WRITER = """
import os, sys, json
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, {repo!r})
from benchmarks.write_durability import rows
from ootd.store.milvus import MilvusStore
store = MilvusStore({db!r}, dim=128)
name = store.ensure_collection("v1"); store.swap_alias(name)
data = rows({n})
with ThreadPoolExecutor({c}) as pool:
    list(pool.map(lambda r: store.upsert([r], collection=name), data))
os.kill(os.getpid(), 9)  # every upsert was acknowledged; no close, no flush
"""


def lost_after_kill(root: Path, n: int, concurrency: int) -> int:
    """Acknowledged rows the old path loses when its process is SIGKILLed (Milvus Lite WAL recovery)."""
    from ootd.store.milvus import MilvusStore

    db = str(root / "killed.db")
    subprocess.run([sys.executable, "-c", _KILLED_WRITER.format(repo=str(REPO), db=db, n=n, c=concurrency)],
                   capture_output=True, timeout=600)
    with MilvusStore(db, dim=DIM) as store:
        return n - len(store.get([r["id"] for r in rows(n)], collection="ootd_v1"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    data = rows(args.writes)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("group commit", lambda r: durable(r, data, args.concurrency, True)),
                          ("commit per write", lambda r: durable(r, data, args.concurrency, False)),
                          ("old (unsafe)", lambda r: old_path(r, data, args.concurrency))):
            root = Path(tmp) / name.replace(" ", "_").replace("(", "").replace(")", "")
            root.mkdir()
            results[name] = run(root)
        lost = lost_after_kill(Path(tmp), args.writes, args.concurrency)
    base = results["commit per write"]["writes_per_s"]
    print(f"{args.writes} upserts, {args.concurrency} concurrent, Milvus Lite")
    print(f"{'path':<18}{'writes/s':>10}{'commits':>9}{'vs per-write':>14}")
    for name, r in results.items():
        print(f"{name:<18}{r['writes_per_s']:>10.1f}{r['commits']:>9}{r['writes_per_s'] / base:>13.2f}x")
    print(f"old path, acknowledged rows lost after SIGKILL: {lost} of {args.writes}")
    print(json.dumps({"results": results, "old_lost_after_kill": lost}))


if __name__ == "__main__":
    main()
