"""Fine-tuning: optimizer and schedule, data checks, and real Ray Train runs (DDP job, resume, killed worker)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ootd.config import with_overrides
from ootd.model.encoder import build_encoder
from ootd.splits import split_of
from ootd.train.checkpoint import STATE_FILE, check_compatible, compat, load_trainable, trainable_state
from ootd.train.driver import prepare_data, run_training
from ootd.train.faults import FAULTS_ENV, fault_point
from ootd.train.worker import (
    LoopSettings,
    lr_factor,
    make_optimizer,
    make_train_module,
    parameter_counts,
    restore,
    retrieval_scores,
    set_lr,
    setup,
    train_step,
)
from tests.crops_fixture import write_crops_table

REPO = Path(__file__).resolve().parents[1]

# Small batches and a large validation split so the 78-photo fixture gives several steps and a scoreable val set.
SMALL_VIEWS = 4
SMALL = [
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.styles_per_batch=4",
    "train.images_per_style=2",
    "train.val_fraction=0.3",
    "train.test_fraction=0.0",
    # These tests are about the job's mechanics: 4 cached views per crop instead of tiny.yaml's 12 keep them short.
    f"train.augment_views={SMALL_VIEWS}",
]


@pytest.fixture(scope="module")
def small_crops(synthetic_set, tmp_path_factory) -> Path:
    return write_crops_table(synthetic_set, tmp_path_factory.mktemp("crops-small"), files=2, unlabelled=3)


# ---------------------------------------------------------------- fast: optimizer, schedule, state, data checks


def test_optimizer_separates_head_and_backbone_and_skips_decay_on_1d(tiny_config):
    cfg = with_overrides(tiny_config, ["model.unlocked_blocks=1", "train.weight_decay=0.05"])
    encoder = build_encoder(cfg.model)
    opt = make_optimizer(encoder, cfg.train)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["head"]["lr"] == cfg.train.lr_head and groups["backbone"]["lr"] == cfg.train.lr_backbone
    assert groups["head"]["weight_decay"] == groups["backbone"]["weight_decay"] == 0.05
    assert groups["head_no_decay"]["weight_decay"] == groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for g in ("head", "backbone") for p in groups[g]["params"])
    assert all(p.ndim < 2 for g in ("head_no_decay", "backbone_no_decay") for p in groups[g]["params"])
    # Exactly the trainable parameters, each once.
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted(id(p) for p in encoder.parameters() if p.requires_grad)
    # Head only: no backbone groups at all.
    frozen = build_encoder(with_overrides(cfg, ["model.unlocked_blocks=0"]).model)
    assert {g["name"] for g in make_optimizer(frozen, cfg.train).param_groups} == {"head", "head_no_decay"}


@pytest.mark.parametrize("bf16", [False, True])
def test_train_steps_lower_the_loss_and_touch_only_unlocked_weights(tiny_config, bf16):
    from ootd.model.losses import make_loss

    cfg = with_overrides(tiny_config, ["model.unlocked_blocks=1", "train.lr_backbone=1e-3"])
    encoder = build_encoder(cfg.model)
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    model = make_train_module(encoder, 1, from_cache=False)
    opt = make_optimizer(encoder, cfg.train)
    loss_fn = make_loss("supcon", 0.1, 0.5)
    rng = np.random.default_rng(0)
    # Two "styles": reddish and bluish noise images, four of each.
    images = [
        Image.fromarray(np.clip(rng.normal(c, 30, (48, 32, 3)), 0, 255).astype(np.uint8))
        for c in ([200, 60, 60],) * 4 + ([60, 60, 200],) * 4
    ]
    pixels, labels = encoder.preprocess(images), torch.tensor([0] * 4 + [1] * 4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    model.train()
    losses = [train_step(model, opt, loss_fn, pixels, labels, autocast) for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    changed = {n for n, p in encoder.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("clip.visual.") for n in changed)


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    lrs = [lr_factor(step, total_steps=20, warmup_fraction=0.2) for step in range(22)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear over round(20 * 0.2) = 4 steps
    assert max(lrs) == lrs[4] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # monotone decay after warmup
    assert lrs[19] > 0.0 and lrs[20] == pytest.approx(0.0) and lrs[21] == pytest.approx(0.0)
    assert [lr_factor(s, 5, 0.0) for s in (0, 5)] == pytest.approx([1.0, 0.0])  # no warmup: starts at the peak
    assert lr_factor(0, 0, 0.1) == pytest.approx(1.0)  # a zero-step estimate is one step, not a division by zero


def test_schedule_can_be_re_aimed_when_an_epoch_forms_more_batches_than_estimated():
    assert lr_factor(5, 10, 0.0) == pytest.approx(0.5)  # half way through the estimated 10 steps
    # The epochs really take twice as many steps: the same step sits earlier on the longer cosine.
    assert lr_factor(6, 20, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 20)))
    assert lr_factor(6, 20, 0.0) > lr_factor(5, 10, 0.0)
    assert lr_factor(10, 10, 0.0) == 0.0 < lr_factor(10, 20, 0.0)


def test_set_lr_scales_each_group_from_its_own_base(tiny_config):
    cfg = with_overrides(tiny_config, ["model.unlocked_blocks=1", "train.lr_head=1e-2", "train.lr_backbone=1e-4"])
    opt = make_optimizer(build_encoder(cfg.model), cfg.train)
    for factor in (0.5, 0.25):  # from the base each time, never compounding
        set_lr(opt, factor)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["head"] == lrs["head_no_decay"] == pytest.approx(1e-2 * factor)
        assert lrs["backbone"] == lrs["backbone_no_decay"] == pytest.approx(1e-4 * factor)
    assert all(g["base_lr"] in (1e-2, 1e-4) for g in opt.param_groups)


def _settings(config, **changes) -> LoopSettings:
    base = LoopSettings(
        model=config.model,
        train=config.train,
        source="images",
        payload="crop",
        shape=None,
        labels=("Chic", "Street"),
        fingerprint="fp",
        steps_per_epoch=4,
    )
    return dataclasses.replace(base, **changes)


def test_loop_settings_are_frozen_and_travel_to_workers_by_pickle(tiny_config):
    settings = _settings(tiny_config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps_per_epoch = 9
    assert pickle.loads(pickle.dumps({"settings": settings}))["settings"] == settings
    assert not settings.from_cache and _settings(tiny_config, source="cache").from_cache


def test_parameter_counts_split_the_image_path_into_trainable_and_frozen(tiny_config):
    encoder = build_encoder(tiny_config.model)
    encoder.freeze(1)
    trainable, frozen = parameter_counts(encoder)
    assert trainable == sum(t.numel() for t in trainable_state(encoder).values())
    assert trainable + frozen == sum(p.numel() for p in [*encoder.visual.parameters(), *encoder.head.parameters()])
    encoder.freeze(0)
    assert 0 < parameter_counts(encoder)[0] < trainable


class _DirCheckpoint:
    """What `ray.train.get_checkpoint()` hands back, minus the storage layer: a local checkpoint folder."""

    def __init__(self, path: Path):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.path))


def test_restore_continues_the_schedule_where_the_checkpoint_left_it(tiny_config, tmp_path):
    from ootd.model.encoder import weights_fingerprint

    cfg = with_overrides(tiny_config, ["model.unlocked_blocks=1", "train.epochs=3"])
    fingerprint = weights_fingerprint(build_encoder(cfg.model))
    settings = _settings(cfg, fingerprint=fingerprint)
    fresh = setup(settings, rank=0, world=1, device=torch.device("cpu"))
    assert restore(None, fresh).total_steps == 4 * 3  # no checkpoint: the driver's estimate
    saved = setup(settings, rank=0, world=1, device=torch.device("cpu"))
    set_lr(saved.optimizer, 0.5)
    state = {
        "epoch": 1,
        "trainable": trainable_state(saved.encoder),
        "optimizer": saved.optimizer.state_dict(),
        "step": 7,
        "history": [{"epoch": 1, "steps": 7}],
        "compat": compat(settings),
    }
    torch.save(state, tmp_path / STATE_FILE)
    worker = setup(settings, rank=0, world=1, device=torch.device("cpu"))
    progress = restore(_DirCheckpoint(tmp_path), worker)
    assert (progress.start_epoch, progress.step, progress.total_steps) == (2, 7, 7 * 3)
    assert progress.history == state["history"]
    assert [g["base_lr"] for g in worker.optimizer.param_groups] == [g["base_lr"] for g in fresh.optimizer.param_groups]
    # A checkpoint from before the step counter and `base_lr`: the history's steps and the config stand in.
    del state["step"]
    for group in state["optimizer"]["param_groups"]:
        del group["base_lr"]
    torch.save(state, tmp_path / STATE_FILE)
    worker = setup(settings, rank=0, world=1, device=torch.device("cpu"))
    progress = restore(_DirCheckpoint(tmp_path), worker)
    assert progress.step == 7
    assert [g["base_lr"] for g in worker.optimizer.param_groups] == [g["base_lr"] for g in fresh.optimizer.param_groups]


def test_restore_brings_back_the_weight_average_on_rank_0_only(tiny_config, tmp_path):
    from ootd.model.encoder import weights_fingerprint

    cfg = with_overrides(tiny_config, ["model.unlocked_blocks=1", "train.epochs=3", "train.ema_decay=0.9"])
    settings = _settings(cfg, fingerprint=weights_fingerprint(build_encoder(cfg.model)))
    saved = setup(settings, rank=0, world=1, device=torch.device("cpu"))
    average = restore(None, saved).average
    assert average is not None and average.updates == 0
    with torch.no_grad():
        for p in saved.encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)
    average.update(saved.encoder)
    state = {"epoch": 1, "trainable": trainable_state(saved.encoder), "optimizer": saved.optimizer.state_dict(),
             "step": 4, "history": [{"epoch": 1, "steps": 4}], "compat": compat(settings),
             "averaged": average.state_dict()}
    torch.save(state, tmp_path / STATE_FILE)
    progress = restore(_DirCheckpoint(tmp_path), setup(settings, rank=0, world=1, device=torch.device("cpu")))
    assert progress.average.updates == 1
    for name, value in progress.average.weights.items():
        torch.testing.assert_close(value, average.weights[name])
    rank_1 = setup(settings, rank=1, world=2, device=torch.device("cpu"))
    assert restore(_DirCheckpoint(tmp_path), rank_1).average is None
    off = _settings(with_overrides(cfg, ["train.ema_decay=0"]), fingerprint=settings.fingerprint)
    assert restore(None, setup(off, rank=0, world=1, device=torch.device("cpu"))).average is None


def test_fault_point_does_nothing_unless_a_plan_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    fault_point("start", rank=0)
    fault_point("epoch_end", rank=0, epoch=1)  # returns at once: no plan, no hold
    plan = {"pid_dir": str(tmp_path), "hold_after_epoch": 1, "hold_timeout_s": 0.5}
    monkeypatch.setenv(FAULTS_ENV, json.dumps(plan))
    fault_point("start", rank=1)
    assert [p.name for p in tmp_path.iterdir()] == [f"rank1-{os.getpid()}.pid"]
    fault_point("epoch_end", rank=1, epoch=2)  # not the epoch to hold after
    started = time.monotonic()
    fault_point("epoch_end", rank=1, epoch=1)  # holds until released or, here, its timeout
    assert time.monotonic() - started >= 0.5 and (tmp_path / f"held-rank1-{os.getpid()}").exists()
    monkeypatch.setenv(FAULTS_ENV, json.dumps({**plan, "hold_after": 1}))
    with pytest.raises(TypeError, match="hold_after"):  # a misspelt plan fails instead of never firing
        fault_point("start", rank=0)


def test_trainable_state_round_trips_and_rejects_another_freeze(tiny_config):
    cfg = with_overrides(tiny_config, ["model.unlocked_blocks=1"])
    a, b = build_encoder(cfg.model), build_encoder(cfg.model)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.01)
    state = trainable_state(a)
    assert state and all(name.startswith(("head.", "clip.visual.")) for name in state)
    load_trainable(b, state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    other = build_encoder(with_overrides(cfg, ["model.unlocked_blocks=2"]).model)
    with pytest.raises(RuntimeError, match="does not fit this encoder"):
        load_trainable(other, state)


def test_resuming_with_another_model_config_says_to_pick_a_new_run_name(tiny_config):
    settings = _settings(tiny_config)
    state = {"compat": {**_compat_of(tiny_config.model), "unlocked_blocks": 3, "labels": ["Chic", "Street"]}}
    with pytest.raises(RuntimeError, match="different unlocked_blocks.*train.run_name"):
        check_compatible(state, settings)


def _compat_of(model):
    return {
        "backbone": model.backbone,
        "head": model.head,
        "embed_dim": model.embed_dim,
        "head_hidden": model.head_hidden,
        "unlocked_blocks": model.unlocked_blocks,
    }


def test_validation_scores_on_a_hand_made_set():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    perfect = retrieval_scores(emb, np.array([0, 0, 1, 1]))
    assert perfect["val_p_at_10"] == pytest.approx(1 / 3)  # one relevant among the 3 other items, P@10 over 3
    assert perfect["val_map_at_10"] == pytest.approx(1.0)
    assert perfect["val_silhouette"] > 0.8
    swapped = retrieval_scores(emb, np.array([0, 1, 0, 1]))
    assert swapped["val_map_at_10"] < perfect["val_map_at_10"]


def test_prepare_data_refuses_a_single_style(tiny_config, tmp_path, synthetic_set):
    crops = write_crops_table(synthetic_set, tmp_path)
    table = pd.read_parquet(crops)
    table["style"] = "Chic"
    for f in crops.glob("*.parquet"):
        f.unlink()
    table.to_parquet(crops / "one-style.parquet")
    with pytest.raises(ValueError, match="at least two styles"):
        prepare_data(tiny_config, crops, tmp_path / "work")


def test_prepare_data_refuses_an_unscoreable_validation_split(tiny_config, tmp_path, synthetic_set):
    crops = write_crops_table(synthetic_set, tmp_path)
    cfg = with_overrides(tiny_config, ["train.val_fraction=0.0"])
    with pytest.raises(ValueError, match="validation split .* no style with two crops"):
        prepare_data(cfg, crops, tmp_path / "work")


def test_prepare_data_needs_a_crops_table(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="no crops table"):
        prepare_data(tiny_config, tmp_path / "nothing", tmp_path / "work")


def test_label_map_is_the_sorted_train_styles_and_unlabelled_rows_never_train(tiny_config, small_crops, tmp_path):
    cfg = with_overrides(tiny_config, [*SMALL, "train.feature_cache=false"])
    data = prepare_data(cfg, small_crops, tmp_path)
    table = pd.read_parquet(small_crops)
    labelled = table[table["style"].notna()]
    splits = labelled["image_id"].map(lambda i: split_of(i, 0.3, 0.0))
    assert data.labels == sorted(labelled.loc[splits == "train", "style"].unique())
    assert data.counts == {"train": int((splits == "train").sum()), "val": int((splits == "val").sum()), "test": 0}
    assert data.source == "images" and data.payload == "crop"



def test_a_near_duplicate_joins_its_representatives_split(tiny_config, small_crops, tmp_path):
    """A repost whose own id hashes into val trains with its train-split original (no leak between splits)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pd.read_parquet(small_crops)
    table = table[table["style"].notna()]
    splits = table["image_id"].map(lambda i: split_of(i, 0.3, 0.0))
    original = table.loc[splits == "train", "image_id"].iloc[0]
    repost = table.loc[splits == "val", "image_id"].iloc[0]
    table = table.assign(near_dup_of=[original if i == repost else None for i in table["image_id"]])
    crops = tmp_path / "crops"
    crops.mkdir()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), crops / "part-0.parquet")
    cfg = with_overrides(tiny_config, [*SMALL, "train.feature_cache=false"])
    data = prepare_data(cfg, crops, tmp_path / "work")
    assert data.groups == {repost: original}
    assert data.counts["val"] == int((splits == "val").sum()) - 1
    assert data.counts["train"] == int((splits == "train").sum()) + 1

