"""The items log on a real filesystem, and the Index's group commit and replay on a real Milvus Lite file."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

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


WRITER_SCRIPT = """
import sys
from ootd.store.items_log import ItemsLog, delete_entry
log = ItemsLog(sys.argv[1])
log.append([delete_entry(sys.argv[2])])
print("appended", flush=True)
sys.stdin.read()  # alive, holding its segment, until the test kills it
"""


def test_compaction_merges_dead_writers_keeps_the_latest_op_and_leaves_live_ones_alone(tmp_path):
    import signal
    import subprocess
    import sys

    first = ItemsLog(tmp_path)
    first.append([upsert_entry(row(n), b"old", "v1") for n in range(5)])
    first.append([upsert_entry(row(1, style="Retro"), b"new", "v1"), delete_entry(sha(2))])
    first.close()
    live = ItemsLog(tmp_path)
    live.append([upsert_entry(row(7), b"live", "v1")])
    # A real writer process, alive: its segment is held by its flock.
    writer = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), sha(3)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "appended"
        before = {k: (v["op"], v["seq"]) for k, v in ItemsLog(tmp_path).latest().items()}
        # Only the closed segment is sealed; rewritten alone because it holds superseded records.
        assert ItemsLog(tmp_path).compact() == {"segments": 1, "records": 7, "kept": 5}
        assert len(live.segments()) == 3
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    # Killed: the kernel dropped its lock, so its segment is sealed now, beside the closed one.
    stats = ItemsLog(tmp_path).compact()
    assert stats == {"segments": 2, "records": 6, "kept": 5}  # the writer's delete supersedes an upsert
    assert len(live.segments()) == 2  # the compacted one and the live writer's, untouched
    after = {k: (v["op"], v["seq"]) for k, v in ItemsLog(tmp_path).latest().items()}
    assert after == before and after[sha(2)][0] == "delete" and after[sha(3)][0] == "delete"  # tombstones kept
    assert ItemsLog(tmp_path).latest()[sha(1)]["crop"] == b"new"
    live.append([delete_entry(sha(7))])  # the live writer goes on appending to its own segment
    assert ItemsLog(tmp_path).latest()[sha(7)]["op"] == "delete"
    assert ItemsLog(tmp_path).compact()["segments"] == 0  # one sealed segment without superseded records


def test_a_compaction_killed_before_removing_the_old_segments_reads_each_record_once(tmp_path):
    log = ItemsLog(tmp_path)
    log.append([upsert_entry(row(n), b"x", "v1") for n in range(3)])
    log.close()
    (segment,) = log.segments()
    copy = tmp_path / segment.name.replace(".jsonl", "-copy.jsonl")
    copy.write_bytes(segment.read_bytes())  # what a kill between the rename and the unlinks leaves
    assert [e["image_id"] for e in ItemsLog(tmp_path).entries()] == [sha(0), sha(1), sha(2)]
    assert ItemsLog(tmp_path).compact()["kept"] == 3
    assert [e["image_id"] for e in ItemsLog(tmp_path).entries()] == [sha(0), sha(1), sha(2)]


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
        Path(core.media.path(sha(1))).write_bytes(b"")  # an unsynced crop a power loss cut short
    finally:
        core.store.close()
    restarted = _live_core(core_config)
    try:
        assert restarted.replayed == {"upserted": 1, "deleted": 1}
        assert {r["id"] for r in restarted.store.get([sha(n) for n in range(5)])} == {sha(n) for n in range(4)}
        assert restarted.media.get(sha(0)) == b"jpeg-0" and restarted.media.get(sha(1)) == b"jpeg-1"
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


@pytest.mark.parametrize("indexed_duplicates", [True, False])
def test_search_collapses_a_near_duplicate_group_to_its_best_hit(core_config, indexed_duplicates):
    from ootd.serve.index_deployment import _Write

    cfg = with_overrides(core_config, [f"store.index_near_duplicates={str(indexed_duplicates).lower()}"])
    core = _live_core(cfg)
    try:
        rep = row(1)
        reposts = []
        for n in (2, 3):  # two reposts of photo 1: near its vector, their meta naming it
            near = np.asarray(rep["embedding"]) + np.random.default_rng(n).normal(scale=0.01, size=128)
            reposts.append({**row(n), "embedding": (near / np.linalg.norm(near)).tolist(),
                            "meta": {"near_dup_of": sha(1)}})
        core.commit([_Write("upsert", r["id"], row=r, crop=b"x", model_version="v1")
                     for r in [rep, *reposts, *(row(n) for n in range(4, 10))]])
        query = {"vector": rep["embedding"], "top_k": 3}
        collapsed, everything = core.search_many([query, {**query, "collapse": False}])
        every_id = [h["id"] for h in everything["hits"]]
        assert every_id[0] == sha(1) and set(every_id) == {sha(1), sha(2), sha(3)}
        ids = [h["id"] for h in collapsed["hits"]]
        if indexed_duplicates:  # one hit of the group, then the next distinct outfits, still top_k of them
            assert ids[0] == sha(1) and not {sha(2), sha(3)} & set(ids) and len(ids) == 3
        else:  # a collection of representatives only: nothing to collapse, nothing over-fetched
            assert ids == every_id
    finally:
        core.store.close()
