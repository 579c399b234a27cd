"""What runs inside each Ray Train worker: the DDP step over class-balanced batches, validation, checkpoints.

`train_loop_per_worker` is a shell over `setup`, `restore`, `run_epoch` and `report_epoch`. The lr schedule is
the pure `lr_factor` of the run's step count, scaling each param group's `base_lr` (`set_lr`): it keeps no state.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ootd.logs import quiet_libraries
from ootd.train.augment import BOX_JITTER
from ootd.train.averaging import WeightAverage
from ootd.train.batches import BatcherStats, balanced_batches
from ootd.train.checkpoint import (
    STATE_FILE,
    check_compatible,
    compat,
    load_trainable,
    report_with_checkpoint,
    trainable_state,
)
from ootd.train.faults import fault_point

if TYPE_CHECKING:
    import torch
    from ray.train import Checkpoint

    from ootd.config import ModelConfig, TrainConfig
    from ootd.model.encoder import StyleEncoder

log = logging.getLogger("ootd.train.driver")

# Rows iterated per Ray Data batch when feeding the batcher. The local shuffle buffer mixes styles across files
# and, in a feature cache, spreads the consecutive views of one crop (12 in tiny.yaml) over a batch's worth of
# other crops: with 256 rows the P×K batcher waited for lagging styles and dropped ~40 % of every epoch's rows,
# with 2,048 ~23 % (the rest is class-balanced undersampling). 2,048 cached rows are ~110 MB at the tiny boundary.
_ROWS_PER_READ = 64
_SHUFFLE_ROWS = 2048


@dataclass(frozen=True)
class LoopSettings:
    """What the driver hands every worker, as `train_loop_config={"settings": LoopSettings(...)}`.

    Attributes:
        model: the encoder config (backbone, head, unlocked_blocks).
        train: the train config, its `styles_per_batch` already capped at the number of train styles.
        source: "cache" (boundary activations, see `ootd.train.feature_cache`) or "images" (crop bytes).
        payload: the column holding each row's input ("features" or "crop").
        shape: one cached row's activation shape (cache only).
        labels: the label map: label i is labels[i].
        fingerprint: weights fingerprint of the backbone the driver (and the cache) used.
        steps_per_epoch: the driver's estimate from full P×K batches; workers measure the real count.
    """

    model: ModelConfig
    train: TrainConfig
    source: str
    payload: str
    shape: tuple[int, ...] | None
    labels: tuple[str, ...]
    fingerprint: str
    steps_per_epoch: int

    @property
    def from_cache(self) -> bool:
        """Whether rows hold cached boundary activations rather than crop bytes."""
        return self.source == "cache"


@dataclass(frozen=True)
class Worker:
    """One worker's fixed parts, built by `setup`; `module` is what DDP wraps after `restore`."""

    settings: LoopSettings
    rank: int
    world: int
    encoder: StyleEncoder
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    autocast: torch.autocast


@dataclass
class Progress:
    """Where the run stands: found by `restore`, then advanced by every step and epoch."""

    start_epoch: int = 1  # the first epoch this worker group trains (later than 1 on resume)
    step: int = 0  # optimizer steps over the whole run: the schedule's position
    total_steps: int = 1  # the schedule's length, re-aimed at the measured steps per epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # every finished epoch's metrics (on rank 0)
    average: WeightAverage | None = None  # rank 0's EMA of the trainable weights (train.ema_decay > 0)


