"""Secrets stay out of logs and saved configs, come from the environment, and `ootd serve` drains on SIGTERM."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ootd.config import REDACTED, ConfigError, load_config, redact_overrides, save_config, with_overrides
from tests.conftest import REPO, free_port, wait_for_http

BIN = Path(sys.executable).parent
# Made at run time: a literal would sit in this file, which `ray job submit --working-dir .` copies into the
# cluster's temp dir, and the leak scan below would find the test itself.
KEY, TOKEN = f"k3y-{secrets.token_hex(8)}", f"t0ken-{secrets.token_hex(8)}"


@pytest.fixture()
def no_secret_env(monkeypatch):
    monkeypatch.delenv("OOTD_API_KEY", raising=False)
    monkeypatch.delenv("OOTD_MILVUS_TOKEN", raising=False)
    return monkeypatch


# -- config (fast) ----------------------------------------------------------------------------------------------------


def test_saved_configs_redact_secrets_and_overrides_keep_them(no_secret_env, tmp_path):
    cfg = load_config("tiny", [f"serve.api_key={KEY}", f"store.token={TOKEN}"])
    assert (cfg.serve.api_key, cfg.store.token) == (KEY, TOKEN)
    text = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert KEY not in text and TOKEN not in text
    saved = yaml.safe_load(text)
    assert saved["serve"]["api_key"] == saved["store"]["token"] == REDACTED
    assert with_overrides(cfg, ["serve.port=9001"]).serve.api_key == KEY  # the in-memory tree keeps them
    # A saved config loads again; its redacted secrets are unset (or the environment's), never the literal "***".
    assert load_config(tmp_path / "config.yaml").serve.api_key == ""
    unset = save_config(load_config("tiny"), tmp_path / "plain.yaml").read_text()
    assert "api_key: ''" in unset  # nothing set: nothing to hide, and the file says so


def test_secrets_come_from_the_environment_unless_the_config_sets_them(no_secret_env, tmp_path):
    no_secret_env.setenv("OOTD_API_KEY", KEY)
    no_secret_env.setenv("OOTD_MILVUS_TOKEN", TOKEN)
    cfg = load_config("tiny")
    assert (cfg.serve.api_key, cfg.store.token) == (KEY, TOKEN)
    assert load_config("tiny", ["serve.api_key=explicit"]).serve.api_key == "explicit"
    save_config(load_config("tiny", [f"serve.api_key={KEY}"]), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").serve.api_key == KEY  # the redacted value is filled from the env


def test_a_secret_override_is_taken_verbatim_and_never_echoed(no_secret_env):
    assert load_config("tiny", ["serve.api_key=0123"]).serve.api_key == "0123"  # YAML would make it 83
    assert load_config("tiny", ["serve.api_key=[a, b]"]).serve.api_key == "[a, b]"
    shown = redact_overrides([f"serve.api_key={KEY}", f"store.token={TOKEN}", "serve.port=1", "serve.api_key="])
    assert shown == [f"serve.api_key={REDACTED}", f"store.token={REDACTED}", "serve.port=1", "serve.api_key="]
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"serve-api_key={KEY}"])
    assert KEY not in str(err.value)


def test_yaml_secrets_must_be_strings(no_secret_env, tmp_path):
    (tmp_path / "c.yaml").write_text("serve:\n  api_key: 0123\n")
    with pytest.raises(ConfigError, match="quoted string") as err:
        load_config(tmp_path / "c.yaml")
    assert "83" not in str(err.value)


@pytest.mark.parametrize(("host", "sets", "refused"), [
    ("0.0.0.0", [], True),
    ("10.1.2.3", [], True),
    ("myhost.example", [], True),
    ("0.0.0.0", [f"serve.api_key={KEY}"], False),
    ("0.0.0.0", ["serve.allow_open_writes=true"], False),
    ("127.0.0.1", [], False),
    ("localhost", [], False),
    ("::1", [], False),
])
def test_open_writes_on_a_non_loopback_host_are_refused(no_secret_env, host, sets, refused):
    from ootd.serve.app import check_write_protection

    cfg = load_config("tiny", [f"serve.host={host}", *sets])
    if refused:
        with pytest.raises(ValueError, match="OOTD_API_KEY"):
            check_write_protection(cfg)
    else:
        check_write_protection(cfg)


def test_ootd_serve_refuses_open_writes_before_joining_a_cluster(no_secret_env, capsys):
    from ootd.cli import main

    assert main(["serve", "--config", "tiny", "--set", "serve.host=0.0.0.0", "--address", "127.0.0.1:1"]) == 2
    assert "allow_open_writes" in capsys.readouterr().err


# -- a real `ootd serve` (slow) ---------------------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_ootd_serve_drains_on_sigterm_exits_0_and_logs_no_secret(ray_cluster, ray_session, tmp_path):
    """The API key from the environment, the Milvus token on the command line: both work, neither is logged."""
    import requests

    from tests.test_durability import _export

    cfg = load_config("tiny", ["model.backbone=tiny-random"])
    model = _export(cfg, tmp_path / "models", seed=5)
    port = free_port()
    sets = [f"store.uri={tmp_path / 'milvus.db'}", f"store.media={tmp_path / 'media'}", f"data.workdir={tmp_path}",
            "model.backbone=tiny-random", f"serve.port={port}", "serve.max_replicas=1", f"store.token={TOKEN}"]
    cmd = [str(BIN / "ootd"), "serve", "--config", "tiny", *[a for s in sets for a in ("--set", s)],
           "--model-dir", str(model), "--address", ray_cluster.address]
    env = {**ray_cluster.job_env(), "OOTD_API_KEY": KEY}
    env.pop("RAY_ADDRESS", None)  # --address says which cluster
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/healthz", timeout=400, proc=proc)
            deadline = time.monotonic() + 400  # the steady state: deployed, waiting for a signal
            while "serving on" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
            unknown = "0" * 64
            assert requests.delete(f"{url}/v1/items/{unknown}", timeout=30).status_code == 401  # the env's key
            assert requests.delete(f"{url}/v1/items/{unknown}", headers={"x-api-key": KEY},
                                   timeout=30).status_code in (404, 503)  # accepted; no live collection
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    output = log_path.read_text(errors="replace")
    assert rc == 0, output[-3000:]
    assert took < 120 and "Traceback" not in output and "SIGTERM received at" not in output, output[-3000:]
    assert "SIGTERM" in output and "shut down" in output
    assert not _port_open(port)  # serve.shutdown() took the proxy down with the app
    assert f"store.token={REDACTED}" in output  # the override log line, redacted
    leaks = [str(p) for p in [log_path, *ray_cluster.temp_dir.rglob("*")] if p.is_file() and p.stat().st_size < 50e6
             and (KEY.encode() in p.read_bytes() or TOKEN.encode() in p.read_bytes())]
    assert not leaks, leaks