# ---------------------------------------------------------------- slow: real Ray Train runs


def _val_p_at_10(encoder_fn, crops: Path, val_fraction: float) -> float:
    from ootd.evaluate.metrics import retrieval_metrics

    table = pd.read_parquet(crops)
    table = table[table["style"].notna()]
    table = table[table["image_id"].map(lambda i: split_of(i, val_fraction, 0.0)) == "val"]
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in table["crop"]]
    return retrieval_metrics(encoder_fn(images), list(table["style"]), ks=(10,))["P@10"]


def _submit(ray_cluster, args: list[str], tries: int = 12):
    # A freshly started head node answers "No available agent" until its job agent registers.
    for _ in range(tries - 1):
        proc = ray_cluster.submit_job(*args)
        if "No available agent to submit job" not in proc.stderr + proc.stdout:
            return proc
        time.sleep(15)
    return ray_cluster.submit_job(*args)


@pytest.mark.slow
def test_train_job_ddp_exports_a_model_that_beats_the_frozen_backbone(ray_cluster, tmp_path_factory, tiny_config):
    from ootd.model.export import load
    from ootd.synthetic import write_sample_data

    # A bigger set than the session fixture so validation P@10 has enough same-style neighbours to mean something.
    sample = tmp_path_factory.mktemp("sample-24")
    write_sample_data(sample, per_style=24, seed=3, size=160)
    work = tmp_path_factory.mktemp("train-job")
    crops = write_crops_table(sample, work)
    sets = [*SMALL, "train.styles_per_batch=6", "train.images_per_style=4", "train.epochs=15", "train.run_name=job"]
    sets += ["train.lr_backbone=1e-4"]  # tiny.yaml's 3e-4 makes the random tiny trunk drift more than it learns
    args = ["jobs/train.py", "--crops", str(crops), "--config", "tiny", "--workdir", str(work)]
    for item in sets:
        args += ["--set", item]
    proc = _submit(ray_cluster, args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = re.search(r"model dir: (\S+)", proc.stdout)  # progress bars share the job's stdout
    assert found, proc.stdout[-6000:]
    model_dir = Path(found.group(1))
    summary = json.loads((work / "ray_results" / "job" / "summary.json").read_text())
    assert summary["model_dir"] == str(model_dir) and model_dir.parent == work / "models"
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 16))
    assert summary["feature_cache"] and Path(summary["feature_cache"]).parent == work / "feature_cache"
    # Both DDP workers trained: summed over workers, an epoch sees more rows than one worker's half of the split
    # (each training crop cached with its augmented views).
    train_rows = SMALL_VIEWS * sum(split_of(i, 0.3, 0.0) == "train" for i in pd.read_parquet(crops)["image_id"])
    assert all(train_rows / 2 < h["samples"] <= train_rows for h in summary["history"])
    # Checkpoints are ranked by validation mAP@10: the exported epoch is the best one seen.
    assert summary["metrics"]["val_map_at_10"] == max(h["val_map_at_10"] for h in summary["history"])
    # Only the best checkpoints (train.checkpoints_to_keep=2) survive, plus the latest one to resume from.
    kept = sorted(c for c in (work / "ray_results" / "job").glob("checkpoint_*") if c.is_dir())
    kept_epochs = {json.loads((c / "history.json").read_text())[-1]["epoch"] for c in kept}
    assert len(kept) <= 3 and {summary["metrics"]["epoch"], 15} <= kept_epochs
    assert (work / "ray_results" / "job" / "config.yaml").exists()

    meta = json.loads((model_dir / "ootd_model.json").read_text())
    assert meta["labels"] == sorted(pd.read_parquet(crops)["style"].unique())
    assert meta["unlocked_blocks"] == 1 and meta["metrics"]["epoch"] == summary["metrics"]["epoch"]
    assert meta["config"]["train"]["epochs"] == 15

    tuned = load(model_dir)
    frozen = build_encoder(tiny_config.model)
    p_tuned = _val_p_at_10(tuned.embed, crops, 0.3)
    p_frozen = _val_p_at_10(frozen.embed_features, crops, 0.3)
    assert p_tuned > p_frozen, (p_tuned, p_frozen)
    # The job's own validation score is what an independent re-embedding of the exported model gives.
    assert summary["metrics"]["val_p_at_10"] == pytest.approx(p_tuned, abs=0.02)


