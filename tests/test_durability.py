"""Acknowledged writes survive a SIGKILL of the Index replica, an app restart and a re-index (real Serve, HTTP, Milvus).

Each test runs on an embedded Milvus Lite file (the case that used to lose acknowledged rows: its WAL is corrupted
by concurrent writers and truncated at recovery; the single replica owns the file, so killing it kills Milvus) and on
a Milvus standalone server (where the app keeps serving, and writing, while `ootd index` fills the next collection).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from ootd.config import with_overrides
from ootd.styles import STYLES
from tests.conftest import free_port, reset_milvus, wait_for_http
from tests.test_index import write_detected_crops
from tests.test_serve import _fresh_photo, _post_image, _post_json

pytestmark = pytest.mark.slow

API_KEY = "durable-secret"
HTTP_TIMEOUT = 120
CLIENTS, PER_CLIENT = 4, 10
KILL_AFTER_ACKS = 8


def _export(cfg, models_dir, seed: int):
    """A tiny encoder exported under `<models>/<version>`, where the app looks for the live collection's model."""
    import torch

    from ootd.model.encoder import StyleEncoder, new_model_version

    torch.manual_seed(seed)
    version = new_model_version()
    return StyleEncoder.from_config(cfg.model).export(models_dir / version, version=version, labels=STYLES)


