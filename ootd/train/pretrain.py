"""Attribute pretraining of the tiny backbone (DESIGN §5): synthetic garments, multi-attribute heads, Ray Train DDP.

The trunk learns garment class, colour family, pattern and silhouette from `ootd.synthetic_attributes` photos,
which never involve a style, so the later style fine-tuning starts from features that know garments but not
the style taxonomy (the regime Marqo-FashionSigLIP, pretrained on product attributes, puts production in).
Every photo is rendered from a seed derived from (seed, stream, index), so the data does not depend on the number
of workers, and the held-out photos come from their own stream.
"""

from __future__ import annotations

import io
import json
import logging
import math
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

TRAIN_STREAM, EVAL_STREAM = 0, 1
WEIGHTS_FILE = "tiny-backbone.safetensors"
METRICS_FILE = "tiny-backbone.metrics.json"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class PretrainSettings:
    """One pretraining run (pickled to every Ray Train worker as it is).

    Attributes:
        n_train: training photos (rendered once, split across workers by index).
        n_eval: held-out photos from a separate seed stream, scored after every epoch.
        epochs: passes over the training photos (random horizontal flips differ per pass).
        batch_size: global batch (divided across workers).
        lr: peak AdamW learning rate (linear warm-up over `warmup_fraction` of the steps, then cosine to 0).
        weight_decay: AdamW decay on matrices (norms, biases and embeddings are not decayed).
        warmup_fraction: share of all steps spent warming up.
        render_size: side of the rendered photo before the outfit crop.
        image_size: the trunk's input side (of the first epochs when `final_image_size` is set; a multiple of the
            patch size, 16): the tiny trunk interpolates its position embeddings from the 8 x 8 grid it stores to
            this size's grid at each forward, so the weights file keeps its shape.
        final_image_size: the input side of the last `final_epochs` epochs (None: `image_size` throughout). A
            progressive resize in one run: the early epochs learn at the cheap size, the last ones adapt the trunk
            to the size fine-tuning runs it at. Photos are kept at this size and the early epochs shrink each
            batch (bilinear, antialiased), so they are rendered once.
        final_epochs: how many of `epochs` run at `final_image_size`.
        init: a trunk weights file (`tiny-backbone.safetensors`) to start from instead of the seeded random init:
            a second stage at another `image_size` continues the first.
        max_pad: the crop box grows by up to this fraction per side, as a detector's padded, imperfect box does.
        seed: the data and init seed.
        num_workers: Ray Train (DDP) workers.
        cpus_per_worker: CPUs each worker reserves; torch uses as many threads.
        bf16: autocast the forward pass to bfloat16; None (default): where the worker's CPU does bf16 natively
            (`native_bf16`). Elsewhere torch emulates it: one 64-photo step of the tiny trunk took 10 s under bf16
            autocast against 0.86 s in fp32 (one thread, an EPYC without AVX512).
    """

    n_train: int = 16384
    n_eval: int = 1024
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    render_size: int = 256
    image_size: int = 128
    final_image_size: int | None = None
    final_epochs: int = 0
    init: str | None = None
    max_pad: float = 0.12
    seed: int = 0
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    bf16: bool | None = None

    @property
    def stored_size(self) -> int:
        """The side photos are rendered and kept at: the largest input side of the run."""
        return max(self.image_size, self.final_image_size or 0)

    def input_size(self, epoch: int) -> int:
        """The trunk's input side in epoch `epoch` (0-based)."""
        final = self.final_image_size is not None and epoch >= self.epochs - self.final_epochs
        return self.final_image_size if final else self.image_size


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), which is where autocast pays."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def attribute_sizes() -> dict[str, int]:
    """Attribute name → number of classes: one classification head each."""
    from ootd.synthetic_attributes import ATTRIBUTES

    return {name: len(classes) for name, classes in ATTRIBUTES.items()}


def majority_baseline(settings: PretrainSettings) -> dict[str, float]:
    """Held-out accuracy of always guessing each attribute's most frequent class: what the heads must beat.

    Cheap: a photo's labels are the first draws of its generator, so no photo is rendered.
    """
    from ootd.synthetic_attributes import sample_attributes

    rows = [sample_attributes(np.random.default_rng([settings.seed, EVAL_STREAM, i])) for i in range(settings.n_eval)]
    return {name: float(np.bincount([r[name] for r in rows]).max() / len(rows)) for name in attribute_sizes()}


