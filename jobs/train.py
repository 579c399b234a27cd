"""Job: Ray Train DDP fine-tuning of the style encoder on a crops table; exports the best model dir."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` from any cwd, also under ray job submit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the job."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="default", help="tiny | default | PATH to a config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, repeatable (e.g. --set train.epochs=3)")  # fmt: skip
    p.add_argument("--crops", required=True, help="crops table folder written by ingest (<workdir>/crops)")
    p.add_argument("--workdir", default=None, help="feature cache, Ray Train runs, models (default: data.workdir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Trains, exports and prints `{model_dir, version, metrics, ...}` as JSON. Returns the process exit code."""
    from ootd.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    crops = Path(args.crops).expanduser()
    workdir = Path(args.workdir or cfg.data.workdir).expanduser()
    # Under `ray job submit --working-dir` the cwd is a temp copy of the repo, not where the command was typed.
    under_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor for the entrypoint
    for name, path in (("--crops", crops), ("--workdir", workdir)):
        if under_job and not path.is_absolute():
            logging.warning("%s %s resolves inside the job dir %s: pass absolute paths", name, path, Path.cwd())
    if not crops.is_dir():
        print(f"error: crops table folder not found: {crops.resolve()}", file=sys.stderr)
        return 2

    import ray

    from ootd.encoder import ModelNotAvailable
    from ootd.train import run_training

    ray.init()
    try:
        summary = run_training(cfg, crops, workdir=workdir)
    except (FileNotFoundError, ValueError, ModelNotAvailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    print(f"model dir: {summary['model_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
