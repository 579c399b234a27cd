"""Encoder on CPU runtimes: the style encoder (vision tower + head + L2 norm) on PyTorch fp32 / bf16 vs
ONNX Runtime and OpenVINO (fp32 and bf16), throughput and cosine to PyTorch fp32.

`--backbone tiny` is the committed tiny backbone with a seeded head, exactly what the tiny config serves;
`--backbone vit-b-16` is Marqo-FashionSigLIP's architecture with random weights (what the default config serves,
minus the download). Inputs are preprocessed synthetic crops, so only the forward pass is timed (what runs after
`preprocess`). OpenVINO is ootd's own `model.runtime=openvino` embedder (`ootd.model.runtime`); ONNX Runtime
runs a `torch.onnx.export` (TorchScript exporter, dynamic batch). Every runtime uses the same thread count (1,
then all cores). bf16 only pays on CPUs with bf16 units (AMX / AVX512-BF16): the header says whether this one
has them; OpenVINO computes fp32 where it does not.

    .venv/bin/python benchmarks/encoder_runtime.py [--backbone tiny] [--batches 1 32] [--iters 30] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import machine_load_line, publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

MIN_COSINE = 0.99


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="images per forward call")
    p.add_argument("--iters", type=int, default=30, help="timed calls per batch size (after one warm-up)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 2],
                   help="intra-op threads of every runtime; one table block per value")  # fmt: skip
    p.add_argument("--backbone", choices=["tiny", "vit-b-16"], default="tiny")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/encoder_runtime[_vit_b_16].md")
    return p.parse_args(argv)


def pixels(n: int, backbone: str, folder: Path):
    """The encoder and `n` preprocessed synthetic outfit crops (float32 N x 3 x S x S), as `embed` feeds it."""
    import numpy as np

    from benchmarks.serve_load import export_model
    from ootd.config import load_config
    from ootd.model.export import load
    from ootd.styles import STYLES
    from ootd.synthetic import render_outfit

    encoder = load(export_model(backbone, load_config("tiny").model, folder)).eval()
    rng = np.random.default_rng(0)
    images = [render_outfit(STYLES[i % len(STYLES)], rng, 256).image for i in range(n)]
    return encoder, encoder.preprocess(images)


def torch_runner(encoder, precision: str):
    """A callable batch -> embeddings on PyTorch: fp32, or bf16 autocast (what `model.precision=bf16` does)."""
    import torch

    def run(batch):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return encoder(torch.from_numpy(batch)).float().numpy()

    return run


def onnx_runner(encoder, sample, folder: Path, threads: int):
    """Exports the encoder to ONNX (dynamic batch) and returns an ONNX Runtime callable."""
    import onnxruntime
    import torch

    path = folder / "encoder.onnx"
    torch.onnx.export(encoder, (sample,), str(path), input_names=["pixels"], output_names=["embedding"],
                      dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                      dynamo=False)  # fmt: skip
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"pixels": batch})[0]


def openvino_runner(encoder, threads: int, precision: str):
    """ootd's `model.runtime=openvino` embedder, minus the preprocessing: a compiled-model callable."""
    from ootd.model.runtime import OpenVINOEmbedder

    embedder = OpenVINOEmbedder(encoder, precision, threads)
    return lambda batch: embedder.compiled(batch)[embedder.output]


def cpu_line() -> str:
    """The CPU model and whether it computes bf16 natively (OpenVINO's capability list)."""
    import platform

    import openvino as ov

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    units = "yes" if bf16 else "no (bf16 rows run fp32 in OpenVINO)"
    return f"CPU: {model}, {os.cpu_count()} cores, bf16 units: {units}."


def measure(run, data, batch: int, iters: int) -> float:
    """Images/s of `run` on `iters` calls of `batch` images (one warm-up call first)."""
    chunk = data[:batch]
    run(chunk)
    start = time.perf_counter()
    for _ in range(iters):
        run(chunk)
    return batch * iters / (time.perf_counter() - start)


def cosine(a, b) -> float:
    """Smallest per-row cosine between two embedding batches."""
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def main(argv: list[str] | None = None) -> int:
    """Builds every runtime, measures each batch size, prints and writes the table. Returns the exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import torch

    out = args.out or REPO / "benchmarks" / "results" / (
        "encoder_runtime.md" if args.backbone == "tiny" else f"encoder_runtime_{args.backbone.replace('-', '_')}.md")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ootd-bench-encoder-") as folder:
        encoder, data = pixels(max(args.batches), args.backbone, Path(folder))
        data = data.numpy()
        sample = torch.from_numpy(data[:1])
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = {
                "torch fp32": torch_runner(encoder, "fp32"),
                "torch bf16 autocast (`model.precision=bf16`)": torch_runner(encoder, "bf16"),
                "onnxruntime fp32": onnx_runner(encoder, sample, Path(folder), threads),
                "openvino fp32 (`model.runtime=openvino`)": openvino_runner(encoder, threads, "fp32"),
                "openvino bf16 (+ `model.precision=bf16`)": openvino_runner(encoder, threads, "bf16"),
            }
            reference = runners["torch fp32"](data)
            for name, run in runners.items():
                rates = [measure(run, data, batch, args.iters) for batch in args.batches]
                rows.append((name, threads, rates, cosine(run(data), reference)))
    load_after = os.getloadavg()

    millions = sum(p.numel() for p in encoder.parameters()) / 1e6
    lines = [
        f"Encoder runtimes on CPU: {args.backbone} style encoder ({millions:.1f}M parameters, {data.shape[-1]} px "
        f"input), {args.iters} calls per batch size. {cpu_line()}",
        "",
        "| runtime | threads | " + " | ".join(f"img/s, batch {b}" for b in args.batches)
        + " | vs torch fp32, same threads (largest batch) | min cosine to torch fp32 (>= 0.99) |",
        "|---|---|" + "---|" * len(args.batches) + "---|---|",
    ]
    torch_rates = {threads: rates[-1] for name, threads, rates, _ in rows if name == "torch fp32"}
    for name, threads, rates, cos in rows:
        verdict = "ok" if cos >= MIN_COSINE else "FAIL"
        lines.append(f"| {name} | {threads} | " + " | ".join(f"{r:.1f}" for r in rates)
                     + f" | {rates[-1] / torch_rates[threads]:.2f}x | {cos:.5f} {verdict} |")
    lines += [
        "",
        machine_load_line(load_before, load_after),
    ]
    publish(lines, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
