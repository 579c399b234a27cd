"""The OpenAPI document is the contract: schemathesis against the app deployed on the test cluster finds no failure.

Two `st run` passes (the CLI, as a subprocess, with bounded examples):

1. every operation, every check (`--checks all`: no 5xx, only documented statuses, bodies and headers as
   documented, schema-violating requests rejected, 405 with `Allow`, auth enforced), except that schema-valid
   *multipart image* requests may be refused: OpenAPI cannot say "these bytes decode as a photo", so random
   `image` bytes are rightly a 422;
2. the JSON operations alone, with `positive_data_acceptance` on: every request the schema calls valid is
   accepted (or a 404 for an id that is not indexed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ootd.config import with_overrides
from tests.conftest import free_port

BIN = Path(sys.executable).parent
API_KEY = "contract-secret"
MAX_EXAMPLES = 12

# Schema-valid multipart uploads whose bytes are no photo are a 422 by design (see the module docstring).
# Every check is enabled here, not with --checks: a check named on the command line beats operation settings.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "positive_data_acceptance", "negative_data_rejection", "use_after_free",
          "ensure_resource_availability", "missing_required_header", "ignored_auth", "unsupported_method",
          "allow_header_conformance")
UPLOADS_CONFIG = "[checks]\nenabled = true\n" + "".join(f"{c}.enabled = true\n" for c in CHECKS) + """
[[operations]]
include-path-regex = "^/v1/(embed|items|search)$"
include-method = "POST"
checks.positive_data_acceptance.enabled = false
"""


def _only_json_operations(spec: dict) -> dict:
    """The spec cut down to the operations whose body is JSON, with their JSON body only."""
    paths = {}
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                op = {**op, "requestBody": {**op["requestBody"], "content": {"application/json":
                                                                               content["application/json"]}}}
                paths.setdefault(path, {})[method] = op
    return {**spec, "paths": paths}


def run_schemathesis(url: str, workdir: Path, api_key: str, max_examples: int = MAX_EXAMPLES,
                     timeout: float = 600) -> list[tuple[str, int, str]]:
    """Runs both passes against `url`; returns (pass, exit code, output tail) of each."""
    import requests

    workdir.mkdir(parents=True, exist_ok=True)
    spec = requests.get(f"{url}/openapi.json", timeout=60).json()
    (workdir / "uploads.toml").write_text(UPLOADS_CONFIG)
    (workdir / "json-only.json").write_text(json.dumps(_only_json_operations(spec)))
    common = ["--max-examples", str(max_examples), "--seed", "1", "--workers", "1",
              "--generation-database", "none", "--no-color", "--request-timeout", "60",
              "-H", f"x-api-key: {api_key}"]
    passes = {
        "all operations": [str(BIN / "st"), "--config-file", str(workdir / "uploads.toml"), "run",
                           f"{url}/openapi.json", *common],
        "json operations": [str(BIN / "st"), "run", str(workdir / "json-only.json"), "--url", url, "--checks", "all",
                            *common],
    }
    results = []
    for name, cmd in passes.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir)
        results.append((name, proc.returncode, (proc.stdout + proc.stderr)[-6000:]))
    return results


@pytest.fixture(scope="module")
def contract_app(ray_cluster, ray_session, tiny_config, synthetic_set, tmp_path_factory):
    """A few crops indexed into a Lite file, then the app deployed with an API key on a free port."""
    import requests
    from ray import serve

    from ootd.index import run_index
    from ootd.serve.app import APP_NAME, make_app, start_serve
    from tests.test_durability import _export
    from tests.test_index import write_detected_crops

    root = tmp_path_factory.mktemp("contract")
    cfg = with_overrides(tiny_config, [f"store.uri={root / 'milvus.db'}", f"store.media={root / 'media'}",
                                       f"data.workdir={root}", "detect.num_cpus=0.25", "serve.max_replicas=1",
                                       f"serve.api_key={API_KEY}", "model.backbone=tiny-random",
                                       "serve.max_image_bytes=200000"])
    crops = write_detected_crops(synthetic_set, root / "crops", cfg.detect, cfg.data.crop_max_side)
    model = _export(cfg, root / "models", seed=3)  # an untrained model: the contract needs no ranking
    run_index(cfg, crops, model, batch_size=16)
    port = free_port()
    start_serve(with_overrides(cfg, [f"serve.port={port}"]))
    serve.run(make_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while requests.get(f"{url}/readyz", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "app not ready"
            time.sleep(1)
        yield {"url": url, "root": root}
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_schemathesis_finds_no_contract_failure(contract_app):
    results = run_schemathesis(contract_app["url"], contract_app["root"] / "schemathesis", API_KEY)
    failed = [f"--- {name} (exit {code}) ---\n{tail}" for name, code, tail in results if code != 0]
    assert not failed, "\n".join(failed)


@pytest.mark.slow
def test_every_route_documents_its_errors_with_the_shared_model(contract_app):
    import requests

    spec = requests.get(f"{contract_app['url']}/openapi.json", timeout=60).json()
    error_ref = "#/components/schemas/ErrorResponse"
    expected = {
        ("post", "/v1/embed"): {"400", "413", "415", "422", "503"},
        ("post", "/v1/items"): {"400", "401", "413", "415", "422", "503"},
        ("get", "/v1/items/{item_id}"): {"404", "422", "503"},
        ("get", "/v1/items/{item_id}/image"): {"404", "422"},
        ("delete", "/v1/items/{item_id}"): {"401", "404", "422", "503"},
        ("post", "/v1/search"): {"400", "404", "413", "415", "422", "503"},
        ("post", "/v1/recommend"): {"400", "404", "413", "415", "422", "503"},
        ("get", "/v1/stats"): {"503"},
    }
    for (method, path), codes in expected.items():
        responses = spec["paths"][path][method]["responses"]
        errors = {c for c in responses if c[0] in "45"}
        assert errors == codes, (method, path, errors)
        for code in codes:
            assert responses[code]["content"]["application/json"]["schema"]["$ref"] == error_ref, (path, code)
        assert "503" not in codes or "Retry-After" in responses["503"]["headers"]
    writes = {("post", "/v1/items"), ("delete", "/v1/items/{item_id}")}
    for method, path in writes:
        assert spec["paths"][path][method]["security"] == [{"apiKey": []}]
    assert spec["components"]["securitySchemes"]["apiKey"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}


@pytest.mark.slow
def test_405_lists_every_method_of_the_path_and_errors_share_one_shape(contract_app):
    import requests

    url = contract_app["url"]
    item = "0" * 64
    resp = requests.put(f"{url}/v1/items/{item}", timeout=60)
    assert resp.status_code == 405
    assert {m.strip() for m in resp.headers["allow"].split(",")} >= {"GET", "DELETE"}
    assert set(resp.json()) == {"detail"} and isinstance(resp.json()["detail"], str)
    bad = requests.get(f"{url}/v1/items/NOT-AN-ID", timeout=60)  # FastAPI's own parameter validation
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], str) and "item_id" in bad.json()["detail"]
    assert bad.json()["errors"][0]["loc"] == ["path", "item_id"]
    body = requests.post(f"{url}/v1/search", json={"top_k": 0, "vector": [1.0] * 128}, timeout=60).json()
    assert "top_k" in body["detail"] and body["errors"][0]["loc"] == ["top_k"]


def _encoder_pids(dashboard_url: str) -> list[int]:
    from ray.util.state import list_actors

    # The test cluster's address: other Ray instances may run on the machine.
    return [a.pid for a in list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
            if "Encoder" in (a.class_name or "")]


@pytest.mark.slow
def test_a_sigkilled_encoder_replica_costs_at_most_503s_under_load(contract_app, ray_cluster, synthetic_set):
    """8 clients search by photo; the only Encoder replica is SIGKILLed mid-run: retried once, else a 503."""
    import os
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    url = contract_app["url"]
    photos = [p.read_bytes() for p in sorted((synthetic_set / "images").rglob("*.jpg"))[:16]]
    (pid,) = _encoder_pids(ray_cluster.dashboard_url)
    results: list[tuple[int, str]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            try:
                resp = requests.post(f"{url}/v1/search", files={"image": ("p.jpg", photos[i % len(photos)],
                                                                          "image/jpeg")}, timeout=180)
                outcome = (resp.status_code, resp.headers.get("retry-after", ""))
            except requests.RequestException as exc:
                outcome = (-1, type(exc).__name__)
            with lock:
                results.append(outcome)
            i += 8

    with ThreadPoolExecutor(8) as pool:
        for n in range(8):
            pool.submit(client, n)
        deadline = time.monotonic() + 120
        while sum(1 for s, _ in results if s == 200) < 16:  # load is flowing
            assert time.monotonic() < deadline, results
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        killed_at = len(results)
        deadline = time.monotonic() + 240
        # Run on until a new replica has answered a good share of requests after the kill.
        while sum(1 for s, _ in results[killed_at:] if s == 200) < 24:
            assert time.monotonic() < deadline, results[killed_at:]
            time.sleep(0.5)
        stop.set()
    statuses = [s for s, _ in results]
    assert not [r for r in results if r[0] == -1 or (r[0] >= 500 and r[0] != 503)], results
    assert all(after for s, after in results if s == 503)  # every 503 says when to retry
    assert statuses.count(200) / len(statuses) >= 0.8, statuses
    assert _encoder_pids(ray_cluster.dashboard_url) not in ([], [pid])  # Serve replaced the replica
