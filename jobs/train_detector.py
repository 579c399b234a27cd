"""Job: train the YOLO garment detector on YOLO-format data and write best.pt with its metrics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` from any cwd, also under ray job submit

# Files of a training run brought back from the Ray task to --out (a few MB: weights, metrics, args, curves).
RESULT_FILES = ("best.pt", "metrics.json", "train_args.yaml", "ultralytics/results.csv", "ultralytics/args.yaml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the job."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="default", help="tiny | default | PATH to a config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, repeatable (e.g. --set detect.device=0)")
    p.add_argument("--data", required=True, help="ultralytics dataset YAML (e.g. <sample>/yolo/data.yaml)")
    p.add_argument("--out", required=True, help="output folder: best.pt, metrics.json, train_args.yaml, config.yaml")
    p.add_argument("--model", default="yolo11n.yaml",
                   help="architecture YAML (random init, nothing downloaded; bare names are also looked up in "
                   "ootd/assets, e.g. yolo11-garments.yaml) or a local .pt to fine-tune")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--imgsz", type=int, default=None, help="default: detect.imgsz of the config")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu | 0 | cuda:0 (default: detect.device of the config)")
    p.add_argument("--workers", type=int, default=0, help="dataloader workers (0: load in the training process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", action="store_true", help="cache decoded images in RAM (faster, not bit-reproducible)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: as the process has; use 1 on a CPU shared with busy processes)")
    p.add_argument("--no-ray", action="store_true", help="train in this process instead of a Ray task")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs the Ray task reserves")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs the Ray task reserves (default: 1 unless cpu)")
    return p.parse_args(argv)


def _train_to_bytes(data: str, kwargs: dict) -> dict[str, bytes]:
    """Runs the training in a scratch folder of whichever node Ray chose and returns the result files."""
    import tempfile

    from ootd.detector_training import train_detector

    with tempfile.TemporaryDirectory(prefix="ootd-detector-") as tmp:
        train_detector(data, tmp, **kwargs)
        return {name: (Path(tmp) / name).read_bytes() for name in RESULT_FILES if (Path(tmp) / name).is_file()}


def main(argv: list[str] | None = None) -> int:
    """Trains a detector; prints and writes its metrics. Returns the process exit code."""
    from ootd.config import ConfigError, load_config, save_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = Path(args.data).expanduser().resolve()
    if not data.is_file():
        print(f"error: dataset YAML not found: {data}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    device = args.device if args.device is not None else cfg.detect.device
    kwargs = {
        "model": args.model, "epochs": args.epochs, "imgsz": args.imgsz or cfg.detect.imgsz, "batch": args.batch,
        "device": device, "workers": args.workers, "seed": args.seed, "cache": args.cache, "conf": cfg.detect.conf,
        "threads": args.threads,
    }
    if args.no_ray:
        from ootd.detector_training import train_detector

        metrics = train_detector(data, out, **kwargs)
    else:
        import ray

        ray.init()
        gpus = args.num_gpus if args.num_gpus is not None else (0.0 if device == "cpu" else 1.0)
        task = ray.remote(num_cpus=args.num_cpus, num_gpus=gpus, max_retries=0)(_train_to_bytes)
        files = ray.get(task.remote(str(data), kwargs))
        for name, blob in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(blob)
        metrics = json.loads(files["metrics.json"])
        metrics.update(weights=str(out / "best.pt"), run_dir=str(out / "ultralytics"))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_config(cfg, out / "config.yaml")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