def _deploy(cfg, port: int) -> str:
    from ray import serve

    from ootd.serve.app import APP_NAME, make_app, start_serve

    start_serve(with_overrides(cfg, [f"serve.port={port}"]))
    serve.run(make_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/readyz", timeout=180)
    return url


def _index_replica_pid(dashboard_url: str) -> int | None:
    from ray.util.state import list_actors

    # The test cluster's address: other Ray instances may run on the machine.
    alive = [a for a in list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
             if "Index" in (a.class_name or "")]
    return alive[0].pid if len(alive) == 1 else None


@pytest.fixture(scope="module", params=["lite", "standalone"])
def durable_app(request, ray_cluster, ray_session, tiny_config, synthetic_set, tmp_path_factory):
    """Crops indexed with model A into a Lite file or an emptied Milvus server, then the app deployed on it with an
    API key."""
    from ray import serve

    from ootd.index import run_index

    root = tmp_path_factory.mktemp("durable")
    server = request.param == "standalone"
    uri = reset_milvus(request.getfixturevalue("milvus_standalone")) if server else str(root / "milvus.db")
    cfg = with_overrides(tiny_config, [f"store.uri={uri}", f"store.media={root / 'media'}",
                                       f"data.workdir={root}", "detect.num_cpus=0.25", "serve.max_replicas=1",
                                       f"serve.api_key={API_KEY}", "model.backbone=tiny-random"])
    crops = write_detected_crops(synthetic_set, root / "crops", cfg.detect, cfg.data.crop_max_side)
    # The untrained trunk: durability needs no learned ranking, and no committed weights asset.
    model_a = _export(cfg, root / "models", seed=1)
    run_index(cfg, crops, model_a, batch_size=16)  # closes the Lite file before the app opens it
    port = free_port()
    try:
        url = _deploy(cfg, port)
        yield {"url": url, "cfg": cfg, "crops": crops, "root": root, "port": port, "server": server,
               "dashboard": ray_cluster.dashboard_url, "table": pq.read_table(crops).to_pandas()}
    finally:
        serve.shutdown()


def _stats(url: str) -> dict:
    import requests

    return requests.get(f"{url}/v1/stats", timeout=HTTP_TIMEOUT).json()


def _assert_each_found_once(url: str, ids: list[str]) -> None:
    import requests

    for image_id in ids:
        item = requests.get(f"{url}/v1/items/{image_id}", params={"embedding": "true"}, timeout=HTTP_TIMEOUT)
        assert item.status_code == 200, (image_id, item.status_code, item.text[:200])
        found = _post_json(url, "/v1/search", {"vector": item.json()["embedding"], "top_k": 100}).json()["results"]
        assert [h["id"] for h in found].count(image_id) == 1


def test_acknowledged_writes_survive_a_sigkill_of_the_index_replica_and_an_app_restart(durable_app):
    import requests
    from ray import serve

    url, key = durable_app["url"], {"x-api-key": API_KEY}
    before = _stats(url)["count"]
    photos = [[_fresh_photo(STYLES[(c + i) % 13], 10_000 + 100 * c + i) for i in range(PER_CLIENT)]
              for c in range(CLIENTS)]
    acked: list[str] = []
    statuses: list[int] = []
    lock, enough = threading.Lock(), threading.Event()

    def client(batch: list[bytes]) -> None:
        for data in batch:
            try:
                status = _post_image(url, "/v1/items", data, headers=key, fields={"style": "Chic"}).status_code
            except requests.RequestException:
                status = -1
            with lock:
                statuses.append(status)
                if 200 <= status < 300:
                    acked.append(hashlib.sha256(data).hexdigest())
                    if len(acked) >= KILL_AFTER_ACKS:
                        enough.set()

    replica_pid = lambda: _index_replica_pid(durable_app["dashboard"])  # noqa: E731
    old_pid = replica_pid()
    assert old_pid is not None
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, batch) for batch in photos]
        assert enough.wait(timeout=300), f"only {len(acked)} writes acknowledged: {statuses}"
        os.kill(old_pid, signal.SIGKILL)  # mid-run: other writes are in flight or queued
        for f in futures:
            f.result(timeout=600)
    assert len(statuses) == CLIENTS * PER_CLIENT
    assert all(s in (201, 503) for s in statuses), statuses  # a restarting replica is a 503, never a 500

    deadline = time.monotonic() + 180
    while replica_pid() in (None, old_pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert replica_pid() not in (None, old_pid), "Serve did not restart the Index replica"
    wait_for_http(f"{url}/readyz", timeout=180)
    assert len(acked) > KILL_AFTER_ACKS  # writes went on being acknowledged after the kill
    _assert_each_found_once(url, acked)
    count = _stats(url)["count"]
    # Every acknowledged id exactly once; a write logged but unacknowledged (killed mid-answer) may be there too.
    assert before + len(acked) <= count <= before + CLIENTS * PER_CLIENT

    from ootd.serve.app import APP_NAME

    serve.delete(APP_NAME)  # an app restart: the Lite file is released and reopened by a new replica
    durable_app["url"] = url = _deploy(durable_app["cfg"], durable_app["port"])
    _assert_each_found_once(url, acked)
    assert _stats(url)["count"] == count


def _write_until(url: str, stop: threading.Event, seed: int) -> list[tuple[str, int]]:
    """Posts fresh photos one after another until `stop`; returns (id, status) of each."""
    import requests

    done, n = [], 0
    while not stop.is_set():
        photo = _fresh_photo(STYLES[n % 13], seed + n)
        try:
            status = _post_image(url, "/v1/items", photo, headers={"x-api-key": API_KEY},
                                 fields={"style": STYLES[n % 13]}).status_code
        except requests.RequestException:
            status = -1
        done.append((hashlib.sha256(photo).hexdigest(), status))
        n += 1
    return done


def test_reindex_keeps_api_items_and_keeps_deletes_deleted(durable_app):
    """On a server the app keeps writing while the job runs: every write it acknowledged is in the new collection."""
    import requests
    from ray import serve

    from ootd.index import run_index
    from ootd.serve.app import APP_NAME

    url, key, table = durable_app["url"], {"x-api-key": API_KEY}, durable_app["table"]
    photo = _fresh_photo("Workwear", 77_777)
    resp = _post_image(url, "/v1/items", photo, headers=key, fields={"style": "Workwear", "source": "api://77"})
    assert resp.status_code == 201, resp.text
    added = resp.json()["id"]
    deleted = table.iloc[5]["image_id"]
    assert requests.delete(f"{url}/v1/items/{deleted}", headers=key, timeout=HTTP_TIMEOUT).status_code == 200
    count = _stats(url)["count"]

    model_b = _export(durable_app["cfg"], durable_app["root"] / "models", seed=2)
    during: list[tuple[str, int]] = []
    if durable_app["server"]:
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            writer = pool.submit(_write_until, url, stop, 50_000)
            try:
                summary = run_index(durable_app["cfg"], durable_app["crops"], model_b, batch_size=16)
            finally:
                stop.set()
            during = writer.result(timeout=300)
        serve.delete(APP_NAME)  # redeploy: the encoder must serve the new model
    else:
        serve.delete(APP_NAME)  # a Lite file is one process's: the index job runs while the app is down
        summary = run_index(durable_app["cfg"], durable_app["crops"], model_b, batch_size=16)
    acked_during = [image_id for image_id, status in during if status == 201]
    assert acked_during or not durable_app["server"], during
    # Before the alias moved: acknowledged; after: refused until the app serves model B (a 503, nothing logged).
    assert all(status in (201, 503) for _, status in during), during
    assert summary["live"] == f"ootd_{model_b.name}" and summary["count"] == count + len(acked_during)
    assert summary["items_log"]["api_items"] >= 1 and summary["items_log"]["deleted"] >= 1
    assert summary["items_log"]["caught_up"] >= len(acked_during)

    durable_app["url"] = url = _deploy(durable_app["cfg"], durable_app["port"])
    assert _stats(url)["model_version"] == model_b.name
    assert requests.get(f"{url}/v1/items/{deleted}", timeout=HTTP_TIMEOUT).status_code == 404
    item = requests.get(f"{url}/v1/items/{added}", timeout=HTTP_TIMEOUT).json()
    assert item["source"] == "api://77" and item["style"] == "Workwear"
    assert item["meta"]["model_version"] == model_b.name
    hit = _post_image(url, "/v1/search", photo, fields={"top_k": "1"}).json()["results"][0]
    assert hit["id"] == added and hit["score"] > 0.999  # re-embedded with model B from its logged crop
    found = _post_json(url, "/v1/search", {"id": added, "top_k": 100}).json()["results"]
    assert deleted not in {h["id"] for h in found}
    for image_id in acked_during:  # written into collection A while B was filled: caught up, re-embedded
        got = requests.get(f"{url}/v1/items/{image_id}", timeout=HTTP_TIMEOUT)
        assert got.status_code == 200 and got.json()["meta"]["model_version"] == model_b.name, image_id
