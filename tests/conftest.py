"""Shared fixtures: a real `ray start` cluster, milvus-lite server, Milvus standalone, tiny config, synthetic photos."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Nothing in the suite may reach the network; these make open_clip / HF / ultralytics fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A ~/.ray/auth_token on the machine would switch the test cluster to token auth (401 on the job API).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Blocks until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the group a fixture started (and only that group), then SIGKILL what is left."""
    from ootd.store.standalone import stop_group

    stop_group(proc, grace)


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Blocks until GET `url` answers 200 (and, given `proc`, fails at once when that process exits)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, f"the server process exited with {proc.returncode}"
        try:
            if requests.get(url, timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


@dataclass(frozen=True)
class RayCluster:
    """A local cluster started by `ray start --head --block` for this test session."""

    address: str  # GCS address for ray.init
    dashboard_url: str  # for `ray job submit --address`
    temp_dir: Path

    def job_env(self) -> dict[str, str]:
        """Environment for `ray job submit` / `serve` CLIs against this cluster."""
        env = dict(os.environ)
        env["RAY_ADDRESS"] = self.dashboard_url
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def submit_job(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """Runs `ray job submit --working-dir <repo> -- python <args>` and waits for it."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO), "--"]
        cmd += ["python", *args]
        for _ in range(5):
            result = subprocess.run(cmd, env=self.job_env(), capture_output=True, text=True, timeout=timeout)
            # Right after start-up the head's job agent may not have registered yet; that is not the job failing.
            if "No available agent to submit job" not in result.stdout + result.stderr:
                return result
            time.sleep(3)
        return result


@pytest.fixture(scope="session")
def ray_cluster():
    """Starts a real 2-CPU head node with its own ports and temp dir; stops only that node at the end."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ootd-ray-", dir="/tmp"))
    gcs_port, dash_port, client_port = free_port(), free_port(), free_port()
    # Ray's fixed default agent/metrics ports collide with any other Ray on the machine: take free ones.
    agent_http, agent_grpc, metrics, runtime_env = free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ)
    # Job entrypoints run `python`: make it this venv's interpreter on the cluster too.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=2", "--num-gpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=800000000",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = open(temp_dir / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_for_port(dash_port, timeout=120, proc=proc)
            # The dashboard's job API comes up a moment after its port opens.
            _wait_for_job_api(f"http://127.0.0.1:{dash_port}", timeout=120)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{_startup_logs(temp_dir)}") from exc
        yield RayCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", temp_dir)
    finally:
        _shutdown_driver()
        stop_process_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_api(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Ray job API at {url} did not answer in {timeout}s")


def _startup_logs(temp_dir: Path, lines: int = 40) -> str:
    """The tail of `ray start` and dashboard logs, so a cluster that fails to start in CI says why."""
    parts = []
    for path in [temp_dir / "ray-start.log", *sorted(temp_dir.glob("session_*/logs/dashboard*.log"))]:
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        parts.append(f"--- {path.name} ---\n" + "\n".join(tail))
    return "\n".join(parts)


def _shutdown_driver() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This pytest process connected to the test cluster as a Ray driver."""
    import ray

    ray.init(address=ray_cluster.address, log_to_driver=False, ignore_reinit_error=True)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # pytest output stays readable; jobs keep their bars
    yield ray_cluster


@pytest.fixture()
def milvus_server(tmp_path_factory):
    """A real Milvus gRPC endpoint (`milvus-lite server`) on a free port; yields its URI."""
    data_dir = tmp_path_factory.mktemp("milvus-server")
    port = free_port()
    cmd = [str(BIN / "milvus-lite"), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]
    log = open(data_dir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc, grace=10)
        log.close()


@pytest.fixture(scope="session")
def milvus_standalone(tmp_path_factory):
    """A real Milvus 2.3 standalone server (PyPI `milvus`) on free ports for the session; yields its URI.

    Unlike Milvus Lite it keeps duplicate keys on plain insert, reads with Bounded consistency by default and
    serves only loaded collections: the behaviour of a production server.
    """
    from ootd.store.standalone import LocalMilvus

    if LocalMilvus.executable() is None:
        pytest.skip("the `milvus` package (Milvus standalone) is not installed: pip install -e '.[dev]'")
    server = LocalMilvus(tmp_path_factory.mktemp("milvus-standalone"))
    try:
        yield server.start()
    finally:
        server.stop()


def reset_milvus(uri: str) -> str:
    """Drops every alias and collection of a shared (session) server, so each test starts from an empty one."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, timeout=30)
    try:
        for name in client.list_collections():
            for alias in client.describe_collection(name).get("aliases", []) or []:
                client.drop_alias(alias)
            client.drop_collection(name)
    finally:
        client.close()
    return uri


@pytest.fixture(scope="session")
def tiny_config():
    """The offline tiny config (tiny ViT, committed synthetic detector)."""
    from ootd.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """A small deterministic synthetic outfit set: 6 photos per style, 256 px."""
    from ootd.synthetic import write_sample_data

    out = tmp_path_factory.mktemp("synthetic")
    write_sample_data(out, per_style=6, seed=7, size=256)
    return out


def record_network(patch: pytest.MonkeyPatch) -> list:
    """Patches sockets through `patch` so every connect and name lookup is recorded (and still made); returns the
    list they are appended to, for tests that prove a code path never reaches the network."""
    import socket

    contacted: list = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def record_connect(sock, address):
        contacted.append(address)
        return connect(sock, address)

    def record_lookup(host, *args, **kwargs):
        contacted.append(host)
        return getaddrinfo(host, *args, **kwargs)

    patch.setattr(socket.socket, "connect", record_connect)
    patch.setattr(socket, "getaddrinfo", record_lookup)
    return contacted
