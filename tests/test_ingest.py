"""Ingest pipeline tests: input listing, every kind of bad input on a real Ray cluster, resume, and the job."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ootd.ingest.pipeline import list_inputs, read_done, run_ingest
from tests.bad_images import encode, exif_rotated_jpeg, gray16, png_bomb, rgba_with_hole, truncated

GOOD_STYLES = ("Casual", "Gorpcore", "Street")  # 6 photos each in the synthetic_set fixture


def read_table(out: Path, name: str) -> pd.DataFrame:
    files = sorted((out / name).glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=["source", "stage", "error"])
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


# ---------------------------------------------------------------- listing (no Ray)


def test_folder_listing_styles_extensions_and_hidden(tmp_path):
    for rel in ("Chic/a.JPG", "Chic/b.jpeg", "Chic/deep/c.png", "Retro/d.webp", "top.jpg", "Chic/notes.txt",
                "Chic/.hidden.jpg", ".cache/e.jpg"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = {(Path(i.source).relative_to(tmp_path).as_posix(), i.style) for i in list_inputs(tmp_path)}
    assert found == {("Chic/a.JPG", "Chic"), ("Chic/b.jpeg", "Chic"), ("Chic/deep/c.png", "Chic"),
                     ("Retro/d.webp", "Retro"), ("top.jpg", None)}  # fmt: skip
    assert all(Path(i.source).is_absolute() for i in list_inputs(tmp_path))


def test_manifest_paths_resolve_against_the_manifest_folder(tmp_path):
    (tmp_path / "m").mkdir()
    pd.DataFrame({"path": ["imgs/a.jpg", "/abs/b.jpg", ""], "style": ["Chic", None, "Retro"]}).to_csv(
        tmp_path / "m" / "list.csv", index=False
    )
    inputs = list_inputs(tmp_path / "m" / "list.csv")
    assert [(i.source, i.style) for i in inputs] == [
        ("/abs/b.jpg", None),
        (str(tmp_path / "m" / "imgs" / "a.jpg"), "Chic"),
        (f"{tmp_path / 'm' / 'list.csv'}#row=2", "Retro"),  # an empty path still becomes an (error) input
    ]
    pd.DataFrame({"path": ["a.jpg"]}).to_parquet(tmp_path / "m" / "list.parquet")
    assert [i.style for i in list_inputs(tmp_path / "m" / "list.parquet")] == [None]


def test_unusable_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_inputs(tmp_path / "nope")
    with pytest.raises(ValueError, match="no image files"):
        list_inputs(tmp_path)
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp_path / "files.csv", index=False)
    with pytest.raises(ValueError, match="needs a `path` or `url` column"):
        list_inputs(tmp_path / "files.csv")
    (tmp_path / "list.txt").write_text("a.jpg")
    with pytest.raises(ValueError, match="folder or a .csv/.parquet/.jsonl manifest"):
        list_inputs(tmp_path / "list.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        list_inputs(f"file://{tmp_path}/nope")


# ---------------------------------------------------------------- bad inputs, one pipeline run on Ray


@pytest.fixture(scope="module")
def bad_run(ray_session, synthetic_set, tiny_config, tmp_path_factory):
    """Good photos plus every kind of bad input, listed in one manifest, ingested once; then a second run."""
    root = tmp_path_factory.mktemp("bad-inputs")
    photos = root / "photos"
    good = []
    for style in GOOD_STYLES:
        for src in sorted((synthetic_set / "images" / style).glob("*.jpg")):
            dst = photos / style / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            good.append((dst, style))
    base = Image.open(good[0][0]).convert("RGB")
    wide = base.crop((0, 48, 256, 208))  # 256 x 160, so a rotation is visible in width/height
    cases = {
        "truncated": ("Chic/truncated.jpg", truncated(good[1][0].read_bytes())),
        "empty": ("Chic/empty.jpg", b""),
        "text": ("Chic/notes.jpg", b"shopping list: socks, a hat\n"),
        "bomb": ("Chic/bomb.png", png_bomb(30000, 30000)),
        "gray": ("Minimal/gray.jpg", encode(base.convert("L"), "JPEG", quality=92)),
        "rgba": ("Minimal/rgba.png", encode(rgba_with_hole(base), "PNG")),
        "gray16": ("Minimal/gray16.png", encode(gray16(base), "PNG")),
        "cmyk": ("Retro/cmyk.jpg", encode(base.convert("CMYK"), "JPEG", quality=92)),
        "rotated": ("Retro/rotated.jpg", exif_rotated_jpeg(wide, orientation=6)),
        "dup_b": ("Street/zz_same_photo_again.jpg", good[-1][0].read_bytes()),
    }
    paths = {}
    for name, (rel, data) in cases.items():
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        (photos / rel).write_bytes(data)
        paths[name] = str(photos / rel)
    paths["dup_a"] = str(good[-1][0])
    paths["missing"] = str(photos / "Chic" / "deleted_after_listing.jpg")
    rows = [(str(p.relative_to(root)), style) for p, style in good]
    rows += [(str(Path(paths[n]).relative_to(root)), rel.split("/")[0]) for n, (rel, _) in cases.items()]
    rows += [("photos/Chic/deleted_after_listing.jpg", "Chic")]
    manifest = root / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "style"]).to_csv(manifest, index=False)

    out = root / "out"
    first = run_ingest(tiny_config, manifest, out)
    files_after_first = sorted(p.name for p in out.rglob("*.parquet"))
    tables = {"crops": read_table(out, "crops"), "errors": read_table(out, "errors")}
    (out / "crops" / ".half-written.parquet.tmp").write_bytes(b"PAR1 killed mid-write")
    second = run_ingest(tiny_config, manifest, out)
    return {
        "first": first, "second": second, "out": out, "paths": paths, "good": [str(p) for p, _ in good],
        "inputs": {str(root / r) for r, _ in rows}, "files_after_first": files_after_first, **tables,
    }  # fmt: skip


def _crop_row(run, name) -> pd.Series:
    rows = run["crops"][run["crops"].source == run["paths"][name]]
    assert len(rows) == 1, f"{name} should have exactly one crops row, errors: {run['errors'].to_dict('records')}"
    return rows.iloc[0]


def _error_row(run, name) -> pd.Series:
    rows = run["errors"][run["errors"].source == run["paths"][name]]
    assert len(rows) == 1, f"{name} should have exactly one errors row"
    return rows.iloc[0]


@pytest.mark.slow
def test_every_input_lands_in_exactly_one_place(bad_run):
    crops, errors = set(bad_run["crops"].source), set(bad_run["errors"].source)
    assert len(bad_run["crops"]) == len(crops) and len(bad_run["errors"]) == len(errors)
    assert not crops & errors
    assert crops | errors | {bad_run["paths"]["dup_b"]} == bad_run["inputs"]
    summary = bad_run["first"]
    assert summary["inputs"] == len(bad_run["inputs"]) == 18 + 11
    assert (summary["rows"], summary["errors"], summary["duplicates"], summary["skipped"]) == (23, 5, 1, 0)
    assert summary["errors_by_stage"] == {"decode": 4, "read": 1}
    assert summary["crops_total"] == 23
    assert json.loads((bad_run["out"] / "ingest_summary.json").read_text())["run_id"] == bad_run["second"]["run_id"]
    assert (bad_run["out"] / "config.yaml").is_file()


@pytest.mark.slow
def test_no_good_image_is_lost(bad_run):
    crops = bad_run["crops"].set_index("source")
    for path in bad_run["good"]:
        row = crops.loc[path]
        assert row["style"] == Path(path).parent.name
        assert (row["width"], row["height"]) == (256, 256)
        x1, y1, x2, y2 = row["box"]
        assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
        crop = Image.open(io.BytesIO(row["crop"]))
        assert crop.format == "JPEG" and crop.mode == "RGB"
        assert crop.size == (x2 - x1, y2 - y1)  # crops under crop_max_side are stored at source resolution
    assert bad_run["first"]["per_style"] == {"Casual": 6, "Gorpcore": 6, "Minimal": 3, "Retro": 2, "Street": 6}


@pytest.mark.slow
def test_image_id_is_sha256_of_the_file(bad_run):
    import hashlib

    for row in bad_run["crops"].itertuples():
        assert row.image_id == hashlib.sha256(Path(row.source).read_bytes()).hexdigest()


@pytest.mark.slow
def test_truncated_jpeg(bad_run):
    row = _error_row(bad_run, "truncated")
    assert row.stage == "decode" and "truncated" in row.error


@pytest.mark.slow
def test_zero_byte_file(bad_run):
    row = _error_row(bad_run, "empty")
    assert row.stage == "decode" and "empty (0 bytes)" in row.error


@pytest.mark.slow
def test_text_file_named_jpg(bad_run):
    row = _error_row(bad_run, "text")
    assert row.stage == "decode" and "not an image" in row.error


@pytest.mark.slow
def test_png_claiming_30000_by_30000_pixels(bad_run):
    row = _error_row(bad_run, "bomb")
    assert row.stage == "decode"
    assert "900,000,000 pixels" in row.error and "decompression-bomb" in row.error


@pytest.mark.slow
def test_missing_file_from_manifest(bad_run):
    row = _error_row(bad_run, "missing")
    assert row.stage == "read" and "file not found" in row.error


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gray", "rgba", "gray16", "cmyk"])
def test_unusual_modes_become_rgb_crops(bad_run, name):
    row = _crop_row(bad_run, name)
    assert (row["width"], row["height"]) == (256, 256)
    assert Image.open(io.BytesIO(row["crop"])).mode == "RGB"


@pytest.mark.slow
def test_exif_rotated_photo_is_upright(bad_run):
    row = _crop_row(bad_run, "rotated")
    assert (row["width"], row["height"]) == (160, 256)  # stored 256 x 160, orientation 6
    x1, y1, x2, y2 = row["box"]
    assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 256
    assert Image.open(io.BytesIO(row["crop"])).size == (x2 - x1, y2 - y1)


@pytest.mark.slow
def test_same_photo_twice_is_one_row(bad_run):
    paths = bad_run["paths"]
    kept = _crop_row(bad_run, "dup_a")  # the lexicographically smaller path stays
    assert not (bad_run["crops"].source == paths["dup_b"]).any()
    assert not (bad_run["errors"].source == paths["dup_b"]).any()
    assert (bad_run["crops"].image_id == kept["image_id"]).sum() == 1
    assert bad_run["first"]["duplicate_examples"] == [[paths["dup_b"], paths["dup_a"]]]


@pytest.mark.slow
def test_near_duplicates_share_a_group_and_distinct_photos_do_not(bad_run):
    crops = bad_run["crops"].set_index("source")
    group = {src: rep if isinstance(rep, str) else key for src, key, rep in zip(crops.index, crops.image_id,
                                                                                 crops.near_dup_of, strict=True)}
    paths = bad_run["paths"]
    # The grayscale, 16-bit and CMYK re-encodings of the first good photo are near duplicates of it.
    assert {group[paths[n]] for n in ("gray", "gray16", "cmyk")} == {group[bad_run["good"][0]]}
    assert len({group[p] for p in bad_run["good"]}) == len(bad_run["good"])  # distinct photos never merged
    reps = crops[crops.near_dup_of.isna()]
    assert set(crops.near_dup_of.dropna()) <= set(reps.image_id)  # every member points at a representative
    assert crops.phash.str.len().eq(36).all() and crops.phash_windows.map(len).eq(5).all()


@pytest.mark.slow
def test_second_run_adds_nothing(bad_run):
    second = bad_run["second"]
    assert (second["rows"], second["errors"]) == (0, 0)
    # Finished sources are skipped; the duplicate is hashed again and matched to the row already written.
    assert (second["skipped"], second["duplicates"]) == (len(bad_run["inputs"]) - 1, 1)
    assert sorted(p.name for p in bad_run["out"].rglob("*.parquet")) == bad_run["files_after_first"]
    assert len(read_table(bad_run["out"], "crops")) == 23 == second["crops_total"]


def test_resuming_with_other_crop_settings_is_refused(tiny_config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ootd.config import save_config, with_overrides
    from ootd.ingest.pipeline import check_crop_settings

    check_crop_settings(tmp_path, tiny_config)  # a new folder
    save_config(tiny_config, tmp_path / "config.yaml")
    check_crop_settings(tmp_path, with_overrides(tiny_config, ["detect.conf=0.2"]))  # no crops yet: nothing to mix
    (tmp_path / "crops").mkdir()
    pq.write_table(pa.table({"source": ["a.jpg"], "image_id": ["a"]}), tmp_path / "crops" / "part-0.parquet")
    check_crop_settings(tmp_path, with_overrides(tiny_config, ["train.epochs=3", "detect.batch_size=2"]))
    with pytest.raises(ValueError, match=r"detect\.conf 0\.1 -> 0\.2; detect\.flip_average False -> True.*new output"):
        check_crop_settings(tmp_path, with_overrides(tiny_config, ["detect.conf=0.2", "detect.flip_average=true"]))
    with pytest.raises(ValueError, match="data.crop_max_side"):
        check_crop_settings(tmp_path, with_overrides(tiny_config, ["data.crop_max_side=128"]))


def test_resuming_after_the_detector_file_was_replaced_is_refused(tiny_config, tmp_path):
    """Same name, other weights (a retrained detector copied over the old one): only the content tells."""
    import hashlib
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ootd.config import save_config, with_overrides
    from ootd.detect.yolo import resolve_weights
    from ootd.ingest.pipeline import DETECTOR_DIGEST_FILE, check_crop_settings

    weights = tmp_path / "detector.pt"
    shutil.copyfile(resolve_weights(tiny_config.detect.weights), weights)
    config = with_overrides(tiny_config, [f"detect.weights={weights}"])
    out = tmp_path / "out"
    (out / "crops").mkdir(parents=True)
    pq.write_table(pa.table({"source": ["a.jpg"], "image_id": ["a"]}), out / "crops" / "part-0.parquet")
    save_config(config, out / "config.yaml")
    (out / DETECTOR_DIGEST_FILE).write_text(hashlib.sha256(weights.read_bytes()).hexdigest() + "\n")
    check_crop_settings(out, config)  # the same weights
    weights.write_bytes(weights.read_bytes() + b"retrained")
    with pytest.raises(ValueError, match="content of the detector weights"):
        check_crop_settings(out, config)


@pytest.mark.slow
def test_resume_after_a_partial_run(ray_session, synthetic_set, tiny_config, tmp_path):
    from ootd.detect.yolo import weights_sha256

    source = synthetic_set / "images" / "Sporty"
    out = tmp_path / "out"
    partial = run_ingest(tiny_config, source, out, limit=2)
    assert (partial["inputs"], partial["rows"]) == (2, 2)
    rest = run_ingest(tiny_config, source, out)
    assert (rest["inputs"], rest["skipped"], rest["rows"], rest["errors"]) == (6, 2, 4, 0)
    sources, ids = read_done(out)
    crops = read_table(out, "crops")
    assert len(crops) == 6 == len(ids) == len(sources) == crops.image_id.nunique()
    assert {Path(s).name for s in crops.source} == {p.name for p in source.glob("*.jpg")}
    assert len(list((out / "crops").glob("*.parquet"))) == 2  # one file per run, none rewritten
    assert (out / "detector.sha256").read_text().strip() == weights_sha256(tiny_config.detect.weights)


# ---------------------------------------------------------------- the job, through `ray job submit`


@pytest.mark.slow
def test_ingest_job_on_the_synthetic_set(ray_cluster, synthetic_set, tiny_config, tmp_path):
    out = tmp_path / "ingest"
    args = ["--config", "tiny", "--source", str(synthetic_set / "images"), "--out", str(out), "--set",
            "data.num_blocks=2"]  # fmt: skip
    proc = ray_cluster.submit_job("jobs/ingest.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert (summary["inputs"], summary["rows"], summary["errors"], summary["duplicates"]) == (78, 78, 0, 0)
    assert summary["per_style"] == {style: 6 for style in summary["per_style"]} and len(summary["per_style"]) == 13
    crops = read_table(out, "crops")
    assert len(crops) == 78 and crops.image_id.nunique() == 78
    assert not (out / "errors").exists() or read_table(out, "errors").empty

    truth = pd.read_parquet(synthetic_set / "manifest.parquet")
    truth["source"] = [str(synthetic_set / p) for p in truth.path]
    merged = crops.merge(truth[["source", "style", "outfit_box"]], on="source", suffixes=("", "_truth"))
    assert len(merged) == 78 and (merged["style"] == merged["style_truth"]).all()

    # The boxes are exactly what the detector gives for these photos in this process (batching may move a
    # box edge by a pixel), so the pipeline neither shifts, scales nor mixes up rows.
    from ootd.decode import decode, to_array
    from ootd.detect.yolo import Detector

    direct = Detector(tiny_config.detect).outfit_boxes(
        [to_array(decode(Path(s).read_bytes(), 10**8)) for s in merged.source]
    )
    for row, found in zip(merged.itertuples(), direct, strict=True):
        assert row.fallback == found.fallback and row.n_garments == found.n_garments, row.source
        assert np.abs(np.array(row.box) - np.array(found.box)).max() <= 2, (row.source, row.box, found.box)
        assert Image.open(io.BytesIO(row.crop)).size == (row.box[2] - row.box[0], row.box[3] - row.box[1])

    # And roughly the ground-truth outfit: the box is the padded union of detected garments, so a perfect
    # detector scores ~0.83 against the exact union with detect.pad=0.05.
    overlaps = np.array([iou(list(a), list(b)) for a, b in zip(merged["box"], merged["outfit_box"], strict=True)])
    assert np.median(overlaps) > 0.5, sorted(overlaps)
    assert merged["fallback"].mean() < 0.2
