"""Media store units, and the index job on a real Ray cluster with real Milvus Lite: alias, reruns, interruption."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ootd.config import absolute_paths, with_overrides
from ootd.index import run_index
from ootd.model.modeldir import model_info
from ootd.store.media import MediaStore
from tests.conftest import reset_milvus

CROPS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source", pa.string()), ("style", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("box", pa.list_(pa.int32())), ("det_score", pa.float32()), ("n_garments", pa.int32()),
    ("fallback", pa.bool_()), ("crop", pa.binary()),
])  # fmt: skip


def write_detected_crops(sample_dir: Path, crops_dir: Path, detect_cfg, crop_max_side: int, files: int = 2) -> Path:
    """An ingest-like crops table: the same decode → detector outfit box → crop → JPEG steps ingest runs.

    Returns:
        The crops folder (`files` parquet files).
    """
    from ootd.decode import decode, encode_jpeg, to_array
    from ootd.detect.boxes import crop_image
    from ootd.detect.yolo import Detector

    manifest = pd.read_parquet(sample_dir / "manifest.parquet")
    detector = Detector(detect_cfg)
    rows = []
    for _, item in manifest.iterrows():
        path = sample_dir / item["path"]
        data = path.read_bytes()
        image = decode(data, 40_000_000)
        (found,) = detector.outfit_boxes([to_array(image)])
        rows.append({
            "image_id": hashlib.sha256(data).hexdigest(), "source": str(path), "style": item["style"],
            "width": image.width, "height": image.height, "box": list(found.box), "det_score": found.score,
            "n_garments": found.n_garments, "fallback": found.fallback,
            "crop": encode_jpeg(crop_image(image, found.box), crop_max_side),
        })  # fmt: skip
    crops_dir.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(rows) // files)
    for i in range(files):
        pq.write_table(pa.Table.from_pylist(rows[i * per_file:(i + 1) * per_file], schema=CROPS_SCHEMA),
                       crops_dir / f"part-{i:03d}.parquet")
    return crops_dir


def export_tiny(tiny_config, out: Path, seed: int) -> Path:
    """A tiny encoder (random weights from `seed`) exported like a trained model."""
    import torch

    from ootd.model.encoder import StyleEncoder

    torch.manual_seed(seed)
    return StyleEncoder.from_config(tiny_config.model).export(out)


# -- media store (fast) -------------------------------------------------------------------------------------------


ID = hashlib.sha256(b"outfit").hexdigest()


@pytest.mark.parametrize("url", ["dir", "memory://ootd-media-test"])
def test_media_store_round_trip(tmp_path, url):
    store = MediaStore(tmp_path / "media" if url == "dir" else url)
    assert not store.exists(ID)
    with pytest.raises(KeyError):
        store.get(ID)
    store.put(ID, b"jpeg bytes")
    assert store.exists(ID) and store.get(ID) == b"jpeg bytes"
    store.put(ID, b"replaced")
    assert store.get(ID) == b"replaced"
    assert store.delete(ID) is True
    assert store.delete(ID) is False
    assert not store.exists(ID)


@pytest.mark.parametrize("bad", ["../../etc/passwd", ID.upper(), ID[:-1], ID + "0", "", None, f"{ID[:62]}/x"])
def test_media_store_rejects_ids_that_are_not_sha256(tmp_path, bad):
    store = MediaStore(tmp_path / "media")
    for call in (lambda: store.put(bad, b"x"), lambda: store.get(bad), lambda: store.exists(bad),
                 lambda: store.delete(bad)):
        with pytest.raises(ValueError, match="sha256"):
            call()
    assert list((tmp_path / "media").iterdir()) == []  # nothing was written anywhere


def test_media_store_layout_and_empty_data(tmp_path):
    store = MediaStore(tmp_path / "media")
    store.put(ID, b"x")
    assert (tmp_path / "media" / ID[:2] / f"{ID}.jpg").read_bytes() == b"x"
    with pytest.raises(ValueError, match="non-empty"):
        store.put(ID, b"")
    assert store.get(ID) == b"x"  # the failed write lost nothing
    with pytest.raises(ValueError, match="empty"):
        MediaStore("")


def test_absolute_paths_fixes_relative_store_paths(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(with_overrides(tiny_config, ["store.uri=runs/m.db", "store.media=runs/media",
                                                      "data.workdir=runs"]))
    assert cfg.store.uri == str(tmp_path / "runs" / "m.db")
    assert cfg.store.media == str(tmp_path / "runs" / "media")
    assert cfg.data.workdir == str(tmp_path / "runs")
    served = absolute_paths(with_overrides(tiny_config, ["store.uri=http://127.0.0.1:19530", "store.media=s3://b/m"]))
    assert served.store.uri == "http://127.0.0.1:19530" and served.store.media == "s3://b/m"


def test_model_info_names_the_fix_for_a_non_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="ootd_model.json"):
        model_info(tmp_path)
    (tmp_path / "ootd_model.json").write_text(json.dumps({"embed_dim": 128}))
    with pytest.raises(ValueError, match="version"):
        model_info(tmp_path)


# -- index job (slow: Ray Data actors, Milvus Lite) ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["lite", "standalone"])
def indexed(request, ray_session, tiny_config, synthetic_set, tmp_path_factory):
    """Two tiny models, an ingest-like crops table and a config on a fresh Milvus Lite file or an emptied Milvus
    standalone server (where a plain insert of an existing key would duplicate it: the reruns check upsert)."""
    root = tmp_path_factory.mktemp("index")
    uri = (str(root / "milvus.db") if request.param == "lite"
           else reset_milvus(request.getfixturevalue("milvus_standalone")))
    cfg = with_overrides(tiny_config, [f"store.uri={uri}", f"store.media={root / 'media'}",
                                       f"data.workdir={root}", "detect.num_cpus=0.25"])
    crops = write_detected_crops(synthetic_set, root / "crops", cfg.detect, cfg.data.crop_max_side)
    table = pq.read_table(crops).to_pandas()
    return {"cfg": cfg, "crops": crops, "table": table, "root": root,
            "a": export_tiny(tiny_config, root / "models" / "a", seed=1),
            "b": export_tiny(tiny_config, root / "models" / "b", seed=2)}


def _store(cfg):
    from ootd.store.milvus import MilvusStore

    return MilvusStore.from_config(cfg.store, dim=cfg.model.embed_dim)


@pytest.mark.slow
def test_index_fills_a_collection_moves_the_alias_and_reruns_without_duplicates(indexed):
    cfg, table = indexed["cfg"], indexed["table"]
    version_a, _ = model_info(indexed["a"])
    summary = run_index(cfg, indexed["crops"], indexed["a"], batch_size=16)
    n = len(table)
    assert summary["written"] == n and summary["errors"] == 0 and summary["count"] == n
    assert summary["live"] == f"ootd_{version_a}" and summary["alias_moved"] is True
    out = Path(summary["out"])
    assert json.loads((out / "index_summary.json").read_text())["count"] == n
    assert (out / "config.yaml").is_file()
    assert summary["count_by_style"] == table["style"].value_counts().to_dict()
    media = MediaStore(cfg.store.media)
    for _, row in table.iterrows():
        assert media.get(row["image_id"]) == row["crop"]

    again = run_index(cfg, indexed["crops"], indexed["a"], batch_size=16)
    assert again["written"] == n and again["count"] == n  # upsert by id: the rerun adds nothing

    from ootd.decode import decode_crop
    from ootd.model.export import load

    first = table.iloc[0]
    vector = load(indexed["a"]).embed([decode_crop(first["crop"])])[0]
    with _store(cfg) as store:
        assert store.count() == n
        (hits,) = store.search(vector, 3)
        stored = store.get([first["image_id"]])[0]
    assert hits[0].id == first["image_id"] and hits[0].score > 0.999
    assert hits[0].style == first["style"] and list(hits[0].box) == list(first["box"])
    assert stored["meta"]["n_garments"] == first["n_garments"] and stored["source"] == first["source"]


@pytest.mark.slow
def test_interrupted_index_leaves_the_old_model_live(indexed):
    cfg, table = indexed["cfg"], indexed["table"]
    version_a, _ = model_info(indexed["a"])
    version_b, _ = model_info(indexed["b"])
    run_index(cfg, indexed["crops"], indexed["a"], batch_size=16)
    n = len(table)

    from ootd.store.milvus import MilvusStore

    real_upsert, written = MilvusStore.upsert, []

    def failing_upsert(self, rows, collection=None):
        if collection == f"ootd_{version_b}" and sum(written) >= 20:
            raise ConnectionError("injected: Milvus went away mid-run")
        written.append(real_upsert(self, rows, collection=collection))
        return written[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MilvusStore, "upsert", failing_upsert)
        with pytest.raises(ConnectionError, match="injected"):
            run_index(cfg, indexed["crops"], indexed["b"], batch_size=8, upsert_rows=16)
    with _store(cfg) as store:
        assert store.live_collection() == f"ootd_{version_a}"
        assert store.count() == n  # A untouched
        partial = store.count(collection=f"ootd_{version_b}")
        assert 20 <= partial < n  # B was being filled midway, never served

    done = run_index(cfg, indexed["crops"], indexed["b"], batch_size=16)
    assert done["live"] == f"ootd_{version_b}" and done["previous_live"] == f"ootd_{version_a}"
    assert done["count"] == n  # the rerun completed B without duplicating the partial rows
    with _store(cfg) as store:
        assert store.count(collection=f"ootd_{version_a}") == n  # the old collection is kept for rollback


@pytest.mark.slow
def test_bad_crop_rows_become_errors_and_the_rest_is_indexed(indexed, tmp_path):
    cfg = with_overrides(indexed["cfg"], [f"store.uri={tmp_path / 'bad.db'}", f"store.media={tmp_path / 'media'}"])
    good = pq.read_table(indexed["crops"]).slice(0, 5).to_pylist()
    junk = dict(good[0], image_id=hashlib.sha256(b"junk").hexdigest(), source="junk.jpg", crop=b"not a jpeg")
    styled = dict(good[1], image_id=hashlib.sha256(b"style").hexdigest(), source="odd.jpg", style="Baroque")
    crops = tmp_path / "crops"
    crops.mkdir()
    pq.write_table(pa.Table.from_pylist([*good, junk, styled], schema=CROPS_SCHEMA), crops / "part-000.parquet")

    summary = run_index(cfg, crops, indexed["a"], batch_size=4)
    assert summary["written"] == 5 and summary["errors"] == 2 and summary["count"] == 5
    errors = pq.read_table(Path(summary["out"]) / "index_errors.parquet").to_pandas().set_index("source")
    assert "undecodable crop" in errors.loc["junk.jpg", "error"]
    assert "unknown style 'Baroque'" in errors.loc["odd.jpg", "error"]
    assert set(errors["stage"]) == {"index"}
    assert not MediaStore(cfg.store.media).exists(junk["image_id"])  # nothing stored for a rejected row


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_near_duplicates_are_left_out_unless_configured_and_then_carry_their_group(indexed, tmp_path, keep):
    cfg = with_overrides(indexed["cfg"], [f"store.uri={tmp_path / 'dups.db'}", f"store.media={tmp_path / 'media'}",
                                          f"store.index_near_duplicates={str(keep).lower()}"])
    rows = pq.read_table(indexed["crops"]).slice(0, 6).to_pylist()
    rep = rows[0]["image_id"]
    for r in rows:
        r["near_dup_of"] = rep if r is rows[1] or r is rows[2] else None  # 1 and 2 are reposts of 0
    crops = tmp_path / "crops"
    crops.mkdir()
    schema = CROPS_SCHEMA.append(pa.field("near_dup_of", pa.string()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), crops / "part-000.parquet")

    summary = run_index(cfg, crops, indexed["a"], batch_size=4)
    assert summary["near_duplicates"] == {"members": 2, "indexed": keep}
    assert summary["count"] == (6 if keep else 4) and summary["errors"] == 0
    with _store(cfg) as store:
        stored = {r["id"]: r for r in store.get([r["image_id"] for r in rows])}
    if keep:
        assert stored[rows[1]["image_id"]]["meta"]["near_dup_of"] == rep
        assert "near_dup_of" not in stored[rep]["meta"]
    else:
        assert set(stored) == {rows[i]["image_id"] for i in (0, 3, 4, 5)}


@pytest.mark.slow
def test_index_of_an_empty_folder_names_the_fix(indexed, tmp_path):
    with pytest.raises(FileNotFoundError, match="ootd ingest"):
        run_index(indexed["cfg"], tmp_path, indexed["a"])


def test_embedding_rows_keep_row_order_and_values():
    from ootd.index import _rows_of

    batch = {
        "image_id": np.array([ID, hashlib.sha256(b"2").hexdigest()], dtype=object),
        "error": np.array(["", "undecodable crop: x"], dtype=object),
        "source": np.array(["a.jpg", "b.jpg"], dtype=object),
        "style": np.array(["Chic", ""], dtype=object),
        "box": np.array([[1, 2, 3, 4], [0, 0, 1, 1]]),
        "meta": np.array([json.dumps({"det_score": 0.5}), "{}"], dtype=object),
        "embedding": np.eye(2, 128, dtype=np.float32),
    }
    rows, failed = _rows_of(batch)
    assert [r["id"] for r in rows] == [ID] and rows[0]["box"] == [1, 2, 3, 4] and rows[0]["meta"]["det_score"] == 0.5
    assert failed == [{"source": "b.jpg", "stage": "index", "error": "undecodable crop: x",
                       "image_id": batch["image_id"][1]}]
