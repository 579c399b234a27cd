"""Benchmark: end-to-end images/s of the Ray Data ingest pipeline vs a sequential single-process loop.

Both do the same work on the same synthetic photos: read + sha256 + decode -> YOLO detect -> crop + JPEG encode
(+ parquet write for the pipeline). The detector is a real-size YOLO (`yolo11n.yaml` architecture, random
weights built from the yaml: nothing is downloaded; compute is what matters, so every class is kept and the
random weights finding nothing is fine).

- sequential: one process, torch using every core, batches of `--batch-size` through `Detector.outfit_boxes`.
- pipeline: `ootd.ingest.run_ingest` on a local Ray instance with `--actors` detector actors of one torch thread
  each, decode tasks overlapping detection.

Run: .venv/bin/python benchmarks/ingest_throughput.py [--images 240 480] [--size 640] [--actors 2] [--repeats 1]
Prints a markdown table and writes it to benchmarks/results/ingest_throughput.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[240], help="synthetic photos to ingest (one row pair "
                   "per value)")  # fmt: skip
    p.add_argument("--size", type=int, default=640, help="photo side in pixels")
    p.add_argument("--imgsz", type=int, default=640, help="YOLO inference size")
    p.add_argument("--batch-size", type=int, default=8, help="images per detector call (both sides)")
    p.add_argument("--actors", type=int, default=2, help="detector actors in the pipeline")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to Ray and to sequential torch")
    p.add_argument("--repeats", type=int, default=1, help="alternate sequential/pipeline runs this many times")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ingest_throughput.md")
    return p.parse_args(argv)


def make_photos(folder: Path, n: int, size: int) -> None:
    """Writes `n` synthetic street snaps as JPEGs in one sub-folder per style."""
    import numpy as np

    from ootd.styles import STYLES
    from ootd.synthetic import render_outfit

    rng = np.random.default_rng(0)
    for i in range(n):
        style = STYLES[i % len(STYLES)]
        photo = render_outfit(style, rng, size)
        (folder / style).mkdir(parents=True, exist_ok=True)
        photo.image.save(folder / style / f"{i:05d}.jpg", quality=90)


def random_yolo(path: Path) -> Path:
    """A yolo11n built from its architecture yaml with random weights, saved as an ultralytics checkpoint."""
    from ootd.detect.yolo import offline_ultralytics

    offline_ultralytics().YOLO("yolo11n.yaml").save(str(path))
    return path


def sequential(cfg, folder: Path, threads: int) -> dict:
    """The baseline loop: one process, stage by stage, torch on `threads` threads."""
    import numpy as np
    import torch
    from PIL import Image

    from ootd.decode import decode, encode_jpeg, image_id, read_file
    from ootd.detect.yolo import Detector
    from ootd.ingest.pipeline import list_inputs

    torch.set_num_threads(threads)
    start = time.perf_counter()
    detector = Detector(cfg.detect)
    inputs = list_inputs(folder)
    busy = {"read+decode": 0.0, "detect": 0.0, "crop+encode": 0.0}
    seen, rows = set(), 0
    step = cfg.detect.batch_size
    for first in range(0, len(inputs), step):
        t0 = time.perf_counter()
        images = []
        for item in inputs[first : first + step]:
            data = read_file(item.source, cfg.data.max_image_bytes)
            key = image_id(data)
            if key not in seen:
                seen.add(key)
                images.append(np.asarray(decode(data, cfg.data.max_image_pixels)))
        t1 = time.perf_counter()
        boxes = detector.outfit_boxes(images)
        t2 = time.perf_counter()
        for image, box in zip(images, boxes, strict=True):
            x1, y1, x2, y2 = box.box
            encode_jpeg(Image.fromarray(image[y1:y2, x1:x2]), cfg.data.crop_max_side, 92)
            rows += 1
        t3 = time.perf_counter()
        busy["read+decode"] += t1 - t0
        busy["detect"] += t2 - t1
        busy["crop+encode"] += t3 - t2
    return {"rows": rows, "seconds": time.perf_counter() - start, "busy": busy}


class RayMemory:
    """Samples the summed RSS of this driver and every Ray worker process (not the Ray daemons)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RayMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for proc in me.children(recursive=True):
                try:
                    if proc.name().startswith("ray::"):
                        total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)


def pipeline(cfg, folder: Path, out: Path) -> dict:
    """The Ray Data pipeline, end to end (hash pass, decode tasks, detector actors, parquet writers)."""
    from ootd.ingest.pipeline import run_ingest

    shutil.rmtree(out, ignore_errors=True)
    with RayMemory() as memory:
        start = time.perf_counter()
        summary = run_ingest(cfg, folder, out)
        seconds = time.perf_counter() - start
    busy = summary["busy_seconds"]
    return {
        "rows": summary["rows"],
        "seconds": seconds,
        "busy": {"read+decode": busy.get("decode", 0.0), "detect": busy.get("detect", 0.0),
                 "crop+encode": busy.get("crop", 0.0)},  # fmt: skip
        "hash_pass": summary["hash_seconds"],
        "peak_rss": memory.peak,
    }


