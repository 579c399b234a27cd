"""One frozen config tree for every job: a YAML file, then dotted overrides, validated by key and type."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIGS_DIR = Path(__file__).parent / "configs"

# Secrets: never logged or saved (shown as REDACTED); taken from the environment when the config leaves them empty,
# so they need not be on a command line (where `ps` and shell history see them).
SECRET_ENV = {"serve.api_key": "OOTD_API_KEY", "store.token": "OOTD_MILVUS_TOKEN"}
REDACTED = "***"


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


def _bounded(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """A field whose numeric value must lie in [lo, hi]."""
    return field(default=default, metadata={"lo": lo, "hi": hi})


@dataclass(frozen=True)
class DataConfig:
    """Where photos come from and what the decoder accepts."""

    # A folder with one sub-folder per style, or a manifest (csv/parquet/jsonl with `path` or `url`, optional
    # `style`); local paths or filesystem URIs (file://, s3://, gs://, ...).
    source: str = ""
    # Root of every derived artefact (crops, errors, checkpoints, models, reports) unless a job is told otherwise.
    workdir: str = "runs"
    # Decompression-bomb guard: images claiming more pixels than this are rejected before decoding.
    max_image_pixels: int = _bounded(40_000_000, lo=1)
    max_image_bytes: int = _bounded(50 * 2**20, lo=1)
    # Ray Data read parallelism; small on a 2-core machine so block counts stay low.
    num_blocks: int = _bounded(8, lo=1)
    # Crops are re-encoded at most this long side (px): enough for 224-px models, small on disk.
    crop_max_side: int = _bounded(512, lo=32)
    # Photos within this many bits (of the 144-bit pHash, mirror- and crop-aware) form one near-duplicate group;
    # measured in benchmarks/near_dup_threshold.py (copies <= 6, first false merge at 36).
    near_dup_threshold: int = _bounded(20, lo=0, hi=144)
    # URL inputs: download actors, and requests in flight in all and to one host (both split over the actors).
    download_actors: int = _bounded(1, lo=1)
    download_concurrency: int = _bounded(16, lo=1)
    download_per_host: int = _bounded(4, lo=1)
    download_connect_timeout_s: float = _bounded(5.0, lo=0.01)
    # Longest wait for any one read; download_deadline_s bounds a whole attempt (a trickling server).
    download_read_timeout_s: float = _bounded(15.0, lo=0.01)
    download_deadline_s: float = _bounded(60.0, lo=0.01)
    # Retries after timeouts, connection errors, 408, 429 and 5xx (exponential backoff from download_backoff_s);
    # a Retry-After over download_max_wait_s ends them. Failures left are retried by the next run.
    download_retries: int = _bounded(3, lo=0)
    download_backoff_s: float = _bounded(0.5, lo=0.0)
    download_max_wait_s: float = _bounded(30.0, lo=0.0)
    # Hosts resolving to loopback/private/link-local addresses are refused (SSRF guard) unless this is set, or
    # the address is in one of allowed_private_networks (CIDRs, e.g. an internal image CDN).
    allow_private_hosts: bool = False
    allowed_private_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class DetectConfig:
    """The YOLO garment detector whose kept boxes form the outfit box."""

    # Ultralytics weights (.pt) or model yaml; a bare name not found on disk is looked up in ootd/assets/.
    weights: str = "yolo-synthetic-garments.pt"
    # Classes whose union is the outfit: garment classes of a clothing model, or [0] (person) for COCO models.
    class_ids: tuple[int, ...] = (0, 1, 2, 3)
    # A garment is kept when its confidence is >= conf and >= relative_conf x the photo's best garment's. Off
    # the training renderer the detector is less sure of every garment, so one absolute threshold drops the
    # weaker ones and cuts the box short: on the held-out generator (benchmarks/results/detector_domain.md)
    # conf 0.25 alone gave a median outfit IoU of 0.605, conf 0.1 with relative 0.3 0.711, and the two agree
    # on the plain and training-domain sets (0.897 and 0.877 vs 0.897 and 0.880).
    conf: float = _bounded(0.1, lo=0.0, hi=1.0)
    relative_conf: float = _bounded(0.3, lo=0.0, hi=1.0)
    iou: float = _bounded(0.7, lo=0.0, hi=1.0)
    imgsz: int = _bounded(320, lo=32)
    # Test-time flip averaging: the outfit box is the mean of the boxes found in the photo and in its left-right
    # mirror, for twice the detector's compute. Off the training renderer the detector's edges err on one side
    # or the other, and the mirror's errors partly cancel them (benchmarks/results/detector_domain.md).
    flip_average: bool = False
    # Outfit box padding as a fraction of its size on each side.
    pad: float = _bounded(0.05, lo=0.0, hi=1.0)
    # Boxes smaller than this (px, either side) are noise, not garments.
    min_box_size: int = _bounded(4, lo=0)
    batch_size: int = _bounded(16, lo=1)
    # Ray Data actor pool: number of detector actors and CPUs each one reserves.
    concurrency: int = _bounded(1, lo=1)
    num_cpus: float = _bounded(1.0, lo=0.0)
    # cpu, cuda, an ultralytics device ("0", "0,1"), or auto = cuda when the cluster has a GPU; actors reserve
    # the GPUs their device needs.
    device: str = "cpu"
    # Inference engine: auto = the fastest installed for the device (openvino > onnx > torch on CPU, torch on GPU);
    # onnx/openvino run an export of the weights built once per node (ootd.detect.runtime).
    runtime: Literal["auto", "torch", "onnx", "openvino"] = "auto"


@dataclass(frozen=True)
class ModelConfig:
    """The style encoder: open_clip backbone plus projection head."""

    # hf-hub:Marqo/marqo-fashionSigLIP | local-dir:PATH | tiny
    backbone: str = "hf-hub:Marqo/marqo-fashionSigLIP"
    head: Literal["linear", "mlp"] = "linear"
    embed_dim: int = _bounded(128, lo=1)
    head_hidden: int = _bounded(256, lo=1)
    # Top transformer blocks trained (plus final norm/pool and head); 0 trains the head only.
    unlocked_blocks: int = _bounded(2, lo=0)
    # Input side in px; 0: the backbone's own (tiny 128, FashionSigLIP 224). Another size resamples the timm
    # trunk's position embeddings (patch size unchanged), so finer patterns survive at the cost of more tokens.
    image_size: int = _bounded(0, lo=0)
    # Inference precision; bf16 runs on CPU too (autocast).
    precision: Literal["fp32", "bf16"] = "fp32"
    # Inference engine of the index job and the Serve Encoder (training and evaluation always run PyTorch):
    # auto = OpenVINO on a CPU when installed (1.2x PyTorch at fp32, 1.9x at bf16 for the tiny encoder,
    # benchmarks/results/encoder_runtime.md), PyTorch on a GPU.
    runtime: Literal["auto", "torch", "openvino"] = "auto"
    # Where the encoder runs for inference (index job actors, Serve Encoder replicas): auto = cuda when the
    # cluster has a GPU (each actor/replica then reserves one), cpu, or cuda.
    device: str = "auto"
    # Never fetch weights unless the user asked for it (DESIGN §5).
    allow_download: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train fine-tuning of the head and top blocks."""

    num_workers: int = _bounded(2, lo=1)
    cpus_per_worker: float = _bounded(1.0, lo=0.0)
    use_gpu: Literal["auto", "true", "false"] = "auto"
    epochs: int = _bounded(10, lo=1)
    # Class-balanced batches: P styles x K images per style per worker step.
    styles_per_batch: int = _bounded(13, lo=2)
    images_per_style: int = _bounded(4, lo=2)
    lr_head: float = _bounded(1e-3, lo=0.0)
    lr_backbone: float = _bounded(1e-5, lo=0.0)
    weight_decay: float = _bounded(0.05, lo=0.0)
    warmup_fraction: float = _bounded(0.1, lo=0.0, hi=1.0)
    loss: Literal["supcon", "pairwise", "triplet"] = "supcon"
    temperature: float = _bounded(0.1, lo=1e-4)
    margin: float = _bounded(0.5, lo=0.0)
    bf16: bool = False
    # Train from cached activations at the frozen/unfrozen boundary instead of images.
    feature_cache: bool = True
    # Views per training crop: the crop and `augment_views - 1` style-preserving ones (flip, box jitter; never
    # colour: `ootd.train.augment`). Cached views are fixed per crop; an epoch passes over every view.
    augment_views: int = _bounded(1, lo=1, hi=32)
    # Largest move of each box side in a view, as a fraction of the crop's side (`ootd.train.augment.BOX_JITTER`).
    augment_box_jitter: float = _bounded(0.12, lo=0.0, hi=0.4)
    # Exponential moving average of the trainable weights, updated every step; validation scores it and the
    # export ships it (`ootd.train.averaging`). 0 turns it off.
    ema_decay: float = _bounded(0.0, lo=0.0, hi=0.9999)
    val_fraction: float = _bounded(0.15, lo=0.0, hi=0.5)
    test_fraction: float = _bounded(0.15, lo=0.0, hi=0.5)
    seed: int = 0
    # Ray Train storage; "" means <workdir>/ray_results. Use shared storage (NFS, s3://) on a cluster.
    storage_path: str = ""
    run_name: str = "ootd"
    max_failures: int = _bounded(1, lo=-1)
    checkpoints_to_keep: int = _bounded(2, lo=1)


