"""The app's Prometheus metrics: real requests, then a scrape of each node's Ray metrics export port."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest

from ootd.config import with_overrides
from tests.conftest import free_port, wait_for_http
from tests.test_serve import _fresh_photo, _post_image, _post_json

API_KEY = "metrics-secret"
HTTP_TIMEOUT = 120
# Its own application name: the session cluster also holds the series of the other modules' apps (dead replicas'
# metrics linger in the agent), and the `application` tag keeps this module's counts apart from theirs.
APP = "ootd-metrics"
SCRAPE_TIMEOUT_S = 120  # Ray's workers report every few seconds, the agent exports what it got last


def test_recording_without_ray_is_a_no_op_that_does_not_import_ray():
    """Benchmarks run the pipeline and IndexCore without Ray: every metric call must work there and stay cheap."""
    code = (
        "import sys\n"
        "from ootd.serve import metrics\n"
        "with metrics.stage('decode'):\n"
        "    pass\n"
        "metrics.batch('encoder', 3)\n"
        "metrics.http_request('/v1/embed', 'POST', 200, 0.1)\n"
        "metrics.get().writes_pending.set(2)\n"
        "try:\n"
        "    with metrics.milvus_call('search'):\n"
        "        raise RuntimeError('down')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "assert 'ray' not in sys.modules, 'recording imported ray'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.fixture(scope="module")
def metrics_app(ray_cluster, ray_session, tiny_config, synthetic_set, tmp_path_factory):
    """A few crops indexed into a Lite file with an untrained model, then the app deployed as `APP`."""
    from ray import serve

    from ootd.index import run_index
    from ootd.serve.app import make_app, start_serve
    from tests.test_durability import _export
    from tests.test_index import write_detected_crops

    root = tmp_path_factory.mktemp("metrics")
    cfg = with_overrides(tiny_config, [f"store.uri={root / 'milvus.db'}", f"store.media={root / 'media'}",
                                       f"data.workdir={root}", "detect.num_cpus=0.25", "serve.max_replicas=1",
                                       f"serve.api_key={API_KEY}", "model.backbone=tiny-random"])
    crops = write_detected_crops(synthetic_set, root / "crops", cfg.detect, cfg.data.crop_max_side)
    run_index(cfg, crops, _export(cfg, root / "models", seed=5), batch_size=16)  # metrics need no ranking
    port = free_port()
    start_serve(with_overrides(cfg, [f"serve.port={port}"]))
    serve.run(make_app(cfg), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/readyz", timeout=180)
        yield url
    finally:
        serve.shutdown()


def _scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample of `APP` on every alive node's metrics export port, `ray_` prefix dropped."""
    import ray
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        text = requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                            timeout=30).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("application") == APP and s.name.startswith(("ray_ootd_", "ootd_")):
                    samples.append((s.name.removeprefix("ray_"), s.labels, s.value))
    return samples


def _totals(samples, name: str, *keys: str) -> Counter:
    """Sum of the `name` samples per value of the label(s) `keys` (over replicas, nodes and other labels)."""
    totals: Counter = Counter()
    for sample_name, labels, value in samples:
        if sample_name == name:
            totals[tuple(labels.get(k) for k in keys)] += value
    return totals


@pytest.mark.slow
def test_requests_stages_batches_and_writes_are_exported(metrics_app):
    import requests

    url = metrics_app
    photos = [_fresh_photo(style, seed) for seed, style in enumerate(("Chic", "Street", "Retro", "Minimal"))]
    vectors = []
    for data in photos[:3]:  # one at a time: three Encoder batches of one
        resp = _post_image(url, "/v1/embed", data)
        assert resp.status_code == 200, resp.text
        vectors.append(resp.json()["embedding"])
    for vector in vectors[:2]:  # by vector: two Milvus searches, no Encoder batch
        assert _post_json(url, "/v1/search", {"vector": vector, "top_k": 3}).status_code == 200
    assert requests.get(f"{url}/v1/items/{'0' * 64}", timeout=HTTP_TIMEOUT).status_code == 404  # one Milvus get
    assert requests.get(f"{url}/v1/items/not-a-sha", timeout=HTTP_TIMEOUT).status_code == 422  # rejected before
    assert requests.get(f"{url}/v1/nowhere", timeout=HTTP_TIMEOUT).status_code == 404
    added = _post_image(url, "/v1/items", photos[3], fields={"style": "Minimal"}, headers={"x-api-key": API_KEY})
    assert added.status_code == 201, added.text  # a fourth Encoder batch, one commit

    expected = {
        ("ootd_http_requests_total", ("route", "method", "status")): {
            ("/v1/embed", "POST", "200"): 3, ("/v1/search", "POST", "200"): 2,
            ("/v1/items/{item_id}", "GET", "404"): 1, ("/v1/items/{item_id}", "GET", "422"): 1,
            ("unmatched", "GET", "404"): 1, ("/v1/items", "POST", "201"): 1},
        ("ootd_http_request_seconds_count", ("route", "method")): {
            ("/v1/embed", "POST"): 3, ("/v1/search", "POST"): 2, ("/v1/items/{item_id}", "GET"): 2,
            ("unmatched", "GET"): 1, ("/v1/items", "POST"): 1},
        ("ootd_stage_seconds_count", ("stage",)): {
            ("decode",): 4, ("detect",): 4, ("crop",): 4, ("embed",): 4, ("search",): 2, ("get",): 1,
            ("commit",): 1, ("log_fsync",): 1, ("milvus_write",): 1},
        ("ootd_batch_size_count", ("kind",)): {("encoder",): 4, ("search",): 2, ("commit",): 1},
        ("ootd_write_ack_seconds_count", ()): {(): 1},
        ("ootd_items_log_pending", ()): {(): 0},  # the one write was acknowledged: nothing waits
    }
    deadline, got = time.monotonic() + SCRAPE_TIMEOUT_S, {}
    while time.monotonic() < deadline:
        samples = _scrape()
        # Only routes this test called: /readyz and /healthz were polled by the fixture a number of times.
        got = {key: {labels: _totals(samples, key[0], *key[1])[labels] for labels in want}
               for key, want in expected.items()}
        if got == expected:
            break
        time.sleep(3)
    samples = _scrape()
    names = {n for n, _, _ in samples}
    assert got == expected, f"scraped {got}\nnames: {sorted(names)}"
    assert "ootd_items_log_pending" in names  # exported at 0, not merely absent
    assert not _totals(samples, "ootd_milvus_errors_total", "op"), "no Milvus call failed"
    # The route label is the template: no series names an id.
    assert not any("0" * 64 in labels.get("route", "") for _, labels, _ in samples)
