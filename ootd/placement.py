"""What a stage asks of the cluster: whether its workers and actors reserve a GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ootd.config import Config


def gpu_requested(config: Config) -> bool:
    """train.use_gpu: "true", "false", or "auto" = every training worker can get a GPU in this cluster."""
    if config.train.use_gpu != "auto":
        return config.train.use_gpu == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= config.train.num_workers


def resolve_device(spec: str) -> str:
    """A device setting as the driver resolves it for its actors: `auto` is `cuda` when the connected cluster has a
    GPU, else `cpu`; anything else is returned as given (`cpu`, `cuda`, `cuda:1`, ultralytics' `0`)."""
    if (spec or "cpu").strip().lower() != "auto":
        return spec or "cpu"
    import ray

    return "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def device_gpus(device: str) -> int:
    """GPUs an actor must reserve to run on `device` (torch or ultralytics spelling: cpu, cuda, cuda:0, 0, 0,1).

    Ray hides unreserved GPUs from an actor (CUDA_VISIBLE_DEVICES), so a cuda device without a reservation fails;
    inside the actor the reserved GPU is device 0.
    """
    spec = (device or "cpu").strip().lower()
    if spec.startswith("cuda"):
        return 1
    ids = [part for part in spec.split(",") if part.strip().isdigit()]
    return len(ids)
