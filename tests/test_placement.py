"""What stages ask of the cluster: GPU reservations follow the configured device."""

from __future__ import annotations


def test_actors_reserve_the_gpus_their_device_needs():
    from ootd.placement import device_gpus

    assert [device_gpus(d) for d in ("cpu", "", "mps", "cuda", "cuda:1", "0", "0,1")] == [0, 0, 0, 1, 1, 1, 2]


def test_auto_devices_follow_the_gpus_of_the_connected_cluster():
    """A Ray instance that declares one GPU (none exists here: Ray takes the count on trust) makes `auto` cuda;
    without one it stays cpu. Run in a child process: the test session's own Ray connection stays untouched."""
    import subprocess
    import sys

    code = (
        "import ray\n"
        "from ootd.config import load_config, with_overrides\n"
        "from ootd.placement import gpu_requested, resolve_device\n"
        "cfg = with_overrides(load_config('tiny'), ['train.num_workers=1', 'train.use_gpu=auto'])\n"
        "for gpus in (1, 0):\n"
        "    ray.init(num_cpus=1, num_gpus=gpus, include_dashboard=False, log_to_driver=False)\n"
        "    print(gpus, resolve_device('auto'), resolve_device('cpu'), resolve_device('cuda:1'), gpu_requested(cfg))\n"
        "    ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line[:1] in "01"]
    assert lines == ["1 cuda cpu cuda:1 True", "0 cpu cpu cuda:1 False"]