def shares(busy: dict) -> str:
    total = sum(busy.values()) or 1.0
    return " / ".join(f"{100 * v / total:.0f}%" for v in busy.values())


def main(argv: list[str] | None = None) -> int:
    """Runs both sides for each size, prints and writes the markdown table. Returns the exit code."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import ray
    from ray.data import DataContext

    from ootd.config import load_config

    work = Path(tempfile.mkdtemp(prefix="ootd-bench-ingest-"))
    rows = []
    try:
        weights = random_yolo(work / "yolo11n-random.pt")
        overrides = [
            f"detect.weights={weights}", f"detect.imgsz={args.imgsz}", f"detect.batch_size={args.batch_size}",
            f"detect.class_ids={list(range(80))}", "data.crop_max_side=512", "data.num_blocks=8",
        ]  # fmt: skip
        seq_cfg = load_config("default", overrides)
        # Detector actors hold one torch thread each; a little under one logical CPU each leaves room for the
        # decode (0.25) and write (0.1) tasks to be scheduled beside them, so decoding overlaps detection.
        per_actor = round(min(1.0, (args.cpus - 0.4) / args.actors), 2)
        ray_cfg = load_config("default", [*overrides, f"detect.concurrency={args.actors}",
                                          f"detect.num_cpus={per_actor}"])  # fmt: skip
        load_before = os.getloadavg()[0]
        for n in args.images:
            photos = work / f"photos-{n}"
            make_photos(photos, n, args.size)
            seq_runs, ray_runs = [], []
            for _ in range(args.repeats):
                # The baseline runs with no Ray process alive: Ray's daemons would steal time from its torch threads.
                seq_runs.append(sequential(seq_cfg, photos, threads=args.cpus))
                seq_runs[-1]["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
                DataContext.get_current().enable_progress_bars = False
                ray_runs.append(pipeline(ray_cfg, photos, work / "out"))
                ray.shutdown()
            seq = min(seq_runs, key=lambda r: r["seconds"])
            par = min(ray_runs, key=lambda r: r["seconds"])
            assert seq["rows"] == par["rows"] == n, (n, seq["rows"], par["rows"])
            rows.append((n, seq, par))
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"Ingest throughput: synthetic photos {args.size}x{args.size}, yolo11n (random weights) at imgsz {args.imgsz}, "
        f"detector batch {args.batch_size}, {args.cpus} CPUs, best of {args.repeats} per row.",
        "",
        "| run | images | seconds | images/s | vs sequential | busy share read+decode / detect / crop+encode "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, seq, par in rows:
        seq_rate, par_rate = n / seq["seconds"], n / par["seconds"]
        lines += [
            f"| sequential loop (1 process, torch {args.cpus} threads) | {n} | {seq['seconds']:.1f} | "
            f"{seq_rate:.2f} | 1.00x | {shares(seq['busy'])} | {seq['peak_rss'] / 2**20:.0f} MiB (process) |",
            f"| Ray Data pipeline ({args.actors} detector actors x 1 thread, decode tasks) | {n} | "
            f"{par['seconds']:.1f} | {par_rate:.2f} | **{par_rate / seq_rate:.2f}x** | {shares(par['busy'])} "
            f"| {par['peak_rss'] / 2**20:.0f} MiB (driver + workers) |",
        ]
    if len(rows) >= 2:
        (n1, s1, p1), (n2, s2, p2) = rows[0], rows[-1]
        seq_dt, par_dt = s2["seconds"] - s1["seconds"], p2["seconds"] - p1["seconds"]
        if seq_dt > 0 and par_dt > 0:
            seq_marginal, par_marginal = (n2 - n1) / seq_dt, (n2 - n1) / par_dt
            note = (f"sequential {seq_marginal:.2f} images/s, pipeline {par_marginal:.2f} images/s, "
                    f"**{par_marginal / seq_marginal:.2f}x**.")  # fmt: skip
        else:
            note = "not measurable in this run (a larger run finished sooner: the machine's load changed)."
        lines += ["", f"Marginal rate from {n1} to {n2} images (start-up costs cancel): {note}"]
    lines += [
        "",
        "Pipeline seconds include the hash/dedup pass (" + ", ".join(f"{p['hash_pass']:.1f} s" for _, _, p in rows)
        + " wall) and detector actor start-up; both sides include loading the detector. Busy shares are summed "
        "stage time (the pipeline's stages overlap).",
        f"Machine load average (1 min) before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores; "
        "other processes competing for the cores skew both sides.",
    ]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
