"""open_clip backbones by name (hf-hub:, local-dir:, tiny, tiny-random) and the vision-trunk seams for freezing."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
TINY = "tiny"  # the tiny ViT with the committed attribute-pretrained trunk (DESIGN §5)
TINY_RANDOM = "tiny-random"  # the same architecture, randomly initialised (tests that need untrained weights)
TINY_NAMES = (TINY, TINY_RANDOM)
# The untrained twin of a pretrained backbone: `ootd evaluate` scores it frozen, to show what pretraining gave.
RANDOM_TWINS = {TINY: TINY_RANDOM}
# Trunk weights `ootd pretrain-backbone` wrote (ootd/assets/README.md says how); `tiny` loads them.
TINY_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "tiny-backbone.safetensors"
# Everything about `tiny` is drawn from this seed, so any process builds the identical model.
TINY_INIT_SEED = 0
# The name `tiny` is registered under in open_clip's model registry, and the timm trunk it is built on.
TINY_OPEN_CLIP_NAME = "ootd-tiny-vit"
TINY_TIMM_NAME = "ootd_tiny_vit_128"
# The first tiny trunk (64 px, patch 8): still registered so that model dirs exported with it keep loading.
TINY_TIMM_NAME_V1 = "ootd_tiny_vit_64"

# Same family as ViT-B-16-SigLIP (timm trunk, MAP pooling, no class token, no projection) so freezing and
# caching take the same code paths as the production model. The text tower only exists so that an exported
# dir is a complete open_clip model; it uses open_clip's bundled BPE tokenizer (49408 tokens, nothing to fetch).
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 192,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 128,
        "timm_model_name": TINY_TIMM_NAME,
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
    },
}
TINY_PREPROCESS_CFG: dict[str, Any] = {
    "size": 128,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "resize_mode": "squash",
}
# 128 px in patches of 16: the 64 tokens (and so the compute) of the first 64 px / patch 8 trunk, but a stripe or
# check a few pixels wide in a crop survives the resize (at 64 px it was mostly gone).
TINY_PATCH_SIZE = 16
_TINY_VIT_ARGS = {
    "img_size": 128,
    "patch_size": TINY_PATCH_SIZE,
    "embed_dim": 192,
    "depth": 4,
    "num_heads": 3,
    "mlp_ratio": 4.0,
    "class_token": False,
    "global_pool": "map",
    "num_classes": 0,
    # Position embeddings interpolated to the input's patch grid at each forward (`model.image_size`): the weights
    # keep the pretraining grid, so a dir exported at any size still loads in plain open_clip.
    "dynamic_img_size": True,
}
# open_clip's local-dir loader takes any *.safetensors in the folder when these are absent (head.safetensors
# included), so ootd demands one of its preferred names before handing a folder over.
OPEN_CLIP_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


class ModelNotAvailable(RuntimeError):
    """A backbone's weights are not on this machine; the message says what to download or which dir to pass."""


