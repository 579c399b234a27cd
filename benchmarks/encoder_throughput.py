"""Encoder throughput: Marqo-FashionSigLIP's ViT-B-16-SigLIP tower (random weights) in fp32 vs bf16, vs matmul peak.

For each batch size and precision it times `StyleEncoder.forward` (vision tower + head + L2 norm, exactly what
`embed` runs after preprocessing) and, in the same run, a square matmul of that precision: the achieved
GFLOP/s (35.4 GFLOPs per 224 px image) over the matmul peak says how much of the machine the encoder uses.
Precisions: `fp32`; `bf16` = fp32 weights under bf16 autocast (what `embed(precision="bf16")` does);
`bf16w` = a copy of the model cast to bf16 once (no per-call weight casts; a candidate for CPU serving).

    .venv/bin/python benchmarks/encoder_throughput.py                    # CPU, batches 1/8/32
    .venv/bin/python benchmarks/encoder_throughput.py --device cuda --iters 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import publish  # noqa: E402 - benchmarks/ is the script's own folder on sys.path

PRECISIONS = ("fp32", "bf16", "bf16w")
GFLOPS_PER_IMAGE = 35.4  # open_clip's profile of the ViT-B-16-SigLIP vision tower at 224 px
MARQO_CONFIG = REPO / "tests" / "data" / "marqo_open_clip_config.json"


def build_encoder(device: str):
    """A StyleEncoder on Marqo-FashionSigLIP's exact open_clip config with random weights (nothing downloaded)."""
    import open_clip
    import torch

    from ootd.model.encoder import StyleEncoder

    config = json.loads(MARQO_CONFIG.read_text())
    model_cfg = copy.deepcopy(config["model_cfg"])
    kwargs = copy.deepcopy(model_cfg)
    kwargs.pop("custom_text")
    model = open_clip.CustomTextCLIP(**kwargs)
    open_clip.set_model_preprocess_cfg(
        model, {**open_clip.get_model_preprocess_cfg(model), **config["preprocess_cfg"], "size": 224}
    )
    encoder = StyleEncoder(model, backbone="random:ViT-B-16-SigLIP", model_cfg=model_cfg)
    return encoder.to(torch.device(device)).eval()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, device: str, warmup: int, iters: int, max_seconds: float) -> float:
    """Seconds of the fastest of up to `iters` timed calls (at least one, within max_seconds) after `warmup` calls.

    The fastest call rather than the mean, because other jobs share this machine's cores.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return best


def matmul_peak(device: str, precision: str, n: int, warmup: int, iters: int, max_seconds: float) -> float:
    """GFLOP/s of an n³ matmul in fp32, or in bf16 (as autocast and the bf16 model feed the linear layers)."""
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_calls(lambda: a @ b, device, warmup, iters, max_seconds)
    return 2 * n**3 / seconds / 1e9


def encoder_rate(encoder, device: str, precision: str, batch: int, warmup: int, iters: int, max_s: float) -> float:
    """Images/s of `encoder(pixels)` for one batch size under no_grad (bf16: autocast; bf16w: bf16 model)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16w" else torch.float32
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)

    def call():
        with torch.no_grad(), torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16,
                                             enabled=precision == "bf16"):
            return encoder(pixels)

    return batch / time_calls(call, device, warmup, iters, max_s)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--precisions", default="fp32,bf16,bf16w", help="comma-separated: fp32, bf16, bf16w")
    parser.add_argument(
        "--warmup", type=int, default=None,
        help="untimed calls per case at its own batch size (default: 1 on cuda, 0 on cpu, where a batch-32 call "
             "takes a minute; every precision always gets one untimed batch-1 call first)",
    )
    parser.add_argument("--iters", type=int, default=3, help="timed calls at most (at least one is made)")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="stop timing a case after this long")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n³ matmul peak reference")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "encoder_throughput.md"))
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not batches or any(b < 1 for b in batches) or not precisions or not set(precisions) <= set(PRECISIONS):
        parser.error(f"batch sizes must be >= 1 and precisions among {PRECISIONS}")
    warmup = args.warmup if args.warmup is not None else (1 if args.device.startswith("cuda") else 0)

    torch.manual_seed(0)
    encoder = build_encoder(args.device)
    models = {p: copy.deepcopy(encoder).to(torch.bfloat16) if p == "bf16w" else encoder for p in precisions}
    n_params = sum(p.numel() for p in encoder.visual.parameters()) / 1e6
    dtype_peaks = {d: matmul_peak(args.device, d, args.matmul_size, 1, 5, args.max_seconds)
                   for d in {"fp32" if p == "fp32" else "bf16" for p in precisions}}
    peaks = {p: dtype_peaks["fp32" if p == "fp32" else "bf16"] for p in precisions}
    for precision in precisions:  # lazy init and kernel selection, once per precision
        encoder_rate(models[precision], args.device, precision, 1, 0, 1, 0.0)
    rows, rates = [], {}
    for batch in batches:
        for precision in precisions:
            rate = encoder_rate(models[precision], args.device, precision, batch, warmup, args.iters,
                                args.max_seconds)
            rates[(batch, precision)] = rate
            achieved = rate * GFLOPS_PER_IMAGE
            speedup = rate / rates[(batch, "fp32")] if (batch, "fp32") in rates else float("nan")
            rows.append(
                f"| {batch} | {precision} | {rate:.2f} | {achieved:.1f} | {peaks[precision]:.1f} "
                f"| {achieved / peaks[precision]:.2f} | {speedup:.2f}x |"
            )
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    lines = [
        f"Encoder throughput: ViT-B-16-SigLIP vision tower ({n_params:.1f} M params, random weights, Marqo config) "
        f"+ linear head, `StyleEncoder.forward` on 224 px inputs; device `{args.device}` ({device_name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; warmup {warmup} per case, "
        f"fastest of ≤{args.iters} timed calls per case. Baseline: {args.matmul_size}³ matmul of the same dtype "
        f"(fastest of 5), same run.",
        "",
        "| batch | precision | images/s | achieved GFLOP/s | matmul peak GFLOP/s | achieved / peak | vs fp32 |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Peak RSS: {peak_rss_mib():.0f} MiB. Achieved GFLOP/s = images/s × {GFLOPS_PER_IMAGE} GFLOPs/image. "
        f"1-min load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
    ]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
