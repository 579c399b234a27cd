"""How much of a model's mAP@10 on a small test split is the split: score trained models on many random splits of
the same size, drawn from a fresh set none of them trained on.

`make demo` scores on 121 test photos (about 9 per style). This embeds every crop of a larger fresh set once per
model, then draws `--subsets` galleries with the demo split's per-style counts (read from `--counts-from`, the
demo's crops table and split) and scores each: the mean is what the model is expected to score on a split like
the demo's, the spread is the split's own noise. The first model is the reference for paired differences (same
subsets for every model). `--crops-for LABEL=CROPS_DIR` scores one model on another crops table of the same
photos, e.g. one ingested with other `detect` settings.

    ootd sample-data --out /tmp/bigtest/sample --per-style 200 --seed 777 --size 256
    ootd ingest -c runs/demo/config.yaml --source /tmp/bigtest/sample/images --out /tmp/bigtest/ingest
    .venv/bin/python benchmarks/split_noise.py --crops /tmp/bigtest/ingest/crops --counts-from runs/demo/crops \\
        --model committed=runs/demo/models/<dir> --model other=runs/demo/models/<dir> ...
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def read_crops(crops_dir: Path) -> tuple[list, list[str], list[str]]:
    """Every labelled crop of a crops table as (PIL images, styles, image ids), in image-id order.

    Ingest writes rows in whatever order its blocks finish, so without the sort two crops tables of the same photos
    (say, with and without `detect.flip_average`) would give the same gallery indices different photos.
    """
    import pyarrow.dataset as ds

    from ootd.decode import decode_crop
    from ootd.tables import crops_files

    dataset = ds.dataset([str(f) for f in crops_files(crops_dir)], format="parquet")
    rows = dataset.to_table(columns=["image_id", "crop", "style"]).sort_by("image_id")
    images, styles, ids = [], [], []
    for image_id, crop, style in zip(*(rows.column(c).to_pylist() for c in rows.column_names), strict=True):
        if crop and style:
            images.append(decode_crop(crop))
            styles.append(style)
            ids.append(image_id)
    return images, styles, ids


def demo_counts(crops_dir: Path) -> Counter:
    """Per-style image counts of a crops table's test split, at the split fractions `ootd demo` trains with."""
    from ootd.config import TrainConfig
    from ootd.evaluate.run import select_split
    from ootd.tables import crops_files

    fractions = TrainConfig()
    selected, _ = select_split(crops_files(crops_dir), "test", fractions.val_fraction, fractions.test_fraction)
    return Counter(selected.values())


def draw_subsets(labels: np.ndarray, counts: Counter, n: int, seed: int) -> list[np.ndarray]:
    """`n` index sets, each with `counts[style]` items of every style, drawn without replacement within a set."""
    rng = np.random.default_rng(seed)
    by_style = {s: np.flatnonzero(labels == s) for s in counts}
    short = {s: (len(by_style[s]), c) for s, c in counts.items() if len(by_style[s]) < c}
    if short:
        raise ValueError(f"the fresh set has fewer photos than a split needs (have, need): {short}")
    return [np.concatenate([rng.choice(by_style[s], c, replace=False) for s, c in counts.items()]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    from ootd.evaluate.metrics import retrieval_metrics
    from ootd.model.export import load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=Path, required=True, help="crops table of the fresh set")
    parser.add_argument("--counts-from", type=Path, required=True, help="crops table whose test split sets the sizes")
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=MODEL_DIR")
    parser.add_argument(
        "--crops-for",
        action="append",
        default=[],
        metavar="LABEL=CROPS_DIR",
        help="score model LABEL on another crops table of the same photos (other detect settings)",
    )
    parser.add_argument("--subsets", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.6, help="report the share of subsets at or above it")
    args = parser.parse_args(argv)
    crops_for = {label: path for label, _, path in (spec.partition("=") for spec in args.crops_for)}
    unknown = set(crops_for) - {spec.partition("=")[0] for spec in args.model}
    if unknown:
        parser.error(f"--crops-for names no --model label: {sorted(unknown)}")

    counts = demo_counts(args.counts_from)
    images, styles, ids = read_crops(args.crops)
    labels = np.asarray(styles)
    subsets = draw_subsets(labels, counts, args.subsets, args.seed)
    print(f"{len(images)} fresh crops; {args.subsets} subsets of {sum(counts.values())} "
          f"({', '.join(f'{s} {c}' for s, c in sorted(counts.items()))})", file=sys.stderr)  # fmt: skip

    other_crops: dict[str, list] = {}  # crops dir -> its images, read once however many models use it
    for path in set(crops_for.values()):
        other_images, _, other_ids = read_crops(Path(path))
        if other_ids != ids:
            raise ValueError(f"{path} does not hold the same labelled photos as {args.crops}")
        other_crops[path] = other_images

    scores: dict[str, np.ndarray] = {}
    for spec in args.model:
        label, _, model_dir = spec.partition("=")
        embeddings = load(model_dir).embed(other_crops[crops_for[label]] if label in crops_for else images)
        scores[label] = np.array([retrieval_metrics(embeddings[idx], labels[idx])["mAP@10"] for idx in subsets])
        print(f"{label}: done", file=sys.stderr)

    reference = next(iter(scores))
    print(f"| model | mean mAP@10 | SD | 5th–95th pct | share ≥ {args.threshold} | − {reference}: mean (SD) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, values in scores.items():
        low, high = np.percentile(values, [5, 95])
        diff = values - scores[reference]
        print(f"| {label} | {values.mean():.3f} | {values.std(ddof=1):.3f} | {low:.3f}–{high:.3f} | "
              f"{(values >= args.threshold).mean():.0%} | {diff.mean():+.3f} ({diff.std(ddof=1):.3f}) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
