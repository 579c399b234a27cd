"""The `ray start` fixture really is a cluster that runs work."""

import os

import pytest


@pytest.mark.slow
def test_cluster_runs_a_remote_task(ray_session):
    import ray

    @ray.remote(num_cpus=0.5)
    def whoami(x: int) -> tuple[int, int]:
        return x * x, os.getpid()

    results = ray.get([whoami.remote(i) for i in range(4)])
    assert [r[0] for r in results] == [0, 1, 4, 9]
    assert all(pid != os.getpid() for _, pid in results)  # ran in worker processes, not here
    assert ray.cluster_resources()["CPU"] == 2
