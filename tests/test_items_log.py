"""The items log on a real filesystem, and the Index's group commit and replay on a real Milvus Lite file."""

from __future__ import annotations

import asyncio
import hashlib
import os

import numpy as np
import pytest

from ootd.config import with_overrides
from ootd.store.items_log import ItemsLog, delete_entry, upsert_entry


def sha(n: int) -> str:
    return hashlib.sha256(f"item-{n}".encode()).hexdigest()


def row(n: int, dim: int = 128, style: str = "Chic") -> dict:
    vec = np.random.default_rng(n).normal(size=dim)
    outfit = {"box": [1, 2, 30, 40], "det_score": 0.9, "n_garments": 2, "fallback": False, "width": 64, "height": 80}
    return {"id": sha(n), "embedding": (vec / np.linalg.norm(vec)).tolist(), "style": style,
            "source": f"upload:{n}", "box": [1, 2, 30, 40], "meta": {"n": n, "outfit": outfit}}


# -- the log (fast) -------------------------------------------------------------------------------------------------


def test_append_fsyncs_once_per_append_and_reads_back_the_crops_contract(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = ItemsLog(tmp_path / "log")
    seqs = log.append([upsert_entry(row(1), b"jpeg-1", "v1"), upsert_entry(row(2), b"jpeg-2", "v1")])
    file_syncs = len(synced)
    log.append([delete_entry(sha(1))])
    assert seqs[0] < seqs[1] and len(synced) - file_syncs == 1  # one fsync per append, however many records
    entries = list(ItemsLog(tmp_path / "log").entries())
    assert [(e["op"], e["image_id"]) for e in entries] == [("upsert", sha(1)), ("upsert", sha(2)), ("delete", sha(1))]
    first = entries[0]
    assert first["crop"] == b"jpeg-1" and first["model_version"] == "v1" and first["style"] == "Chic"
    assert (first["width"], first["height"], first["box"], first["n_garments"]) == (64, 80, [1, 2, 30, 40], 2)
    assert first["det_score"] == 0.9 and first["fallback"] is False and first["source"] == "upload:1"
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)


def test_latest_op_per_id_wins_across_writers_and_restarts(tmp_path):
    first = ItemsLog(tmp_path)
    first.append([upsert_entry(row(1), b"a", "v1"), upsert_entry(row(2), b"b", "v1")])
    first.close()
    second = ItemsLog(tmp_path)  # a restarted replica: a new segment
    second.latest()
    second.append([delete_entry(sha(1)), upsert_entry(row(2, style="Retro"), b"c", "v1")])
    assert len(second.segments()) == 2
    latest = ItemsLog(tmp_path).latest()
    assert latest[sha(1)]["op"] == "delete"
    assert latest[sha(2)]["style"] == "Retro" and latest[sha(2)]["crop"] == b"c"


