"""Attribute pretraining of the tiny backbone: its data, loss, schedule, the trunk asset `tiny` loads, the DDP run."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from ootd.model import backbones
from ootd.train.pretrain import (
    EVAL_STREAM,
    TRAIN_STREAM,
    AttributeNet,
    CropPixels,
    PretrainSettings,
    attribute_loss,
    attribute_sizes,
    lr_at,
    render_set,
    shrink,
    use_explicit_attention,
)

SMALL = PretrainSettings(n_train=8, n_eval=4, epochs=1, batch_size=4, render_size=128, num_workers=2,
                         cpus_per_worker=0.5)  # fmt: skip


def test_rendered_crops_are_deterministic_labelled_and_streams_are_disjoint():
    x, y = render_set(TRAIN_STREAM, range(4), SMALL)
    x2, y2 = render_set(TRAIN_STREAM, range(4), SMALL)
    ex, _ = render_set(EVAL_STREAM, range(4), SMALL)
    assert x.shape == (4, 3, 128, 128) and y.shape == (4, len(attribute_sizes())) and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not any(torch.equal(a, b) for a in x for b in ex)  # held-out photos are never training photos
    sizes = torch.tensor(list(attribute_sizes().values()))
    assert bool(((y >= 0) & (y < sizes)).all())
    assert x.dtype == torch.uint8  # a quarter of float32's memory per worker


def test_uint8_crops_normalise_to_exactly_what_the_eval_transform_gives():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 110, 3), dtype=np.uint8))
    pixels = CropPixels(192)
    expected = backbones.eval_transform({**backbones.TINY_PREPROCESS_CFG, "size": [192, 192]})(image)
    got = pixels.normalise(pixels.to_uint8(image)[None])[0]
    assert torch.equal(got, expected)  # bit-identical, not merely close
    assert -1.0 <= float(got.min()) and float(got.max()) <= 1.0  # the tiny preprocess: mean/std 0.5


def test_a_few_steps_on_a_handful_of_images_lower_the_attribute_loss():
    x, y = render_set(TRAIN_STREAM, range(8), SMALL)
    x = CropPixels(SMALL.image_size).normalise(x)
    net = AttributeNet(seed=0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with torch.no_grad():
        logits = net(x)
        before = float(attribute_loss(logits, y))
    assert set(logits) == set(attribute_sizes())
    assert all(out.shape == (8, n) for out, n in zip(logits.values(), attribute_sizes().values(), strict=True))
    for _ in range(6):
        optimizer.zero_grad()
        attribute_loss(net(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        assert float(attribute_loss(net(x), y)) < before


def test_schedule_warms_up_then_decays_to_zero():
    settings = PretrainSettings(lr=1e-3, warmup_fraction=0.1)
    lrs = [lr_at(step, 100, settings) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[100] == pytest.approx(0.0)


def _save_trunk(visual: torch.nn.Module, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in visual.state_dict().items()}, str(path))


def test_tiny_loads_the_trunk_file_and_tiny_random_does_not(tmp_path, monkeypatch):
    net = AttributeNet(seed=0)
    with torch.no_grad():
        for param in net.visual.parameters():  # stands in for pretraining having moved the weights
            param.add_(0.01)
    weights = tmp_path / "tiny-backbone.safetensors"
    _save_trunk(net.visual, weights)
    monkeypatch.setattr(backbones, "TINY_WEIGHTS", weights)

    model, _ = backbones.create_open_clip("tiny")
    for name, value in model.visual.state_dict().items():
        assert torch.equal(value, net.visual.state_dict()[name]), name
    random_a, _ = backbones.create_open_clip("tiny-random")
    torch.manual_seed(123)  # the caller's RNG state must not matter: every process builds the same model
    random_b, _ = backbones.create_open_clip("tiny-random")
    assert all(torch.equal(a, b) for a, b in zip(random_a.state_dict().values(), random_b.state_dict().values(),
                                                   strict=True))  # fmt: skip
    qkv = [m.visual.trunk.blocks[0].attn.qkv.weight for m in (random_a, model)]
    assert not torch.equal(*qkv)


def test_a_second_stage_continues_from_a_trunk_file_at_another_input_size(tmp_path):
    first = AttributeNet(seed=0)
    with torch.no_grad():
        for param in first.visual.parameters():  # stands in for a first stage having moved the weights
            param.add_(0.01)
    weights = tmp_path / "stage1.safetensors"
    _save_trunk(first.visual, weights)
    second = AttributeNet(seed=0, init=str(weights))
    for name, value in second.visual.state_dict().items():
        assert torch.equal(value, first.visual.state_dict()[name]), name
    # 192 px: the stored 8 x 8 position embeddings are interpolated to the 12 x 12 grid, the file keeps its shape.
    x, y = render_set(TRAIN_STREAM, range(2), dataclasses.replace(SMALL, image_size=192))
    assert x.shape == (2, 3, 192, 192)
    x = CropPixels(192).normalise(x)
    assert all(out.shape[0] == 2 for out in second(x).values())
    assert second.visual.trunk.pos_embed.shape == first.visual.trunk.pos_embed.shape


def test_a_progressive_resize_runs_its_last_epochs_at_the_final_size_from_photos_rendered_once():
    settings = dataclasses.replace(SMALL, epochs=5, image_size=128, final_image_size=192, final_epochs=2)
    assert [settings.input_size(epoch) for epoch in range(5)] == [128, 128, 128, 192, 192]
    assert settings.stored_size == 192 and SMALL.stored_size == 128
    x, _ = render_set(TRAIN_STREAM, range(2), settings)
    assert x.shape == (2, 3, 192, 192)  # kept at the largest size; the early epochs shrink each batch
    pixels = CropPixels(192).normalise(x)
    assert shrink(pixels, 128).shape == (2, 3, 128, 128) and shrink(pixels, 192) is pixels


def test_explicit_attention_computes_what_the_fused_kernel_does():
    explicit = AttributeNet(seed=0)  # pretraining switches its tower to explicit attention
    fused = copy.deepcopy(explicit)
    layers = [m for m in fused.modules() if hasattr(m, "fused_attn")]
    assert len(layers) == 5 and not any(layer.fused_attn for layer in layers)  # four blocks and the MAP pool
    for layer in layers:
        layer.fused_attn = True
    assert use_explicit_attention(copy.deepcopy(fused)) == 5
    pixels, labels = torch.randn(2, 3, 128, 128), torch.zeros(2, len(attribute_sizes()), dtype=torch.long)
    fused_logits, explicit_logits = fused.eval()(pixels), explicit.eval()(pixels)
    for name, logits in fused_logits.items():
        torch.testing.assert_close(explicit_logits[name], logits, rtol=1e-4, atol=1e-5)
    # the switch is made for the backward's speed, so the gradients must agree too
    attribute_loss(fused_logits, labels).backward()
    attribute_loss(explicit_logits, labels).backward()
    for (name, a), b in zip(fused.visual.named_parameters(), explicit.visual.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_pretrain_rejects_a_bad_input_size_or_a_missing_init_before_starting_ray(tmp_path):
    from ootd.train.pretrain import pretrain_backbone

    with pytest.raises(ValueError, match="multiple of .*16"):
        pretrain_backbone(dataclasses.replace(SMALL, image_size=100), tmp_path)
    with pytest.raises(ValueError, match="final_image_size must be a multiple"):
        pretrain_backbone(dataclasses.replace(SMALL, final_image_size=100, final_epochs=1), tmp_path)
    for final_size, final_epochs in ((192, 0), (None, 1), (192, 2)):  # SMALL runs one epoch
        with pytest.raises(ValueError, match="final_epochs must be in"):
            pretrain_backbone(dataclasses.replace(SMALL, final_image_size=final_size, final_epochs=final_epochs),
                              tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="init trunk weights not found"):
        pretrain_backbone(dataclasses.replace(SMALL, init=str(tmp_path / "gone")), tmp_path)


def test_missing_trunk_asset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "TINY_WEIGHTS", tmp_path / "gone.safetensors")
    with pytest.raises(backbones.ModelNotAvailable, match="ootd pretrain-backbone.*tiny-random"):
        backbones.create_open_clip("tiny")
    with pytest.raises(backbones.ModelNotAvailable, match="pretrain-backbone"):
        backbones.locate_weights("tiny")
    assert "random" in backbones.locate_weights("tiny-random")


def test_committed_asset_is_small_loads_and_records_its_metrics():
    assert backbones.TINY_WEIGHTS.is_file(), "ootd/assets/tiny-backbone.safetensors is missing"
    assert backbones.TINY_WEIGHTS.stat().st_size <= 10 * 2**20
    metrics = json.loads((backbones.TINY_WEIGHTS.parent / "tiny-backbone.metrics.json").read_text())
    assert set(metrics["eval_accuracy"]) == set(attribute_sizes())
    assert metrics["eval_mean_accuracy"] > metrics["majority_mean_accuracy"]
    pretrained, _ = backbones.create_open_clip("tiny")
    random, _ = backbones.create_open_clip("tiny-random")
    assert not torch.equal(pretrained.visual.trunk.pos_embed, random.visual.trunk.pos_embed)


@pytest.mark.slow
def test_pretrain_runs_under_ray_train_ddp_and_writes_a_loadable_trunk(ray_session, tmp_path, monkeypatch):
    from ootd.train.pretrain import METRICS_FILE, WEIGHTS_FILE, native_bf16, pretrain_backbone

    # two epochs: the second at the final size, from the same photos
    settings = dataclasses.replace(SMALL, epochs=2, final_image_size=160, final_epochs=1)
    summary = pretrain_backbone(settings, tmp_path / "out")
    assert summary["settings"]["num_workers"] == 2
    assert [epoch["image_size"] for epoch in summary["history"]] == [128, 160]
    # bf16 left at its default resolves per CPU: emulated bf16 is ~12x slower than fp32 (PretrainSettings.bf16)
    assert summary["settings"]["bf16"] == native_bf16()
    assert set(summary["eval_accuracy"]) == set(attribute_sizes())
    assert all(0.0 <= v <= 1.0 for v in summary["eval_accuracy"].values())
    assert json.loads((tmp_path / "out" / METRICS_FILE).read_text())["weights_bytes"] == summary["weights_bytes"]
    monkeypatch.setattr(backbones, "TINY_WEIGHTS", tmp_path / "out" / WEIGHTS_FILE)
    model, _ = backbones.create_open_clip("tiny")
    features = model.visual(torch.zeros(2, 3, 128, 128))
    assert features.shape == (2, 192) and bool(np.isfinite(features.detach().numpy()).all())