def ootd_tiny_vit_128(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """timm entrypoint of the tiny trunk: ViT, 128 px, patch 16, width 192, depth 4, 3 heads, MAP pooling.

    Args:
        pretrained: must be False: ootd loads the pretrained trunk itself (`create_open_clip("tiny")`).
        **kwargs: timm `VisionTransformer` arguments overriding the defaults (open_clip passes num_classes,
            global_pool).

    Raises:
        ModelNotAvailable: when pretrained weights are requested.
    """
    return _tiny_vit(TINY_TIMM_NAME, pretrained, kwargs)


def ootd_tiny_vit_64(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """timm entrypoint of the first tiny trunk (64 px, patch 8), for model dirs exported with it."""
    return _tiny_vit(TINY_TIMM_NAME_V1, pretrained, {"img_size": 64, "patch_size": 8, **kwargs})


def _tiny_vit(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ModelNotAvailable(f"{name} has no timm-hosted weights; use backbone 'tiny', which loads {TINY_WEIGHTS}")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**{**_TINY_VIT_ARGS, **kwargs})


def register_tiny() -> None:
    """Registers the tiny trunk with timm and the tiny model with open_clip; repeated calls do nothing."""
    import open_clip
    import timm
    from open_clip import factory

    for name, entrypoint in ((TINY_TIMM_NAME, ootd_tiny_vit_128), (TINY_TIMM_NAME_V1, ootd_tiny_vit_64)):
        if not timm.is_model(name):
            timm.models.register_model(entrypoint)
    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        # open_clip only offers add_model_config(json file); its in-memory registry is the same table without
        # shipping a file, and later rescans keep entries already present.
        factory._MODEL_CONFIGS[TINY_OPEN_CLIP_NAME] = copy.deepcopy(TINY_MODEL_CFG)


def create_open_clip(backbone: str, allow_download: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Builds the full open_clip model for a backbone name, never touching the network unless allowed.

    Args:
        backbone: `hf-hub:ORG/REPO`, `local-dir:PATH`, `tiny` (pretrained asset) or `tiny-random`.
        allow_download: let open_clip fetch hf-hub weights that are not in the local Hugging Face cache.

    Returns:
        The open_clip model (its own preprocess cfg attached, see `open_clip.get_model_preprocess_cfg`) and the
        untouched `model_cfg` it was built from (what an export writes back).

    Raises:
        ModelNotAvailable: weights missing locally (the message names the fix).
        ValueError: an unknown backbone name.
    """

    register_tiny()  # cheap, and needed by any exported tiny dir whose config names the custom timm trunk
    if backbone in TINY_NAMES:
        return create_tiny(pretrained=backbone == TINY), copy.deepcopy(TINY_MODEL_CFG)
    if backbone.startswith(LOCAL_DIR_PREFIX):
        folder = check_local_dir(backbone[len(LOCAL_DIR_PREFIX):])
        return _create_from_dir(folder)
    if backbone.startswith(HF_HUB_PREFIX):
        repo_id = backbone[len(HF_HUB_PREFIX):].strip()
        if not repo_id:
            raise ValueError("empty repo id after 'hf-hub:'")
        snapshot = cached_hub_snapshot(repo_id)
        if snapshot is None and allow_download:
            snapshot = download_hub_snapshot(repo_id)
        if snapshot is None:
            raise ModelNotAvailable(_missing_hub_message(repo_id))
        # The cached snapshot is a complete local dir: loading it this way needs no network call at all.
        return _create_from_dir(snapshot)
    raise ValueError(
        f"unknown backbone {backbone!r}: use 'hf-hub:ORG/REPO' (e.g. hf-hub:Marqo/marqo-fashionSigLIP), "
        f"'local-dir:PATH' (a folder with open_clip_config.json and open_clip_model.safetensors), 'tiny' or "
        f"'tiny-random'"
    )


def _fixed_grid(trunk: Any) -> bool:
    """Whether a timm trunk's position embeddings fit one input size only (not `dynamic_img_size`)."""
    return hasattr(trunk, "set_input_size") and not getattr(trunk, "dynamic_img_size", False)


class _DropRecords(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _create_from_dir(folder: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """open_clip's `local-dir:` load, at the input size its config names; returns the model and its model_cfg.

    open_clip builds a timm trunk at timm's default size whatever `vision_cfg.image_size` says, so the weights of
    a model exported after `resize_input` (position embeddings for another token count) would not fit: the trunk
    is resized to the config's size before they are loaded.
    """
    import open_clip

    # Weights are loaded below: open_clip's root-logger warning that none were would only mislead.
    quiet = _DropRecords("No pretrained weights loaded")
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(f"{LOCAL_DIR_PREFIX}{folder}", load_weights=False)
    finally:
        logging.getLogger().removeFilter(quiet)
    model_cfg = _read_model_cfg(folder)
    size = (model_cfg.get("vision_cfg") or {}).get("image_size")
    trunk = getattr(model.visual, "trunk", None)
    if size and _fixed_grid(trunk) and tuple(trunk.patch_embed.img_size) != (size, size):
        model.visual.set_input_size(size)
    weights = next(folder / name for name in OPEN_CLIP_WEIGHT_FILES if (folder / name).is_file())
    open_clip.load_checkpoint(model, str(weights))
    return model, model_cfg


def create_tiny(pretrained: bool = True) -> torch.nn.Module:
    """The tiny open_clip model, identical in every process: seeded init, then the pretrained trunk if asked.

    Args:
        pretrained: load `TINY_WEIGHTS` into the vision tower (`tiny`); False keeps the seeded random init.

    Raises:
        ModelNotAvailable: the pretrained asset is missing (the message says how to rebuild it).
    """
    import open_clip
    import torch

    register_tiny()
    if pretrained and not TINY_WEIGHTS.is_file():
        raise ModelNotAvailable(
            f"the pretrained tiny backbone {TINY_WEIGHTS} is missing (a checkout without ootd/assets?). Rebuild it "
            "with `ootd pretrain-backbone` (ootd/assets/README.md has the exact command), or pass "
            "`--set model.backbone=tiny-random` for the untrained architecture"
        )
    # fork_rng: the caller's RNG stream (e.g. a head initialised next) stays exactly as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_INIT_SEED)
        model = open_clip.create_model(TINY_OPEN_CLIP_NAME, force_preprocess_cfg=dict(TINY_PREPROCESS_CFG))
    if pretrained:
        load_tiny_trunk(model.visual, TINY_WEIGHTS)
    return model


def load_tiny_trunk(visual: torch.nn.Module, weights: str | Path) -> None:
    """Loads a trunk weights file (`tiny-backbone.safetensors` format) into the tiny vision tower, in place.

    strict: a trunk of another shape (an asset from a different architecture) must fail loudly.
    """
    from safetensors.torch import load_file

    visual.load_state_dict(load_file(str(weights)), strict=True)


def locate_weights(backbone: str) -> str:
    """Where a backbone's weights are on this machine, found the way `create_open_clip` finds them, without loading.

    Raises:
        ModelNotAvailable: weights missing locally (the message names the fix).
        ValueError: an unknown backbone name.
    """
    if backbone == TINY:
        if not TINY_WEIGHTS.is_file():
            raise ModelNotAvailable(f"{TINY_WEIGHTS} missing; rebuild it with `ootd pretrain-backbone`")
        return f"{TINY_WEIGHTS} (offline model pretrained on synthetic garment attributes, not fashion-aware)"
    if backbone == TINY_RANDOM:
        return "built in (random init, offline test model)"
    if backbone.startswith(LOCAL_DIR_PREFIX):
        return str(check_local_dir(backbone[len(LOCAL_DIR_PREFIX):]))
    if backbone.startswith(HF_HUB_PREFIX):
        repo_id = backbone[len(HF_HUB_PREFIX):].strip()
        snapshot = cached_hub_snapshot(repo_id) if repo_id else None
        if snapshot is None:
            raise ModelNotAvailable(_missing_hub_message(repo_id))
        return f"in the local Hugging Face cache ({snapshot})"
    raise ValueError(f"unknown backbone {backbone!r}: use hf-hub:ORG/REPO, local-dir:PATH, tiny or tiny-random")


def _read_model_cfg(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "open_clip_config.json").read_text())
    return config.get("model_cfg", config)


def check_local_dir(path: str | Path) -> Path:
    """The absolute folder of a `local-dir:` backbone after checking that open_clip can load it.

    Raises:
        ModelNotAvailable: the folder, its open_clip_config.json or its weights file is missing.
    """
    folder = Path(path).expanduser().absolute()
    fix = (
        "download the model on a machine with internet (e.g. `huggingface-cli download Marqo/marqo-fashionSigLIP "
        "--local-dir DIR`), copy DIR here and pass `--set model.backbone=local-dir:DIR`"
    )
    if not folder.is_dir():
        raise ModelNotAvailable(f"local-dir:{folder}: no such folder; {fix}")
    if not (folder / "open_clip_config.json").is_file():
        raise ModelNotAvailable(f"local-dir:{folder}: open_clip_config.json missing; {fix}")
    if not any((folder / name).is_file() for name in OPEN_CLIP_WEIGHT_FILES):
        raise ModelNotAvailable(
            f"local-dir:{folder}: no weights file (expected one of {', '.join(OPEN_CLIP_WEIGHT_FILES)}); {fix}"
        )
    return folder


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot holding a repo's open_clip config and weights, or None.

    Reads the cache only (HF_HUB_CACHE / HF_HOME), never the network.
    """
    from huggingface_hub import try_to_load_from_cache

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: a cache probe must never wait on the network
    try:
        config = try_to_load_from_cache(repo_id, "open_clip_config.json")
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    if not any((snapshot / name).is_file() for name in OPEN_CLIP_WEIGHT_FILES):
        return None
    return snapshot


def download_hub_snapshot(repo_id: str) -> Path:
    """Fetches a repo's open_clip config and first available weights file into the HF cache (network)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    config = Path(hf_hub_download(repo_id, "open_clip_config.json"))
    for name in OPEN_CLIP_WEIGHT_FILES:
        try:
            hf_hub_download(repo_id, name)
            return config.parent
        except EntryNotFoundError:
            continue
    raise ModelNotAvailable(f"hf-hub:{repo_id} has no open_clip weights file ({', '.join(OPEN_CLIP_WEIGHT_FILES)})")


def _missing_hub_message(repo_id: str) -> str:
    return (
        f"hf-hub:{repo_id} is not in the local Hugging Face cache and downloads are off "
        f"(model.allow_download=false). On a machine with internet run "
        f"`huggingface-cli download {repo_id} --local-dir DIR` (or `hf download {repo_id} --local-dir DIR`), "
        f"copy DIR here and pass `--set model.backbone=local-dir:DIR`; or allow the download with "
        f"`--set model.allow_download=true`."
    )


def resize_input(model: torch.nn.Module, model_cfg: dict[str, Any], size: int) -> dict[str, Any]:
    """Makes an open_clip model with a timm trunk take `size` x `size` inputs, in place: the preprocess resizes to
    `size`, and a trunk with a fixed patch grid has its position embeddings resampled (timm `set_input_size`; the
    tiny trunk interpolates them at each forward instead).

    Args:
        model: the open_clip model.
        model_cfg: the config it was built from.
        size: input side in px (a multiple of the patch size).

    Returns:
        The model config with the new `vision_cfg.image_size`: what an export must write so that the saved
        (resampled) weights load into a model built at that size.

    Raises:
        ValueError: the vision tower is not a timm trunk, or `size` is not a multiple of its patch size.
    """
    import open_clip
    from open_clip.timm_model import TimmModel

    visual = model.visual
    if not isinstance(visual, TimmModel) or not hasattr(visual.trunk, "set_input_size"):
        raise ValueError("model.image_size needs a timm ViT vision tower (tiny, ViT-B-16-SigLIP)")
    patch = visual.trunk.patch_embed.patch_size[0]
    if size % patch:
        raise ValueError(f"model.image_size must be a multiple of the patch size {patch}, got {size}")
    if _fixed_grid(visual.trunk):
        visual.set_input_size(size)
    open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), "size": size})
    resized = copy.deepcopy(model_cfg)
    resized.setdefault("vision_cfg", {})["image_size"] = size
    return resized


def preprocess_cfg_of(model: torch.nn.Module) -> dict[str, Any]:
    """The preprocess config open_clip attached to a model, as JSON-able data (`size` as [h, w])."""
    import open_clip

    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in open_clip.get_model_preprocess_cfg(model).items()}
    size = plain.get("size", 224)
    plain["size"] = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    return plain