@dataclass(frozen=True)
class StoreConfig:
    """Milvus: an embedded Milvus Lite file by default, a server by URI."""

    # A path ending in .db opens Milvus Lite in-process; http(s)://host:port talks to a Milvus server.
    uri: str = "runs/milvus.db"
    # Milvus server credentials (`user:password` or an API key); a secret: env OOTD_MILVUS_TOKEN, never saved.
    token: str = ""
    alias: str = "ootd"
    hnsw_m: int = _bounded(16, lo=2)
    hnsw_ef_construction: int = _bounded(200, lo=8)
    search_ef: int = _bounded(64, lo=1)
    # Searches see the writing replica's own writes at once, others' within Milvus' time tick; "Strong" costs a
    # tick (~200 ms on a server) per search (benchmarks/results/milvus_backends.md).
    search_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] = "Session"
    # Where crop images are kept, keyed by image id (a directory or an fsspec URL).
    media: str = "runs/media"
    # The append-only log of API writes (a local directory); "" means <data.workdir>/items_log.
    items_log: str = ""
    # Index every member of a near-duplicate group (reposts, resizes: ingest's `near_dup_of`), not only its
    # representative; search then collapses each group to its best hit. Off: a repost adds nothing to a result.
    index_near_duplicates: bool = False


@dataclass(frozen=True)
class ServeConfig:
    """The Ray Serve app: HTTP ingress, autoscaled encoder, Milvus index."""

    host: str = "127.0.0.1"
    port: int = _bounded(8000, lo=1, hi=65535)
    # Model dir to serve; "" means <workdir>/models/<version of the live Milvus collection>, so the encoder
    # always matches the vectors it is compared with.
    model_dir: str = ""
    # When set, writes (POST/DELETE /v1/items) need header `x-api-key: <api_key>`; a secret: env OOTD_API_KEY,
    # never logged or saved.
    api_key: str = ""
    # Without an API key a non-loopback `host` refuses to start (anyone who reaches it could write) unless this is
    # true: for a network that is private by other means.
    allow_open_writes: bool = False
    max_image_bytes: int = _bounded(10 * 2**20, lo=1)
    # Decompression-bomb guard of uploads, far below ingest's `data.max_image_pixels`: a replica decodes a whole
    # batch at once and must not run out of memory on any upload. Larger JPEGs are downscaled while decoding.
    max_image_pixels: int = _bounded(16_000_000, lo=1)
    min_replicas: int = _bounded(1, lo=0)
    max_replicas: int = _bounded(2, lo=1)
    target_ongoing_requests: float = _bounded(8.0, lo=0.1)
    max_batch_size: int = _bounded(16, lo=1)
    # How long an idle Encoder replica waits for company before running a lone request; a busy one runs every
    # request that queued while its previous batch ran (up to max_batch_size) without waiting.
    batch_wait_timeout_s: float = _bounded(0.0, lo=0.0)
    # How long the Index waits to merge concurrent searches into one Milvus call: more throughput, more latency.
    search_batch_wait_s: float = _bounded(0.02, lo=0.0)
    encoder_num_cpus: float = _bounded(0.5, lo=0.0)
    # GPU share of an Encoder replica whose `model.device` or `detect.device` is (or `auto` resolves to) cuda: 0.5
    # lets the two default replicas share one GPU.
    encoder_num_gpus: float = _bounded(0.5, lo=0.0)
    index_num_cpus: float = _bounded(0.25, lo=0.0)
    ingress_num_cpus: float = _bounded(0.25, lo=0.0)
    # Requests one Encoder replica holds (its running batch and those queued for the next ones). Above it callers
    # queue in Serve's router, which retries a full replica with backoff of up to 0.5 s (Ray 2.60), so a replica
    # starves while requests wait: keep it above the concurrency a replica should absorb.
    encoder_max_ongoing_requests: int = _bounded(128, lo=1)
    # torch (and detector runtime) threads per Encoder replica; 0: its `encoder_num_cpus` rounded up. More
    # threads than reserved cores spin against the other replicas and the ingress.
    encoder_threads: int = _bounded(0, lo=0)
    # Ray Serve's throughput-optimized settings (what RAY_SERVE_THROUGHPUT_OPTIMIZED sets, less direct ingress,
    # which would move the HTTP port), given to the controller, proxy and every replica (ootd.serve.app).
    throughput_optimized: bool = True
    # HAProxy in front of the Ingress replicas instead of Serve's Python proxy (ootd.serve.app.HAPROXY_ENV): the
    # fastest front on one node. Its stats page (port 8404) and metrics (9101) listen on every interface, and on
    # a multi-node cluster `serve.host` must be reachable from the other nodes; false: Serve's Python proxy.
    haproxy: bool = True
    # One access-log line per request per hop (proxy, ingress, encoder, index); errors are logged either way.
    access_log: bool = False
    # Level of the Serve controller, proxy and replica logs.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # Merge concurrent writes into one items-log fsync + one Milvus call (False: one commit per write, the
    # benchmark baseline); either way a 2xx comes only after the write is durable.
    group_commit: bool = True


