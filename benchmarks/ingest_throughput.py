"""Benchmark: end-to-end images/s of the Ray Data ingest pipeline vs sequential single-process loops, and the
detector alone on each runtime.

All ingest rows do the same work on the same synthetic photos: read + sha256 + decode -> YOLO detect -> crop + JPEG
encode (+ parquet write for the pipeline). The detector is a real-size YOLO (`yolo11n.yaml` architecture, random
weights built from the yaml: nothing is downloaded; compute is what matters, so every class is kept and the
random weights finding nothing is fine).

- seed loop: the original baseline, one process, PyTorch (`detect.runtime=torch`) on every core, batches of
  `--batch-size` through `Detector.outfit_boxes`.
- runtime loop: the same loop on the pipeline's runtime (`detect.runtime=auto`): what the pipeline itself adds.
- pipeline: `ootd.ingest.run_ingest` on a local Ray instance (`auto` runtime) with `--actors` detector actors of one
  inference thread each, decode tasks overlapping detection.
- detector only: `Detector.outfit_boxes` on decoded photos, one image per call and `--batch-size` per call, for
  torch / onnx / openvino, on one thread and on every core.

Each loop runs in a fresh process (its peak RSS is its own). Exports are built into a temp cache before timing,
as on a node that has run ingest once. Run: .venv/bin/python benchmarks/ingest_throughput.py
[--images 240 480] [--size 640] [--actors 2] [--repeats 1]
Prints the markdown tables and writes them to benchmarks/results/ingest_throughput.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
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

from report import machine_load_line, publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path


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
    p.add_argument("--detector-images", type=int, default=48, help="photos per detector-only measurement")
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
    """The baseline loop: one process, stage by stage, torch (and the detector runtime) on `threads` threads."""
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
    return {"rows": rows, "seconds": time.perf_counter() - start, "busy": busy, "runtime": detector.runtime.name,
            "peak_rss": peak_rss()}


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which (unlike ru_maxrss) does not carry the spawning parent's peak
    over exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def detector_only(cfg, folder: Path, threads: int, n: int) -> dict:
    """Images/s of `Detector.outfit_boxes` alone on `n` decoded photos: one per call, then `batch_size` per call."""
    import numpy as np
    import torch

    from ootd.decode import decode, read_file
    from ootd.detect.yolo import Detector
    from ootd.ingest.pipeline import list_inputs

    torch.set_num_threads(threads)
    detector = Detector(cfg.detect)
    images = [np.asarray(decode(read_file(item.source, cfg.data.max_image_bytes), cfg.data.max_image_pixels))
              for item in list_inputs(folder)[:n]]  # fmt: skip
    detector.outfit_boxes(images[:2])  # warm-up
    rates = {}
    for per_call in (1, cfg.detect.batch_size):
        start = time.perf_counter()
        for first in range(0, len(images), per_call):
            detector.outfit_boxes(images[first : first + per_call])
        rates[per_call] = len(images) / (time.perf_counter() - start)
    return {"runtime": detector.runtime.name, "rates": rates, "peak_rss": peak_rss()}


def in_fresh_process(fn, *args) -> dict:
    """Runs `fn(*args)` in a spawned process: its own peak RSS, no Ray or earlier model in memory."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


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
    """Runs every side for each size and the detector-only table; prints and writes the markdown. Returns 0."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import ray
    from ray.data import DataContext

    from ootd.config import load_config
    from ootd.detect import runtime as runtimes
    from ootd.detect.yolo import resolve_weights

    work = Path(tempfile.mkdtemp(prefix="ootd-bench-ingest-"))
    # A private export cache, inherited by the loops' processes and the Ray workers.
    os.environ["OOTD_CACHE_DIR"] = str(work / "cache")
    rows, detector_rows = [], []
    try:
        weights = random_yolo(work / "yolo11n-random.pt")
        overrides = [
            f"detect.weights={weights}", f"detect.imgsz={args.imgsz}", f"detect.batch_size={args.batch_size}",
            f"detect.class_ids={list(range(80))}", "data.crop_max_side=512", "data.num_blocks=8",
        ]  # fmt: skip
        installed = ["torch", *(name for name in runtimes.EXPORTED[::-1] if runtimes.installed(name))]
        export_seconds = {}
        for name in installed[1:]:
            start = time.perf_counter()
            runtimes.exported_model(resolve_weights(str(weights)), name, args.imgsz)
            export_seconds[name] = time.perf_counter() - start
        seed_cfg = load_config("default", [*overrides, "detect.runtime=torch"])
        auto_cfg = load_config("default", [*overrides, "detect.runtime=auto"])
        # Detector actors hold one inference thread each; a little under one logical CPU each leaves room for the
        # decode (0.25) and write (0.1) tasks to be scheduled beside them, so decoding overlaps detection.
        per_actor = round(min(1.0, (args.cpus - 0.4) / args.actors), 2)
        ray_cfg = load_config("default", [*overrides, "detect.runtime=auto", f"detect.concurrency={args.actors}",
                                          f"detect.num_cpus={per_actor}"])  # fmt: skip
        load_before = os.getloadavg()
        for n in args.images:
            photos = work / f"photos-{n}"
            make_photos(photos, n, args.size)
            seed_runs, loop_runs, ray_runs = [], [], []
            for _ in range(args.repeats):
                # The loops run with no Ray process alive: Ray's daemons would steal time from their threads.
                seed_runs.append(in_fresh_process(sequential, seed_cfg, photos, args.cpus))
                loop_runs.append(in_fresh_process(sequential, auto_cfg, photos, args.cpus))
                ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
                DataContext.get_current().enable_progress_bars = False
                ray_runs.append(pipeline(ray_cfg, photos, work / "out"))
                ray.shutdown()
            seed, loop, par = (min(runs, key=lambda r: r["seconds"]) for runs in (seed_runs, loop_runs, ray_runs))
            assert seed["rows"] == loop["rows"] == par["rows"] == n, (n, seed["rows"], loop["rows"], par["rows"])
            rows.append((n, seed, loop, par))
        photos = work / f"photos-{args.images[0]}"
        for name in installed:
            cfg = load_config("default", [*overrides, f"detect.runtime={name}"])
            for threads in sorted({1, args.cpus}):
                detector_rows.append((name, threads, in_fresh_process(detector_only, cfg, photos, threads,
                                                                      args.detector_images)))  # fmt: skip
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    auto = rows[0][2]["runtime"]
    lines = [
        f"Ingest throughput: synthetic photos {args.size}x{args.size}, yolo11n (random weights) at imgsz {args.imgsz}, "
        f"detector batch {args.batch_size}, {args.cpus} CPUs, best of {args.repeats} per row. `auto` ran {auto}.",
        "",
        "| run | images | seconds | images/s | vs seed loop | busy share read+decode / detect / crop+encode "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, seed, loop, par in rows:
        seed_rate, loop_rate, par_rate = (n / r["seconds"] for r in (seed, loop, par))
        lines += [
            f"| seed loop (1 process, torch {args.cpus} threads) | {n} | {seed['seconds']:.1f} | {seed_rate:.2f} | "
            f"1.00x | {shares(seed['busy'])} | {seed['peak_rss'] / 2**20:.0f} MiB (process) |",
            f"| same loop on `auto` ({loop['runtime']}, {args.cpus} threads) | {n} | {loop['seconds']:.1f} | "
            f"{loop_rate:.2f} | {loop_rate / seed_rate:.2f}x | {shares(loop['busy'])} | "
            f"{loop['peak_rss'] / 2**20:.0f} MiB (process) |",
            f"| Ray Data pipeline (`auto`, {args.actors} detector actors x 1 thread, decode tasks) | {n} | "
            f"{par['seconds']:.1f} | {par_rate:.2f} | **{par_rate / seed_rate:.2f}x** ({par_rate / loop_rate:.2f}x "
            f"the `auto` loop) | {shares(par['busy'])} | {par['peak_rss'] / 2**20:.0f} MiB (driver + workers) |",
        ]
    if len(rows) >= 2:
        (n1, s1, l1, p1), (n2, s2, l2, p2) = rows[0], rows[-1]
        deltas = [r2["seconds"] - r1["seconds"] for r1, r2 in ((s1, s2), (l1, l2), (p1, p2))]
        if all(dt > 0 for dt in deltas):
            seed_m, loop_m, par_m = ((n2 - n1) / dt for dt in deltas)
            note = (f"seed loop {seed_m:.2f} images/s, `auto` loop {loop_m:.2f}, pipeline {par_m:.2f}: "
                    f"**{par_m / seed_m:.2f}x** the seed loop, {par_m / loop_m:.2f}x the `auto` loop.")  # fmt: skip
        else:
            note = "not measurable in this run (a larger run finished sooner: the machine's load changed)."
        lines += ["", f"Marginal rate from {n1} to {n2} images (start-up costs cancel): {note}"]
    lines += [
        "",
        "Pipeline seconds include the hash/dedup pass (" + ", ".join(f"{p['hash_pass']:.1f} s" for *_, p in rows)
        + " wall) and detector actor start-up; every row includes loading the detector (exports were built before "
        "timing: " + ", ".join(f"{k} {v:.1f} s" for k, v in export_seconds.items()) + ", once per node and weights). "
        "Busy shares are summed stage time (the pipeline's stages overlap).",
        "",
        f"Detector only: `Detector.outfit_boxes` on {args.detector_images} decoded {args.size}x{args.size} photos at "
        f"imgsz {args.imgsz} (letterbox, inference, NMS, outfit box), each runtime in a fresh process.",
        "",
        f"| runtime | threads | images/s, 1 per call | images/s, {args.batch_size} per call | vs torch, same threads "
        "(batched) | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    torch_rates = {t: r["rates"][args.batch_size] for name, t, r in detector_rows if name == "torch"}
    for name, threads, result in detector_rows:
        single, batched = result["rates"][1], result["rates"][args.batch_size]
        lines.append(f"| {name} | {threads} | {single:.2f} | {batched:.2f} | {batched / torch_rates[threads]:.2f}x | "
                     f"{result['peak_rss'] / 2**20:.0f} MiB |")  # fmt: skip
    lines += [
        "",
        machine_load_line(load_before, load_after, '; anything above 0 competes with the runs, and skews every row'),
    ]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
