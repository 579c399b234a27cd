"""MilvusStore against a real Milvus Lite file and a real `milvus-lite server`: rows, search, filters, alias swaps."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_port

from ootd.store.milvus import Hit, MilvusStore
from ootd.store.rows import check_row, filter_expr
from ootd.styles import STYLES
from tests.conftest import reset_milvus

DIM = 16


def sha(n: int) -> str:
    return hashlib.sha256(f"outfit-{n}".encode()).hexdigest()


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_rows(vectors: np.ndarray, start: int = 0, styles=STYLES) -> list[dict]:
    return [
        {"id": sha(start + i), "embedding": vec, "style": styles[(start + i) % len(styles)],
         "source": f"photos/{start + i}.jpg", "box": [i, i + 1, i + 10, i + 20], "meta": {"n": start + i}}
        for i, vec in enumerate(vectors)
    ]  # fmt: skip


@pytest.fixture(params=["lite", "server", "standalone"])
def store(request, tmp_path):
    """A store on a Milvus Lite file, a `milvus-lite server` and a Milvus standalone server, same tests for all."""
    uri = {"lite": lambda: str(tmp_path / "m.db"), "server": lambda: request.getfixturevalue("milvus_server"),
           "standalone": lambda: reset_milvus(request.getfixturevalue("milvus_standalone"))}[request.param]()
    s = MilvusStore(uri, dim=DIM, search_ef=32)
    yield s
    s.close()


@pytest.fixture()
def live(store):
    """A store with a live collection of 26 rows (2 per style)."""
    name = store.ensure_collection("v1")
    store.upsert(make_rows(unit(np.random.default_rng(0), 26)), collection=name)
    store.swap_alias(name)
    return store


def test_ensure_collection_is_idempotent_and_versions_listed(store):
    assert store.live_collection() is None and store.model_version() is None
    assert store.ensure_collection("v20261123t193000_ab12cd") == "ootd_v20261123t193000_ab12cd"
    assert store.ensure_collection("v20261123t193000_ab12cd") == "ootd_v20261123t193000_ab12cd"
    store.ensure_collection("v20261124t000000_ffffff")
    assert store.list_versions() == ["v20261123t193000_ab12cd", "v20261124t000000_ffffff"]
    assert store.count("ootd_v20261123t193000_ab12cd") == 0


def test_bad_names_and_dim_mismatch(store, tmp_path):
    with pytest.raises(ValueError, match="model version"):
        store.ensure_collection("v1; drop")
    with pytest.raises(ValueError, match="model version"):
        MilvusStore.collection_name("v-1")
    store.ensure_collection("v1")
    other = MilvusStore(store.uri, dim=DIM * 2)
    try:
        with pytest.raises(ValueError, match="16-d"):
            other.ensure_collection("v1")
    finally:
        other.close()


def test_no_alias_is_a_clear_lookup_error(store):
    store.ensure_collection("v1")
    for call in (lambda: store.count(), lambda: store.search(unit(np.random.default_rng(1), 1), 3),
                 lambda: store.upsert(make_rows(unit(np.random.default_rng(1), 1))), lambda: store.get([sha(0)])):
        with pytest.raises(LookupError, match="ootd index"):
            call()


def test_upsert_get_delete_count(live):
    rng = np.random.default_rng(2)
    assert live.count() == 26
    assert live.count_by_style() == {s: 2 for s in STYLES}
    # Re-upserting an id replaces its row: count unchanged, new values visible.
    new_vec = unit(rng, 1)[0]
    row = {"id": sha(3), "embedding": new_vec, "style": "", "source": "s3", "box": (1, 2, 3, 4), "meta": {"k": [1]},
           "created_at": 1_700_000_000}
    assert live.upsert([row]) == 1
    assert live.count() == 26
    (got,) = live.get([sha(3)])
    assert got["style"] == "" and got["source"] == "s3" and got["box"] == (1, 2, 3, 4)
    assert got["meta"] == {"k": [1]} and got["created_at"] == 1_700_000_000
    np.testing.assert_allclose(got["embedding"], new_vec, atol=1e-6)
    assert live.count_by_style()[""] == 1
    # get keeps request order and skips unknown ids.
    assert [r["id"] for r in live.get([sha(5), sha(999), sha(4)])] == [sha(5), sha(4)]
    # delete reports only rows that existed; count follows at once.
    assert live.delete([sha(4), sha(5), sha(999)]) == 2
    assert live.count() == 24
    assert live.get([sha(4)]) == []
    assert live.delete([]) == 0
    # A repeated id inside one batch keeps the last row.
    a, b = unit(rng, 2)
    assert live.upsert([{"id": sha(100), "embedding": a}, {"id": sha(100), "embedding": b, "style": "Chic"}]) == 1
    (got,) = live.get([sha(100)])
    assert got["style"] == "Chic" and got["box"] == (0, 0, 0, 0) and got["created_at"] > 1_700_000_000
    np.testing.assert_allclose(got["embedding"], b, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"id": "ABC"}, "sha256"),
        ({"id": sha(1).upper()}, "sha256"),
        ({"embedding": [0.1] * (DIM - 1)}, "expected 16 floats"),
        ({"embedding": [float("nan")] * DIM}, "NaN"),
        ({"embedding": [0.0] * DIM}, "all zeros"),
        ({"embedding": "x"}, "expected 16 floats|not a vector"),
        ({"style": "Goth"}, "unknown style"),
        ({"box": [1, 2, 3]}, "box"),
        ({"box": [5, 5, 1, 1]}, "box"),
        ({"box": "abcd"}, "box"),
        ({"meta": "x"}, "meta"),
        ({"meta": {"a": float("inf")}}, "meta"),
        ({"source": "x" * 3000}, "source"),
        ({"created_at": -1}, "created_at"),
        ({"det_score": 0.3}, "unknown keys"),
    ],
)
def test_check_row_rejects_bad_values(change, message):
    row = {**make_rows(unit(np.random.default_rng(3), 1))[0], **change}
    with pytest.raises(ValueError, match=message):
        check_row(0, row, DIM, now=0)


def test_check_row_fills_defaults():
    vec = unit(np.random.default_rng(3), 1)[0]
    row = check_row(0, {"id": sha(1), "embedding": vec, "style": None, "box": np.array([1, 2, 3, 4])}, DIM, now=7)
    assert row == {"id": sha(1), "embedding": pytest.approx(vec.tolist()), "style": "", "source": "",
                   "box": [1, 2, 3, 4], "created_at": 7, "meta": {}}


def test_filter_expr_is_built_from_validated_values_only():
    assert filter_expr(None, None) == "" and filter_expr([], []) == ""
    assert filter_expr(["Retro", "Chic", "Chic"], [sha(2)]) == f'style in ["Chic", "Retro"] and id not in ["{sha(2)}"]'
    for styles, ids, message in [
        (['Chic" or id != "'], None, "unknown style"),
        (["chic"], None, "unknown style"),
        ("Chic", None, "not one string"),
        (None, ['x" or 1==1 or id=="'], "sha256"),
        (None, sha(1), "not one string"),
    ]:
        with pytest.raises(ValueError, match=message):
            filter_expr(styles, ids)


def test_bad_row_in_a_batch_writes_nothing(live):
    rows = make_rows(unit(np.random.default_rng(3), 3), start=200)
    rows[2] = {**rows[2], "style": "Goth"}
    with pytest.raises(ValueError, match="row 2 .*unknown style"):
        live.upsert(rows)
    assert live.count() == 26
    assert live.get([rows[0]["id"]]) == []


def test_search_batch_sorted_and_identical_vector_scores_one(live):
    rows = live.get([sha(i) for i in range(26)])
    queries = np.stack([r["embedding"] for r in rows[:5]])
    results = live.search(queries, top_k=4)
    assert len(results) == 5
    for row, hits in zip(rows[:5], results, strict=True):
        assert len(hits) == 4 and all(isinstance(h, Hit) for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].id == row["id"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert (hits[0].style, hits[0].source, hits[0].box, hits[0].meta) == (
            row["style"], row["source"], row["box"], row["meta"])
    # A single (dim,) vector and plain lists are accepted.
    assert live.search(queries[0].tolist(), top_k=1)[0][0].id == rows[0]["id"]
    assert live.search(np.zeros((0, DIM)), top_k=3) == []


def test_search_filters(live):
    rows = live.get([sha(i) for i in range(26)])
    q = rows[0]["embedding"]
    (hits,) = live.search(q, top_k=26, exclude_ids=[sha(0), sha(1)])
    assert len(hits) == 24 and {sha(0), sha(1)}.isdisjoint(h.id for h in hits)
    (hits,) = live.search(q, top_k=26, styles=["Chic", "Retro"])
    assert sorted(h.style for h in hits) == ["Chic", "Chic", "Retro", "Retro"]
    (hits,) = live.search(q, top_k=26, styles=["Chic"], exclude_ids=[r["id"] for r in rows if r["style"] == "Chic"][:1])
    assert [h.style for h in hits] == ["Chic"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"styles": ['Chic" or id != "']}, "unknown style"),
        ({"exclude_ids": ['x" or 1==1 or id=="']}, "sha256"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 100_000}, "top_k"),
    ],
)
def test_bad_search_arguments_raise(live, kwargs, message):
    args = {"top_k": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        live.search(unit(np.random.default_rng(4), 1), **args)


def test_bad_query_vectors_raise(live):
    with pytest.raises(ValueError, match=r"\(Q, 16\)"):
        live.search(np.ones((2, DIM + 1)), top_k=3)
    with pytest.raises(ValueError, match="NaN"):
        live.search(np.full((1, DIM), np.nan), top_k=3)


def test_alias_swap_readers_see_one_version_at_a_time(live):
    reader = MilvusStore(live.uri, dim=DIM)
    try:
        v1_ids = {sha(i) for i in range(26)}
        v2 = live.ensure_collection("v2")
        v2_rows = make_rows(unit(np.random.default_rng(5), 10), start=1000)
        live.upsert(v2_rows[:5], collection=v2)
        q = unit(np.random.default_rng(6), 3)
        # Half-built v2 is invisible through the alias.
        assert reader.live_collection() == "ootd_v1" and reader.model_version() == "v1"
        assert reader.count() == 26
        assert all(h.id in v1_ids for hits in reader.search(q, top_k=30) for h in hits)
        live.upsert(v2_rows[5:], collection=v2)
        live.swap_alias(v2)
        assert reader.model_version() == "v2" and reader.count() == 10
        hits = reader.search(q, top_k=30)
        assert all(len(h) == 10 for h in hits)
        v2_ids = {r["id"] for r in v2_rows}
        assert all(h.id in v2_ids for hs in hits for h in hs)
        # Writes through the alias now land in v2 only; v1 is untouched and can be dropped once not live.
        reader.upsert(make_rows(unit(np.random.default_rng(7), 1), start=2000))
        assert reader.count() == 11 and reader.count("ootd_v1") == 26
        with pytest.raises(ValueError, match="live"):
            live.drop_collection(v2)
        live.drop_collection("ootd_v1")
        assert live.list_versions() == ["v2"]
        live.drop_collection("ootd_v1")  # missing: no-op
    finally:
        reader.close()


def test_swap_to_missing_collection_raises(live):
    with pytest.raises(ValueError, match="no such collection"):
        live.swap_alias("ootd_nope")
    assert live.live_collection() == "ootd_v1"


def test_from_config_uses_the_store_section(tiny_config, tmp_path):
    from ootd.config import with_overrides

    cfg = with_overrides(tiny_config, [f"store.uri={tmp_path / 'cfg' / 'milvus.db'}", "store.alias=live_one"])
    with MilvusStore.from_config(cfg.store, dim=DIM) as s:
        assert (s.alias, s.dim, s.search_ef) == ("live_one", DIM, cfg.store.search_ef)
        name = s.ensure_collection("v1")
        vectors = unit(np.random.default_rng(9), 3)
        s.upsert(make_rows(vectors), collection=name)
        s.flush(name)
        # An explicit collection is searchable before any alias exists.
        assert s.search(vectors, top_k=1, collection=name)[1][0].id == sha(1)
        s.swap_alias(name)
        assert s.live_collection() == name and s.count() == 3
    assert (tmp_path / "cfg" / "milvus.db").is_dir()


def test_ping(store):
    assert store.ping()


def test_uri_validation(tmp_path):
    with pytest.raises(ValueError, match="end in .db"):
        MilvusStore(str(tmp_path / "milvus"))
    with pytest.raises(ValueError, match="unsupported"):
        MilvusStore("ftp://host/x")
    with pytest.raises(ValueError, match="alias"):
        MilvusStore(str(tmp_path / "m.db"), alias="bad alias")


def test_lite_file_persists_and_is_released_on_close(tmp_path):
    path = tmp_path / "nested" / "dir" / "m.db"  # parent dirs are created
    vectors = unit(np.random.default_rng(8), 5)
    with MilvusStore(str(path), dim=DIM) as s:
        name = s.ensure_collection("v1")
        s.upsert(make_rows(vectors), collection=name)
        s.swap_alias(name)
    # Reopened (the file comes back with its collections released), searches load the live one again.
    with MilvusStore(str(path), dim=DIM) as s:
        assert s.search(vectors[2], top_k=1)[0][0].id == sha(2)
    # Another process can open the file once this one closed it, and sees the same data.
    code = (
        "import sys; from ootd.store.milvus import MilvusStore\n"
        f"s = MilvusStore({str(path)!r}, dim={DIM})\n"
        f"print(s.model_version(), s.count(), s.search({vectors[3].tolist()!r}, 1)[0][0].id); s.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["v1", "5", sha(3)]


def test_lite_file_held_by_another_process_is_a_clear_error(tmp_path):
    path = tmp_path / "m.db"
    code = (
        "import sys; from ootd.store.milvus import MilvusStore\n"
        f"s = MilvusStore({str(path)!r}, dim={DIM}); print('open', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ConnectionError, match="one process at a time"):
            MilvusStore(str(path), dim=DIM)
    finally:
        holder.communicate(input="", timeout=60)
    # Once the holder exits the file opens here.
    with MilvusStore(str(path), dim=DIM) as s:
        assert s.ping()


def test_unreachable_server_is_a_connection_error():
    with pytest.raises(ConnectionError, match="cannot reach Milvus"):
        MilvusStore(f"http://127.0.0.1:{free_port()}")


def test_stopping_a_process_group_waits_for_members_that_ignore_sigterm():
    """A restarted Milvus standalone died on a port its old server still held: `stop_group` must return only
    once every process of the group is gone, the ones that ignore SIGTERM included."""
    from ootd.store.standalone import group_running, stop_group

    script = "trap '' TERM; sleep 60 & sleep 60 & wait"  # the shell and its children all ignore SIGTERM
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_running(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(group_running(proc.pid)) == 3
    stop_group(proc, grace=0.5)
    assert group_running(proc.pid) == [] and proc.returncode is not None