def test_a_torn_last_record_and_a_corrupt_one_are_skipped(tmp_path):
    log = ItemsLog(tmp_path)
    log.append([upsert_entry(row(n), b"x", "v1") for n in range(3)])
    (segment,) = log.segments()
    data = segment.read_bytes()
    lines = data.split(b"\n")
    corrupt = lines[1][:-3] + b"zz}"  # same length, checksum no longer matches
    segment.write_bytes(b"\n".join([lines[0], corrupt, lines[2]]) + b"\n" + lines[0][: len(lines[0]) // 2])
    ids = [e["image_id"] for e in ItemsLog(tmp_path).entries()]
    assert ids == [sha(0), sha(2)]


def test_bad_records_are_refused_before_anything_is_written(tmp_path):
    log = ItemsLog(tmp_path)
    with pytest.raises(ValueError, match="op"):
        log.append([upsert_entry(row(1), b"x", "v1"), {"op": "merge", "image_id": sha(2)}])
    with pytest.raises(ValueError, match="sha256"):
        log.append([delete_entry("../etc/passwd")])
    assert list(log.entries()) == []


# -- the Index's write path on Milvus Lite (in-process, no Serve) -------------------------------------------------


@pytest.fixture()
def core_config(tiny_config, tmp_path):
    return with_overrides(tiny_config, [f"store.uri={tmp_path / 'm.db'}", f"store.media={tmp_path / 'media'}",
                                        f"data.workdir={tmp_path}"])


def _live_core(cfg, **kwargs):
    from ootd.serve.index_deployment import IndexCore

    core = IndexCore(cfg, **kwargs)
    if core.store.live_collection() is None:
        core.store.swap_alias(core.store.ensure_collection("v1"))
    return core


def _write(op: str, n: int, version: str = "v1"):
    from ootd.serve.index_deployment import _Write

    if op == "delete":
        return _Write("delete", sha(n))
    return _Write("upsert", sha(n), row=row(n), crop=f"jpeg-{n}".encode(), model_version=version)


def test_group_commit_merges_concurrent_writes_and_acknowledges_each(core_config):
    async def burst(core, writes):
        return await asyncio.gather(*(core.submit(w) for w in writes))

    grouped = _live_core(core_config)
    try:
        results = asyncio.run(burst(grouped, [_write("upsert", n) for n in range(24)]))
        assert results == [{"written": 1}] * 24 and grouped.commits < 24
        mixed = asyncio.run(burst(grouped, [_write("delete", 0), _write("upsert", 0), _write("delete", 1),
                                            _write("delete", 99), _write("upsert", 5, version="v0")]))
        assert mixed[:4] == [{"deleted": 1}, {"written": 1}, {"deleted": 1}, {"deleted": 0}]
        assert mixed[4]["status"] == 503 and "model v1" in mixed[4]["error"]  # only the mismatched write fails
        assert {r["id"] for r in grouped.store.get([sha(n) for n in range(24)])} == {sha(n) for n in range(24)} - {
            sha(1)}
        assert grouped.media.get(sha(0)) == b"jpeg-0" and not grouped.media.exists(sha(1))
        latest = grouped.items_log.latest()
        assert latest[sha(0)]["op"] == "upsert" and latest[sha(1)]["op"] == "delete" and sha(5) in latest
        assert latest[sha(5)]["model_version"] == "v1"  # the refused v0 write was never logged
    finally:
        grouped.store.close()

    single = _live_core(core_config, group_commit=False)
    try:
        before = single.commits
        asyncio.run(burst(single, [_write("upsert", n) for n in range(30, 36)]))
        assert single.commits - before == 6
    finally:
        single.store.close()


def test_replay_restores_what_milvus_lost_and_removes_what_was_deleted(core_config):
    core = _live_core(core_config)
    try:
        core.commit([_write("upsert", n) for n in range(5)] + [_write("delete", 4)])
        # Milvus loses an acknowledged upsert and regains a deleted row (what a corrupt Lite WAL does).
        core.store.delete([sha(0)])
        core.store.upsert([row(4)])
        core.media.delete(sha(0))
    finally:
        core.store.close()
    restarted = _live_core(core_config)
    try:
        assert restarted.replayed == {"upserted": 1, "deleted": 1}
        assert {r["id"] for r in restarted.store.get([sha(n) for n in range(5)])} == {sha(n) for n in range(4)}
        assert restarted.media.get(sha(0)) == b"jpeg-0"
    finally:
        restarted.store.close()
    again = _live_core(core_config)
    try:
        assert again.replayed == {"upserted": 0, "deleted": 0}  # nothing left to do
    finally:
        again.store.close()


def test_one_bad_query_fails_only_itself_in_a_batched_search(core_config):
    core = _live_core(core_config)
    try:
        core.commit([_write("upsert", n) for n in range(6)])
        good = {"vector": row(2)["embedding"], "top_k": 3}
        bad = {"vector": [1e39] * 128, "top_k": 3}  # not float32: would fail the whole Milvus call
        zero = {"vector": [0.0] * 128, "top_k": 3}
        out = core.search_many([good, bad, good, zero, {**good, "styles": ["Retro"]}])
        assert out[0]["hits"][0]["id"] == sha(2) and out[2] == out[0]
        assert out[1]["status"] == 422 and "NaN or infinity" in out[1]["error"]
        assert out[3]["status"] == 422 and "zeros" in out[3]["error"]
        assert out[4]["hits"] == []  # no Retro rows: an empty answer, not an error
    finally:
        core.store.close()
