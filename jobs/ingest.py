"""Job: Ray Data ingest of a style folder or manifest into the crops and errors tables (decode, dedup, detect, crop)."""

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
                   help="config override, repeatable (e.g. --set detect.concurrency=2)")  # fmt: skip
    p.add_argument("--source", default=None, help="folder with one sub-folder per style, or a csv/parquet manifest "
                   "(path[, style]); default: data.source")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder for crops/, errors/ and the summary (default: "
                   "data.workdir)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="ingest only the first N inputs (in path order)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Ingests and prints the run summary as JSON. Returns the process exit code."""
    from ootd.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source, out = args.source or cfg.data.source, args.out or cfg.data.workdir
    if not source:
        print("error: no input: pass --source or set data.source", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    for name, value in (("--source", source), ("--out", out)):
        if not Path(value).expanduser().is_absolute():
            # Under `ray job submit --working-dir` the cwd is a temp copy of the repo, not where you typed the command.
            logging.warning("%s %s is relative to %s; pass an absolute path for ray job submit",
                            name, value, Path.cwd())

    import ray

    from ootd.ingest import run_ingest

    ray.init()
    try:
        summary = run_ingest(cfg, source, out, limit=args.limit)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
