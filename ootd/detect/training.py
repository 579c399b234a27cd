"""Training a YOLO garment detector offline and measuring how well its outfit boxes match the ground truth."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ootd.detect.boxes import box_iou, union_box

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Arguments that keep ultralytics off the network and out of the working directory whatever the caller passes.
_OFFLINE_TRAIN_ARGS = {"plots": False, "amp": False, "exist_ok": True}
# Ultralytics augmentations for domain-randomised training (`augment="domain"`): stronger colour, geometry and
# scale jitter than the defaults; mosaic is switched off for the last epochs so boxes end on whole photos.
DOMAIN_AUGMENT: dict[str, Any] = {
    "hsv_h": 0.02, "hsv_s": 0.6, "hsv_v": 0.45, "degrees": 8.0, "translate": 0.15, "scale": 0.6, "shear": 2.0,
    "fliplr": 0.5, "flipud": 0.0, "mosaic": 1.0, "mixup": 0.0, "close_mosaic": 5,
}
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {"ultralytics": {}, "domain": DOMAIN_AUGMENT}
# Fine-tuning a trained `.pt` needs no three-epoch warm-up (its high bias learning rate undoes the trained head).
_FINE_TUNE_ARGS = {"warmup_epochs": 1.0}


def train_detector(
    data_yaml: str | Path,
    out_dir: str | Path,
    *,
    model: str = "yolo11n.yaml",
    epochs: int = 60,
    imgsz: int = 256,
    batch: int = 16,
    device: str = "cpu",
    workers: int = 0,
    seed: int = 0,
    cache: bool = False,
    conf: float | None = None,
    relative_conf: float | None = None,
    threads: int | None = None,
    extra: dict[str, Any] | None = None,
    augment: str = "ultralytics",
    randomise_per_style: int = 0,
    randomisation: str = "training",
    randomise_seed: int = 1000,
) -> dict[str, Any]:
    """Trains a detector on YOLO-format data, validates it and writes it with its metrics.

    The architecture comes from an ultralytics model YAML with random init (`pretrained=False`), so nothing is
    downloaded; a local `.pt` fine-tunes those weights instead (`pretrained=True`, one warm-up epoch). After
    training, `best.pt` is validated for mAP50 and for the median IoU between each val image's predicted outfit
    box (union of the predicted garments) and its ground-truth outfit box (union of its label boxes).

    Writes to `out_dir`: `best.pt`, `metrics.json` (the returned dict), `train_args.yaml` (every resolved
    ultralytics argument) and `ultralytics/` (the run folder: `results.csv`, `last.pt`).

    Args:
        data_yaml: ultralytics dataset YAML (train/val image folders, names).
        out_dir: output folder (created).
        model: architecture YAML (a path, a bare name in ootd/assets such as `yolo11-garments.yaml`, or an
            ultralytics one such as `yolo11n.yaml` with the scale letter in its name), or a local `.pt` to fine-tune.
        epochs: training epochs.
        imgsz: training and validation image size.
        batch: images per step.
        device: `cpu`, `0`, `cuda:0`, ...
        workers: dataloader workers (0 loads in the training process: best on small CPU machines).
        seed: random seed (ultralytics runs deterministically).
        cache: keep decoded training images in RAM (faster, but ultralytics then is not bit-reproducible).
        conf: detection confidence of the outfit-box evaluation (None: `DetectConfig`'s default).
        relative_conf: its threshold relative to each photo's best garment (None: `DetectConfig`'s default).
        threads: torch threads for training and evaluation (None: the current count). Use 1 on a CPU shared
            with other busy processes: more threads then wait on each other far longer than they compute.
        extra: further ultralytics train arguments (e.g. `{"lr0": 0.02, "mosaic": 0.5}`); they win over `augment`.
        augment: ultralytics augmentation preset: `ultralytics` (its defaults) or `domain` (`DOMAIN_AUGMENT`).
        randomise_per_style: domain-randomised photos per style added to the training split (0: none). They are
            rendered into `out_dir/randomised/` (`ootd.synthetic.write_sample_data` with a `Randomisation`, at
            `imgsz`), and `out_dir/data.yaml` trains on both; validation stays on `data_yaml`'s val split.
        randomisation: the `ootd.synthetic_domain.PRESETS` entry the added photos are drawn with (never
            `held-out` in earnest: that variant measures generalisation).
        randomise_seed: seed of the added photos (keep it apart from the seeds of `data_yaml`'s photos).

    Returns:
        Metrics: `map50`, `map50_95`, `precision`, `recall`, `outfit_iou_median`, `outfit_iou_mean`,
        `outfit_iou_ge_0_8` (share of images), `n_val_images`, `n_fallback`, `weights`, `weights_bytes`,
        `epochs`, `imgsz`, `model`, `train_seconds`, `ultralytics_version`.

    Raises:
        FileNotFoundError: the data YAML or a local `.pt` model is missing.
        ValueError: unknown augmentation or randomisation preset.
    """
    import yaml

    from ootd.detect.yolo import keep_torch_threads, offline_ultralytics

    data_yaml = Path(data_yaml).expanduser().resolve()
    if not data_yaml.is_file():
        raise FileNotFoundError(f"dataset YAML not found: {data_yaml}")
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augment preset {augment!r}; expected one of {', '.join(AUGMENT_PRESETS)}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = _model_source(model)
    fine_tune = source.endswith(".pt")
    given_yaml = data_yaml
    if randomise_per_style > 0:
        data_yaml = add_randomised_photos(data_yaml, out, per_style=randomise_per_style, seed=randomise_seed,
                                          size=imgsz, randomisation=randomisation)

    ultralytics = offline_ultralytics()
    args: dict[str, Any] = {
        "data": str(data_yaml), "epochs": epochs, "imgsz": imgsz, "batch": batch, "device": device,
        "workers": workers, "seed": seed, "deterministic": True, "cache": cache,
        # ultralytics drops a loaded checkpoint's weights when pretrained is False: only YAMLs start from random init
        "pretrained": fine_tune, **(_FINE_TUNE_ARGS if fine_tune else {}),
        "project": str(out), "name": "ultralytics", "verbose": False, **AUGMENT_PRESETS[augment], **(extra or {}),
        **_OFFLINE_TRAIN_ARGS,
    }
    started = time.perf_counter()
    with keep_torch_threads(threads):
        yolo = ultralytics.YOLO(source, task="detect")
        yolo.train(**args)
    train_seconds = time.perf_counter() - started
    trainer = yolo.trainer
    run_dir = Path(trainer.save_dir)
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    weights = out / "best.pt"
    shutil.copyfile(best, weights)
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(trainer.args).items()}
    (out / "train_args.yaml").write_text(yaml.safe_dump(resolved, sort_keys=True))

    with keep_torch_threads(threads):
        val = ultralytics.YOLO(str(weights), task="detect").val(
            data=str(data_yaml), split="val", imgsz=imgsz, batch=batch, device=device, workers=workers,
            project=str(out), name="val", verbose=False, **_OFFLINE_TRAIN_ARGS,
        )
    box = val.box
    metrics: dict[str, Any] = {
        "map50": float(box.map50), "map50_95": float(box.map), "precision": float(box.mp),
        "recall": float(box.mr),
    }
    with keep_torch_threads(threads):
        metrics.update(evaluate_outfit_boxes(weights, data_yaml, split="val", imgsz=imgsz, device=device, conf=conf,
                                             relative_conf=relative_conf))
    metrics.update({
        "weights": str(weights), "weights_bytes": weights.stat().st_size, "epochs": epochs, "imgsz": imgsz,
        "model": model, "seed": seed, "threads": threads, "train_seconds": round(train_seconds, 1),
        "augment": augment, "randomise_per_style": randomise_per_style,
        "randomisation": randomisation if randomise_per_style > 0 else None, "data": str(given_yaml),
        "ultralytics_version": ultralytics.__version__, "run_dir": str(run_dir),
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def add_randomised_photos(
    data_yaml: str | Path, out_dir: str | Path, *, per_style: int, seed: int, size: int, randomisation: str
) -> Path:
    """Renders domain-randomised photos into `out_dir/randomised/` and writes `out_dir/data.yaml`, which trains on
    `data_yaml`'s train split plus all of them and validates on `data_yaml`'s val split (absolute paths).

    Args:
        data_yaml: the dataset YAML being extended.
        out_dir: folder for the photos and the new YAML.
        per_style: photos per style.
        seed: their seed.
        size: their side in pixels.
        randomisation: a `ootd.synthetic_domain.PRESETS` name.

    Returns:
        The new dataset YAML.

    Raises:
        ValueError: unknown preset, or `data_yaml` lacks a train or val split.
    """
    import yaml

    from ootd.synthetic_dataset import write_sample_data
    from ootd.synthetic_domain import PRESETS

    if randomisation not in PRESETS:
        raise ValueError(f"unknown randomisation {randomisation!r}; expected one of {', '.join(PRESETS)}")
    data_yaml = Path(data_yaml).expanduser().resolve()
    data = yaml.safe_load(data_yaml.read_text()) or {}
    root = data_yaml.parent / data["path"] if data.get("path") else data_yaml.parent

    def absolute(split: str) -> list[str]:
        entry = data.get(split)
        if not entry:
            raise ValueError(f"{data_yaml}: no {split!r} split")
        return [str((root / item).resolve()) for item in ([entry] if isinstance(entry, str) else entry)]

    out = Path(out_dir).expanduser().resolve()
    summary = write_sample_data(out / "randomised", per_style=per_style, seed=seed, size=size, val_fraction=0.0,
                                overwrite=True, randomisation=PRESETS[randomisation])
    combined = {
        "train": [*absolute("train"), str(Path(summary["yolo_dir"]) / "images" / "train")],
        "val": absolute("val"), "nc": data.get("nc", len(data.get("names", []))), "names": data["names"],
    }
    (out / "data.yaml").write_text(f"# {data_yaml} plus {per_style} {randomisation!r}-randomised photos per style "
                                   f"(seed {seed}).\n" + yaml.safe_dump(combined, sort_keys=False))
    return out / "data.yaml"


# Files of a training run brought back from a Ray task to the output folder (a few MB: weights, metrics, curves).
RESULT_FILES = ("best.pt", "metrics.json", "train_args.yaml", "ultralytics/results.csv", "ultralytics/args.yaml")


def train_detector_on_ray(
    data_yaml: str | Path, out_dir: str | Path, *, num_cpus: float = 1.0, num_gpus: float = 0.0, **kwargs: Any
) -> dict[str, Any]:
    """`train_detector` as a Ray task on whichever node has the resources; its result files come back to `out_dir`.

    The task trains in a scratch folder of its node, so `out_dir` only has to exist where the caller runs.
    Needs a connected Ray cluster. Keyword arguments are those of `train_detector`.
    """
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(_train_to_bytes)
    files = ray.get(task.remote(str(data_yaml), kwargs))
    out = Path(out_dir).expanduser().resolve()
    for name, blob in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(blob)
    metrics = json.loads(files["metrics.json"])
    metrics.update(weights=str(out / "best.pt"), run_dir=str(out / "ultralytics"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _train_to_bytes(data_yaml: str, kwargs: dict[str, Any]) -> dict[str, bytes]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ootd-detector-") as tmp:
        train_detector(data_yaml, tmp, **kwargs)
        return {name: (Path(tmp) / name).read_bytes() for name in RESULT_FILES if (Path(tmp) / name).is_file()}


def _model_source(model: str) -> str:
    """A local `.pt` (never downloaded), an architecture YAML on disk or in ootd/assets, or an ultralytics YAML."""
    from ootd.detect.yolo import ASSETS_DIR, resolve_weights

    if not model.endswith((".yaml", ".yml")):
        return str(resolve_weights(model))
    path = Path(model).expanduser()
    if path.is_file():
        return str(path.resolve())
    if len(path.parts) == 1 and (ASSETS_DIR / path.name).is_file():
        return str(ASSETS_DIR / path.name)
    return model  # a built-in ultralytics architecture such as yolo11n.yaml (packaged, not downloaded)


def evaluate_outfit_boxes(
    weights: str | Path,
    data_yaml: str | Path,
    *,
    split: str = "val",
    imgsz: int = 256,
    device: str = "cpu",
    conf: float | None = None,
    relative_conf: float | None = None,
    flip_average: bool = False,
    batch: int = 16,
) -> dict[str, Any]:
    """IoU of predicted outfit boxes (union of all predicted garments, no padding) against the labels' union.

    Images without any label box have no ground-truth outfit and are left out (counted in `n_unlabelled`).

    Args:
        weights: detector `.pt`.
        data_yaml: ultralytics dataset YAML.
        split: which split of the YAML to score.
        imgsz: inference size.
        device: inference device.
        conf: detection confidence threshold (None: `DetectConfig`'s default, what ingest and serving keep).
        relative_conf: threshold relative to the photo's best garment (None: `DetectConfig`'s default).
        flip_average: average each outfit box with the one found in the mirrored photo (`DetectConfig`).
        batch: images per detector call.

    Returns:
        `outfit_iou_median`, `outfit_iou_mean`, `outfit_iou_ge_0_8`, `n_val_images`, `n_fallback`, `n_unlabelled`.

    Raises:
        ValueError: the split has no labelled images.
    """
    from PIL import Image

    from ootd.config import DetectConfig
    from ootd.detect.yolo import Detector

    names, images = split_images(data_yaml, split)
    thresholds = {k: v for k, v in (("conf", conf), ("relative_conf", relative_conf)) if v is not None}
    cfg = DetectConfig(weights=str(weights), class_ids=tuple(range(len(names))), imgsz=imgsz, pad=0.0,
                       min_box_size=0, batch_size=batch, device=device, flip_average=flip_average, **thresholds)
    detector = Detector(cfg)
    labelled = []
    for path in images:
        truth = label_outfit_box(path)
        if truth is not None:
            labelled.append((path, truth))
    if not labelled:
        raise ValueError(f"{data_yaml}: split {split!r} has no labelled images")
    ious: list[float] = []
    fallbacks = 0
    for start in range(0, len(labelled), batch):
        chunk = labelled[start : start + batch]
        arrays = []
        for path, _ in chunk:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        for (_, truth), (arr, found) in zip(chunk, zip(arrays, detector.outfit_boxes(arrays), strict=True),
                                            strict=True):
            h, w = arr.shape[:2]
            gt = (truth[0] * w, truth[1] * h, truth[2] * w, truth[3] * h)
            fallbacks += found.fallback
            ious.append(0.0 if found.fallback else box_iou(found.box, gt))
    return {
        "outfit_iou_median": float(statistics.median(ious)),
        "outfit_iou_mean": float(statistics.fmean(ious)),
        "outfit_iou_ge_0_8": float(np.mean(np.asarray(ious) >= 0.8)),
        "n_val_images": len(ious),
        "n_fallback": fallbacks,
        "n_unlabelled": len(images) - len(labelled),
    }


def split_images(data_yaml: str | Path, split: str) -> tuple[list[str], list[Path]]:
    """Class names and image files of one split of an ultralytics dataset YAML.

    Args:
        data_yaml: the dataset YAML; `path` (if any) and the split entries are resolved against its folder.
        split: `train`, `val` or `test`.

    Raises:
        ValueError: the YAML lacks names or the split.
        FileNotFoundError: a split folder or list file does not exist.
    """
    import yaml

    data_yaml = Path(data_yaml).expanduser().resolve()
    data = yaml.safe_load(data_yaml.read_text()) or {}
    names = data.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not names:
        names = [f"class_{i}" for i in range(int(data.get("nc", 0)))]
    if not names:
        raise ValueError(f"{data_yaml}: no `names` or `nc`")
    entry = data.get(split)
    if not entry:
        raise ValueError(f"{data_yaml}: no {split!r} split")
    root = data_yaml.parent / data["path"] if data.get("path") else data_yaml.parent
    images: list[Path] = []
    for item in [entry] if isinstance(entry, str) else list(entry):
        where = (root / item).resolve()
        if where.is_dir():
            images += sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif where.is_file():  # a list file, one image path per line, relative to the dataset root
            lines = [line.strip() for line in where.read_text().splitlines() if line.strip()]
            images += [(root / line).resolve() for line in lines]
        else:
            raise FileNotFoundError(f"{data_yaml}: {split} entry {item!r} not found at {where}")
    return [str(n) for n in names], images


def label_outfit_box(image_path: Path) -> tuple[float, float, float, float] | None:
    """The union of an image's YOLO label boxes in normalised x1, y1, x2, y2; None if it has no labels.

    The label file is found the ultralytics way: the last `/images/` in the path becomes `/labels/`.

    Args:
        image_path: an image inside a YOLO dataset.
    """
    text = str(image_path)
    head, sep, tail = text.rpartition("/images/")
    label = Path((head + "/labels/" + tail) if sep else text).with_suffix(".txt")
    if not label.is_file():
        return None
    boxes: list[Sequence[float]] = []
    for line in label.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5:
            cx, cy, w, h = (float(v) for v in parts[1:5])
            boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return union_box(boxes)
