"""Job: embed a crops table with one exported model into Milvus (`ootd_<version>`), then move the live alias."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` from any cwd, also under ray job submit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the job."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="default", help="tiny | default | PATH to a config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, repeatable (e.g. --set store.uri=http://127.0.0.1:19530)")
    p.add_argument("--crops", required=True, help="crops table folder written by ingest (<workdir>/crops)")
    p.add_argument("--model-dir", required=True, help="exported model dir (<workdir>/models/<version>)")
    p.add_argument("--out", default=None, help="summary folder (default: <workdir>/index/<version>)")
    p.add_argument("--limit", type=int, default=None, help="index only the first N crops")
    p.add_argument("--no-swap", action="store_true", help="fill the collection but leave the live alias alone")
    p.add_argument("--concurrency", type=int, default=None, help="embedding actors (default: detect.concurrency)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per actor (default: detect.num_cpus)")
    p.add_argument("--batch-size", type=int, default=32, help="crops per encoder forward pass")
    p.add_argument("--device", default="cpu", help="cpu | cuda (one GPU per actor)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Indexes and prints the summary as JSON. Returns the process exit code."""
    from ootd.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    for name, value in (("--crops", args.crops), ("--model-dir", args.model_dir), ("store.uri", cfg.store.uri)):
        if "://" not in value and not Path(value).expanduser().is_absolute():
            # Under `ray job submit --working-dir` the cwd is a temp copy of the repo, not where you typed the command.
            logging.warning("%s %s is relative to %s; pass an absolute path for ray job submit",
                            name, value, Path.cwd())

    import ray

    from ootd.index import run_index

    ray.init()
    try:
        summary = run_index(cfg, args.crops, args.model_dir, out=args.out, limit=args.limit, swap=not args.no_swap,
                            concurrency=args.concurrency, num_cpus=args.num_cpus, batch_size=args.batch_size,
                            device=args.device)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
