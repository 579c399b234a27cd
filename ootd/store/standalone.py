"""A local Milvus standalone server (PyPI `milvus`: Milvus 2.3 with embedded etcd and local storage) as a child.

Tests and benchmarks use it to exercise a real server beside Milvus Lite; a single machine can serve from it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Every port the server binds that has a flag; each gets its own free port so two servers never collide on them.
# (The embedded etcd's peer port has no flag: run one standalone server per machine at a time.)
PORT_FLAGS = ("etcd", "root-coord", "proxy-internal", "query-coord", "query-node", "index-coord", "index-node",
              "data-coord", "data-node")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (and only that group), then SIGKILL what is left of it.

    Returns once no process of the group is running, so its ports are free: Milvus' embedded etcd binds a fixed
    peer port (2380), and a restart while the old server is still shutting down dies on it.
    """
    if group_running(proc.pid):
        os.killpg(proc.pid, signal.SIGTERM)
        _wait_group(proc, grace)
    if group_running(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _wait_group(proc, 10.0)
    proc.poll()


def group_running(pgid: int) -> list[int]:
    """Pids of the processes in group `pgid` that still run (zombies do not: an orphan's may never be reaped)."""
    running = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the parenthesised command: state, ppid, pgrp, ...
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            running.append(int(entry.name))
    return running


def _wait_group(proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reaps the leader, which is our child
        if not group_running(proc.pid):
            return
        time.sleep(0.1)


class LocalMilvus:
    """`milvus-server --data DIR` on free ports, in its own process group (the wrapper's child outlives a signal
    sent to the wrapper alone, so the whole group is stopped: TERM, then KILL what lingers).

    Use as a context manager, or call `start()` / `stop()` (a stopped server can be started again on the same
    data dir, keeping its collections: a restart).
    """

    def __init__(self, data_dir: str | Path, proxy_port: int | None = None):
        self.data_dir = Path(data_dir)
        self.proxy_port = proxy_port or free_port()
        self.uri = f"http://127.0.0.1:{self.proxy_port}"
        self._proc: subprocess.Popen | None = None
        self._log = None

    @staticmethod
    def executable() -> str | None:
        """The `milvus-server` script beside this Python, or on PATH; None when the package is not installed."""
        beside = Path(sys.executable).parent / "milvus-server"
        return str(beside) if beside.exists() else shutil.which("milvus-server")

    def start(self, timeout: float = 180.0) -> str:
        """Starts the server and returns its URI once a real call succeeds.

        Raises:
            FileNotFoundError: the `milvus` package is not installed.
            TimeoutError / RuntimeError: the server did not come up (its log is in `<data_dir>/server.log`).
        """
        exe = self.executable()
        if exe is None:
            raise FileNotFoundError("milvus-server not found: pip install 'milvus==2.3.5' (Linux x86_64)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "--data", str(self.data_dir), "--proxy-port", str(self.proxy_port)]
        for name in PORT_FLAGS:
            cmd += [f"--{name}-port", str(free_port())]
        self._log = open(self.data_dir / "server.log", "a")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        return self.uri

    def stop(self, grace: float = 20.0) -> None:
        """Stops the server's process group (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, grace)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _wait_ready(self, timeout: float) -> None:
        # The proxy port opens before the coordinators are up: wait until a real call succeeds.
        from pymilvus import MilvusClient

        deadline, last, launched = time.monotonic() + timeout, None, False
        # pymilvus logs each refused connection at ERROR with a traceback: expected until the server is up.
        rpc_log = logging.getLogger("pymilvus.decorators")
        level = rpc_log.level
        rpc_log.setLevel(logging.CRITICAL)
        try:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"milvus-server exited with {self._proc.returncode}; "
                                       f"see {self.data_dir}/server.log")
                # The wrapper outlives a server that crashed on start (and then waits forever): once the server
                # it launched has been seen, a group down to the wrapper alone means that server is gone.
                members = len(group_running(self._proc.pid)) if self._proc is not None else 0
                launched = launched or members > 1
                if launched and members <= 1:
                    self.stop()
                    raise RuntimeError(f"the Milvus server exited during start-up; see "
                                       f"{self.data_dir}/logs/milvus-stderr.log")
                try:
                    client = MilvusClient(uri=self.uri, timeout=5)
                    client.list_collections()
                    client.close()
                    return
                except Exception as exc:  # noqa: BLE001 - not ready yet; the last error is reported on timeout
                    last = exc
                    time.sleep(0.5)
        finally:
            rpc_log.setLevel(level)
        self.stop()
        raise TimeoutError(f"Milvus standalone at {self.uri} not ready after {timeout:.0f}s: {last}")

    def __enter__(self) -> LocalMilvus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
