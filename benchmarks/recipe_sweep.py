"""Fine-tuning recipe sweep on the demo's data: each recipe trained with several seeds, chosen on val, reported on test.

The demo's synthetic photos (13 styles x 60, seed 0) are ingested once; every recipe (a list of `--set`
overrides on the tiny config) is trained by the real Ray Train path (`run_training`, 2 DDP workers) once per seed
and scored by `ootd evaluate` on the val split (what the choice may look at) and on the test split (reported
only). The colour-histogram and frozen-backbone baselines come from the same evaluations. Results go to
`benchmarks/results/recipe_sweep.md` (mean ± sd over seeds).

    .venv/bin/python benchmarks/recipe_sweep.py                       # every recipe, seeds 0,1
    .venv/bin/python benchmarks/recipe_sweep.py --recipes current,blocks2 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# name → overrides on top of tiny.yaml (what `make demo` trains with).
RECIPES: dict[str, list[str]] = {
    "current": [],
    "head_only": ["model.unlocked_blocks=0"],
    "blocks2": ["model.unlocked_blocks=2"],
    "blocks4": ["model.unlocked_blocks=4"],
    "blocks2_lr1e-4": ["model.unlocked_blocks=2", "train.lr_backbone=1e-4"],
    "blocks4_lr1e-4": ["model.unlocked_blocks=4", "train.lr_backbone=1e-4"],
    "lr_backbone1e-3": ["train.lr_backbone=1e-3"],
    "lr_head3e-3": ["train.lr_head=3e-3"],
    "linear_head": ["model.head=linear"],
    "temp0.05": ["train.temperature=0.05"],
    "temp0.2": ["train.temperature=0.2"],
    "views8": ["train.augment_views=8"],
    "epochs20": ["train.epochs=20"],
    "triplet": ["train.loss=triplet"],
    "image160": ["model.image_size=160"],
    "image192": ["model.image_size=192"],
    "image224": ["model.image_size=224"],
}
METRICS = ("mAP@10", "P@1", "style_gap")


def ingest_demo_data(workdir: Path, config) -> Path:
    """The demo's photos, ingested once (crops table under `workdir/crops`)."""
    from ootd.demo import SAMPLE_PER_STYLE
    from ootd.ingest.pipeline import run_ingest
    from ootd.synthetic import write_sample_data

    if not (workdir / "crops").is_dir():
        write_sample_data(workdir / "sample", per_style=SAMPLE_PER_STYLE, seed=0, size=256, overwrite=True)
        run_ingest(config, str(workdir / "sample" / "images"), workdir)
    return workdir / "crops"


def train_and_score(config, crops: Path, workdir: Path) -> dict:
    """One training, scored on val and test: {split: {variant: metrics}} plus the training seconds."""
    from ootd.evaluate.run import evaluate
    from ootd.train.driver import run_training

    start = time.monotonic()
    trained = run_training(config, crops, workdir=workdir)
    seconds = time.monotonic() - start
    scores = {}
    for split in ("val", "test"):
        report = evaluate(trained["model_dir"], crops, workdir / f"eval_{split}", split=split, config=config,
                          val_fraction=config.train.val_fraction, test_fraction=config.train.test_fraction,
                          progress=False)
        scores[split] = {name: {m: v[m] for m in METRICS} for name, v in report["variants"].items()}
    return {"scores": scores, "train_s": seconds}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def report(runs: dict[str, list[dict]], seeds: list[int], workdir: Path) -> str:
    lines = [f"## recipe_sweep (tiny config, demo data, seeds {','.join(map(str, seeds))}, "
             f"{os.cpu_count()} CPUs; mean ± sd over seeds; choose on val, test reported)", "",
             "| recipe | overrides | val mAP@10 | test mAP@10 | test P@1 | test style gap | train s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    def col(results: list[dict], split: str, metric: str, variant: str = "finetuned_crop") -> str:
        return spread([r["scores"][split][variant][metric] for r in results])

    for name, results in runs.items():
        lines.append(f"| {name} | `{' '.join(RECIPES[name]) or '(tiny.yaml)'}` | {col(results, 'val', 'mAP@10')} | "
                     f"{col(results, 'test', 'mAP@10')} | {col(results, 'test', 'P@1')} | "
                     f"{col(results, 'test', 'style_gap')} | "
                     f"{statistics.fmean(r['train_s'] for r in results):.0f} |")
    first = next(iter(runs.values()))
    lines += ["", "Baselines on the same test split (no fine-tuning): "
              + ", ".join(f"{v} mAP@10 {spread([r['scores']['test'][v]['mAP@10'] for r in first])}"
                          for v in ("histogram_crop", "frozen_crop", "frozen_whole")), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse an ingested workdir (default: temp)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipe_sweep.md")
    args = parser.parse_args()

    import logging

    import ray

    from ootd.config import load_config, with_overrides
    from ootd.logs import setup_logging

    setup_logging()
    logging.getLogger().setLevel(logging.WARNING)  # one line per run below, not the jobs' INFO
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = set(names) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ootd-sweep-"))
    base = with_overrides(load_config("tiny"), [f"data.workdir={workdir}",
                                                f"train.storage_path={workdir / 'ray_results'}"])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20)
    try:
        crops = ingest_demo_data(workdir, base)
        runs: dict[str, list[dict]] = {}
        for name in names:
            for seed in seeds:
                config = with_overrides(base, [*RECIPES[name], f"train.seed={seed}",
                                               f"train.run_name=sweep-{name}-{seed}"])
                result = train_and_score(config, crops, workdir / "runs" / f"{name}-{seed}")
                runs.setdefault(name, []).append(result)
                test = result["scores"]["test"]["finetuned_crop"]
                print(f"{name} seed {seed}: val mAP@10 {result['scores']['val']['finetuned_crop']['mAP@10']:.3f} "
                      f"test mAP@10 {test['mAP@10']:.3f} ({result['train_s']:.0f}s)", flush=True)
            (workdir / "sweep.json").write_text(json.dumps(runs, indent=2))
            # After every recipe: a sweep stopped part-way still leaves the table of what it finished.
            args.out.write_text(report(runs, seeds, workdir))
    finally:
        ray.shutdown()
    print(args.out.read_text() if args.out.exists() else "no recipe finished")


if __name__ == "__main__":
    main()