def render_example(stream: int, index: int, settings: PretrainSettings, transform: Any) -> tuple[Any, np.ndarray]:
    """One attribute-mode photo as the encoder sees a crop: JPEG round trip, padded outfit box, the tiny preprocess
    up to its normalisation (`CropPixels.normalise` does that per batch).

    Args:
        stream: TRAIN_STREAM or EVAL_STREAM.
        index: photo index within the stream.
        settings: the run (seed, render size, crop padding).
        transform: PIL crop → uint8 tensor (`CropPixels.to_uint8`).

    Returns:
        (uint8 tensor (3, S, S), int64 labels in `attribute_sizes()` order).
    """
    from PIL import Image

    from ootd.detect.boxes import pad_to_square
    from ootd.synthetic_attributes import ATTRIBUTES, render_attribute_outfit

    rng = np.random.default_rng([settings.seed, stream, index])
    photo = render_attribute_outfit(rng, settings.render_size)
    buf = io.BytesIO()  # photos arrive as JPEGs: train on their artefacts too
    photo.image.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    x1, y1, x2, y2 = photo.outfit_box
    pads = rng.uniform(0.0, settings.max_pad, 4) * np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
    size = settings.render_size
    box = (max(0, int(x1 - pads[0])), max(0, int(y1 - pads[1])), min(size, int(x2 + pads[2] + 1)),
           min(size, int(y2 + pads[3] + 1)))  # fmt: skip
    pixels = transform(pad_to_square(image.crop(box)))
    labels = np.array([photo.attributes[name] for name in ATTRIBUTES], dtype=np.int64)
    return pixels, labels


class CropPixels:
    """The tiny eval transform split at its normalisation: PIL crop → uint8 tensor, then uint8 batch → model input.

    Workers keep their rendered photos as uint8, a quarter of float32 (8,192 photos at 192 px: 0.9 GB instead of
    3.6 GB per worker), and normalise each batch as it is used. The transform's to-tensor step is x / 255 of these
    same uint8 values, so the model sees bit-identical inputs.
    """

    def __init__(self, size: int) -> None:
        from ootd.model import backbones

        steps = backbones.eval_transform(_tiny_preprocess(size)).transforms
        if type(steps[-2]).__name__ != "MaybeToTensor" or type(steps[-1]).__name__ != "Normalize":
            raise NotImplementedError(f"the tiny eval transform changed shape: {steps}")
        self._resize = steps[:-2]
        mean, std = steps[-1].mean, steps[-1].std
        self._mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def to_uint8(self, image: Any) -> torch.Tensor:
        for step in self._resize:
            image = step(image)
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        # Normalize's own (x - mean) / std, in place on the one float copy: it runs on every training batch.
        return pixels.float().div_(255).sub_(self._mean).div_(self._std)