def eval_transform(cfg: dict[str, Any]) -> Any:
    """open_clip's own inference transform for a preprocess config (resize, tensor, normalise)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    fields = {k: v for k, v in cfg.items() if k in PreprocessCfg.__dataclass_fields__}
    fields["size"] = tuple(fields["size"])
    return image_transform_v2(PreprocessCfg(**fields), is_train=False)


def feature_dim_of(visual: torch.nn.Module) -> int:
    """Width of the pooled features the vision tower returns (before any ootd head)."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, TimmModel):
        for layer in reversed(list(visual.head.modules())):
            if hasattr(layer, "out_features"):
                return int(layer.out_features)
        return int(visual.trunk.num_features)
    if isinstance(visual, VisionTransformer):
        return int(visual.output_dim)
    if isinstance(getattr(visual, "output_dim", None), int):  # e.g. open_clip's ModifiedResNet
        return int(visual.output_dim)
    raise NotImplementedError(f"cannot tell the feature width of vision tower {type(visual).__name__}")


def trunk_blocks(visual: torch.nn.Module) -> torch.nn.Module:
    """The sequence of transformer blocks of a supported vision tower (timm ViT or open_clip ViT)."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, TimmModel) and hasattr(visual.trunk, "blocks"):
        return visual.trunk.blocks
    if isinstance(visual, VisionTransformer):
        return visual.transformer.resblocks
    raise NotImplementedError(
        f"freezing/caching supports timm ViT trunks and open_clip VisionTransformer, not {type(visual).__name__}"
    )


def top_modules(visual: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules after the transformer blocks that train with any unlocked block: final norm, pooling, projection."""
    from open_clip.timm_model import TimmModel

    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        names = ("norm", "attn_pool", "fc_norm", "head")
        return [m for m in (getattr(trunk, n, None) for n in names) if m is not None] + [visual.head]
    trunk_blocks(visual)  # raises for unsupported towers
    names = ("ln_post", "attn_pool", "attn_pool_contrastive")
    return [m for m in (getattr(visual, n, None) for n in names) if m is not None]


def top_parameters(visual: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters outside any module that belong to the top of the tower (open_clip's `proj` matrix)."""
    import torch

    proj = getattr(visual, "proj", None)
    return [proj] if isinstance(proj, torch.nn.Parameter) else []


def embed_tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Token activations entering the first transformer block (batch-first)."""
    from open_clip.timm_model import TimmModel

    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        x = trunk.patch_embed(pixels)
        x = trunk._pos_embed(x)
        x = trunk.patch_drop(x)
        return trunk.norm_pre(x)
    return visual._embeds(pixels)


def run_blocks(visual: torch.nn.Module, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Runs blocks[start:stop] on batch-first tokens."""
    blocks = trunk_blocks(visual)
    batch_first = getattr(getattr(visual, "transformer", None), "batch_first", True)
    x = tokens if batch_first else tokens.transpose(0, 1)
    for block in list(blocks)[start:stop]:
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


def pool_tokens(visual: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final norm, pooling and projection: what the tower does after its last block."""
    from open_clip.timm_model import TimmModel

    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        return visual.head(trunk.forward_head(trunk.norm(tokens)))
    pooled, _ = visual._pool(tokens)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled
