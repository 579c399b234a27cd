"""The committed garment detector through ootd.detect.yolo: outfit-box quality, filtering, batching, inputs, errors."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ootd.config import load_config
from ootd.detect.boxes import box_iou
from ootd.detect.runtime import cache_dir
from ootd.detect.yolo import ASSETS_DIR, Detector, keep_torch_threads, resolve_weights
from ootd.styles import STYLES
from ootd.synthetic import render_outfit

REPO = Path(__file__).resolve().parents[1]
COMMITTED = "yolo-synthetic-garments.pt"
FRESH_SEED = 20_241  # not a seed the committed detector was trained or validated on (that set used seed 1)


@pytest.fixture(scope="module")
def detect_cfg():
    return load_config("tiny").detect


@pytest.fixture(scope="module")
def detector(detect_cfg):
    return Detector(dataclasses.replace(detect_cfg, pad=0.0))


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(FRESH_SEED)
    return [render_outfit(style, rng, 256) for style in STYLES for _ in range(2)]


def test_committed_detector_finds_the_outfit(detector, photos):
    boxes = detector.outfit_boxes([np.asarray(p.image) for p in photos])
    ious = [box_iou(found.box, photo.outfit_box) for found, photo in zip(boxes, photos, strict=True)]
    assert statistics.median(ious) >= 0.8, sorted(ious)
    assert sum(b.fallback for b in boxes) <= len(boxes) // 10
    for found in boxes:
        if not found.fallback:
            assert found.n_garments >= 1
            assert found.score >= detector.cfg.conf


def test_flip_averaging_means_the_photos_and_its_mirrors_box_and_is_mirror_symmetric(detect_cfg, detector, photos):
    flipping = Detector(dataclasses.replace(detect_cfg, pad=0.0, flip_average=True))
    images = [np.asarray(p.image) for p in photos[:6]]
    mirrors = [np.ascontiguousarray(image[:, ::-1]) for image in images]
    averaged, averaged_mirrors = flipping.outfit_boxes(images), flipping.outfit_boxes(mirrors)
    upright, mirrored = detector.outfit_boxes(images), detector.outfit_boxes(mirrors)
    for image, avg, avg_mirror, up, mir in zip(images, averaged, averaged_mirrors, upright, mirrored, strict=True):
        width = image.shape[1]
        assert not (avg.fallback or up.fallback or mir.fallback)
        # the mean of the plain detector's two views (outward rounding: within a pixel)
        back = (width - mir.box[2], mir.box[1], width - mir.box[0], mir.box[3])
        expected = [(a + b) / 2 for a, b in zip(up.box, back, strict=True)]
        assert np.allclose(avg.box, expected, atol=1.0), (avg.box, expected)
        # a mirrored photo gets the mirrored box: which side the detector errs on no longer depends on the pose
        assert np.allclose(avg_mirror.box, (width - avg.box[2], avg.box[1], width - avg.box[0], avg.box[3]),
                           atol=1.0)  # fmt: skip


def test_detections_have_the_documented_types(detector, photos):
    (det,) = detector.detect([np.asarray(photos[0].image)])
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
    assert det.scores.shape == (len(det),) and det.classes.shape == (len(det),)
    assert np.issubdtype(det.classes.dtype, np.integer)
    assert len(det) >= 1
    assert set(det.classes.tolist()) <= set(detector.names)
    assert np.all(det.boxes[:, 2] > det.boxes[:, 0]) and np.all(det.boxes[:, 3] > det.boxes[:, 1])


def test_batch_gives_one_result_per_image_in_order(detector, photos):
    images = [np.asarray(p.image) for p in photos[:5]]
    batched = detector.detect(images)
    assert len(batched) == 5
    for image, det in zip(images, batched, strict=True):
        (alone,) = detector.detect([image])
        np.testing.assert_allclose(np.sort(det.boxes, axis=0), np.sort(alone.boxes, axis=0), atol=1.0)
    assert detector.detect([]) == []
    assert detector.outfit_boxes([]) == []


def test_batches_larger_than_batch_size_are_chunked(detect_cfg, photos):
    small = Detector(dataclasses.replace(detect_cfg, batch_size=2, pad=0.0))
    images = [np.asarray(p.image) for p in photos[:5]]
    assert [b.box for b in small.outfit_boxes(images)] == [b.box for b in Detector(
        dataclasses.replace(detect_cfg, pad=0.0)).outfit_boxes(images)]


@pytest.mark.parametrize("class_ids", [(), (99,)])
def test_unwanted_classes_fall_back_to_the_whole_image(detect_cfg, photos, class_ids):
    det = Detector(dataclasses.replace(detect_cfg, class_ids=class_ids))
    boxes = det.outfit_boxes([np.asarray(p.image) for p in photos[:3]])
    assert all(b.fallback and b.box == (0, 0, 256, 256) and b.n_garments == 0 and b.score == 0.0 for b in boxes)


def test_padding_grows_the_outfit_box(detect_cfg, detector, photos):
    padded = Detector(dataclasses.replace(detect_cfg, pad=0.1))
    image = np.asarray(photos[0].image)
    (tight,), (wide,) = detector.outfit_boxes([image]), padded.outfit_boxes([image])
    assert not tight.fallback
    assert wide.box[0] <= tight.box[0] and wide.box[1] <= tight.box[1]
    assert wide.box[2] >= tight.box[2] and wide.box[3] >= tight.box[3]
    assert wide.box != tight.box


def test_grayscale_alpha_and_odd_sizes(detector, photos):
    rgb = np.asarray(photos[1].image)
    gray = np.asarray(photos[1].image.convert("L"))
    rgba = np.asarray(photos[1].image.convert("RGBA"))
    odd = np.asarray(photos[2].image.resize((173, 301)))
    tiny = np.full((7, 5, 3), 200, np.uint8)
    images = [rgb, gray, gray[:, :, None], rgba, odd, tiny]
    boxes = detector.outfit_boxes(images)
    assert len(boxes) == len(images)
    for image, found in zip(images, boxes, strict=True):
        h, w = image.shape[:2]
        x1, y1, x2, y2 = found.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert boxes[3].box == boxes[0].box  # the alpha channel is dropped, not read as colour
    assert box_iou(boxes[1].box, photos[1].outfit_box) > 0.5  # grayscale still finds the figure
    assert boxes[5].fallback  # a flat 7x5 image holds no garment


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((32, 32, 3), np.float32), "uint8"),
        (np.zeros((0, 32, 3), np.uint8), "shape"),
        (np.zeros((32, 32, 2), np.uint8), "shape"),
        ("photo.jpg", "numpy array or PIL"),
    ],
)
def test_bad_images_raise_clear_errors(detector, photos, image, match):
    with pytest.raises(ValueError, match=match) as info:
        detector.detect([np.asarray(photos[0].image), image])
    assert "image 1" in str(info.value)


def test_resolve_weights_finds_the_committed_asset_by_bare_name():
    assert resolve_weights(COMMITTED) == (ASSETS_DIR / COMMITTED).resolve()
    assert (ASSETS_DIR / COMMITTED).stat().st_size <= 8 * 2**20


def test_resolve_weights_keeps_an_existing_path(tmp_path):
    weights = tmp_path / "mine.pt"
    weights.write_bytes(b"x")
    assert resolve_weights(str(weights)) == weights.resolve()


@pytest.mark.parametrize("name", ["yolo11n.pt", "nowhere/yolo11n.pt", ""])
def test_missing_weights_explain_how_to_get_some_and_download_nothing(detect_cfg, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        Detector(dataclasses.replace(detect_cfg, weights=name))
    message = str(info.value)
    assert "ootd train-detector --data" in message and "class_ids=[0]" in message and "yolo11n.pt" in message
    assert list(tmp_path.iterdir()) == []  # nothing fetched into the working directory


def test_a_file_that_is_not_a_detector_is_a_clear_error(detect_cfg, tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot load detector weights"):
        Detector(dataclasses.replace(detect_cfg, weights=str(bad)))


def test_keep_torch_threads_sets_and_restores_the_count(detector):
    import torch

    before = torch.get_num_threads()
    with keep_torch_threads(1):
        assert torch.get_num_threads() == 1
        detector.detect([np.zeros((32, 32, 3), np.uint8)])  # ultralytics' device setup must not change it
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_import_is_light_and_ultralytics_is_made_offline_without_throttling_threads(tmp_path):
    """In a fresh process: no ultralytics on import; after loading, offline switches on and threads kept."""
    code = f"""