def render_set(
    stream: int, indices: range | list[int], settings: PretrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders photos `indices` of a stream: (pixels (N, 3, S, S) uint8 at `settings.stored_size`, labels
    (N, attributes) int64)."""
    size = settings.stored_size
    crop_pixels = CropPixels(size)
    indices = list(indices)
    if not indices:
        raise ValueError(f"no photos to render in stream {stream} (n_train/n_eval too small for the workers)")
    # Filled in place: stacking a list would hold every photo twice at the peak.
    pixels = torch.empty((len(indices), 3, size, size), dtype=torch.uint8)
    labels = np.empty((len(indices), len(attribute_sizes())), dtype=np.int64)
    for row, index in enumerate(indices):
        pixels[row], labels[row] = render_example(stream, index, settings, crop_pixels.to_uint8)
    return pixels, torch.from_numpy(labels)


def _tiny_preprocess(size: int) -> dict[str, Any]:
    from ootd.model import backbones

    return {**backbones.TINY_PREPROCESS_CFG, "size": [size, size]}


def use_explicit_attention(model: torch.nn.Module) -> int:
    """Switches the model's timm attention layers from torch's fused SDPA to timm's explicit softmax(QKᵀ)V, in place.

    Same maths, but on CPU the fused (flash) kernel's backward is slow for short token sequences: a 64-photo
    pretraining step of the tiny trunk (bf16 autocast, one core) takes 0.475 s fused against 0.358 s explicit at
    128 px, 1.205 s against 0.867 s at 192 px. (Style fine-tuning, which trains one block on cached activations,
    gained nothing measurable from it, so only pretraining uses it.)

    Returns:
        How many layers were switched.
    """
    layers = [module for module in model.modules() if getattr(module, "fused_attn", False)]
    for layer in layers:
        layer.fused_attn = False
    return len(layers)


class AttributeNet(torch.nn.Module):
    """The tiny vision tower plus one linear head per attribute on its pooled 192-d feature.

    Args:
        seed: seeds the heads (the tower's init is `tiny-random`'s, seeded by `ootd.model.backbones`).
        init: trunk weights to load into the tower (strict), e.g. a first stage's `tiny-backbone.safetensors`.
    """

    def __init__(self, seed: int = 0, init: str | None = None) -> None:
        from ootd.model.backbones import create_tiny, feature_dim_of, load_tiny_trunk

        super().__init__()
        self.visual = create_tiny(pretrained=False).visual
        use_explicit_attention(self.visual)  # pretraining runs on CPU, where a step is ~1.35x faster with it
        if init is not None:
            load_tiny_trunk(self.visual, init)
        dim = feature_dim_of(self.visual)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(dim, n) for name, n in attribute_sizes().items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute name."""
        features = self.visual(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def attribute_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the cross-entropy of each head (labels columns in `attribute_sizes()` order)."""
    import torch.nn.functional as F

    return sum(F.cross_entropy(out.float(), labels[:, i]) for i, out in enumerate(logits.values()))


def _optimizer(model: torch.nn.Module, settings: PretrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.shape[0] > 1]
    keep = [p for p in model.parameters() if not (p.ndim >= 2 and p.shape[0] > 1)]  # norms, biases, pos/latent
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999))


def lr_at(step: int, total: int, settings: PretrainSettings) -> float:
    """Linear warm-up then cosine decay to zero."""
    warmup = max(1, int(settings.warmup_fraction * total))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def shrink(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """A normalised batch resized to `size` (bilinear, antialiased); unchanged when it already has that size."""
    import torch.nn.functional as F

    if pixels.shape[-1] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def evaluate_attributes(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, bf16: bool,
                        normalise: Callable[[torch.Tensor], torch.Tensor], batch: int = 256,
                        size: int | None = None) -> np.ndarray:  # fmt: skip
    """Correct predictions per attribute (int counts, `attribute_sizes()` order) on the given uint8 photos, fed at
    input side `size` (default: as stored)."""
    correct = np.zeros(labels.shape[1], dtype=np.int64)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(pixels), batch):
            logits = model(shrink(normalise(pixels[start:start + batch]), size or pixels.shape[-1]))
            for i, out in enumerate(logits.values()):
                correct[i] += int((out.argmax(dim=1) == labels[start:start + batch, i]).sum())
    model.train(was_training)
    return correct


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: renders its shard, trains the DDP-wrapped net, reports per-epoch held-out accuracy.

    Rank 0 reports the final trunk weights as the run's checkpoint; every rank reports every epoch (Ray Train's
    barrier). Works with a world of 1.
    """
    import ray.train
    import ray.train.torch

    settings: PretrainSettings = config["settings"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
    started = time.perf_counter()
    train_x, train_y = render_set(TRAIN_STREAM, range(rank, settings.n_train, world), settings)
    eval_x, eval_y = render_set(EVAL_STREAM, range(rank, settings.n_eval, world), settings)
    render_s = time.perf_counter() - started
    crop_pixels = CropPixels(settings.stored_size)
    bf16 = native_bf16() if settings.bf16 is None else settings.bf16
    if rank == 0:
        log.info("pretrain: bf16 autocast %s", "on" if bf16 else "off (fp32)")

    net = AttributeNet(settings.seed, settings.init)
    model = ray.train.torch.prepare_model(net)  # DDP when world > 1; broadcasts rank 0's (identical) init
    optimizer = _optimizer(model, settings)
    local_batch = max(1, settings.batch_size // world)
    # Every rank must take the same number of steps or DDP's all-reduce would wait forever.
    steps_per_epoch = max(1, (settings.n_train // world) // local_batch)
    total = steps_per_epoch * settings.epochs
    gen = torch.Generator().manual_seed(settings.seed * 1000 + rank)
    step, history = 0, []
    for epoch in range(settings.epochs):
        epoch_start, losses, size = time.perf_counter(), [], settings.input_size(epoch)
        order = torch.randperm(len(train_x), generator=gen)
        model.train()
        for i in range(steps_per_epoch):
            idx = order[(i * local_batch) % len(order):][:local_batch]
            x, y = train_x[idx], train_y[idx]
            flip = torch.rand(len(x), generator=gen) < 0.5  # attributes are left-right symmetric
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # on uint8: a quarter of the bytes
            x = shrink(crop_pixels.normalise(x), size)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, settings)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = attribute_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.detach().item())
            step += 1
        correct = evaluate_attributes(net, eval_x, eval_y, bf16, crop_pixels.normalise, size=size)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        counts = np.array([*correct, cpu.ru_utime + cpu.ru_stime, len(eval_x), sum(losses), len(losses)])
        counts = _all_reduce_sum(counts.astype(np.float64), world)
        n_eval = counts[-3]
        accuracy = {name: float(c / n_eval) for name, c in zip(attribute_sizes(), counts[:-4], strict=True)}
        metrics = {
            "epoch": epoch + 1, "image_size": size, "steps": step, "train_loss": float(counts[-2] / counts[-1]),
            "eval_accuracy": accuracy, "eval_mean_accuracy": float(np.mean(list(accuracy.values()))),
            "epoch_seconds": time.perf_counter() - epoch_start, "render_seconds": render_s,
            # CPU time of all workers so far: what the run costs regardless of other load on the machine.
            "worker_cpu_seconds": float(counts[-4]),
            "bf16": bf16,  # what the default (None) resolved to on rank 0's CPU
        }  # fmt: skip
        keys = ("epoch", "image_size", "train_loss", "eval_mean_accuracy", "epoch_seconds", "worker_cpu_seconds")
        history.append({k: metrics[k] for k in keys})
        log.info("pretrain epoch %d: loss %.3f, mean attribute accuracy %.3f", epoch + 1, metrics["train_loss"],
                 metrics["eval_mean_accuracy"])  # fmt: skip
        if epoch + 1 == settings.epochs and rank == 0:
            _report_trunk(metrics, net.visual, history)
        else:
            ray.train.report(metrics, checkpoint=None)


def _all_reduce_sum(values: np.ndarray, world: int) -> np.ndarray:
    if world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.from_numpy(values.copy())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.numpy()


def _report_trunk(metrics: dict[str, Any], visual: torch.nn.Module, history: list[dict]) -> None:
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in visual.state_dict().items()}
        save_file(state, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": "ootd-tiny-trunk-v1"})
        (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def pretrain_backbone(settings: PretrainSettings, out_dir: str | Path, *, storage_path: str | Path | None = None,
                      run_name: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Runs attribute pretraining in a Ray Train TorchTrainer and writes the trunk and its metrics to `out_dir`.

    Needs a connected Ray cluster (`ray.init` is the caller's job).

    Args:
        settings: the run.
        out_dir: receives `tiny-backbone.safetensors` (the vision tower's state dict, what `tiny` loads) and
            `tiny-backbone.metrics.json`; copy both to ootd/assets/ to make them the committed backbone.
        storage_path: Ray Train storage; default `<out_dir>/ray_results`.
        run_name: Ray Train run name; default a fresh timestamped one.

    Returns:
        The metrics written: final per-attribute held-out accuracy, history, wall time, settings, file sizes.

    Raises:
        ValueError: an input size is not a multiple of the trunk's patch size, the final-size schedule does not
            fit `epochs`, or `init` is not a file.
        RuntimeError: when the run fails or reports no checkpoint.
    """
    import shutil

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ootd.model.backbones import TINY_PATCH_SIZE

    for name in ("image_size", "final_image_size"):
        size = getattr(settings, name)
        if size is not None and size % TINY_PATCH_SIZE:
            raise ValueError(f"{name} must be a multiple of the tiny trunk's patch size {TINY_PATCH_SIZE}, "
                             f"got {size}")  # fmt: skip
    if not 0 <= settings.final_epochs <= settings.epochs or (settings.final_epochs > 0) != (
            settings.final_image_size is not None):  # fmt: skip
        raise ValueError(f"final_epochs must be in 1..epochs ({settings.epochs}) with a final_image_size, and 0 "
                         f"without one; got final_epochs={settings.final_epochs}, "
                         f"final_image_size={settings.final_image_size}")  # fmt: skip
    if settings.init is not None and not Path(settings.init).is_file():
        raise ValueError(f"init trunk weights not found: {settings.init}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(storage_path).resolve() if storage_path else out / "ray_results"
    name = run_name or time.strftime("pretrain-%Y%m%d-%H%M%S")
    started = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=ScalingConfig(num_workers=settings.num_workers,
                                     resources_per_worker={"CPU": settings.cpus_per_worker}),  # fmt: skip
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"pretraining run {storage / name} failed") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining run {storage / name} reported no checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        shutil.copyfile(Path(ckpt) / WEIGHTS_FILE, out / WEIGHTS_FILE)
        history = json.loads((Path(ckpt) / HISTORY_FILE).read_text())
    final = dict(result.metrics)
    summary = {
        "eval_accuracy": final.get("eval_accuracy"),
        "eval_mean_accuracy": final.get("eval_mean_accuracy"),
        "majority_accuracy": (majority := majority_baseline(settings)),
        "majority_mean_accuracy": float(np.mean(list(majority.values()))),
        "final_train_loss": final.get("train_loss"),
        "wall_seconds": round(wall, 1),
        "render_seconds_per_worker": final.get("render_seconds"),
        "worker_cpu_seconds": final.get("worker_cpu_seconds"),
        "history": history,
        "settings": {**asdict(settings), "bf16": final.get("bf16", settings.bf16)},
        "weights_bytes": (out / WEIGHTS_FILE).stat().st_size,
        "run_dir": str(storage / name),
    }  # fmt: skip
    (out / METRICS_FILE).write_text(json.dumps(summary, indent=2))
    return summary
