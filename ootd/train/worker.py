"""What runs inside each Ray Train worker: the DDP step over class-balanced batches, validation, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ootd.train.batches import BatcherStats, balanced_batches

if TYPE_CHECKING:
    import torch

    from ootd.config import ModelConfig, TrainConfig
    from ootd.model.encoder import StyleEncoder

log = logging.getLogger("ootd.train.driver")

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
SCORE = "val_map_at_10"  # checkpoints are ranked by this (higher is better)
# Rows iterated per Ray Data batch when feeding the batcher; the local shuffle buffer mixes styles across files.
_ROWS_PER_READ = 64
_SHUFFLE_ROWS = 256


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
    """AdamW with `lr_head` for the head, `lr_backbone` for unlocked blocks; no decay on biases and norms (1-D)."""
    import torch

    head, backbone = encoder.parameter_groups()
    groups = []
    for name, params, lr in (("head", head, train.lr_head), ("backbone", backbone, train.lr_backbone)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": train.weight_decay})
        if no_decay:
            groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """Linear warmup over the first `warmup_fraction` of steps, then cosine decay to zero.

    `scheduler.total_steps` may be corrected during the run (`set_total_steps`): class-balanced batching forms a
    number of batches per epoch that the driver can only estimate.
    """
    import torch

    scheduler = None  # bound below; `factor` reads its (correctable, checkpointed) total_steps

    def factor(step: int) -> float:
        total = scheduler.total_steps if scheduler is not None else max(1, total_steps)
        warmup = int(round(total * warmup_fraction))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.total_steps = max(1, total_steps)
    return scheduler


def set_total_steps(scheduler, total_steps: int) -> None:
    """Re-aims the cosine at `total_steps`; the new rate applies from the next step."""
    scheduler.total_steps = max(1, total_steps)


def train_step(model, optimizer, scheduler, loss_fn, inputs, labels, autocast) -> float:
    """One optimizer step; the loss is computed in fp32 even when the forward pass runs under bf16 autocast."""
    with autocast:
        emb = model(inputs)
    loss = loss_fn(emb.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def collate(
    batch: list[tuple[int, Any]], from_cache: bool, shape: tuple[int, ...] | None, encoder: StyleEncoder
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, payload) rows → (inputs, labels): cached fp16 activations, or decoded and preprocessed crops."""
    import torch

    from ootd.decode import decode_crop
    from ootd.train.feature_cache import decode_features

    labels = torch.tensor([label for label, _ in batch], dtype=torch.long)
    payloads = [payload for _, payload in batch]
    if from_cache:
        return torch.from_numpy(decode_features(payloads, shape)).float(), labels
    return encoder.preprocess([decode_crop(b) for b in payloads]), labels