@pytest.mark.slow
def test_rerun_with_the_same_run_name_resumes_instead_of_starting_over(ray_session, small_crops, tiny_config, tmp_path):
    # From images (no cache), so this run also covers the image path of the training loop.
    cfg = with_overrides(tiny_config, [*SMALL, "train.feature_cache=false", "train.run_name=resume"])
    first = run_training(with_overrides(cfg, ["train.epochs=1"]), small_crops, workdir=tmp_path)
    assert [h["epoch"] for h in first["history"]] == [1]
    assert first["feature_cache"] is None

    second = run_training(with_overrides(cfg, ["train.epochs=3"]), small_crops, workdir=tmp_path)
    history = second["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # Epoch 1 comes from the first run; the second run started at epoch 2 from its checkpoint.
    assert [h["started_at_epoch"] for h in history] == [1, 2, 2]
    assert history[0] == first["history"][0]
    assert second["version"] != first["version"]
    assert Path(second["model_dir"]).is_dir() and Path(first["model_dir"]).is_dir()

    # Re-running the finished run trains nothing more and exports its best checkpoint again.
    third = run_training(with_overrides(cfg, ["train.epochs=3"]), small_crops, workdir=tmp_path)
    assert third["history"] == history
    assert third["metrics"] == second["metrics"] and third["version"] != second["version"]


# A driver of its own: the fault plan must reach the Train workers as a job env var (`ray.init(runtime_env=...)`),
# which this pytest process, already connected by `ray_session`, cannot set any more.
_FAULTS_DRIVER = """
import json, os, sys
import ray
from ootd.config import load_config, with_overrides
from ootd.train.driver import run_training
from ootd.train.faults import FAULTS_ENV, fault_point

address, crops, workdir, out, *overrides = sys.argv[1:]
ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {FAULTS_ENV: os.environ[FAULTS_ENV]}})
summary = run_training(with_overrides(load_config("tiny"), overrides), crops, workdir=workdir)
with open(out, "w") as f:
    json.dump(summary, f, default=str)
"""


@pytest.mark.slow
def test_a_killed_training_worker_is_restarted_and_the_run_completes(ray_cluster, small_crops, tmp_path):
    sets = [*SMALL, "train.epochs=3", "train.max_failures=2", "train.run_name=failover"]
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    snapshot = tmp_path / "work" / "ray_results" / "failover" / "checkpoint_manager_snapshot.json"
    killed: dict[str, int] = {}

    def kill_rank1_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            held = sorted(pid_dir.glob("held-rank1-*"))
            if held and snapshot.exists():  # epoch 1's checkpoint is registered: a restart can resume from it
                pid = int(held[0].name.rsplit("-", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                (pid_dir / "release").write_text("go")
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank1_after_first_checkpoint, daemon=True)
    killer.start()
    plan = {"pid_dir": str(pid_dir), "hold_after_epoch": 1}
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-c", _FAULTS_DRIVER, ray_cluster.address, str(small_crops), str(tmp_path / "work")]
    proc = subprocess.run(
        [*cmd, str(summary), *sets],
        env={**os.environ, FAULTS_ENV: json.dumps(plan)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    killer.join(timeout=5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads(summary.read_text())
    assert killed, "the worker was never killed"
    rank1_pids = {int(p.stem.split("-")[1]) for p in pid_dir.glob("rank1-*.pid")}
    assert killed["pid"] in rank1_pids and len(rank1_pids) >= 2  # a new rank-1 process took over
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    # The restarted worker group resumed from epoch 1's checkpoint rather than starting over.
    assert [h["started_at_epoch"] for h in out["history"]] == [1, 2, 2]
    assert Path(out["model_dir"], "ootd_model.json").exists()
