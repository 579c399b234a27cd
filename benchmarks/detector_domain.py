"""Measurement: does the garment detector generalise beyond the renderer it was trained on? (issue #14, DESIGN §7)

Each detector is run through the real `ootd.detect.yolo.Detector` path (`evaluate_outfit_boxes`, no padding),
under each garment-keeping rule of RULES (the default: conf 0.1 and 0.3 x the photo's best garment; the one before:
conf 0.25 alone), on photo sets it never trained on:
- `standard`: the plain style-mode generator (`write_sample_data`, no randomisation), a fresh seed;
- `standard val`: the val split of the set both detectors validated on while training (seed 11, 48 per style);
- `training domain`: drawn with `ootd.synthetic_domain.TRAINING` (the ranges the new detector trains on), a fresh
  seed;
- `held-out`: drawn with `ootd.synthetic_domain.HELD_OUT`, whose every range lies outside TRAINING's; never used
  for training.
Reported per set: fallback rate (no garment found → the whole photo), median and mean IoU of the predicted outfit
box against the ground-truth union box (a fallback scores 0), share of photos with IoU ≥ 0.8.

Run: .venv/bin/python benchmarks/detector_domain.py [--new /tmp/det2/best.pt] [--old /tmp/det1/best.pt]
     [--per-style 8] [--imgsz 224 256] [--flip-average both] [--seed-offset 0]
     [--standard-val /tmp/det_data/yolo/data.yaml]   (a few minutes on 2 cores)
Writes benchmarks/results/detector_domain.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

SEEDS = {"standard": 101, "training domain": 102, "held-out": 103}
# Garment-keeping rules (conf, relative_conf): None is DetectConfig's default.
RULES = {"default: conf 0.1, relative 0.3": (None, None), "conf 0.25 only (before)": (0.25, 0.0)}


def write_sets(root: Path, per_style: int, size: int, seed_offset: int = 0) -> dict[str, Path]:
    """The three fresh photo sets, every photo in the `train` split of its own YOLO folder; `seed_offset` draws
    another sample of each (a confirmation set for a choice made on the first)."""
    from ootd.synthetic import HELD_OUT, TRAINING, write_sample_data

    modes = {"standard": None, "training domain": TRAINING, "held-out": HELD_OUT}
    return {
        name: Path(write_sample_data(root / name.replace(" ", "_"), per_style=per_style,
                                     seed=SEEDS[name] + seed_offset, size=size, val_fraction=0.0,
                                     randomisation=mode)["data_yaml"])
        for name, mode in modes.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", default=str(REPO / "ootd/assets/yolo-synthetic-garments.pt"),
                        help="the detector measured (default: the committed one)")
    parser.add_argument("--old", default=None, help="a detector to compare it with (.pt)")
    parser.add_argument("--new-label", default=None, help="its name in the table (default: its file name)")
    parser.add_argument("--old-label", default=None, help="the other's name in the table (default: its file name)")
    parser.add_argument("--per-style", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="side of the rendered photos")
    parser.add_argument("--imgsz", type=int, nargs="+", default=None,
                        help="detector inference sizes to measure (default: --size)")
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES),
                        help="garment-keeping rules to measure (default: all)")
    parser.add_argument("--flip-average", choices=["off", "on", "both"], default="both",
                        help="test-time flip averaging (detect.flip_average) to measure (default: both)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="added to every set's seed: a fresh sample of the same distributions")
    parser.add_argument("--standard-val", default=None, help="data.yaml whose val split both detectors validated on")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/detector_domain.md"))
    args = parser.parse_args(argv)

    from ootd.detect.training import evaluate_outfit_boxes

    detectors = {args.new_label or Path(args.new).name: args.new}
    if args.old:
        old_label = args.old_label or Path(args.old).name
        if old_label in detectors:
            parser.error("--new and --old share a file name: name them with --new-label and --old-label")
        detectors[old_label] = args.old
    rows = []
    with tempfile.TemporaryDirectory(prefix="ootd-detector-domain-") as tmp:
        written = write_sets(Path(tmp), args.per_style, args.size, args.seed_offset)
        sets = {name: (yaml, "train") for name, yaml in written.items()}
        flips = {"off": [False], "on": [True], "both": [False, True]}[args.flip_average]
        if args.standard_val:
            sets = {"standard val (seed 11)": (Path(args.standard_val), "val"), **sets}
        for set_name, (data_yaml, split) in sets.items():
            for label, weights in detectors.items():
                for imgsz in args.imgsz or [args.size]:
                    for rule in args.rules:
                        for flip in flips:
                            conf, relative = RULES[rule]
                            m = evaluate_outfit_boxes(weights, data_yaml, split=split, imgsz=imgsz, conf=conf,
                                                      relative_conf=relative, flip_average=flip)
                            rows.append((set_name, label, imgsz, rule, flip, m))
                            print(set_name, label, imgsz, rule, f"flip {flip}",
                                  {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}, flush=True)

    lines = [
        "# Detector domain generalisation (`benchmarks/detector_domain.py`)",
        "",
        f"Photos per set: {args.per_style} per style x 13 styles at {args.size} px (standard val: its own size); "
        f"seeds {({k: v + args.seed_offset for k, v in SEEDS.items()})}. Real `Detector` path, no padding; "
        "fallback = no garment found (IoU 0). Rules: a garment is kept when its confidence is ≥ conf and ≥ "
        "relative × the photo's best garment's. Flip: `detect.flip_average` (the box is the mean of the photo's "
        "and its mirror's).",
        "",
        "| set | detector | imgsz | rule | flip | n | fallback | median IoU | mean IoU | IoU ≥ 0.8 |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for set_name, label, imgsz, rule, flip, m in rows:
        n = m["n_val_images"]
        lines.append(f"| {set_name} | {label} | {imgsz} | {rule} | {'on' if flip else 'off'} | {n} | "
                     f"{m['n_fallback'] / n:.1%} | "
                     f"{m['outfit_iou_median']:.3f} | "
                     f"{m['outfit_iou_mean']:.3f} | {m['outfit_iou_ge_0_8']:.1%} |")
    lines += ["", f"Detectors: {detectors}. Held-out ranges: `ootd.synthetic_domain.HELD_OUT`, "
              "training ranges: `ootd.synthetic_domain.TRAINING` (each held-out range is disjoint from its training "
              "range; tests/test_detector_domain.py checks it)."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
