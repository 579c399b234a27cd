"""What stages ask of the cluster: GPU reservations follow the configured device."""

from __future__ import annotations


def test_actors_reserve_the_gpus_their_device_needs():
    from ootd.placement import device_gpus

    assert [device_gpus(d) for d in ("cpu", "", "mps", "cuda", "cuda:1", "0", "0,1")] == [0, 0, 0, 1, 1, 1, 2]