@dataclass(frozen=True)
class Config:
    """The whole tree; every job reads the section it needs and saves all of it next to its output."""

    data: DataConfig = field(default_factory=DataConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def load_config(source: str | Path | None = "default", overrides: typing.Iterable[str] = ()) -> Config:
    """Builds the config tree from a YAML file and dotted overrides.

    Args:
        source: a built-in config name (`default`, `tiny`), a YAML path, or None for the dataclass defaults.
        overrides: `section.key=value` strings; values are parsed as YAML (`train.lr_head=1e-4`,
            `detect.class_ids=[0]`).

    Raises:
        ConfigError: for an unknown key, a malformed override or a value of the wrong type or range.
    """
    tree: dict[str, Any] = {}
    if source is not None:
        path = Path(source)
        if not path.suffix and (CONFIGS_DIR / f"{source}.yaml").exists():
            path = CONFIGS_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"config file not found: {source} (built-ins: {builtin_config_names()})")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    return _secrets_from_env(_build(Config, _apply_overrides(tree, overrides), prefix=""))


def builtin_config_names() -> list[str]:
    """Names accepted by `load_config` besides file paths."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_to_dict(config: Config, *, redact: bool = True) -> dict[str, Any]:
    """The tree as plain YAML-able data (tuples become lists).

    Args:
        config: the tree.
        redact: replace set secrets (`SECRET_ENV` keys) by `REDACTED`; everything this returns may end up in a
            saved file (config.yaml, ootd_model.json, reports), so only the config machinery itself passes False.
    """
    tree = _plain(dataclasses.asdict(config))
    if redact:
        for dotted in SECRET_ENV:
            section, name = dotted.split(".")
            if tree[section][name]:
                tree[section][name] = REDACTED
    return tree


def save_config(config: Config, path: str | Path) -> Path:
    """Writes the resolved config as YAML, secrets redacted; jobs call this next to what they produce."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def with_overrides(config: Config, overrides: typing.Iterable[str]) -> Config:
    """A copy of `config` with dotted overrides applied and validated (secrets kept)."""
    return _build(Config, _apply_overrides(config_to_dict(config, redact=False), overrides), prefix="")


