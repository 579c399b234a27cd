"""StyleEncoder: backbones by name, one preprocess, freezing, the cache boundary, bf16, export and load."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ootd.config import load_config, with_overrides
from ootd.model.encoder import ModelNotAvailable, StyleEncoder, new_model_version
from ootd.model.export import load

MARQO_CONFIG = Path(__file__).parent / "data" / "marqo_open_clip_config.json"
REPO = Path(__file__).resolve().parents[1]


def _model_cfg(*overrides: str):
    return with_overrides(load_config("tiny"), list(overrides)).model


def _tiny(*overrides: str, seed: int = 0) -> StyleEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StyleEncoder.from_config(_model_cfg(*overrides))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(24, 160)), int(rng.integers(24, 160))
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def _write_open_clip_dir(folder: Path, config: dict) -> Path:
    """A local-dir backbone with random weights: build the model from the config, save its state dict."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    model_cfg = copy.deepcopy(config["model_cfg"])
    model_cls = open_clip.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip.CLIP
    model = model_cls(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def tiny() -> StyleEncoder:
    return _tiny()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "m1"
    return tiny.export(out, labels=["Casual", "Chic"], metrics={"recall@5": np.float32(0.5)})


def test_tiny_shapes_and_unit_norm(tiny):
    assert (tiny.feature_dim, tiny.embed_dim, tiny.depth) == (192, 128, 4)
    assert tiny.preprocess_cfg["size"] == [224, 224]  # tiny.yaml's model.image_size (the trunk's own is 128)
    assert tiny.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and tiny.preprocess_cfg["resize_mode"] == "squash"
    emb = tiny.embed(_images(5), batch_size=2)
    assert emb.shape == (5, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    feats = tiny.embed_features(_images(3))
    assert feats.shape == (3, 192)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert tiny.embed([]).shape == (0, 128)


def test_tiny_is_registered_with_open_clip_idempotently(tiny):
    import open_clip

    from ootd.model import backbones

    backbones.register_tiny()
    backbones.register_tiny()
    assert open_clip.list_models().count(backbones.TINY_OPEN_CLIP_NAME) == 1
    model = open_clip.create_model(backbones.TINY_OPEN_CLIP_NAME)
    assert model.visual(torch.zeros(1, 3, 128, 128)).shape == (1, 192)


def test_same_input_same_embedding_regardless_of_batching(tiny):
    images = _images(7, seed=3)
    np.testing.assert_allclose(tiny.embed(images, batch_size=7), tiny.embed(images, batch_size=2), atol=1e-5)


def test_export_then_load_gives_identical_embeddings(tiny, exported):
    images = _images(6, seed=1)
    loaded = load(exported)
    np.testing.assert_allclose(loaded.embed(images), tiny.embed(images), atol=1e-5, rtol=0)
    assert loaded.version == tiny.version and loaded.version.startswith("v")
    assert loaded.labels == ["Casual", "Chic"]
    assert loaded.preprocess_cfg == tiny.preprocess_cfg
    assert loaded.unlocked_blocks == 1  # tiny.yaml's model.unlocked_blocks, applied by from_config


def test_export_writes_the_model_dir_contract(tiny, exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "head.safetensors", "ootd_model.json", "open_clip_config.json", "open_clip_model.safetensors"]
    meta = json.loads((exported / "ootd_model.json").read_text())
    assert meta["version"] == tiny.version
    # tiny.yaml's head (the recipe sweep's choice), not an encoder property.
    assert (meta["embed_dim"], meta["feature_dim"], meta["head"], meta["backbone"]) == (128, 192, "mlp", "tiny")
    assert meta["labels"] == ["Casual", "Chic"] and meta["metrics"] == {"recall@5": 0.5}
    assert meta["unlocked_blocks"] == 1 and meta["preprocess"]["interpolation"] == "bicubic"
    assert meta["created_at"] and meta["ootd_version"]
    oc = json.loads((exported / "open_clip_config.json").read_text())
    assert set(oc) == {"model_cfg", "preprocess_cfg"} and oc["preprocess_cfg"]["std"] == [0.5, 0.5, 0.5]
    assert not list(exported.parent.glob(".*tmp*")), "staging dir left behind"


def test_export_is_open_clip_loadable(tiny, exported):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    pixels = tiny.preprocess(_images(2, seed=4))
    with torch.no_grad():
        torch.testing.assert_close(model.visual(pixels), tiny.backbone_features(pixels), atol=1e-5, rtol=0)
    assert "Normalize(mean=[0.5, 0.5, 0.5]" in repr(transform)


def test_export_records_config_and_refuses_to_overwrite(tiny, exported, tmp_path):
    cfg = load_config("tiny")
    out = tiny.export(tmp_path / "m2", version="v20260101t000000_abcdef", config=cfg, unlocked_blocks=2)
    meta = json.loads((out / "ootd_model.json").read_text())
    assert meta["version"] == "v20260101t000000_abcdef"
    assert meta["config"]["model"]["backbone"] == "tiny" and meta["unlocked_blocks"] == 2
    with pytest.raises(FileExistsError, match="not an empty folder"):
        tiny.export(exported)
    assert (exported / "ootd_model.json").is_file()  # the existing model is untouched


def test_load_in_a_fresh_process_registers_tiny_first(tiny, exported):
    images = _images(3, seed=5)
    expected = tiny.embed(images)
    code = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from ootd.model.export import load\n"
        "rng = np.random.default_rng(5)\n"
        "ims = []\n"
        "for _ in range(3):\n"
        "    h, w = int(rng.integers(24, 160)), int(rng.integers(24, 160))\n"
        "    ims.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))\n"
        f"np.save(sys.argv[1], load({str(exported)!r}).embed(ims))\n"
    )
    out = exported.parent / "fresh.npy"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=REPO, capture_output=True, timeout=300)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_freeze_unlocks_exactly_the_top_blocks(k):
    enc = _tiny()
    enc.freeze(k)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    head = {n for n, _ in enc.named_parameters() if n.startswith("head.")}  # linear or MLP, whichever tiny.yaml has
    top_prefixes = ("clip.visual.trunk.norm.", "clip.visual.trunk.attn_pool.", "clip.visual.trunk.fc_norm.")
    top = {n for n, _ in enc.named_parameters() if n.startswith(top_prefixes)}
    blocks = {n for n, _ in enc.named_parameters()
              if any(n.startswith(f"clip.visual.trunk.blocks.{i}.") for i in range(4 - k, 4))}
    expected = head | (top | blocks if k else set())
    assert trainable == expected
    assert not any(n.startswith("clip.visual.trunk.blocks.0.") for n in trainable)
    assert not any(n.startswith(("clip.text.", "clip.logit")) for n in trainable)
    head_params, trunk_params = enc.parameter_groups()
    assert len(head_params) == len(head) and len(trunk_params) == len(expected) - len(head)
    if k:
        assert "clip.visual.trunk.attn_pool.latent" in trainable and "clip.visual.trunk.norm.weight" in trainable


def test_freeze_rejects_more_blocks_than_the_tower_has():
    enc = _tiny()
    with pytest.raises(ValueError, match="only 4 blocks"):
        enc.freeze(5)
    with pytest.raises(ValueError, match=">= 0"):
        enc.freeze(-1)


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_boundary_path_equals_full_path(k, head):
    enc = _tiny(f"model.head={head}")
    pixels = enc.preprocess(_images(4, seed=k))
    with torch.no_grad():
        boundary = enc.boundary_features(pixels, k)
        via_boundary = enc.forward_from_boundary(boundary, k)
        full = enc(pixels)
    assert boundary.shape == ((4, 192) if k == 0 else (4, 196, 192))  # 224 px (tiny.yaml) in 16 px patches
    torch.testing.assert_close(via_boundary, full, atol=1e-5, rtol=0)


def test_boundary_path_trains_the_unlocked_blocks():
    enc = _tiny()
    enc.freeze(1)
    enc.train()
    with torch.no_grad():
        boundary = enc.boundary_features(enc.preprocess(_images(4)), 1)
    enc.forward_from_boundary(boundary, 1).sum().backward()
    grads = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "clip.visual.trunk.blocks.3.attn.qkv.weight" in grads and any(n.startswith("head.") for n in grads)


def test_mlp_head_shape():
    enc = _tiny("model.head=mlp", "model.head_hidden=32")
    layers = [m for m in enc.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(192, 32), (32, 128)]
    assert any(isinstance(m, torch.nn.GELU) for m in enc.head)


def test_bf16_embeddings_match_fp32(tiny):
    images = _images(8, seed=2)
    fp32 = tiny.embed(images)
    bf16 = tiny.embed(images, precision="bf16")
    assert bf16.dtype == np.float32
    assert (fp32 * bf16).sum(axis=1).min() >= 0.99


def test_bad_arguments_are_rejected(tiny):
    with pytest.raises(ValueError, match="precision"):
        tiny.embed(_images(1), precision="fp16")
    with pytest.raises(ValueError, match="batch_size"):
        tiny.embed(_images(1), batch_size=0)
    with pytest.raises(TypeError, match="item 1 is a ndarray"):
        tiny.embed([_images(1)[0], np.zeros((8, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="unknown backbone"):
        StyleEncoder.from_config(_model_cfg("model.backbone=resnet50"))


def test_non_square_crop_is_padded_not_stretched(tiny):
    red = Image.new("RGB", (20, 40), (255, 0, 0))  # tall crop: 2x as high as wide
    pixels = tiny.preprocess([red])[0]
    assert pixels.shape == (3, 224, 224)
    grey = (127 / 255 - 0.5) / 0.5
    # Side bands (a quarter of the width each, 56 px) are the neutral fill, the centre is the red crop; the pixels
    # next to each seam are left out, where the bicubic resize rings.
    torch.testing.assert_close(pixels[:, :, :44], torch.full((3, 224, 44), grey), atol=1e-3, rtol=0)
    torch.testing.assert_close(pixels[:, :, -44:], torch.full((3, 224, 44), grey), atol=1e-3, rtol=0)
    assert pixels[0, :, 64:160].min() > 0.99 and pixels[1, :, 64:160].max() < -0.99
    stretched = tiny.transform(red)  # what a squash resize alone would give: red everywhere
    assert not torch.allclose(pixels, stretched, atol=0.1)


def test_preprocess_follows_the_model_dir_config_not_open_clip_defaults(exported, tmp_path):
    folder = tmp_path / "shortest"
    shutil.copytree(exported, folder)
    oc = json.loads((folder / "open_clip_config.json").read_text())
    oc["preprocess_cfg"].update(mean=[0.1, 0.2, 0.3], std=[0.2, 0.2, 0.2], interpolation="bilinear")
    (folder / "open_clip_config.json").write_text(json.dumps(oc))
    enc = StyleEncoder.from_config(_model_cfg(f"model.backbone=local-dir:{folder}", "model.image_size=0"))
    assert enc.preprocess_cfg["mean"] == [0.1, 0.2, 0.3] and enc.preprocess_cfg["interpolation"] == "bilinear"
    white = enc.preprocess([Image.new("RGB", (8, 8), (255, 255, 255))])[0]
    torch.testing.assert_close(white[:, 0, 0], torch.tensor([4.5, 4.0, 3.5]), atol=1e-4, rtol=0)


def test_hf_hub_without_cache_says_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailable) as err:
        StyleEncoder.from_config(_model_cfg("model.backbone=hf-hub:Marqo/marqo-fashionSigLIP"))
    message = str(err.value)
    assert "huggingface-cli download Marqo/marqo-fashionSigLIP --local-dir DIR" in message
    assert "model.backbone=local-dir:DIR" in message


def test_hf_hub_loads_from_the_local_cache_without_network(exported, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--Marqo--marqo-fashionSigLIP"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(exported, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    enc = StyleEncoder.from_config(_model_cfg("model.backbone=hf-hub:Marqo/marqo-fashionSigLIP"))
    reference = load(exported)
    pixels = reference.preprocess(_images(2))
    with torch.no_grad():
        torch.testing.assert_close(enc.backbone_features(pixels), reference.backbone_features(pixels), atol=1e-5,
                                   rtol=0)
    assert enc.backbone == "hf-hub:Marqo/marqo-fashionSigLIP"


def test_local_dir_problems_name_the_fix(exported, tmp_path):
    with pytest.raises(ModelNotAvailable, match="no such folder.*local-dir:DIR"):
        StyleEncoder.from_config(_model_cfg(f"model.backbone=local-dir:{tmp_path / 'nope'}"))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(ModelNotAvailable, match="open_clip_config.json missing"):
        StyleEncoder.from_config(_model_cfg(f"model.backbone=local-dir:{no_config}"))
    # head.safetensors alone must not be mistaken for backbone weights.
    no_weights = tmp_path / "no_weights"
    shutil.copytree(exported, no_weights)
    (no_weights / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelNotAvailable, match="no weights file"):
        StyleEncoder.from_config(_model_cfg(f"model.backbone=local-dir:{no_weights}"))
    with pytest.raises(ModelNotAvailable, match="no weights file"):
        load(no_weights)


def test_load_rejects_what_is_not_a_model_dir(exported, tmp_path):
    with pytest.raises(ModelNotAvailable, match="not an exported ootd model dir"):
        load(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "ootd_model.json").write_text("{\"version\": \"v1\"}")
    with pytest.raises(ValueError, match="malformed"):
        load(broken)


def test_open_clip_native_vision_transformer_is_supported(tmp_path):
    config = {
        "model_cfg": {
            "embed_dim": 48,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},
    }
    folder = _write_open_clip_dir(tmp_path / "native", config)
    enc = StyleEncoder.from_config(_model_cfg(f"model.backbone=local-dir:{folder}", "model.unlocked_blocks=2",
                                                 "model.image_size=0"))
    assert (enc.feature_dim, enc.depth) == (48, 3)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert {"clip.visual.proj", "clip.visual.ln_post.weight", "clip.visual.transformer.resblocks.2.mlp.c_fc.weight",
            "clip.visual.transformer.resblocks.1.attn.in_proj_weight"} <= trainable
    assert not any(n.startswith(("clip.visual.transformer.resblocks.0.", "clip.visual.conv1")) for n in trainable)
    pixels = enc.preprocess(_images(3))
    with torch.no_grad():
        for k in (0, 1, 3):
            torch.testing.assert_close(enc.forward_from_boundary(enc.boundary_features(pixels, k), k), enc(pixels),
                                       atol=1e-5, rtol=0)


def test_new_model_version_is_a_valid_milvus_name_part():
    import re

    versions = {new_model_version() for _ in range(20)}
    assert len(versions) == 20
    assert all(re.fullmatch(r"v\d{8}t\d{6}_[0-9a-f]{6}", v) for v in versions)


@pytest.mark.slow
def test_marqo_config_with_random_weights_loads_as_local_dir(tmp_path):
    config = json.loads(MARQO_CONFIG.read_text())
    folder = _write_open_clip_dir(tmp_path / "marqo", config)
    enc = StyleEncoder.from_config(_model_cfg(f"model.backbone=local-dir:{folder}", "model.unlocked_blocks=2",
                                                 "model.image_size=0"))
    assert (enc.feature_dim, enc.embed_dim, enc.depth) == (768, 128, 12)
    cfg = enc.preprocess_cfg
    assert (cfg["size"], cfg["interpolation"], cfg["resize_mode"]) == ([224, 224], "bicubic", "squash")
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]
    steps = enc.transform.transforms
    assert type(steps[0]).__name__ == "Resize" and list(steps[0].size) == [224, 224]
    assert not any(type(s).__name__ in ("CenterCrop", "CenterCropOrPad") for s in steps)
    images = _images(2)
    assert enc.embed_features(images).shape == (2, 768)
    emb = enc.embed(images)
    assert emb.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    pixels = enc.preprocess(images)
    with torch.no_grad():
        boundary = enc.boundary_features(pixels, 2)
        assert boundary.shape == (2, 196, 768)
        torch.testing.assert_close(enc.forward_from_boundary(boundary, 2), enc(pixels), atol=1e-4, rtol=0)


def test_model_dirs_exported_with_the_first_64px_trunk_still_build():
    import copy

    from open_clip.model import CustomTextCLIP

    from ootd.model import backbones

    backbones.register_tiny()
    cfg = copy.deepcopy(backbones.TINY_MODEL_CFG)
    cfg.pop("custom_text")
    cfg["vision_cfg"].update(image_size=64, timm_model_name=backbones.TINY_TIMM_NAME_V1)
    visual = CustomTextCLIP(**cfg).visual
    assert visual.trunk.patch_embed.patch_size == (8, 8)
    assert visual(torch.zeros(1, 3, 64, 64)).shape == (1, 192)


def test_image_size_resamples_the_trunk_and_round_trips_through_an_export(tmp_path):
    base = _tiny("model.image_size=0")  # the trunk's own 128 px
    enc = _tiny("model.image_size=192")
    assert enc.preprocess_cfg["size"] == [192, 192]
    # The same pretrained weights (position embeddings on the 8 x 8 grid, interpolated to 12 x 12 per forward).
    for (name, a), (_, b) in zip(enc.visual.state_dict().items(), base.visual.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert enc.preprocess(_images(1))[0].shape == (3, 192, 192)
    images = _images(4, seed=3)
    loaded = load(enc.export(tmp_path / "m192"))
    assert loaded.preprocess_cfg["size"] == [192, 192]
    np.testing.assert_allclose(loaded.embed(images), enc.embed(images), atol=1e-5, rtol=0)
    assert not np.allclose(enc.embed(images), base.embed(images), atol=1e-3)


def test_image_size_must_fit_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        _tiny("model.image_size=150")


def test_a_fixed_grid_trunk_is_resampled_and_its_export_reloads(tmp_path):
    """A timm trunk without dynamic position embeddings (like ViT-B-16-SigLIP's) gets them resampled."""
    config = json.loads(MARQO_CONFIG.read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_tiny_patch16_224"  # small, same family of code
    config["model_cfg"]["embed_dim"] = 192
    config["model_cfg"]["text_cfg"] = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                       "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}
    folder = _write_open_clip_dir(tmp_path / "fixed", config)
    enc = StyleEncoder.from_config(_model_cfg(f"model.backbone=local-dir:{folder}", "model.image_size=160"))
    tokens = 10 * 10 + (0 if enc.visual.trunk.no_embed_class else enc.visual.trunk.num_prefix_tokens)
    assert tuple(enc.visual.trunk.pos_embed.shape[1:]) == (tokens, 192)  # 160 px in patches of 16
    images = _images(3, seed=5)
    loaded = load(enc.export(tmp_path / "m160"))
    assert tuple(loaded.visual.trunk.pos_embed.shape[1:]) == (tokens, 192)
    np.testing.assert_allclose(loaded.embed(images), enc.embed(images), atol=1e-5, rtol=0)
