"""Training throughput: feature cache vs images (ViT-B-16-SigLIP), and 2 DDP workers vs 1 (Ray Train).

Part 1, in this process: Marqo-FashionSigLIP's architecture (tests/data/marqo_open_clip_config.json, random
weights written to a temp `local-dir:` folder, loaded through `StyleEncoder.from_config` like a real backbone),
for each `--ks` value k (default 2, 1, 0). The same optimizer step (`ootd.train_loop.train_step`) is timed on
the same batches
  - from images: decode crop JPEG → preprocess → frozen 12-k blocks under no_grad → top k blocks + head, and
  - from the cache: fp16 boundary activations → top k blocks + head.
With k unlocked of 12 blocks and backward ≈ 2 forwards, the images path costs ≈ 12 + 2k block-forwards a step
and the cache path ≈ 3k (+ head, optimizer): the cache can win at most ≈ 2.7x at k=2, 4.7x at k=1, far more at k=0.
The one-time cost of building the cache (a frozen forward per crop) is timed too, and folded into an
amortised speed-up over `--epochs` passes.

Part 2, on a local Ray instance this script starts (2 CPUs): the real `build_trainer` run (tiny backbone by default)
with 1 worker × 1 CPU vs 2 workers × 1 CPU each, run in the order 1, 2, 2, 1; samples/s is the loop's own
per-epoch figure (all workers' samples / epoch wall time on rank 0), median over epochs after the first.

    .venv/bin/python benchmarks/train_throughput.py                    # batch 16, 3 timed steps per path
    .venv/bin/python benchmarks/train_throughput.py --ks 2 --skip-ddp  # the k=2 comparison only
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

MARQO_CONFIG = REPO / "tests" / "data" / "marqo_open_clip_config.json"


def note(message: str) -> None:
    """Progress on stderr: the table on stdout stays clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_random_marqo_dir(folder: Path) -> Path:
    """A `local-dir:` model folder: the Marqo open_clip config with randomly initialised weights."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = json.loads(MARQO_CONFIG.read_text())
    kwargs = copy.deepcopy(config["model_cfg"])
    kwargs.pop("custom_text")
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def sample_crops(out: Path, per_style: int, size: int) -> tuple[list[bytes], list[str]]:
    """JPEG outfit crops (ground-truth boxes) and their styles from the synthetic generator."""
    import pandas as pd
    from PIL import Image

    from ootd.synthetic import write_sample_data

    write_sample_data(out, per_style=per_style, seed=0, size=size)
    manifest = pd.read_parquet(out / "manifest.parquet")
    crops, styles = [], []
    for _, row in manifest.iterrows():
        with Image.open(out / row["path"]) as image:
            buf = io.BytesIO()
            image.convert("RGB").crop(tuple(int(v) for v in row["outfit_box"])).save(buf, "JPEG", quality=92)
        crops.append(buf.getvalue())
        styles.append(row["style"])
    return crops, styles


def cache_vs_images(args: argparse.Namespace, tmp: Path) -> tuple[list[str], dict]:
    import numpy as np
    import torch

    from ootd.config import load_config, with_overrides
    from ootd.decode import decode_crop
    from ootd.model.encoder import build_encoder
    from ootd.model.losses import make_loss
    from ootd.train.feature_cache import decode_features
    from ootd.train.worker import make_optimizer, make_train_module, train_step

    folder = write_random_marqo_dir(tmp / "marqo-random")
    cfg = with_overrides(load_config("default"), [f"model.backbone=local-dir:{folder}"])
    encoder = build_encoder(cfg.model)
    note("ViT-B-16-SigLIP encoder built")
    crops, styles = sample_crops(tmp / "sample", per_style=2, size=256)
    labels = torch.tensor([sorted(set(styles)).index(s) for s in styles])
    picks = [np.random.default_rng(i).choice(len(crops), args.batch, replace=False) for i in range(args.steps + 1)]
    loss_fn = make_loss("supcon", 0.1, 0.5)
    autocast = torch.autocast("cpu", enabled=False)
    rows = [
        "| unlocked blocks k | from images: samples/s (s/step) | from cache: samples/s (s/step) | cache vs images "
        f"| cache build crops/s | cache incl. build, amortised over {args.epochs} epochs |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    shapes = {}
    for k in args.ks:
        encoder.freeze(k)
        # The cache as the cache job stores it: fp16 bytes per crop, computed once (timed per crop, after one
        # untimed batch so lazy initialisation is not billed to the first k).
        blobs = []
        with torch.inference_mode():
            encoder.boundary_features(encoder.preprocess([decode_crop(c) for c in crops[: args.batch]]), k)
            started = time.perf_counter()
            for start in range(0, len(crops), args.batch):
                pixels = encoder.preprocess([decode_crop(c) for c in crops[start : start + args.batch]])
                blobs += [row.tobytes() for row in encoder.boundary_features(pixels, k).to(torch.float16).numpy()]
            build = (time.perf_counter() - started) / len(crops)
            shape = tuple(encoder.boundary_features(encoder.preprocess([decode_crop(crops[0])]), k).shape[1:])
        shapes[k] = shape
        note(f"k={k}: cache of {len(crops)} crops built, {build:.2f} s/crop")

        def step(from_cache: bool, model, opt, pick, blobs: list = blobs, shape: tuple = shape) -> float:
            started = time.perf_counter()
            if from_cache:
                inputs = torch.from_numpy(decode_features([blobs[i] for i in pick], shape)).float()
            else:
                inputs = encoder.preprocess([decode_crop(crops[i]) for i in pick])
            train_step(model, opt, loss_fn, inputs, labels[pick], autocast)
            return time.perf_counter() - started

        paths = {}
        for from_cache in (False, True):
            paths[from_cache] = (make_train_module(encoder, k, from_cache).train(), make_optimizer(encoder, cfg.train))
        times: dict[bool, list[float]] = {False: [], True: []}
        # Steps alternate between the two paths so both see the same background load; step 0 is warm-up.
        for i, pick in enumerate(picks):
            for from_cache in (False, True):
                times[from_cache].append(step(from_cache, *paths[from_cache], pick))
                note(f"k={k} {'cache' if from_cache else 'images'} step {i}: {times[from_cache][-1]:.2f} s")
        t_img, t_cache = statistics.mean(times[False][1:]), statistics.mean(times[True][1:])
        e, b = args.epochs, args.batch
        amortised = (e * t_img / b) / (build + e * t_cache / b)
        rows.append(
            f"| {k} | {b / t_img:.2f} ({t_img:.2f}) | {b / t_cache:.2f} ({t_cache:.2f}) | {t_img / t_cache:.2f}x "
            f"| {1 / build:.2f} | {amortised:.2f}x |"
        )
    info = {"shapes": shapes, "rss": peak_rss_mib(), "params": sum(p.numel() for p in encoder.visual.parameters())}
    return rows, info


def ddp_scaling(args: argparse.Namespace, tmp: Path) -> list[str]:
    import ray

    from ootd.config import load_config, with_overrides
    from ootd.train.driver import build_trainer, prepare_data

    sys.path.insert(0, str(REPO / "tests"))
    from crops_fixture import write_crops_table

    from ootd.synthetic import write_sample_data

    sample = tmp / "ddp-sample"
    write_sample_data(sample, per_style=args.ddp_per_style, seed=1, size=160)
    crops = write_crops_table(sample, tmp / "ddp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rates: dict[int, list[float]] = {1: [], 2: []}
    rss: dict[int, float] = {}
    try:
        # A-B-B-A order: a drift in the machine's background load hits both worker counts alike.
        for run, workers in enumerate((1, 2, 2, 1)):
            cfg = with_overrides(
                load_config(args.ddp_config),
                [
                    f"train.num_workers={workers}",
                    "train.cpus_per_worker=1",
                    f"train.epochs={args.ddp_epochs}",
                    "train.styles_per_batch=6",
                    "train.images_per_style=4",
                    "train.val_fraction=0.2",
                    "train.test_fraction=0.0",
                    f"train.feature_cache={'true' if args.ddp_source == 'cache' else 'false'}",
                    f"train.run_name=ddp{run}-{workers}",
                ],
            )
            work = tmp / "ddp-work"
            data = prepare_data(cfg, crops, work)
            result = build_trainer(cfg, data, storage_path=work / "ray_results").fit()
            with result.checkpoint.as_directory() as ckpt:
                history = json.loads((Path(ckpt) / "history.json").read_text())
            rates[workers].append(statistics.median(h["samples_per_s"] for h in history[1:]))
            rss[workers] = max(rss.get(workers, 0.0), *(h["worker_peak_rss_mib"] for h in history))
            note(f"DDP run {run}, {workers} worker(s): {rates[workers][-1]:.1f} samples/s")
    finally:
        ray.shutdown()
    base = statistics.median(rates[1])
    rows = [
        "| Ray Train workers | CPUs each | samples/s, median of runs (each run: median epoch ≥ 2) | runs "
        "| vs 1 worker | worker peak RSS MiB |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for workers in (1, 2):
        rate = statistics.median(rates[workers])
        runs = ", ".join(f"{r:.1f}" for r in rates[workers])
        rows.append(f"| {workers} | 1 | {rate:.1f} | {runs} | {rate / base:.2f}x | {rss[workers]:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per step (part 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path after one warm-up step")
    parser.add_argument("--ks", default="2,1,0", help="unlocked_blocks values of part 1, comma-separated ('': skip)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs the cache build is amortised over")
    parser.add_argument("--ddp-config", default="tiny", help="config of the DDP part (tiny | default | PATH)")
    parser.add_argument("--ddp-source", choices=("images", "cache"), default="images")
    parser.add_argument("--ddp-per-style", type=int, default=30, help="synthetic photos per style (DDP part)")
    parser.add_argument("--ddp-epochs", type=int, default=3)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.md"))
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    with tempfile.TemporaryDirectory(prefix="ootd-train-bench-") as tmp:
        cache_rows, info = cache_vs_images(args, Path(tmp)) if args.ks else ([], {})
        ddp_rows = [] if args.skip_ddp else ddp_scaling(args, Path(tmp))
    lines = [] if not cache_rows else [
        f"Training throughput, part 1: ViT-B-16-SigLIP vision tower ({info['params'] / 1e6:.1f} M params, Marqo "
        f"config, random weights via `local-dir:`), batch {args.batch}, supcon, AdamW; mean of {args.steps} timed "
        f"steps after 1 warm-up step per path, same batches, the two paths' steps interleaved, one process, "
        f"torch {torch.__version__} with "
        f"{torch.get_num_threads()} CPU threads. Cached fp16 activations per crop: "
        + ", ".join(f"k={k}: {shape} = {2 * math.prod(shape) / 1024:.1f} KiB" for k, shape in info["shapes"].items())
        + ".",
        "",
        *cache_rows,
        "",
        "",
        "Arithmetic bound of `cache vs images` (12 blocks, backward ≈ 2 forwards, head and optimizer ignored): "
        "images ≈ 12 + 2k block-forwards a step, cache ≈ 3k, so at most ≈ 2.7x at k=2 and ≈ 4.7x at k=1. "
        f"Peak RSS of this process after part 1: {info['rss']:.0f} MiB.",
    ]
    if ddp_rows:
        lines += [
            "",
            f"Part 2: Ray Train DDP on a local 2-CPU Ray instance, `{args.ddp_config}` config, training from "
            f"{args.ddp_source}, {args.ddp_per_style} synthetic photos per style, P×K = 6×4 per worker, "
            f"{args.ddp_epochs} epochs per run, runs in the order 1, 2, 2, 1 workers.",
            "",
            *ddp_rows,
        ]
    lines += ["", f"1-min load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
