"""Spread of `ootd evaluate` over repeated trainings: mean, min and max of each variant's figures.

Train the same config with different `train.seed` (and `train.run_name`, so each run starts fresh), evaluate each
model on the same crops, then pass the `metrics.json` files:

    .venv/bin/ootd train -c runs/demo/config.yaml --crops runs/demo/crops --workdir runs/demo \\
        --set train.seed=1 --set train.run_name=seed1
    .venv/bin/ootd evaluate -c runs/demo/config.yaml --crops runs/demo/crops --model-dir <dir> --out /tmp/eval_1
    .venv/bin/python benchmarks/eval_spread.py runs/demo/eval/metrics.json /tmp/eval_*/metrics.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

FIGURES = ("P@1", "P@10", "mAP@10", "MRR", "style_gap")
VARIANTS = ("histogram_crop", "frozen_random_crop", "frozen_crop", "frozen_whole", "finetuned_crop", "finetuned_whole")


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def table(runs: list[dict]) -> list[str]:
    lines = ["| variant | " + " | ".join(FIGURES) + " |", "|---|" + "---:|" * len(FIGURES)]
    for variant in (v for v in VARIANTS if all(v in run["variants"] for run in runs)):
        cells = [spread([run["variants"][variant][f] for run in runs]) for f in FIGURES]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def margins(runs: list[dict]) -> list[str]:
    """The smallest margin of each ordering the end-to-end test asserts, over all runs, in the test's own form:
    a ratio for the histogram (fine-tuned ≥ 2× it), a difference for the others."""
    pairs = [("finetuned_crop", "histogram_crop", "ratio"), ("finetuned_crop", "frozen_crop", "diff"),
             ("finetuned_crop", "finetuned_whole", "diff"), ("frozen_crop", "frozen_whole", "diff"),
             ("frozen_crop", "frozen_random_crop", "diff")]
    lines = []
    for a, b, form in pairs:
        if not all(a in run["variants"] and b in run["variants"] for run in runs):
            continue
        scores = [(run["variants"][a]["mAP@10"], run["variants"][b]["mAP@10"]) for run in runs]
        if form == "ratio":
            ratios = [x / y for x, y in scores]
            lines.append(f"- mAP@10 {a} / {b}: smallest {min(ratios):.2f}×, largest {max(ratios):.2f}×")
        else:
            gaps = [x - y for x, y in scores]
            lines.append(f"- mAP@10 {a} − {b}: smallest {min(gaps):+.3f}, largest {max(gaps):+.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json of each `ootd evaluate` run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_spread.md")
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.metrics]
    splits = {(r["split"], r["n_images"], r["crops_dir"]) for r in runs}
    if len(splits) != 1:
        parser.error(f"the runs were evaluated on different data: {sorted(splits)}")
    (split, n_images, _), = splits
    text = "\n".join([
        f"## eval_spread ({len(runs)} trainings, split {split}, {n_images} images; mean (min–max))", "",
        *table(runs), "", *margins(runs), "",
        "style_gap: same-style minus cross-style mean cosine (style matrix diagonal vs off-diagonal).", ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
