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
