"""Job: evaluate a model on a held-out split — frozen vs fine-tuned, crop vs whole photo — and print the table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import ootd` from any cwd, also under ray job submit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the job."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="default", help="tiny | default | PATH to a config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, repeatable (e.g. --set train.test_fraction=0.2)")  # fmt: skip
    p.add_argument("--model-dir", required=True, help="exported model dir (<workdir>/models/<version>)")
    p.add_argument("--crops", required=True, help="crops table folder written by ingest (<workdir>/crops)")
    p.add_argument("--out", default=None, help="report folder (default: <model-dir>/eval)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to score")
    p.add_argument("--baseline-backbone", default=None,
                   help="frozen baseline backbone (default: the one the model was fine-tuned from)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Evaluates, writes the report folder and prints its markdown table. Returns the process exit code."""
    from ootd.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    for name, value in (("--crops", args.crops), ("--model-dir", args.model_dir), ("--out", args.out)):
        if value and not Path(value).expanduser().is_absolute():
            # Under `ray job submit --working-dir` the cwd is a temp copy of the repo, not where you typed the command.
            logging.warning(
                "%s %s is relative to %s; pass an absolute path for ray job submit", name, value, Path.cwd()
            )

    from ootd.encoder import ModelNotAvailable
    from ootd.evaluate import evaluate

    out = Path(args.out) if args.out else Path(args.model_dir) / "eval"
    try:
        result = evaluate(
            args.model_dir, args.crops, out, split=args.split,
            val_fraction=cfg.train.val_fraction, test_fraction=cfg.train.test_fraction,
            baseline_backbone=args.baseline_backbone, config=cfg, batch_size=args.batch_size,
            precision=cfg.model.precision, device=args.device, progress=not args.no_progress,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, ModelNotAvailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result["table"])
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    if result["skipped"]["count"]:
        print(f"warning: {result['skipped']['count']} image(s) left out (unreadable crop or photo), see metrics.json")
    print(f"\nreport: {result['files']['report']}\nmetrics: {result['files']['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
