"""Encoder runtimes (`model.runtime`): OpenVINO embeds what PyTorch embeds; the choice follows the device."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ootd.config import load_config
from ootd.detect.runtime import RuntimeUnavailable
from ootd.model.encoder import build_encoder
from ootd.model.export import load
from ootd.model.runtime import build_embedder, preferred


def _crops(n: int, seed: int = 0) -> list[Image.Image]:
    """Outfit-like crops of varied shapes: random, so no two share a vector by accident."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(40, 200)), int(rng.integers(30, 120)), 3),
                                         dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    """The committed pretrained tiny backbone with a head, exported and loaded as the jobs load it."""
    encoder = build_encoder(load_config("tiny").model)
    return load(encoder.export(tmp_path_factory.mktemp("models") / "m", labels=["Casual", "Chic"]))


@pytest.mark.parametrize("batch_size", [1, 5, 32])
def test_openvino_embeds_what_torch_embeds(exported_tiny, batch_size):
    crops = _crops(11)
    reference = build_embedder(exported_tiny, "torch", "fp32", "cpu").embed(crops, batch_size)
    embedder = build_embedder(exported_tiny, "openvino", "fp32", "cpu", threads=1)
    assert embedder.name == "openvino"
    vectors = embedder.embed(crops, batch_size)
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (vectors * reference).sum(axis=1).min() >= 0.9999
    # Different photos stay different: the converted graph is not returning one constant vector.
    assert (vectors[0] * vectors[1:]).sum(axis=1).max() < 0.9999


def test_openvino_bf16_stays_close_to_fp32(exported_tiny):
    crops = _crops(6, seed=1)
    reference = build_embedder(exported_tiny, "torch", "fp32", "cpu").embed(crops, 8)
    vectors = build_embedder(exported_tiny, "openvino", "bf16", "cpu", threads=1).embed(crops, 8)
    assert (vectors * reference).sum(axis=1).min() >= 0.99


def test_auto_picks_openvino_on_cpu_and_torch_on_a_gpu(exported_tiny):
    assert preferred("cpu") == "openvino"
    assert preferred("cuda") == "torch" and preferred("cuda:1") == "torch"
    assert build_embedder(exported_tiny, "auto", "fp32", "cpu").name == "openvino"
    # No GPU here: the choice is made from the device name, before anything touches CUDA.
    assert build_embedder(exported_tiny, "auto", "fp32", "cuda").name == "torch"


def test_openvino_on_a_gpu_or_missing_is_a_clear_error(exported_tiny, monkeypatch):
    with pytest.raises(RuntimeUnavailable, match="runs on the CPU"):
        build_embedder(exported_tiny, "openvino", "fp32", "cuda")
    with pytest.raises(ValueError, match="unknown model.runtime"):
        build_embedder(exported_tiny, "tensorrt", "fp32", "cpu")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(RuntimeUnavailable, match="pip install openvino"):
        build_embedder(exported_tiny, "openvino", "fp32", "cpu")
    assert build_embedder(exported_tiny, "auto", "fp32", "cpu").name == "torch"


def test_auto_falls_back_to_torch_when_conversion_fails(exported_tiny, monkeypatch, caplog):
    import openvino

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino, "convert_model", broken)
    with caplog.at_level("WARNING", logger="ootd.model.runtime"):
        assert build_embedder(exported_tiny, "auto", "fp32", "cpu").name == "torch"
    assert "unsupported operation" in caplog.text
    with pytest.raises(RuntimeUnavailable, match="unsupported operation"):
        build_embedder(exported_tiny, "openvino", "fp32", "cpu")


def test_conversion_leaves_the_encoder_as_it_was(exported_tiny):
    exported_tiny.train()
    before = {k: v.clone() for k, v in exported_tiny.state_dict().items()}
    build_embedder(exported_tiny, "openvino", "fp32", "cpu", threads=1)
    assert exported_tiny.training
    exported_tiny.eval()
    assert all(torch.equal(before[k], v) for k, v in exported_tiny.state_dict().items())


def test_the_config_takes_only_known_runtimes():
    from ootd.config import ConfigError

    assert load_config("tiny").model.runtime == "auto"
    assert load_config("tiny", ["model.runtime=torch"]).model.runtime == "torch"
    with pytest.raises(ConfigError, match="model.runtime"):
        load_config("tiny", ["model.runtime=onnx"])
