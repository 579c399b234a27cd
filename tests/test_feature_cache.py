"""Feature cache: cached boundary activations reproduce the image path, keys track what matters, reuse is real."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ootd.config import with_overrides
from ootd.decode import decode_crop
from ootd.model.encoder import build_encoder, weights_fingerprint
from ootd.tables import crops_snapshot
from ootd.train.feature_cache import BoundaryFeatures, build_feature_cache, cache_key, decode_features, read_cache
from ootd.train.worker import make_train_module
from tests.crops_fixture import write_crops_table


def _jpeg(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(sum(color))
    pixels = np.clip(np.array(color) + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def crops_batch() -> dict[str, np.ndarray]:
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 30), (90, 90, 90)]
    sizes = [(40, 90), (64, 64), (120, 50), (33, 77), (80, 160)]
    return {
        "image_id": np.array([f"{i:064x}" for i in range(5)], dtype=object),
        "style": np.array(["Chic", "Street", None, "Chic", "Retro"], dtype=object),
        "crop": np.array([_jpeg(c, s) for c, s in zip(colors, sizes, strict=True)], dtype=object),
    }


def test_decode_features_round_trip_and_bad_rows():
    rows = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    out = decode_features([r.tobytes() for r in rows], (3, 4))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, rows)
    with pytest.raises(ValueError, match="holds 22 bytes, expected 24"):
        decode_features([rows[0].tobytes()[:-2]], (3, 4))
    with pytest.raises(ValueError, match="holds None bytes"):
        decode_features([None], (3, 4))


def test_cache_key_changes_with_everything_that_changes_activations():
    parts = [("part-0.parquet", 10)]
    views = {"train_views": 1, "val_fraction": 0.15, "test_fraction": 0.15}
    base = ("tiny", 1, "abc", {"size": 64}, parts, views)
    key = cache_key(*base)
    assert key.startswith("k1-") and key == cache_key(*base)
    changed = [
        ("tiny2", 1, "abc", {"size": 64}, parts, views),
        ("tiny", 2, "abc", {"size": 64}, parts, views),
        ("tiny", 1, "abd", {"size": 64}, parts, views),
        ("tiny", 1, "abc", {"size": 96}, parts, views),
        ("tiny", 1, "abc", {"size": 64}, [*parts, ("part-1.parquet", 5)], views),
        ("tiny", 1, "abc", {"size": 64}, parts, {**views, "train_views": 4}),
    ]
    assert len({cache_key(*c) for c in changed} | {key}) == len(changed) + 1


def test_crops_snapshot_needs_a_crops_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="no crops table"):
        crops_snapshot(tmp_path)
    (tmp_path / "a.parquet").write_bytes(b"x" * 7)
    assert crops_snapshot(tmp_path) == [("a.parquet", 7)]


def test_build_encoder_is_reproducible_and_fingerprint_sees_weights(tiny_config):
    a, b = build_encoder(tiny_config.model), build_encoder(tiny_config.model)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert weights_fingerprint(a) != weights_fingerprint(b)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_cached_activations_give_the_image_path_outputs(tiny_config, crops_batch, k):
    model = with_overrides(tiny_config, [f"model.unlocked_blocks={k}"]).model
    encoder = build_encoder(model).eval()
    actor = BoundaryFeatures(model, k, weights_fingerprint(encoder))
    out = actor(crops_batch).to_pydict()
    # The unlabelled crop is skipped; every other row has fp16 activations and no error.
    assert out["style"] == ["Chic", "Street", "Chic", "Retro"]
    assert out["error"] == [None] * 4
    images = [decode_crop(c) for c, s in zip(crops_batch["crop"], crops_batch["style"], strict=True) if s]
    with torch.no_grad():
        pixels = encoder.preprocess(images)
        shape = tuple(encoder.boundary_features(pixels[:1], k).shape[1:])
        cached = torch.from_numpy(decode_features(out["features"], shape)).float()
        direct = encoder(pixels)
        from_cache = encoder.forward_from_boundary(cached, k)
        # The training module (what DDP wraps) agrees on both inputs too.
        via_images = make_train_module(encoder, k, from_cache=False)(pixels)
        via_cache = make_train_module(encoder, k, from_cache=True)(cached)
    assert shape == ((encoder.feature_dim,) if k == 0 else shape)
    assert len(shape) == (1 if k == 0 else 2)
    torch.testing.assert_close(from_cache, direct, atol=2e-2, rtol=0)
    torch.testing.assert_close(via_cache, via_images, atol=2e-2, rtol=0)
    cosine = torch.nn.functional.cosine_similarity(from_cache, direct)
    assert cosine.min() > 0.999


def test_actor_records_a_corrupt_crop_and_keeps_the_rest(tiny_config, crops_batch):
    batch = {key: value.copy() for key, value in crops_batch.items()}
    batch["crop"][1] = b"not a jpeg"
    encoder = build_encoder(tiny_config.model)
    out = BoundaryFeatures(tiny_config.model, 1, weights_fingerprint(encoder))(batch).to_pydict()
    assert out["features"][1] is None
    assert "crop does not decode" in out["error"][1]
    assert all(f is not None for i, f in enumerate(out["features"]) if i != 1)


def test_actor_refuses_a_backbone_that_does_not_rebuild_identically(tiny_config):
    with pytest.raises(RuntimeError, match="not reproducible"):
        BoundaryFeatures(tiny_config.model, 1, "0000000000000000")


@pytest.mark.slow
def test_cache_job_writes_every_labelled_crop_once_and_is_reused(ray_session, synthetic_set, tiny_config, tmp_path):
    crops = write_crops_table(synthetic_set, tmp_path, files=3, unlabelled=4)
    # One view per crop: augmented views are the subject of the test below.
    cfg = with_overrides(tiny_config, ["train.num_workers=1", "train.cpus_per_worker=0.5", "train.augment_views=1"])
    cache = build_feature_cache(cfg, crops, tmp_path / "work")
    assert not cache.reused
    assert cache.path.parent == tmp_path / "work" / "feature_cache"
    assert cache.path.name.startswith("k1-")
    table = pd.read_parquet(crops)
    labelled = table[table["style"].notna()]
    assert cache.rows == len(labelled) == 13 * 6 - 4 and cache.errors == 0
    parts = sorted(cache.path.glob("*.parquet"))
    rows = pd.concat([pq.read_table(p, columns=["image_id", "style", "features"]).to_pandas() for p in parts])
    assert sorted(rows["image_id"]) == sorted(labelled["image_id"])
    assert dict(zip(rows["image_id"], rows["style"], strict=True)) == dict(
        zip(labelled["image_id"], labelled["style"], strict=True)
    )
    # Spot-check the stored activations against the encoder run here.
    encoder = build_encoder(cfg.model).eval()
    sample = labelled.iloc[:6]
    with torch.no_grad():
        want = encoder.boundary_features(encoder.preprocess([decode_crop(c) for c in sample["crop"]]), 1)
    got = decode_features(rows.set_index("image_id").loc[sample["image_id"], "features"].tolist(), cache.shape)
    # fp16 keeps 11 significant bits: a relative error of 2^-11 (the pretrained trunk's activations reach ~50).
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), rtol=1e-3, atol=1e-2)
    manifest = json.loads((cache.path / "cache.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["rows"] == cache.rows
    assert not list(cache.path.parent.glob(".*tmp*"))  # nothing half-written left behind

    again = build_feature_cache(cfg, crops, tmp_path / "work")
    assert again.reused and again.path == cache.path and again.rows == cache.rows
    assert read_cache(cache.path).key == cache.key
    # Another boundary is another cache.
    k2 = build_feature_cache(cfg, crops, tmp_path / "work", unlocked_blocks=2)
    assert k2.path != cache.path and not k2.reused and k2.unlocked_blocks == 2


def test_training_crops_get_their_augmented_views_and_evaluation_crops_only_themselves(tiny_config, crops_batch):
    from ootd.splits import group_split_of
    from ootd.train.feature_cache import ViewPlan

    encoder = build_encoder(tiny_config.model)
    fingerprint = weights_fingerprint(encoder)
    # Content-hash-like ids and fractions that put three labelled crops in train and one in val.
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(crops_batch["image_id"]))]
    batch = {**crops_batch, "image_id": np.array(ids, dtype=object)}
    plan = ViewPlan(train_views=3, val_fraction=0.15, test_fraction=0.15)
    out = BoundaryFeatures(tiny_config.model, 1, fingerprint, plan=plan)(batch).to_pydict()
    plain = BoundaryFeatures(tiny_config.model, 1, fingerprint)(batch).to_pydict()
    labelled = [i for i, s in zip(batch["image_id"], batch["style"], strict=True) if s is not None]
    splits = {i: group_split_of(i, None, 0.15, 0.15) for i in labelled}
    assert {"train"} < set(splits.values())  # both kinds are exercised
    for image_id in labelled:
        views = [v for i, v in zip(out["image_id"], out["view"], strict=True) if i == image_id]
        assert views == ([0, 1, 2] if splits[image_id] == "train" else [0])
    # View 0 is the crop itself: the same activations as without augmentation; other views differ.
    first = {i: f for i, v, f in zip(out["image_id"], out["view"], out["features"], strict=True) if v == 0}
    assert first == dict(zip(plain["image_id"], plain["features"], strict=True))
    assert len(set(out["features"])) == len(out["features"])
    # The plan's box jitter reaches the views: another jitter, other augmented views, the same view 0.
    wide = BoundaryFeatures(tiny_config.model, 1, fingerprint, plan=dataclasses.replace(plan, box_jitter=0.3))
    wide_out = wide(batch).to_pydict()
    assert wide_out["view"] == out["view"]
    for v, f, g in zip(out["view"], out["features"], wide_out["features"], strict=True):
        assert (f == g) == (v == 0)
