"""Encoder inference runtimes: PyTorch, or the same encoder converted to OpenVINO for CPUs (`model.runtime`).

Only inference uses this (the index job's embedding actors and the Serve Encoder); training, the feature cache
and `ootd evaluate` always run PyTorch. Measured in benchmarks/results/encoder_runtime*.md: at fp32 OpenVINO ran the
tiny encoder 1.23x faster than PyTorch at batch 32 and 2.06x at batch 1, ViT-B-16 1.09x; on a CPU with AMX, 1.9x
PyTorch at bf16 (cosine to fp32 >= 0.9999). Where the CPU has no bf16 units OpenVINO computes in fp32 whatever
`model.precision` says.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ootd.detect.runtime import RuntimeUnavailable, installed, is_cpu

if TYPE_CHECKING:
    from PIL import Image

    from ootd.model.encoder import StyleEncoder

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino")


class TorchEmbedder:
    """The encoder's own PyTorch forward (autocast for bf16)."""

    name = "torch"

    def __init__(self, encoder: StyleEncoder, precision: str):
        self.encoder, self.precision = encoder, precision

    def embed(self, images: Sequence[Image.Image], batch_size: int) -> np.ndarray:
        """L2-normalised embeddings (N, embed_dim) of PIL crops."""
        return self.encoder.embed(images, batch_size=batch_size, precision=self.precision)


class OpenVINOEmbedder:
    """The encoder (vision tower + head + normalisation) converted in memory to an OpenVINO CPU model.

    Converting takes about a second for the tiny encoder and tens of seconds for ViT-B-16, once per process, so
    nothing is cached on disk: a stale cache keyed on a model version would be one more thing to get wrong.
    Preprocessing stays the encoder's own, so both runtimes see the same pixels.
    """

    name = "openvino"

    def __init__(self, encoder: StyleEncoder, precision: str, threads: int):
        """Converts and compiles the encoder.

        Args:
            encoder: a loaded StyleEncoder on the CPU.
            precision: fp32 (OpenVINO f32) or bf16 (OpenVINO's bf16 on CPUs with AMX/AVX512-BF16).
            threads: inference threads: the CPUs Ray reserved, not OpenVINO's default of every core.
        """
        import openvino as ov

        from ootd.detect.runtime import _openvino_without_telemetry

        _openvino_without_telemetry()
        self.encoder = encoder
        size = encoder.preprocess_cfg["size"]
        sample = torch.zeros((1, 3, size[0], size[1]), dtype=torch.float32)
        was_training = encoder.training
        encoder.eval()
        try:
            # The converter traces with torch.jit, whose deprecation and tracer warnings say nothing to a user.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ov.convert_model(_fixed_grid_copy(encoder, size), example_input=sample)
        finally:
            encoder.train(was_training)
        model.reshape({model.input(0): ov.PartialShape([-1, 3, size[0], size[1]])})
        # OpenVINO defaults to bf16 on CPUs that have it, whatever the config says: fp32 must stay fp32.
        # No core pinning: replicas and actors sharing a node would pin their threads to the same cores.
        self.compiled = ov.Core().compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"})
        self.output = self.compiled.output(0)
        # Calling a compiled model reuses one infer request, which is not thread-safe.
        self._lock = threading.Lock()

    def embed(self, images: Sequence[Image.Image], batch_size: int) -> np.ndarray:
        """L2-normalised embeddings (N, embed_dim) of PIL crops."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(images), self.encoder.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            pixels = self.encoder.preprocess(images[start:start + batch_size]).numpy()
            with self._lock:
                vectors = np.array(self.compiled(pixels)[self.output], dtype=np.float32)
            # Renormalised: bf16 math leaves norms a few 1e-3 off 1, and Milvus' COSINE and our scores assume 1.
            out[start:start + len(pixels)] = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True),
                                                                  1e-12)
        return out


def preferred(device: str) -> str:
    """What `auto` means on `device`: OpenVINO on a CPU when it is installed, else PyTorch."""
    return "openvino" if is_cpu(device) and installed("openvino") else "torch"


def _fixed_grid_copy(encoder: StyleEncoder, size: list[int]) -> StyleEncoder:
    """The encoder, or for a trunk that interpolates its position embeddings at each forward (the tiny one at a
    `model.image_size` of its own) a copy with them resampled once, by torch, for this input size: OpenVINO's
    bicubic interpolation is not torch's (cosine 0.992 to PyTorch's embeddings where it ran in the graph)."""
    import copy

    trunk = getattr(encoder.visual, "trunk", None)
    if not getattr(trunk, "dynamic_img_size", False) or tuple(trunk.patch_embed.img_size) == tuple(size):
        return encoder
    fixed = copy.deepcopy(encoder)
    fixed.visual.trunk.set_input_size(img_size=tuple(size))
    return fixed


def build_embedder(encoder: StyleEncoder, runtime: str, precision: str, device: str,
                   threads: int | None = None) -> TorchEmbedder | OpenVINOEmbedder:
    """The embedder for `model.runtime` on `device`.

    `auto` takes `preferred(device)` and falls back to PyTorch, with one WARNING, when the conversion fails; an
    explicit `openvino` that cannot run here raises.

    Args:
        encoder: the loaded encoder, already on `device`.
        runtime: auto, torch or openvino.
        precision: model.precision (fp32 or bf16).
        device: the torch device the encoder is on (openvino needs the CPU).
        threads: OpenVINO inference threads; default torch's thread count in this process.

    Raises:
        RuntimeUnavailable: `openvino` asked for on a GPU device, not installed, or failing to convert.
        ValueError: an unknown runtime.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown model.runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    name = preferred(device) if runtime == "auto" else runtime
    if name == "torch":
        return TorchEmbedder(encoder, precision)
    if not is_cpu(device):
        raise RuntimeUnavailable(f"model.runtime=openvino runs on the CPU, but the encoder is on {device!r}; "
                                 f"set model.runtime=auto or torch, or model.device=cpu")
    if not installed("openvino"):
        raise RuntimeUnavailable("model.runtime=openvino needs the openvino package (pip install openvino), or "
                                 "set model.runtime=auto or torch")
    try:
        return OpenVINOEmbedder(encoder, precision, threads or torch.get_num_threads())
    except Exception as exc:  # noqa: BLE001 - any converter failure has the same remedy
        message = f"converting the encoder to OpenVINO failed: {type(exc).__name__}: {exc}"
        if runtime != "auto":
            raise RuntimeUnavailable(message) from exc
        log.warning("model.runtime=auto: %s; embedding with PyTorch instead", message)
        return TorchEmbedder(encoder, precision)