import os, sys
import ootd.detect.yolo
assert "ultralytics" not in sys.modules, "importing ootd.detect.yolo must not import ultralytics"
import torch
torch.set_num_threads(2)
from ootd.config import load_config
det = ootd.detect.yolo.Detector(load_config("tiny").detect)
det.detect([__import__("numpy").zeros((64, 64, 3), "uint8")])
from ultralytics.utils import SETTINGS
assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "false"
assert "OMP_NUM_THREADS" not in os.environ, os.environ.get("OMP_NUM_THREADS")
assert torch.get_num_threads() == 2, torch.get_num_threads()
assert SETTINGS["sync"] is False and SETTINGS["raytune"] is False and SETTINGS["mlflow"] is False
assert os.environ["YOLO_CONFIG_DIR"].startswith({str(tmp_path)!r})
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "YOLO_CONFIG_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    env["OOTD_CACHE_DIR"] = str(cache_dir().parent)  # reuse this session's detector export rather than rebuild it
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def small_yolo_set(tmp_path_factory):
    from ootd.synthetic import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("yolo_small"), per_style=2, seed=3, size=128, val_fraction=0.5)


@pytest.mark.slow
def test_train_detector_stays_offline_and_writes_weights_metrics_and_args(small_yolo_set, tmp_path, monkeypatch):
    import json

    import yaml

    from ootd.detect.training import train_detector
    from tests.conftest import record_network

    contacted = record_network(monkeypatch)
    out = tmp_path / "det"
    metrics = train_detector(small_yolo_set["data_yaml"], out, epochs=1, imgsz=128, batch=8, seed=0)
    assert contacted == []
    assert (out / "best.pt").stat().st_size <= 8 * 2**20
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in ("map50", "outfit_iou_median", "outfit_iou_mean"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_val_images"] == 13 and metrics["epochs"] == 1
    args = yaml.safe_load((out / "train_args.yaml").read_text())
    assert (args["plots"], args["amp"], args["pretrained"], args["model"]) == (False, False, False, "yolo11n.yaml")
    # the result is a detector ootd can load by path
    cfg = dataclasses.replace(load_config("tiny").detect, weights=str(out / "best.pt"), imgsz=128)
    assert len(Detector(cfg).detect([np.zeros((128, 128, 3), np.uint8)])) == 1


@pytest.mark.slow
def test_train_detector_job_under_ray_job_submit(ray_cluster, small_yolo_set, tmp_path):
    import json

    import yaml

    out = tmp_path / "job_det"
    result = ray_cluster.submit_job(
        "jobs/train_detector.py", "--config", "tiny", "--data", small_yolo_set["data_yaml"], "--out", str(out),
        "--epochs", "1", "--imgsz", "128", "--batch", "8", "--num-cpus", "0.5",
        "--ultralytics-arg", "degrees=3", "--ultralytics-arg", "shear=1.5",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"] == str(out / "best.pt") and (out / "best.pt").is_file()
    assert (out / "config.yaml").is_file() and (out / "train_args.yaml").is_file()
    args = yaml.safe_load((out / "train_args.yaml").read_text())
    assert (args["degrees"], args["shear"]) == (3.0, 1.5)  # --ultralytics-arg reached ultralytics, typed
    assert (out / "ultralytics" / "results.csv").is_file()


def test_train_detector_job_rejects_a_missing_dataset(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from jobs.train_detector import main

    assert main(["--data", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"), "--no-ray"]) == 2
    assert "dataset YAML not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_loading_ultralytics_leaves_pil_open_alone():
    """Ultralytics' global Image.open patch would answer a non-image with a pip install attempt (pi-heif)."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ootd.detect.yolo import offline_ultralytics

    offline_ultralytics()
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(b"definitely not an image"))


def test_train_detector_cli_refuses_an_ultralytics_arg_without_a_value(small_yolo_set, tmp_path):
    from typer.testing import CliRunner

    from ootd.cli import app

    result = CliRunner().invoke(app, ["train-detector", "--data", small_yolo_set["data_yaml"], "--out",
                                      str(tmp_path / "det"), "--no-ray", "--ultralytics-arg", "degrees"])
    assert result.exit_code == 2
    assert "--ultralytics-arg takes KEY=VALUE, got 'degrees'" in result.output
    assert not (tmp_path / "det").exists()  # refused before any training
