"""Detector runtimes (ootd.detect.runtime): real ONNX Runtime / OpenVINO exports give PyTorch's boxes, built once."""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np
import pytest

from ootd.config import load_config
from ootd.detect import runtime as runtimes
from ootd.detect.boxes import box_iou
from ootd.detect.yolo import Detector, resolve_weights
from ootd.styles import STYLES
from ootd.synthetic import render_outfit
from tests.conftest import record_network

FRESH_SEED = 20_241  # as in test_detect.py: photos the committed detector was not trained on
MIN_IOU = 0.99
INSTALLED = [name for name in runtimes.EXPORTED if runtimes.installed(name)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private export cache for this module (OOTD_CACHE_DIR), so the tests build real exports."""
    root = tmp_path_factory.mktemp("ootd_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OOTD_CACHE_DIR", str(root))
        yield root / "detector"


@pytest.fixture(scope="module")
def detect_cfg():
    return dataclasses.replace(load_config("tiny").detect, pad=0.0)


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(FRESH_SEED)
    images = [np.asarray(render_outfit(style, rng, 256).image) for style in STYLES for _ in range(2)]
    # Non-square photos: the dynamic-shape export must letterbox them as the PyTorch model does.
    return [*images, images[0][:, 40:200].copy(), np.ascontiguousarray(images[1][30:230].transpose(1, 0, 2))]


@pytest.fixture(scope="module")
def built(cache, detect_cfg):
    """One Detector per runtime (torch and each installed export), built once for the module, and every address a
    socket connected to or looked up meanwhile."""
    with pytest.MonkeyPatch.context() as patch:
        contacted = record_network(patch)
        detectors = {name: Detector(dataclasses.replace(detect_cfg, runtime=name)) for name in ["torch", *INSTALLED]}
    return detectors, contacted


@pytest.fixture(scope="module")
def detectors(built):
    return built[0]


def test_at_least_one_exported_runtime_is_installed():
    assert INSTALLED, "onnxruntime/openvino are dependencies of ootd (pyproject.toml); neither is installed"


@pytest.mark.parametrize("name", runtimes.EXPORTED)
def test_exported_runtime_finds_pytorchs_boxes(detectors, photos, name):
    if name not in detectors:
        pytest.skip(f"{name} is not installed")
    exported, reference = detectors[name], detectors["torch"]
    assert exported.runtime.name == name and exported.runtime.model_path.is_relative_to(runtimes.cache_dir())
    for i, (got, want) in enumerate(zip(exported.detect(photos), reference.detect(photos), strict=True)):
        assert len(got) == len(want), f"photo {i}: {len(got)} boxes on {name}, {len(want)} on torch"
        for box, cls in zip(want.boxes.tolist(), want.classes.tolist(), strict=True):
            same_class = [other for other, c in zip(got.boxes.tolist(), got.classes.tolist(), strict=True) if c == cls]
            best = max((box_iou(box, other) for other in same_class), default=0.0)
            assert best >= MIN_IOU, f"photo {i}: torch box {box} (class {cls}) best IoU {best:.4f} on {name}"
    for i, (got, want) in enumerate(zip(exported.outfit_boxes(photos), reference.outfit_boxes(photos), strict=True)):
        assert got.fallback == want.fallback and got.n_garments == want.n_garments, i
        assert box_iou(got.box, want.box) >= MIN_IOU, f"photo {i}: outfit {got.box} on {name}, {want.box} on torch"


def test_exported_runtime_batches_like_single_images(detectors, photos):
    for name in INSTALLED:
        batched = detectors[name].outfit_boxes(photos[:6])
        alone = [detectors[name].outfit_boxes([photo])[0] for photo in photos[:6]]
        assert all(box_iou(a.box, b.box) >= MIN_IOU for a, b in zip(batched, alone, strict=True)), name


def test_building_exports_stays_offline_and_installs_nothing(built):
    from ultralytics.utils import checks

    assert built[1] == []
    assert checks.AUTOINSTALL is False


def test_the_export_is_built_once_per_cache_even_when_asked_concurrently(detect_cfg, tmp_path):
    """Two threads asking at once: one exports under the file lock, the other waits and reuses the entry."""
    name = INSTALLED[-1] if INSTALLED else pytest.skip("no exported runtime installed")
    weights = resolve_weights(detect_cfg.weights)
    results: list[runtimes.Export] = []
    threads = [threading.Thread(target=lambda: results.append(
        runtimes.exported_model(weights, name, detect_cfg.imgsz, cache=tmp_path))) for _ in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.built for r in results) == [False, True]
    assert results[0].path == results[1].path and results[0].path.exists()
    mtime = results[0].path.stat().st_mtime_ns
    again = runtimes.exported_model(weights, name, detect_cfg.imgsz, cache=tmp_path)
    assert not again.built and again.path == results[0].path and again.path.stat().st_mtime_ns == mtime
    # one entry and its lock; no staging folder left behind
    assert sorted(p.name.endswith(".lock") for p in tmp_path.iterdir()) == [False, True]
    # another imgsz is another export
    assert runtimes.exported_model(weights, name, detect_cfg.imgsz + 32, cache=tmp_path).built


def test_a_new_detector_reuses_the_cached_export(detectors, detect_cfg):
    for name in INSTALLED:
        path = detectors[name].runtime.model_path
        mtime = path.stat().st_mtime_ns
        assert Detector(dataclasses.replace(detect_cfg, runtime=name)).runtime.model_path == path
        assert path.stat().st_mtime_ns == mtime


def test_auto_picks_the_fastest_installed_runtime_for_the_device(detectors, detect_cfg):
    fastest = next((name for name in runtimes.EXPORTED if name in INSTALLED), "torch")
    assert runtimes.preferred("cpu") == fastest
    assert runtimes.preferred("cuda:0") == runtimes.preferred("0") == "torch"
    assert Detector(dataclasses.replace(detect_cfg, runtime="auto")).runtime.name == fastest


def test_auto_without_the_fastest_package_takes_the_next(detect_cfg, monkeypatch):
    monkeypatch.setitem(runtimes._MODULES, "openvino", ("openvino", "ootd_no_such_module"))
    assert not runtimes.installed("openvino")
    expected = "onnx" if runtimes.installed("onnx") else "torch"
    assert runtimes.preferred("cpu") == expected


def test_an_explicit_runtime_that_cannot_be_built_is_a_clear_error(detect_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("OOTD_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(runtimes._MODULES, "openvino", ("openvino", "ootd_no_such_module"))
    with pytest.raises(runtimes.RuntimeUnavailable, match="detect.runtime=openvino needs .*pip install"):
        Detector(dataclasses.replace(detect_cfg, runtime="openvino"))
    assert not (tmp_path / "detector").exists() or list((tmp_path / "detector").iterdir()) == []


def test_auto_falls_back_to_torch_with_one_warning_when_its_export_fails(detect_cfg, monkeypatch, tmp_path, caplog):
    """auto chose openvino but it cannot be built: one WARNING, and the detector runs on PyTorch."""
    monkeypatch.setenv("OOTD_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(runtimes._MODULES, "openvino", ("openvino", "ootd_no_such_module"))
    monkeypatch.setattr(runtimes, "preferred", lambda device: "openvino")
    with caplog.at_level(logging.WARNING, logger="ootd"):
        detector = Detector(dataclasses.replace(detect_cfg, runtime="auto"))
    assert detector.runtime.name == "torch" and detector.runtime.model_path == detector.weights
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("ootd")]
    assert len(warnings) == 1 and "PyTorch" in warnings[0].getMessage()
    assert len(detector.detect([np.zeros((64, 64, 3), np.uint8)])) == 1


def test_unknown_runtime_is_rejected_by_the_config():
    from ootd.config import ConfigError

    with pytest.raises(ConfigError):
        load_config("tiny", ["detect.runtime=tensorrt"])
    assert load_config("tiny", ["detect.runtime=onnx"]).detect.runtime == "onnx"
