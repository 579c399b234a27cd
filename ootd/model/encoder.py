"""The style encoder: open_clip vision tower + projection head, one preprocess, freezing (model dirs: `export`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ootd.model import backbones
from ootd.model.backbones import ModelNotAvailable
from ootd.model.modeldir import model_info, new_model_version

if TYPE_CHECKING:
    from PIL import Image

    from ootd.config import Config, ModelConfig

__all__ = [
    "ModelNotAvailable", "StyleEncoder", "build_encoder", "model_info", "new_model_version",
    "weights_fingerprint",
]

HEADS = ("linear", "mlp")
PRECISIONS = ("fp32", "bf16")
# Fixed init seed: a backbone built from a name (`tiny`) must come out identical in the cache job, every training
# worker and the export, or cached activations would not match the blocks trained on top of them.
INIT_SEED = 0


def build_head(kind: str, feature_dim: int, embed_dim: int, hidden: int) -> torch.nn.Module:
    """The projection head: `linear` (feature_dim → embed_dim) or `mlp` (feature_dim → hidden → embed_dim, GELU).

    Raises:
        ValueError: an unknown head kind.
    """
    if kind == "linear":
        return torch.nn.Linear(feature_dim, embed_dim)
    if kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(feature_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, embed_dim)
        )
    raise ValueError(f"unknown head {kind!r}: expected one of {list(HEADS)}")


class StyleEncoder(torch.nn.Module):
    """open_clip model (only `.visual` is used) plus a head that maps pooled features to L2-normalised embeddings.

    Attributes:
        version: model version ("" until exported or loaded).
        backbone: the backbone name the weights came from (`hf-hub:...`, `local-dir:...`, `tiny`).
        feature_dim: width of the pooled backbone features.
        embed_dim: width of the output embedding.
        head_kind: `linear` or `mlp`; head_hidden is the MLP's hidden width.
        labels: style names the model was trained on.
        preprocess_cfg: the backbone's own preprocess config (size, mean, std, interpolation, resize_mode, ...).
        unlocked_blocks: top transformer blocks left trainable by the last `freeze`.
    """

    def __init__(
        self,
        clip_model: torch.nn.Module,
        *,
        backbone: str,
        model_cfg: dict[str, Any],
        head: str = "linear",
        embed_dim: int = 128,
        head_hidden: int = 256,
        version: str = "",
        labels: Iterable[str] = (),
    ) -> None:
        """Wraps an open_clip model; prefer `StyleEncoder.from_config` or `load`.

        Args:
            clip_model: the full open_clip model (kept whole so that exports stay open_clip-loadable).
            backbone: name the weights came from, recorded in exports.
            model_cfg: the open_clip `model_cfg` the model was built from.
            head: `linear` or `mlp`.
            embed_dim: output embedding width.
            head_hidden: hidden width of the `mlp` head.
            version: model version, if known.
            labels: style names.
        """
        super().__init__()
        self.clip = clip_model
        self.backbone = backbone
        self.model_cfg = model_cfg
        self.feature_dim = backbones.feature_dim_of(clip_model.visual)
        self.embed_dim = int(embed_dim)
        self.head_kind = head
        self.head_hidden = int(head_hidden)
        self.head = build_head(head, self.feature_dim, self.embed_dim, self.head_hidden)
        self.version = version
        self.labels = [str(label) for label in labels]
        self.preprocess_cfg = backbones.preprocess_cfg_of(clip_model)
        self.transform = backbones.eval_transform(self.preprocess_cfg)
        self.unlocked_blocks = 0
        self.freeze(0)

    @classmethod
    def from_config(cls, model: ModelConfig) -> StyleEncoder:
        """A new encoder (random head) on the configured backbone, frozen to `model.unlocked_blocks`, in eval mode.

        Args:
            model: the `model` section of the config.

        Raises:
            ModelNotAvailable: the backbone's weights are not on this machine (the message names the fix).
            ValueError: an unknown backbone or head name.
        """
        if model.head not in HEADS:
            raise ValueError(f"unknown head {model.head!r}: expected one of {list(HEADS)}")
        clip_model, model_cfg = backbones.create_open_clip(model.backbone, allow_download=model.allow_download)
        if model.image_size and [model.image_size] * 2 != backbones.preprocess_cfg_of(clip_model)["size"]:
            model_cfg = backbones.resize_input(clip_model, model_cfg, model.image_size)
        encoder = cls(
            clip_model,
            backbone=model.backbone,
            model_cfg=model_cfg,
            head=model.head,
            embed_dim=model.embed_dim,
            head_hidden=model.head_hidden,
        )
        encoder.freeze(model.unlocked_blocks)
        return encoder.eval()

    @property
    def visual(self) -> torch.nn.Module:
        """The open_clip vision tower."""
        return self.clip.visual

    @property
    def device(self) -> torch.device:
        """Where the head's weights live (the whole module moves together)."""
        return next(self.head.parameters()).device

    @property
    def depth(self) -> int:
        """Number of transformer blocks in the vision tower."""
        return len(backbones.trunk_blocks(self.visual))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The one preprocessing used at train, index and serve time: pad to a square, then the backbone's transform.

        Padding (neutral grey) first keeps the outfit's proportions under a `squash` resize.

        Args:
            images: PIL images of any size and mode.

        Returns:
            float32 tensor (N, 3, S, S) on the CPU.
        """
        from PIL import Image

        from ootd.detect.boxes import pad_to_square

        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"preprocess expects PIL images; item {i} is a {type(image).__name__}")
        if len(images) == 0:
            size = self.preprocess_cfg["size"]
            return torch.empty((0, 3, size[0], size[1]), dtype=torch.float32)
        return torch.stack([self.transform(pad_to_square(image)) for image in images])

    def backbone_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled vision-tower features (B, feature_dim), no head, not normalised."""
        return self.visual(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B, embed_dim) of preprocessed pixels."""
        return self._project(self.backbone_features(pixels))

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.head(features), dim=-1)

    def boundary_features(self, pixels: torch.Tensor, unlocked_blocks: int) -> torch.Tensor:
        """What the frozen part of the tower computes: the feature cache stores exactly this.

        Args:
            pixels: preprocessed images (B, 3, S, S).
            unlocked_blocks: k. For k > 0 the token activations entering the first of the top k blocks
                (B, tokens, width); for k = 0 the pooled features (B, feature_dim).
        """
        k = self._check_blocks(unlocked_blocks)
        if k == 0:
            return self.backbone_features(pixels)
        tokens = backbones.embed_tokens(self.visual, pixels)
        return backbones.run_blocks(self.visual, tokens, 0, self.depth - k)

    def forward_from_boundary(self, boundary: torch.Tensor, unlocked_blocks: int) -> torch.Tensor:
        """Finishes `forward` from `boundary_features(pixels, k)`: the same (B, embed_dim) as `forward(pixels)`."""
        k = self._check_blocks(unlocked_blocks)
        if k == 0:
            return self._project(boundary)
        tokens = backbones.run_blocks(self.visual, boundary, self.depth - k, self.depth)
        return self._project(backbones.pool_tokens(self.visual, tokens))

    def freeze(self, unlocked_blocks: int) -> None:
        """Freezes the backbone except the top k blocks and, for k ≥ 1, the final norm, pooling and projection.

        The head always trains; the text tower never does.

        Args:
            unlocked_blocks: k, from 0 (head only) to the tower's depth.

        Raises:
            ValueError: k out of range.
            NotImplementedError: k ≥ 1 on a vision tower that is neither a timm ViT nor an open_clip ViT.
        """
        if unlocked_blocks < 0:
            raise ValueError(f"unlocked_blocks must be >= 0, got {unlocked_blocks}")
        self.clip.requires_grad_(False)
        self.head.requires_grad_(True)
        if unlocked_blocks > 0:
            k = self._check_blocks(unlocked_blocks)
            blocks = list(backbones.trunk_blocks(self.visual))
            for module in blocks[len(blocks) - k:] + backbones.top_modules(self.visual):
                module.requires_grad_(True)
            for param in backbones.top_parameters(self.visual):
                param.requires_grad_(True)
        self.unlocked_blocks = int(unlocked_blocks)

    def _check_blocks(self, unlocked_blocks: int) -> int:
        k = int(unlocked_blocks)
        if k < 0:
            raise ValueError(f"unlocked_blocks must be >= 0, got {unlocked_blocks}")
        if k > 0 and k > self.depth:
            raise ValueError(f"unlocked_blocks={k} but the vision tower has only {self.depth} blocks")
        return k

    def parameter_groups(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(head parameters, trainable backbone parameters): the two optimizer groups (head and backbone lr)."""
        head = list(self.head.parameters())
        trunk = [p for p in self.visual.parameters() if p.requires_grad]
        return head, trunk

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], batch_size: int = 32, precision: str = "fp32") -> np.ndarray:
        """L2-normalised style embeddings of PIL images.

        Args:
            images: crops (any size; padded to a square here).
            batch_size: images per forward pass.
            precision: `fp32`, or `bf16` (autocast on CPU or GPU).

        Returns:
            float32 array (N, embed_dim).
        """
        return self._batched(images, batch_size, precision, self.forward, self.embed_dim)

    @torch.no_grad()
    def embed_features(
        self, images: Sequence[Image.Image], batch_size: int = 32, precision: str = "fp32"
    ) -> np.ndarray:
        """L2-normalised pooled backbone features (no head) of PIL images: the frozen baseline.

        Returns:
            float32 array (N, feature_dim).
        """

        def features(pixels: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.backbone_features(pixels).float(), dim=-1)

        return self._batched(images, batch_size, precision, features, self.feature_dim)

    def _batched(self, images: Sequence[Image.Image], batch_size: int, precision: str, fn: Any, dim: int) -> np.ndarray:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(images), dim), dtype=np.float32)
        device = self.device
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(images), batch_size):
                pixels = self.preprocess(images[start:start + batch_size]).to(device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    result = fn(pixels)
                out[start:start + len(pixels)] = result.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def export(
        self,
        out_dir: str | Path,
        *,
        version: str | None = None,
        labels: Iterable[str] = (),
        metrics: dict | None = None,
        config: Config | None = None,
        unlocked_blocks: int | None = None,
    ) -> Path:
        """Writes a self-contained model dir, published atomically (readers never see half of one).

        Contents: `open_clip_config.json` + `open_clip_model.safetensors` (loadable by open_clip as
        `local-dir:DIR`), `head.safetensors` and `ootd_model.json` (version, dims, head, backbone, labels,
        preprocess, unlocked blocks, metrics, resolved config, created_at, ootd version).

        Args:
            out_dir: the model dir to create (absent or empty), e.g. `<workdir>/models/<version>`.
            version: model version; default: a new one (a changed model must never reuse a version).
            labels: style names; default: this encoder's labels.
            metrics: training/eval metrics to record (JSON-able).
            config: the resolved config the model was trained with.
            unlocked_blocks: blocks that were fine-tuned; default: the last `freeze`.

        Returns:
            The model dir.

        Raises:
            FileExistsError: out_dir exists and is not empty.
        """
        from ootd.model.export import export_model

        return export_model(self, out_dir, version=version, labels=labels, metrics=metrics, config=config,
                            unlocked_blocks=unlocked_blocks)


def build_encoder(model: ModelConfig) -> StyleEncoder:
    """Builds the encoder the same way everywhere (cache actors, training workers, export).

    Args:
        model: the model section of the config.
    """
    # fork_rng keeps the caller's RNG stream untouched while the build draws from a fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return StyleEncoder.from_config(model)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap hash of every tensor's name, shape and a strided sample of its values.

    It tells apart two differently initialised or loaded backbones without hashing hundreds of MB.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]