def redact_overrides(overrides: typing.Iterable[str]) -> list[str]:
    """The overrides as they may be logged: the value of every secret key replaced by `REDACTED`."""
    shown = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        secret = key.strip() in SECRET_ENV and sep and raw
        shown.append(f"{key}={REDACTED}" if secret else item)
    return shown


def _secrets_from_env(config: Config) -> Config:
    """Fills each secret the config leaves empty (or holds redacted, as a saved config.yaml does) from its
    environment variable (`SECRET_ENV`)."""
    changes: dict[str, dict[str, str]] = {}
    for dotted, env in SECRET_ENV.items():
        section, name = dotted.split(".")
        current = getattr(getattr(config, section), name)
        if current in ("", REDACTED):
            changes.setdefault(section, {})[name] = os.environ.get(env, "")
    for section, values in changes.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
    return config


def _apply_overrides(tree: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            # Not echoed whole: it may be a mistyped secret.
            raise ConfigError(f"override {key.strip()!r}=... must look like section.key=value")
        section, name = parts
        if not isinstance(tree.setdefault(section, {}), dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        # A secret is taken verbatim: YAML would turn a key like 0123 into the number 83.
        secret = f"{section}.{name}" in SECRET_ENV
        tree[section][name] = raw if secret else yaml.safe_load(raw) if raw.strip() else ""
    return tree


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known in {where}: {', '.join(known)})")
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, hint, value)
            _check_bounds(key, known[name], values[name])
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and "true" in choices:  # YAML reads `use_gpu=false` as a bool
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", item_type, v) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config tree")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if key in SECRET_ENV:
            if not isinstance(value, str):  # an unquoted YAML number would be silently rewritten; never echo it
                raise ConfigError(f"{key} must be a quoted string in YAML (its value is not shown: a secret)")
            return value
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {hint!r}")