@dataclass(frozen=True)
class EpochSums:
    """One epoch over all workers; `steps` is per worker (DDP: all take the same), `seconds` this worker's."""

    loss: float  # summed over every worker's steps
    steps: int
    samples: int
    seconds: float
    dropped: int  # crops this worker's batcher could not place in a P×K batch


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function; `config["settings"]` is the driver's `LoopSettings`."""
    import ray.train
    import ray.train.torch

    settings: LoopSettings = config["settings"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    quiet_libraries()
    fault_point("start", rank=rank)
    worker = setup(settings, rank, ctx.get_world_size(), ray.train.torch.get_device())
    progress = restore(ray.train.get_checkpoint(), worker)
    model = ray.train.torch.prepare_model(worker.module)
    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(progress.start_epoch, settings.train.epochs + 1):
        sums = run_epoch(worker, model, train_shard, progress, epoch)
        # Class-balanced batching forms more batches than the driver's full-P×K estimate: aim at the measured count.
        progress.total_steps = sums.steps * settings.train.epochs
        report_epoch(worker, progress, epoch, sums)
        fault_point("epoch_end", rank=rank, epoch=epoch)


def setup(settings: LoopSettings, rank: int, world: int, device: torch.device) -> Worker:
    """Builds this worker's encoder, frozen to `unlocked_blocks`, with its train module, optimizer and loss.

    Raises:
        RuntimeError: when the backbone built here has other weights than the driver's (see `fingerprint`).
    """
    import torch

    from ootd.model.encoder import build_encoder, weights_fingerprint
    from ootd.model.losses import make_loss

    mcfg, tcfg, k = settings.model, settings.train, settings.model.unlocked_blocks
    encoder = build_encoder(mcfg)
    if weights_fingerprint(encoder) != settings.fingerprint:
        raise RuntimeError(f"backbone {mcfg.backbone!r} on this worker differs from the driver's (fingerprint)")
    encoder.freeze(k)
    trainable, frozen = parameter_counts(encoder)
    log.info(f"trainable {trainable:,} / frozen {frozen:,} parameters (unlocked_blocks={k}, head={mcfg.head})")
    module = make_train_module(encoder, k, settings.from_cache)
    loss_fn = make_loss(tcfg.loss, tcfg.temperature, tcfg.margin)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16)
    return Worker(settings, rank, world, encoder, module, make_optimizer(encoder, tcfg), loss_fn, device, autocast)


def restore(checkpoint: Checkpoint | None, worker: Worker) -> Progress:
    """Loads the run's latest checkpoint, if any, into the encoder and optimizer; says where the run stands.

    On resume the schedule is aimed at the steps the last epoch really took times `train.epochs`, which a rerun
    may have raised; without a checkpoint, at the driver's estimate.

    Raises:
        RuntimeError: when the checkpoint was trained with another model config or label map.
    """
    import torch

    tcfg = worker.settings.train
    if checkpoint is None:
        return Progress(total_steps=worker.settings.steps_per_epoch * tcfg.epochs, average=_new_average(worker))
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    check_compatible(state, worker.settings)
    load_trainable(worker.encoder, state["trainable"])
    bases = [group["base_lr"] for group in worker.optimizer.param_groups]
    worker.optimizer.load_state_dict(state["optimizer"])
    for group, base in zip(worker.optimizer.param_groups, bases, strict=True):
        group.setdefault("base_lr", base)  # checkpoints from before `base_lr` lived in the param groups
    history = state["history"]
    progress = Progress(
        start_epoch=state["epoch"] + 1,
        # Older checkpoints kept no counter; every epoch's (equal on all workers) steps are in the history.
        step=state.get("step", sum(h["steps"] for h in history)),
        total_steps=history[-1]["steps"] * tcfg.epochs,
        history=history,
        average=_new_average(worker),
    )
    if progress.average is not None and "averaged" in state:
        progress.average.load_state_dict(state["averaged"])
    log.info("resuming run from its epoch %d checkpoint", state["epoch"])
    if progress.start_epoch > tcfg.epochs:
        log.warning(
            "the run already trained %d of train.epochs=%d: nothing to train, its best checkpoint is exported "
            "again; raise train.epochs to continue it or set a new train.run_name for a fresh run",
            state["epoch"],
            tcfg.epochs,
        )
    return progress


def run_epoch(worker: Worker, model: torch.nn.Module, shard, progress: Progress, epoch: int) -> EpochSums:
    """Trains one epoch on this worker's shard, advancing `progress.step`; returns the sums over all workers.

    Raises:
        RuntimeError: when no worker formed a batch (a shard needs two styles with two crops each).
    """
    settings, tcfg, world = worker.settings, worker.settings.train, worker.world
    model.train()
    seed = tcfg.seed * 1_000_003 + epoch * 1009 + worker.rank
    stats = BatcherStats()
    rows = iter_rows(shard, settings.payload, seed)
    batches = balanced_batches(rows, tcfg.styles_per_batch, tcfg.images_per_style, seed=seed, stats=stats)
    started = time.perf_counter()
    loss_sum, steps, samples = 0.0, 0, 0
    # DDP needs every worker to take the same steps: the epoch ends when any shard runs dry.
    # From images, a training crop is replaced by a random style-preserving view when augmentation is on.
    augment = np.random.default_rng(seed) if tcfg.augment_views > 1 and not settings.from_cache else None
    while _all_workers((batch := next(batches, None)) is not None, world):
        inputs, labels = collate(batch, settings.from_cache, settings.shape, worker.encoder, augment,
                                 tcfg.augment_box_jitter)
        set_lr(worker.optimizer, lr_factor(progress.step, progress.total_steps, tcfg.warmup_fraction))
        inputs, labels = inputs.to(worker.device), labels.to(worker.device)
        loss = train_step(model, worker.optimizer, worker.loss_fn, inputs, labels, worker.autocast)
        if progress.average is not None:
            progress.average.update(worker.encoder)
        loss_sum, steps, samples, progress.step = loss_sum + loss, steps + 1, samples + len(batch), progress.step + 1
    for _ in batches:
        pass  # drain the shard so every epoch starts Ray Data's split afresh
    seconds = time.perf_counter() - started
    totals = _reduce([loss_sum, steps, samples], world, "sum")
    if totals[1] == 0:
        raise RuntimeError(
            f"epoch {epoch} formed no training batch: a worker's shard needs two styles with two crops each "
            f"(rank {worker.rank} saw {stats.rows_in} rows); use fewer train.num_workers or more labelled photos"
        )
    return EpochSums(totals[0], int(totals[1] / world), int(totals[2]), seconds, stats.dropped)


def report_epoch(worker: Worker, progress: Progress, epoch: int, sums: EpochSums) -> None:
    """Reports the epoch's metrics from every rank; rank 0 also validates and attaches the checkpoint."""
    import ray.train

    metrics = {
        "epoch": epoch,
        "started_at_epoch": progress.start_epoch,
        "train_loss": sums.loss / (sums.steps * worker.world),
        "steps": sums.steps,
        "samples": sums.samples,
        "samples_per_s": sums.samples / max(sums.seconds, 1e-9),
        "lr_head": worker.optimizer.param_groups[0]["lr"],  # the epoch's last step's
        "batcher_dropped": sums.dropped,
        "worker_peak_rss_mib": _reduce([_peak_rss_mib()], worker.world, "max")[0],
    }
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)  # every rank reports: it is Ray Train's barrier
        return
    val_shard = ray.train.get_dataset_shard("val")
    # With an EMA, validation scores the averaged weights: they are what the best checkpoint exports.
    with progress.average.applied(worker.encoder) if progress.average is not None else nullcontext():
        metrics.update(validate(worker.encoder, val_shard, worker.settings, worker.device, worker.autocast))
    log.info("epoch %d/%d %s", epoch, worker.settings.train.epochs, _fmt(metrics))
    progress.history.append(metrics)
    state = {
        "epoch": epoch,
        "trainable": trainable_state(worker.encoder),
        "optimizer": worker.optimizer.state_dict(),  # its param groups carry `base_lr`
        "step": progress.step,
        "history": progress.history,
        "labels": list(worker.settings.labels),
        "fingerprint": worker.settings.fingerprint,
        "compat": compat(worker.settings),
    }
    if progress.average is not None:
        state["averaged"] = progress.average.state_dict()
    report_with_checkpoint(metrics, state, progress.history)


def _new_average(worker: Worker) -> WeightAverage | None:
    """Rank 0's weight average, started from the encoder's current (initial or restored) weights."""
    decay = worker.settings.train.ema_decay
    return WeightAverage(worker.encoder, decay) if decay > 0 and worker.rank == 0 else None


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """The lr multiplier for optimizer step `step` (0-based) of `total_steps`: linear warmup, then cosine to 0.

    Warmup spans the first round(total_steps * warmup_fraction) steps and reaches 1.0 on its last; from
    `total_steps` on the factor is 0. Being pure, the caller may re-aim `total_steps` at any step.
    """
    total = max(1, total_steps)
    warmup = int(round(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Sets each param group's lr to `factor` × its `base_lr` (a group without one keeps its current lr as base)."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def make_train_module(encoder: StyleEncoder, unlocked_blocks: int, from_cache: bool) -> torch.nn.Module:
    """Wraps the encoder so DDP sees one `forward`: boundary activations or pixels in, embeddings out.

    From pixels, the frozen lower trunk runs under no_grad: it neither trains nor keeps activations for backward.
    """
    import torch

    class TrainModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            if not from_cache:
                with torch.no_grad():
                    inputs = self.encoder.boundary_features(inputs, unlocked_blocks)
            return self.encoder.forward_from_boundary(inputs, unlocked_blocks)

    return TrainModule()


def make_optimizer(encoder: StyleEncoder, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with `lr_head` for the head, `lr_backbone` for unlocked blocks; no decay on biases and norms (1-D).

    Each group also keeps its configured rate as `base_lr`, which `set_lr` scales by the schedule.
    """
    import torch

    head, backbone = encoder.parameter_groups()
    groups = []
    for name, params, lr in (("head", head, train.lr_head), ("backbone", backbone, train.lr_backbone)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        rates = {"lr": lr, "base_lr": lr}
        if decay:
            groups.append({"name": name, "params": decay, **rates, "weight_decay": train.weight_decay})
        if no_decay:
            groups.append({"name": f"{name}_no_decay", "params": no_decay, **rates, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def train_step(model, optimizer, loss_fn, inputs, labels, autocast) -> float:
    """One optimizer step at the groups' current lr; the loss is computed in fp32 even under bf16 autocast."""
    with autocast:
        emb = model(inputs)
    loss = loss_fn(emb.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def parameter_counts(encoder: StyleEncoder) -> tuple[int, int]:
    """(trainable, frozen) parameters of the image path (visual tower and head; the text tower never runs here)."""
    params = [*encoder.visual.parameters(), *encoder.head.parameters()]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) - trainable


def collate(
    batch: list[tuple[int, Any]],
    from_cache: bool,
    shape: tuple[int, ...] | None,
    encoder: StyleEncoder,
    augment: np.random.Generator | None = None,
    box_jitter: float = BOX_JITTER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, payload) rows → (inputs, labels): cached fp16 activations, or decoded and preprocessed crops.

    With `augment`, each decoded crop (view 0 half the time) becomes a random view (`ootd.train.augment`).
    """
    import torch

    from ootd.decode import decode_crop
    from ootd.train.augment import augmented_view
    from ootd.train.feature_cache import decode_features

    labels = torch.tensor([label for label, _ in batch], dtype=torch.long)
    payloads = [payload for _, payload in batch]
    if from_cache:
        return torch.from_numpy(decode_features(payloads, shape)).float(), labels
    images = [decode_crop(b) for b in payloads]
    if augment is not None:
        images = [augmented_view(im, augment, box_jitter) if augment.random() < 0.5 else im for im in images]
    return encoder.preprocess(images), labels


def iter_rows(shard, payload: str, seed: int) -> Iterator[tuple[int, bytes]]:
    """Streams (label, payload bytes) rows from a Ray Data shard with a local shuffle."""
    for batch in shard.iter_batches(
        batch_size=_ROWS_PER_READ,
        batch_format="numpy",
        local_shuffle_buffer_size=_SHUFFLE_ROWS,
        local_shuffle_seed=seed,
    ):
        yield from zip(batch["label"].tolist(), batch[payload], strict=True)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def validate(encoder: StyleEncoder, val_shard, settings: LoopSettings, device, autocast) -> dict[str, float]:
    """Embeds the validation split (rank 0 only) and scores image-to-image retrieval by style."""
    import torch

    from_cache, shape, k = settings.from_cache, settings.shape, settings.model.unlocked_blocks
    embs, labels = [], []
    encoder.eval()
    with torch.inference_mode(), autocast:
        for batch in val_shard.iter_batches(batch_size=_ROWS_PER_READ, batch_format="numpy"):
            rows = list(zip(batch["label"].tolist(), batch[settings.payload], strict=True))
            inputs, lab = collate(rows, from_cache, shape, encoder)
            inputs = inputs.to(device)
            boundary = inputs if from_cache else encoder.boundary_features(inputs, k)
            embs.append(encoder.forward_from_boundary(boundary, k).float().cpu().numpy())
            labels.append(lab.numpy())
    encoder.train()
    if not embs:
        raise RuntimeError("the validation split is empty on rank 0")
    return {**retrieval_scores(np.concatenate(embs), np.concatenate(labels)), "val_rows": sum(map(len, labels))}


def retrieval_scores(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Validation P@10, mAP@10 (image-to-image, same style relevant, query excluded) and cosine silhouette."""
    from ootd.evaluate.metrics import retrieval_metrics, silhouette

    scores = retrieval_metrics(emb, labels, ks=(10,))
    try:
        sil = silhouette(emb, labels)
    except ValueError:  # e.g. every validation crop of one style: retrieval is still defined, silhouette is not
        sil = float("nan")
    return {"val_p_at_10": scores["P@10"], "val_map_at_10": scores["mAP@10"], "val_silhouette": sil}


def _all_workers(flag: bool, world: int) -> bool:
    return bool(_reduce([1.0 if flag else 0.0], world, "min")[0])


def _reduce(values: list[float], world: int, op: str) -> list[float]:
    if world == 1:
        return [float(v) for v in values]
    import ray.train.torch
    import torch
    import torch.distributed as dist

    # On the worker's device: NCCL (Ray Train's backend with GPUs) reduces CUDA tensors only.
    tensor = torch.tensor(values, dtype=torch.float64, device=ray.train.torch.get_device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor.tolist()


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