def iter_rows(shard, payload: str, seed: int) -> Iterator[tuple[int, bytes]]:
    """Streams (label, payload bytes) rows from a Ray Data shard with a local shuffle."""
    for batch in shard.iter_batches(
        batch_size=_ROWS_PER_READ,
        batch_format="numpy",
        local_shuffle_buffer_size=_SHUFFLE_ROWS,
        local_shuffle_seed=seed,
    ):
        yield from zip(batch["label"].tolist(), batch[payload], strict=True)


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """The Ray Train worker function (see `ootd.train.build_trainer` for the `loop` keys)."""
    import ray.train
    import ray.train.torch
    import torch

    from ootd.model.encoder import build_encoder, weights_fingerprint
    from ootd.model.losses import make_loss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    mcfg: ModelConfig = loop["model"]
    tcfg: TrainConfig = loop["train"]
    k, from_cache, shape = mcfg.unlocked_blocks, loop["source"] == "cache", loop.get("shape")
    hooks = loop.get("hooks") or {}
    _hook_pid(hooks, rank)
    device = ray.train.torch.get_device()

    encoder = build_encoder(mcfg)
    if weights_fingerprint(encoder) != loop["fingerprint"]:
        raise RuntimeError(f"backbone {mcfg.backbone!r} on this worker differs from the driver's (fingerprint)")
    encoder.freeze(k)
    module = make_train_module(encoder, k, from_cache)
    optimizer = make_optimizer(encoder, tcfg)
    scheduler = warmup_cosine(optimizer, loop["steps_per_epoch"] * tcfg.epochs, tcfg.warmup_fraction)
    loss_fn = make_loss(tcfg.loss, tcfg.temperature, tcfg.margin)

    start_epoch, history = 1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
        _check_compatible(state, loop)
        load_trainable(encoder, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        set_total_steps(scheduler, history[-1]["steps"] * tcfg.epochs)
        log.info("resuming run from its epoch %d checkpoint", state["epoch"])
        if start_epoch > tcfg.epochs:
            log.warning(
                "the run already trained %d of train.epochs=%d: nothing to train, its best checkpoint is exported "
                "again; raise train.epochs to continue it or set a new train.run_name for a fresh run",
                state["epoch"],
                tcfg.epochs,
            )
    model = ray.train.torch.prepare_model(module)
    train_shard = ray.train.get_dataset_shard("train")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.bf16)

    for epoch in range(start_epoch, tcfg.epochs + 1):
        model.train()
        seed = tcfg.seed * 1_000_003 + epoch * 1009 + rank
        stats = BatcherStats()
        rows = iter_rows(train_shard, loop["payload"], seed)
        batches = balanced_batches(rows, tcfg.styles_per_batch, tcfg.images_per_style, seed=seed, stats=stats)
        started = time.perf_counter()
        loss_sum, steps, samples = 0.0, 0, 0
        while True:
            batch = next(batches, None)
            # DDP needs every worker to take the same steps: stop the epoch when any shard runs dry.
            if not _all_workers(batch is not None, world):
                break
            inputs, labels = collate(batch, from_cache, shape, encoder)
            loss = train_step(model, optimizer, scheduler, loss_fn, inputs.to(device), labels.to(device), autocast)
            loss_sum, steps, samples = loss_sum + loss, steps + 1, samples + len(batch)
        for _ in batches:
            pass  # drain the shard so every epoch starts Ray Data's split afresh
        seconds = time.perf_counter() - started
        totals = _reduce([loss_sum, steps, samples], world, "sum")
        if totals[1] == 0:
            raise RuntimeError(
                f"epoch {epoch} formed no training batch: a worker's shard needs two styles with two crops each "
                f"(rank {rank} saw {stats.rows_in} rows); use fewer train.num_workers or more labelled photos"
            )
        # Every worker took the same number of steps; the driver's estimate assumed full P×K batches only.
        set_total_steps(scheduler, int(totals[1] / world) * tcfg.epochs)
        metrics = {
            "epoch": epoch,
            "started_at_epoch": start_epoch,
            "train_loss": totals[0] / totals[1],
            "steps": int(totals[1] / world),
            "samples": int(totals[2]),
            "samples_per_s": totals[2] / max(seconds, 1e-9),
            "lr_head": optimizer.param_groups[0]["lr"],
            "batcher_dropped": stats.dropped,
            "worker_peak_rss_mib": _reduce([_peak_rss_mib()], world, "max")[0],
        }
        if rank == 0:
            metrics.update(validate(encoder, ray.train.get_dataset_shard("val"), loop, device, autocast))
            log.info("epoch %d/%d %s", epoch, tcfg.epochs, _fmt(metrics))
            history.append(metrics)
            state = {
                "epoch": epoch,
                "trainable": trainable_state(encoder),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "labels": loop["labels"],
                "fingerprint": loop["fingerprint"],
                "compat": _compat(loop),
            }
            _report_with_checkpoint(metrics, state, history)
        else:
            ray.train.report(metrics, checkpoint=None)  # every rank reports: it is Ray Train's barrier
        _hook_hold(hooks, epoch, rank)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _report_with_checkpoint(metrics: dict[str, Any], state: dict[str, Any], history: list[dict]) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        # Readable without torch or the optimizer state: the driver returns it as the run's history.
        Path(tmp, HISTORY_FILE).write_text(json.dumps(history, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def validate(encoder: StyleEncoder, val_shard, loop: dict[str, Any], device, autocast) -> dict[str, float]:
    """Embeds the validation split (rank 0 only) and scores image-to-image retrieval by style."""
    import torch

    from_cache, shape, k = loop["source"] == "cache", loop.get("shape"), loop["model"].unlocked_blocks
    embs, labels = [], []
    encoder.eval()
    with torch.inference_mode(), autocast:
        for batch in val_shard.iter_batches(batch_size=_ROWS_PER_READ, batch_format="numpy"):
            rows = list(zip(batch["label"].tolist(), batch[loop["payload"]], strict=True))
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


def trainable_state(encoder: StyleEncoder) -> dict[str, torch.Tensor]:
    """Only what training changes (head + unlocked blocks): the frozen trunk is rebuilt from the backbone name."""
    return {name: p.detach().cpu().clone() for name, p in encoder.named_parameters() if p.requires_grad}


def load_trainable(encoder: StyleEncoder, state: dict[str, torch.Tensor]) -> None:
    """Loads `trainable_state` output back into an encoder frozen the same way.

    Raises:
        RuntimeError: when the names do not match the encoder's trainable parameters.
    """
    import torch

    params = dict(encoder.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise RuntimeError(f"checkpoint does not fit this encoder: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _compat(loop: dict[str, Any]) -> dict[str, Any]:
    m = loop["model"]
    return {
        "backbone": m.backbone,
        "head": m.head,
        "embed_dim": m.embed_dim,
        "head_hidden": m.head_hidden,
        "unlocked_blocks": m.unlocked_blocks,
        "labels": list(loop["labels"]),
    }


def _check_compatible(state: dict[str, Any], loop: dict[str, Any]) -> None:
    theirs, ours = state.get("compat", {}), _compat(loop)
    diff = sorted(key for key in ours if theirs.get(key) != ours[key])
    if diff:
        raise RuntimeError(
            f"the run's latest checkpoint was trained with a different {', '.join(diff)} "
            f"({[theirs.get(d) for d in diff]} vs {[ours[d] for d in diff]}): "
            "pick a new name with --set train.run_name=... to start a fresh run"
        )


def _all_workers(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    # On the worker's device: NCCL (Ray Train's backend with GPUs) reduces CUDA tensors only.
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _collective_device():
    import ray.train.torch

    return ray.train.torch.get_device()


def _reduce(values: list[float], world: int, op: str) -> list[float]:
    if world == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _hook_pid(hooks: dict[str, Any], rank: int) -> None:
    """Test hook: record this worker's pid so a test can kill a real worker process."""
    if hooks.get("pid_dir"):
        Path(hooks["pid_dir"], f"rank{rank}-{os.getpid()}.pid").write_text(str(os.getpid()))


def _hook_hold(hooks: dict[str, Any], epoch: int, rank: int) -> None:
    """Test hook: after `hold_after_epoch`, wait (bounded) for the test to create `<pid_dir>/release`."""
    if hooks.get("hold_after_epoch") != epoch or not hooks.get("pid_dir"):
        return
    release = Path(hooks["pid_dir"], "release")
    Path(hooks["pid_dir"], f"held-rank{rank}-{os.getpid()}").write_text(str(epoch))
    deadline = time.monotonic() + float(hooks.get("hold_timeout_s", 300))
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