def _check_bounds(key: str, spec: dataclasses.Field, value: Any) -> None:
    lo, hi = spec.metadata.get("lo"), spec.metadata.get("hi")
    if lo is not None and value < lo:
        raise ConfigError(f"{key} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} must be <= {hi}, got {value!r}")


def absolute_paths(config: Config) -> Config:
    """The config with relative store/media/workdir paths made absolute against this process's cwd.

    Ray workers and Serve replicas run with other working directories: paths must be fixed by the driver.
    """
    sets = []
    uri = config.store.uri
    if uri and "://" not in uri and not Path(uri).expanduser().is_absolute():
        sets.append(f"store.uri={Path(uri).expanduser().absolute()}")
    media = config.store.media
    if media and ("://" not in media or media.startswith("file://")):
        local = Path(media.removeprefix("file://")).expanduser()
        if not local.is_absolute():
            sets.append(f"store.media={local.absolute()}")
    items_log = config.store.items_log
    if items_log and not Path(items_log).expanduser().is_absolute():
        sets.append(f"store.items_log={Path(items_log).expanduser().absolute()}")
    if not Path(config.data.workdir).expanduser().is_absolute():
        sets.append(f"data.workdir={Path(config.data.workdir).expanduser().absolute()}")
    return with_overrides(config, sets) if sets else config
