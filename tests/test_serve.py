"""The Serve app over real HTTP: index job → deploy on the test cluster → every route, bad input and write path.

The app runs on a Milvus Lite file and on a Milvus standalone server; tests of input validation, which never
reach Milvus, run on the Lite file only (`lite_only`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ootd.config import with_overrides
from ootd.styles import STYLES
from tests.conftest import free_port, reset_milvus
from tests.test_index import write_detected_crops

REPO = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow
lite_only = pytest.mark.lite_only

API_KEY = "test-secret"
MAX_IMAGE_BYTES = 200_000
HTTP_TIMEOUT = 120


def train_briefly(tiny_config, crops_dir: Path, models_dir: Path) -> Path:
    """A tiny encoder whose head is fitted to the crops' styles (frozen trunk, supcon): a model with known ranking.

    Untrained tiny weights give no style ordering, so the ranking assertions need a model that learned one.
    """
    import torch

    from ootd.decode import decode_crop
    from ootd.model.encoder import StyleEncoder, new_model_version
    from ootd.model.losses import make_loss

    table = pq.read_table(crops_dir).to_pandas()
    torch.manual_seed(0)
    encoder = StyleEncoder.from_config(tiny_config.model)
    encoder.freeze(0)
    with torch.no_grad():
        features = encoder.boundary_features(encoder.preprocess([decode_crop(c) for c in table["crop"]]), 0)
    labels = torch.tensor([STYLES.index(s) for s in table["style"]])
    head, _ = encoder.parameter_groups()
    optimiser = torch.optim.Adam(head, lr=1e-2)
    loss_fn = make_loss("supcon", temperature=0.1)
    for _ in range(600):  # the random tiny trunk separates styles weakly: the head needs a few hundred steps
        optimiser.zero_grad()
        loss_fn(encoder.forward_from_boundary(features, 0), labels).backward()
        optimiser.step()
    version = new_model_version()
    return encoder.export(models_dir / version, version=version, labels=STYLES, unlocked_blocks=0)


@pytest.fixture(autouse=True)
def _lite_only(request):
    """Skips a `lite_only` test on the server: what it checks never reaches Milvus."""
    callspec = getattr(request.node, "callspec", None)
    if request.node.get_closest_marker("lite_only") and callspec and callspec.params.get("app") == "standalone":
        pytest.skip("input validation does not depend on the Milvus backend: checked on the Lite file")


@pytest.fixture(scope="module", params=["lite", "standalone"])
def app(request, ray_cluster, ray_session, tiny_config, synthetic_set, tmp_path_factory):
    """Index job through `ray job submit` into a Lite file or an emptied Milvus server, then the app deployed with
    Serve on a free port; yields its facts."""
    import requests
    from ray import serve

    from ootd.serve.app import APP_NAME, make_app, start_serve

    root = tmp_path_factory.mktemp("serve")
    uri = (reset_milvus(request.getfixturevalue("milvus_standalone")) if request.param == "standalone"
           else str(root / "milvus.db"))
    overrides = [f"store.uri={uri}", f"store.media={root / 'media'}", f"data.workdir={root}",
                 "detect.num_cpus=0.25", "serve.max_replicas=1", f"serve.api_key={API_KEY}",
                 f"serve.max_image_bytes={MAX_IMAGE_BYTES}"]
    cfg = with_overrides(tiny_config, overrides)
    crops = write_detected_crops(synthetic_set, root / "crops", cfg.detect, cfg.data.crop_max_side)
    model_dir = train_briefly(tiny_config, crops, root / "models")

    sets = [a for o in overrides for a in ("--set", o)]
    for _ in range(12):
        job = ray_cluster.submit_job("jobs/index.py", "--config", "tiny", *sets, "--crops", str(crops),
                                     "--model-dir", str(model_dir), "--batch-size", "16")
        # A freshly started node's job agent can lag behind its dashboard on a busy machine.
        if "No available agent to submit job" not in job.stderr:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    port = free_port()
    start_serve(with_overrides(cfg, [f"serve.port={port}"]))
    # No model dir given: the app serves the model of the live collection the job just filled.
    serve.run(make_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        assert requests.get(f"{url}/readyz", timeout=HTTP_TIMEOUT).status_code == 200
        table = pq.read_table(crops).to_pandas()
        yield {"url": url, "cfg": cfg, "table": table, "version": model_dir.name, "root": root,
               "backend": request.param,
               "sources": [Path(s) for s in table["source"]]}
    finally:
        serve.shutdown()


def _post_image(url: str, route: str, data: bytes, *, fields: dict | None = None, headers: dict | None = None,
                ctype: str = "image/jpeg"):
    import requests

    return requests.post(f"{url}{route}", files={"image": ("photo.jpg", data, ctype)}, data=fields or {},
                         headers=headers or {}, timeout=HTTP_TIMEOUT)


def _post_json(url: str, route: str, payload, headers: dict | None = None):
    import requests

    return requests.post(f"{url}{route}", json=payload, headers=headers or {}, timeout=HTTP_TIMEOUT)


def _detail(resp) -> str:
    return json.dumps(resp.json()["detail"])


def _fresh_photo(style: str, seed: int) -> bytes:
    """A synthetic photo that is not in the index."""
    from ootd.synthetic import render_outfit

    photo = render_outfit(style, np.random.default_rng([999, seed]), size=256)
    buffer = io.BytesIO()
    photo.image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# -- builders (fast, no deployment) ----------------------------------------------------------------------------


def test_index_is_one_replica_on_a_lite_file_and_autoscales_on_a_server(tiny_config):
    from ootd.serve.app import deployment_options

    lite = deployment_options(with_overrides(tiny_config, ["store.uri=/tmp/x.db"]))
    assert lite["Index"]["num_replicas"] == 1 and "autoscaling_config" not in lite["Index"]
    served = deployment_options(with_overrides(tiny_config, ["store.uri=http://127.0.0.1:19530",
                                                             "serve.max_replicas=3"]))
    assert "num_replicas" not in served["Index"] and served["Index"]["autoscaling_config"]["max_replicas"] == 3
    encoder = served["Encoder"]
    assert encoder["autoscaling_config"] == {"min_replicas": tiny_config.serve.min_replicas, "max_replicas": 3,
                                             "target_ongoing_requests": 8.0}
    assert encoder["max_ongoing_requests"] >= tiny_config.serve.max_batch_size
    assert 0 < encoder["ray_actor_options"]["num_cpus"] < 1


def test_encoder_replicas_reserve_a_gpu_share_only_when_a_model_runs_on_cuda(tiny_config):
    from ootd.serve.app import deployment_options, resolve_devices

    def encoder_gpus(*overrides: str) -> float:
        options = deployment_options(with_overrides(tiny_config, list(overrides)))
        return options["Encoder"]["ray_actor_options"].get("num_gpus", 0)

    assert encoder_gpus("model.device=cpu", "detect.device=cpu") == 0
    assert encoder_gpus("model.device=cuda", "detect.device=cpu") == 0.5
    assert encoder_gpus("model.device=cpu", "detect.device=0", "serve.encoder_num_gpus=1") == 1
    # `auto` is decided when the app is built, against the connected cluster (this one has no GPU).
    resolved = resolve_devices(with_overrides(tiny_config, ["model.device=auto", "detect.device=auto"]))
    assert (resolved.model.device, resolved.detect.device) == ("cpu", "cpu")


def test_serve_config_yaml_builds_the_app(monkeypatch, tmp_path):
    import importlib

    import yaml
    from ray.serve import Application

    from ootd.config import ConfigError, load_config
    from ootd.serve.app import builder_args, serve_env

    spec = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    (entry,) = spec["applications"]
    module, _, name = entry["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    defaults = load_config("default").serve
    assert spec["http_options"] == {"host": defaults.host, "port": defaults.port}
    # The controller (and the proxy or HAProxy it starts) runs with the environment the app gives its replicas.
    assert spec["controller_options"]["runtime_env"]["env_vars"] == serve_env(load_config("default"))
    monkeypatch.chdir(tmp_path)
    assert isinstance(builder(entry["args"]), Application)
    assert isinstance(builder({"config": "tiny"}), Application)
    config, model_dir, batch_search = builder_args({"config": "tiny", "overrides": "serve.api_key=k,serve.port=9001",
                                                    "batch_search": "false", "model_dir": "/m"})
    assert (config.serve.api_key, config.serve.port, model_dir, batch_search) == ("k", 9001, "/m", False)
    assert builder_args({"config": "tiny"})[1:] == (None, True)
    with pytest.raises(ConfigError, match="serve.nope"):
        builder({"config": "tiny", "overrides": ["serve.nope=1"]})


def test_model_dir_resolution(tiny_config, tmp_path):
    from ootd.serve.app import resolve_model_dir
    from ootd.serve.backend import Unavailable

    cfg = with_overrides(tiny_config, [f"data.workdir={tmp_path}"])
    with pytest.raises(Unavailable, match="ootd index"):
        resolve_model_dir(cfg, None, None)
    with pytest.raises(FileNotFoundError, match="ootd_model.json"):
        resolve_model_dir(cfg, None, "v1")
    model = tmp_path / "models" / "v1"
    model.mkdir(parents=True)
    (model / "ootd_model.json").write_text(json.dumps({"version": "v1", "embed_dim": 128}))
    assert resolve_model_dir(cfg, None, "v1") == model
    assert resolve_model_dir(cfg, model, "other") == model


def test_preference_vector_is_liked_minus_weighted_disliked():
    from fastapi import HTTPException

    from ootd.serve.api import _preference_vector

    v = _preference_vector([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]], 0.5)
    assert np.allclose(v, np.array([0.0, 0.5]) / 0.5)
    assert np.allclose(_preference_vector([[3.0, 4.0]], [], 0.5), [0.6, 0.8])
    with pytest.raises(HTTPException) as err:
        _preference_vector([[1.0, 0.0]], [[1.0, 0.0]], 1.0)
    assert err.value.status_code == 422


# -- happy paths ------------------------------------------------------------------------------------------------------


@slow
def test_health_readiness_docs_and_gallery(app):
    import requests

    url = app["url"]
    assert requests.get(f"{url}/healthz", timeout=HTTP_TIMEOUT).json() == {"status": "ok"}
    ready = requests.get(f"{url}/readyz", timeout=HTTP_TIMEOUT).json()
    assert ready["ready"] is True and ready["model_version"] == ready["live_model_version"] == app["version"]
    spec = requests.get(f"{url}/openapi.json", timeout=HTTP_TIMEOUT).json()
    assert {"/v1/embed", "/v1/items", "/v1/items/{item_id}", "/v1/search", "/v1/recommend", "/v1/stats"} <= set(
        spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert requests.get(f"{url}/docs", timeout=HTTP_TIMEOUT).status_code == 200
    page = requests.get(f"{url}/", timeout=HTTP_TIMEOUT)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


@slow
@lite_only
def test_haproxy_fronts_the_app_and_the_ingress_stays_on_loopback(app):
    """`serve.haproxy` (the default) puts HAProxy on the app's port, and the Ingress replicas it forwards to listen
    on `serve.host` only, so a loopback deployment is not reachable through their ports either."""
    import psutil

    port = int(app["url"].rsplit(":", 1)[1])
    listeners = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid]
    (front,) = [c for c in listeners if c.laddr.port == port]
    assert "haproxy" in psutil.Process(front.pid).name()
    # Direct-ingress HTTP ports are Serve's 30000-31000 range (Ray 2.60 RAY_SERVE_DIRECT_INGRESS_*_HTTP_PORT).
    replicas = [c for c in listeners if 30000 <= c.laddr.port <= 31000 and "ServeRepli" in psutil.Process(c.pid).name()]
    assert replicas, "no Ingress replica listens: direct ingress is off"
    assert all(c.laddr.ip == "127.0.0.1" for c in replicas), replicas


@slow
@lite_only
def test_no_saved_config_or_model_file_holds_the_api_key(app):
    """The index job got `--set serve.api_key=...`: every config.yaml and model json it wrote has it redacted."""
    saved = [*app["root"].rglob("config.yaml"), *app["root"].rglob("*.json")]
    assert any(p.name == "config.yaml" for p in saved)
    for path in saved:
        assert API_KEY not in path.read_text(errors="replace"), path
    configs = [p for p in saved if p.name == "config.yaml"]
    assert any("api_key: '***'" in p.read_text() for p in configs)


@slow
def test_stats_count_every_indexed_crop(app):
    import requests

    stats = requests.get(f"{app['url']}/v1/stats", timeout=HTTP_TIMEOUT).json()
    assert stats["model_version"] == app["version"] and stats["collection"] == f"ootd_{app['version']}"
    assert stats["count_by_style"] == app["table"]["style"].value_counts().to_dict()


@slow
def test_embed_matches_the_indexed_vector_of_the_same_photo(app):
    import requests

    row = app["table"].iloc[3]
    resp = _post_image(app["url"], "/v1/embed", Path(row["source"]).read_bytes())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    vector = np.asarray(body["embedding"])
    assert body["dim"] == 128 and vector.shape == (128,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert body["model_version"] == app["version"]
    assert body["outfit"]["box"] == list(row["box"]) and body["outfit"]["width"] == row["width"]
    item = requests.get(f"{app['url']}/v1/items/{row['image_id']}", params={"embedding": "true"},
                        timeout=HTTP_TIMEOUT).json()
    # Serve decodes, detects, crops and encodes exactly as ingest + index did.
    assert float(np.dot(vector, item["embedding"])) > 0.999


@slow
def test_search_by_an_indexed_photo_returns_it_first(app):
    for i in (0, 20, 50):
        row = app["table"].iloc[i]
        resp = _post_image(app["url"], "/v1/search", Path(row["source"]).read_bytes(), fields={"top_k": "5"})
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert len(results) == 5 and results[0]["id"] == row["image_id"] and results[0]["score"] > 0.999
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


@slow
def test_same_style_outfits_rank_above_others(app):
    """With the briefly trained head: neighbours found by id share the query's style far above chance (1/13)."""
    table = app["table"]
    precision, margins = [], []
    for _, row in table.iterrows():
        resp = _post_json(app["url"], "/v1/search", {"id": row["image_id"], "top_k": 100})
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert row["image_id"] not in {r["id"] for r in results}  # by id: the item itself is excluded
        assert len(results) == len(table) - 1
        same = [r["score"] for r in results if r["style"] == row["style"]]
        other = [r["score"] for r in results if r["style"] != row["style"]]
        precision.append(np.mean([r["style"] == row["style"] for r in results[:5]]))
        margins.append(np.mean(same) - np.mean(other))
    assert np.mean(precision) >= 0.6, np.mean(precision)
    assert np.mean(np.asarray(margins) > 0) >= 0.9  # same-style mean score above the others' for most queries


@slow
def test_search_filters_and_top_k(app):
    table = app["table"]
    row = table.iloc[0]
    chic = _post_json(app["url"], "/v1/search", {"id": row["image_id"], "top_k": 3, "styles": ["Chic", "Retro"]})
    assert chic.status_code == 200 and len(chic.json()["results"]) == 3
    assert {r["style"] for r in chic.json()["results"]} <= {"Chic", "Retro"}
    first = chic.json()["results"][0]["id"]
    again = _post_json(app["url"], "/v1/search", {"id": row["image_id"], "top_k": 3, "styles": ["Chic", "Retro"],
                                                  "exclude_ids": [first]})
    assert first not in {r["id"] for r in again.json()["results"]}
    form = _post_image(app["url"], "/v1/search", Path(row["source"]).read_bytes(),
                       fields={"top_k": "4", "styles": "Street,Workwear"})
    assert form.status_code == 200 and len(form.json()["results"]) == 4
    assert {r["style"] for r in form.json()["results"]} <= {"Street", "Workwear"}


@slow
def test_concurrent_searches_get_the_same_answers_as_sequential_ones(app):
    """Batched searches (merged into Milvus calls by filter) answer each request as if it were alone."""
    import requests

    item = requests.get(f"{app['url']}/v1/items/{app['table'].iloc[7]['image_id']}", params={"embedding": "true"},
                        timeout=HTTP_TIMEOUT).json()
    queries = [{"vector": item["embedding"], "top_k": 1 + i % 7, **({"styles": [STYLES[i % 13]]} if i % 3 else {})}
               for i in range(24)]
    sequential = [_post_json(app["url"], "/v1/search", q).json()["results"] for q in queries]
    with ThreadPoolExecutor(12) as pool:
        concurrent = [r.json()["results"] for r in pool.map(lambda q: _post_json(app["url"], "/v1/search", q), queries)]
    assert [[h["id"] for h in r] for r in concurrent] == [[h["id"] for h in r] for r in sequential]
    per_style = app["table"]["style"].value_counts()
    for q, result in zip(queries, concurrent, strict=True):
        available = per_style[q["styles"][0]] if "styles" in q else len(app["table"])
        assert len(result) == min(q["top_k"], available)
        assert all(h["style"] in q.get("styles", STYLES) for h in result)


@slow
def test_hostile_requests_fail_alone_and_the_good_ones_batched_with_them_succeed(app):
    """Searches by vector and by photo, sent at once with hostile ones (a vector beyond float32, JSON nested past the
    limit, bytes that are no photo, a truncated JPEG): every good one gets its sequential answer, every hostile one
    its own 422, and no request is a 5xx (the Index and Encoder batch them together)."""
    import requests

    item = requests.get(f"{app['url']}/v1/items/{app['table'].iloc[3]['image_id']}", params={"embedding": "true"},
                        timeout=HTTP_TIMEOUT).json()
    photo = app["sources"][5].read_bytes()
    depth = 5_000
    nested = b'{"vector": ' + b"[" * depth + b"]" * depth + b"}"
    good = [("vector", {"vector": item["embedding"], "top_k": 1 + i % 5}) for i in range(8)] + [("photo", photo)] * 4
    hostile = [("vector", {"vector": [1e200] * 128}), ("raw", nested), ("photo", b"plain text, no photo"),
               ("photo", photo[:300])]

    def send(request: tuple[str, object]) -> requests.Response:
        kind, body = request
        if kind == "vector":
            return _post_json(app["url"], "/v1/search", body)
        if kind == "raw":
            return requests.post(f"{app['url']}/v1/search", data=body, headers={"content-type": "application/json"},
                                 timeout=HTTP_TIMEOUT)
        return _post_image(app["url"], "/v1/search", body)

    def ids(resp: requests.Response) -> list[str]:
        return [h["id"] for h in resp.json()["results"]]

    sequential = [ids(send(r)) for r in good]
    mixed = [r for pair in zip(good, hostile * 3, strict=True) for r in pair]  # each hostile one among good ones
    with ThreadPoolExecutor(len(mixed)) as pool:
        answers = list(pool.map(send, mixed))
    assert [a.status_code for a in answers[0::2]] == [200] * len(good)
    assert [ids(a) for a in answers[0::2]] == sequential
    assert [a.status_code for a in answers[1::2]] == [422] * len(good), [a.text[:200] for a in answers[1::2]]


@slow
def test_every_acknowledged_write_is_found_and_deletes_are_gone(app):
    import requests

    url, key = app["url"], {"x-api-key": API_KEY}
    before = requests.get(f"{url}/v1/stats", timeout=HTTP_TIMEOUT).json()["count"]
    photos = [(STYLES[i % 13], _fresh_photo(STYLES[i % 13], i)) for i in range(8)]

    def add(item):
        style, data = item
        return _post_image(url, "/v1/items", data, headers=key,
                           fields={"style": style, "source": f"test://{style}", "meta": json.dumps({"n": 1})})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(add, photos))
    assert [r.status_code for r in responses] == [201] * 8, [r.text for r in responses]
    ids = [r.json()["id"] for r in responses]
    assert ids == [hashlib.sha256(data).hexdigest() for _, data in photos]
    assert requests.get(f"{url}/v1/stats", timeout=HTTP_TIMEOUT).json()["count"] == before + 8
    for (style, data), image_id in zip(photos, ids, strict=True):
        hit = _post_image(url, "/v1/search", data, fields={"top_k": "1"}).json()["results"][0]
        assert hit["id"] == image_id and hit["score"] > 0.999 and hit["style"] == style
        item = requests.get(f"{url}/v1/items/{image_id}", timeout=HTTP_TIMEOUT).json()
        assert item["source"] == f"test://{style}" and item["meta"]["n"] == 1
        assert item["meta"]["model_version"] == app["version"]
        crop = requests.get(f"{url}/v1/items/{image_id}/image", timeout=HTTP_TIMEOUT)
        assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
        from PIL import Image

        box = item["box"]
        assert Image.open(io.BytesIO(crop.content)).size == (box[2] - box[0], box[3] - box[1])

    gone = ids[0]
    assert requests.delete(f"{url}/v1/items/{gone}", headers=key, timeout=HTTP_TIMEOUT).json()["deleted"] is True
    assert requests.get(f"{url}/v1/items/{gone}", timeout=HTTP_TIMEOUT).status_code == 404
    assert requests.get(f"{url}/v1/items/{gone}/image", timeout=HTTP_TIMEOUT).status_code == 404
    top = _post_image(url, "/v1/search", photos[0][1], fields={"top_k": "3"}).json()["results"]
    assert gone not in {h["id"] for h in top}
    assert requests.get(f"{url}/v1/stats", timeout=HTTP_TIMEOUT).json()["count"] == before + 7
    for image_id in ids[1:]:  # leave the index as the other tests expect it
        assert requests.delete(f"{url}/v1/items/{image_id}", headers=key, timeout=HTTP_TIMEOUT).status_code == 200


@slow
def test_recommend_moves_towards_liked_styles_and_excludes_rated(app):
    table = app["table"]
    liked = list(table[table["style"] == "Gorpcore"]["image_id"][:3])
    disliked = list(table[table["style"] == "Romantic"]["image_id"][:2])
    resp = _post_json(app["url"], "/v1/recommend", {"liked": liked, "disliked": disliked, "top_k": 5})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 5 and not ({r["id"] for r in results} & set(liked + disliked))
    assert sum(r["style"] == "Gorpcore" for r in results) >= 2  # the 3 other Gorpcore outfits lead
    filtered = _post_json(app["url"], "/v1/recommend", {"liked": liked, "styles": ["Sporty"], "top_k": 3})
    assert {r["style"] for r in filtered.json()["results"]} == {"Sporty"}


# -- bad input: a 4xx with a message, nothing else lost -----------------------------------------------------------


@slow
@lite_only
def test_non_image_bytes_are_a_422(app):
    """A well-formed request whose `image` is no photo is unprocessable content (422), as the README says."""
    resp = _post_image(app["url"], "/v1/embed", b"this is plain text, not a photo")
    assert resp.status_code == 422 and "could not decode" in _detail(resp)
    truncated = Path(app["table"].iloc[0]["source"]).read_bytes()[:400]  # a valid header: the Encoder finds it
    resp = _post_image(app["url"], "/v1/search", truncated)
    assert resp.status_code == 422 and "could not decode" in _detail(resp)
    resp = _post_image(app["url"], "/v1/embed", b"")  # an empty file part
    assert resp.status_code == 422 and "empty" in _detail(resp)


@slow
@lite_only
def test_image_formats_outside_the_allow_list_are_a_415(app):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="TIFF")
    resp = _post_image(app["url"], "/v1/embed", buffer.getvalue(), ctype="image/tiff")
    assert resp.status_code == 415 and "TIFF" in _detail(resp) and "JPEG" in _detail(resp)


@slow
@lite_only
def test_empty_bodies_are_a_400(app):
    import requests

    resp = requests.post(f"{app['url']}/v1/embed", data=b"",
                         headers={"content-type": "multipart/form-data; boundary=x"}, timeout=HTTP_TIMEOUT)
    assert resp.status_code == 400 and "empty" in _detail(resp)
    resp = requests.post(f"{app['url']}/v1/search", data=b"", headers={"content-type": "application/json"},
                         timeout=HTTP_TIMEOUT)
    assert resp.status_code == 400 and "empty" in _detail(resp)


@slow
@lite_only
def test_images_over_the_size_limit_are_a_413(app):
    import requests

    big = b"\xff\xd8" + bytes(MAX_IMAGE_BYTES + 10)
    resp = _post_image(app["url"], "/v1/embed", big)
    assert resp.status_code == 413 and "limit" in _detail(resp)

    def chunks():  # no content-length: the limit holds for streamed bodies too
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(40):
            yield bytes(16 << 10)

    resp = requests.post(f"{app['url']}/v1/embed", data=chunks(),
                         headers={"content-type": "multipart/form-data; boundary=x"}, timeout=HTTP_TIMEOUT)
    assert resp.status_code == 413 and "limit" in _detail(resp)


@slow
@lite_only
def test_wrong_content_types_are_a_415(app):
    import requests

    resp = _post_json(app["url"], "/v1/embed", {"image": "base64?"})
    assert resp.status_code == 415 and "multipart/form-data" in _detail(resp)
    resp = requests.post(f"{app['url']}/v1/search", data=b"hello", headers={"content-type": "text/plain"},
                         timeout=HTTP_TIMEOUT)
    assert resp.status_code == 415 and "application/json" in _detail(resp)
    photo = Path(app["table"].iloc[0]["source"]).read_bytes()
    resp = _post_image(app["url"], "/v1/embed", photo, ctype="text/plain")
    assert resp.status_code == 415 and "text/plain" in _detail(resp)
    resp = _post_image(app["url"], "/v1/recommend", photo)
    assert resp.status_code == 415


@slow
@lite_only
def test_malformed_json_is_a_422(app):
    import requests

    for route in ("/v1/search", "/v1/recommend"):
        resp = requests.post(f"{app['url']}{route}", data=b'{"id": "abc",', timeout=HTTP_TIMEOUT,
                             headers={"content-type": "application/json"})
        assert resp.status_code == 422 and "malformed JSON" in _detail(resp)
    resp = _post_json(app["url"], "/v1/search", {"top_k": 3})
    assert resp.status_code == 422 and "exactly one of `id` or `vector`" in _detail(resp)


@slow
@lite_only
@pytest.mark.parametrize("top_k", [0, 10000, -1, "many"])
def test_top_k_out_of_range_is_a_422(app, top_k):
    resp = _post_json(app["url"], "/v1/search", {"vector": [0.1] * 128, "top_k": top_k})
    assert resp.status_code == 422 and "top_k" in _detail(resp)
    resp = _post_image(app["url"], "/v1/search", Path(app["table"].iloc[0]["source"]).read_bytes(),
                       fields={"top_k": str(top_k)})
    assert resp.status_code == 422 and "top_k" in _detail(resp)


@slow
@lite_only
def test_unknown_style_is_a_422(app):
    resp = _post_json(app["url"], "/v1/search", {"vector": [0.1] * 128, "styles": ["Baroque"]})
    assert resp.status_code == 422 and "Baroque" not in resp.text.split("Input should be")[0]
    assert "Casual" in _detail(resp)  # the message lists the known styles
    photo = _fresh_photo("Chic", 100)
    resp = _post_image(app["url"], "/v1/items", photo, fields={"style": "Baroque"}, headers={"x-api-key": API_KEY})
    assert resp.status_code == 422 and "unknown style 'Baroque'" in _detail(resp)
    resp = _post_image(app["url"], "/v1/search", photo, fields={"styles": "Chic,baroque"})
    assert resp.status_code == 422


@slow
@lite_only
def test_vectors_of_the_wrong_length_or_values_are_a_422(app):
    resp = _post_json(app["url"], "/v1/search", {"vector": [0.1] * 127})
    assert resp.status_code == 422 and "128" in _detail(resp)
    resp = _post_json(app["url"], "/v1/search", {"vector": [0.0] * 128})
    assert resp.status_code == 422 and "zeros" in _detail(resp)
    import requests

    resp = requests.post(f"{app['url']}/v1/search", data=b'{"vector": [NaN]}', timeout=HTTP_TIMEOUT,
                         headers={"content-type": "application/json"})
    assert resp.status_code == 422


@slow
def test_unknown_ids_are_a_404_and_malformed_ids_a_422(app):
    import requests

    url, unknown = app["url"], hashlib.sha256(b"never indexed").hexdigest()
    assert requests.get(f"{url}/v1/items/{unknown}", timeout=HTTP_TIMEOUT).status_code == 404
    assert requests.get(f"{url}/v1/items/{unknown}/image", timeout=HTTP_TIMEOUT).status_code == 404
    resp = requests.delete(f"{url}/v1/items/{unknown}", headers={"x-api-key": API_KEY}, timeout=HTTP_TIMEOUT)
    assert resp.status_code == 404 and unknown in _detail(resp)
    resp = _post_json(url, "/v1/search", {"id": unknown})
    assert resp.status_code == 404 and unknown in _detail(resp)
    resp = _post_json(url, "/v1/recommend", {"liked": [app["table"].iloc[0]["image_id"], unknown]})
    assert resp.status_code == 404 and unknown in _detail(resp)
    # A traversal-shaped id reaches the items route (`..` with `/` would be normalised away by the client) and is
    # refused by the id pattern before any lookup.
    resp = requests.get(f"{url}/v1/items/..%5C..%5Cetc%5Cpasswd/image", timeout=HTTP_TIMEOUT)
    assert resp.status_code == 422 and "item_id" in resp.text
    assert requests.get(f"{url}/v1/items/{unknown.upper()}", timeout=HTTP_TIMEOUT).status_code == 422
    # Each list within its limit, together over the exclude limit: refused, not a server error.
    many = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(1500)]
    resp = _post_json(url, "/v1/recommend", {"liked": many[:1000], "disliked": many[1000:]})
    assert resp.status_code == 422 and "at most 1000 distinct" in resp.text, resp.text


@slow
def test_writes_without_the_right_api_key_are_a_401_and_write_nothing(app):
    import requests

    url = app["url"]
    photo = _fresh_photo("Retro", 200)
    image_id = hashlib.sha256(photo).hexdigest()
    for headers, message in (({}, "missing x-api-key"), ({"x-api-key": "wrong"}, "invalid API key")):
        resp = _post_image(url, "/v1/items", photo, fields={"style": "Retro"}, headers=headers)
        assert resp.status_code == 401 and message in _detail(resp)
    assert requests.get(f"{url}/v1/items/{image_id}", timeout=HTTP_TIMEOUT).status_code == 404
    indexed = app["table"].iloc[1]["image_id"]
    resp = requests.delete(f"{url}/v1/items/{indexed}", headers={"x-api-key": "wrong"}, timeout=HTTP_TIMEOUT)
    assert resp.status_code == 401
    assert requests.get(f"{url}/v1/items/{indexed}", timeout=HTTP_TIMEOUT).status_code == 200


@slow
@lite_only
def test_bad_item_fields_are_a_422(app):
    photo, key = _fresh_photo("Minimal", 300), {"x-api-key": API_KEY}
    resp = _post_image(app["url"], "/v1/items", photo, fields={"meta": "{not json"}, headers=key)
    assert resp.status_code == 422 and "not valid JSON" in _detail(resp)
    resp = _post_image(app["url"], "/v1/items", photo, fields={"meta": "[1, 2]"}, headers=key)
    assert resp.status_code == 422 and "JSON object" in _detail(resp)
    import requests

    resp = requests.post(f"{app['url']}/v1/items", data={"style": "Chic"}, headers=key, timeout=HTTP_TIMEOUT,
                         files={"other": ("a.txt", b"x", "text/plain")})
    assert resp.status_code == 422 and "missing form field `image`" in _detail(resp)


@slow
def test_the_app_is_healthy_and_complete_after_the_bad_inputs(app):
    """Runs last in this module: after every rejected request the app answers and holds exactly the index."""
    import requests

    url = app["url"]
    assert requests.get(f"{url}/healthz", timeout=HTTP_TIMEOUT).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=HTTP_TIMEOUT).json()["ready"] is True
    stats = requests.get(f"{url}/v1/stats", timeout=HTTP_TIMEOUT).json()
    assert stats["count"] == len(app["table"])
    row = app["table"].iloc[10]
    hit = _post_image(url, "/v1/search", Path(row["source"]).read_bytes(), fields={"top_k": "1"}).json()
    assert hit["results"][0]["id"] == row["image_id"]


# -- the gallery page in a real browser -------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
# Without these, Chromium keeps trying Google's services on a closed network and starts slowly.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@slow
@lite_only
@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (make test installs it)")
def test_gallery_uploads_a_photo_and_renders_results_in_chromium(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    photo = app["sources"][0]
    photo_id = hashlib.sha256(photo.read_bytes()).hexdigest()
    photo_style = app["table"].set_index("image_id").loc[photo_id, "style"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(HTTP_TIMEOUT * 1000)
            page.goto(app["url"] + "/")
            expect(page.locator("#stats")).to_contain_text(f"{len(app['table'])} outfits")

            page.set_input_files("#upload", str(photo))
            cards = page.locator("#results .card")
            expect(cards.first).to_be_visible()
            assert cards.count() == 12  # the page's default top-k
            assert cards.first.get_attribute("data-id") == photo_id  # the indexed photo finds itself first
            assert page.locator("#outfit-box").is_visible()
            page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)

            # Style filter: every card of the re-run search has the chosen style.
            page.locator("#style-filter label", has_text=photo_style).click()
            expect(page.locator("#status")).to_contain_text(f"style of your photo · {photo_style} only")
            assert set(cards.evaluate_all("cs => cs.map(c => c.dataset.style)")) == {photo_style}

            # Like the first outfit, ask for recommendations: liked items are never recommended back.
            cards.first.locator(".like").click()
            page.locator("#recommend").click()
            expect(page.locator("#status")).to_contain_text("Recommended from 1 liked")
            shown = cards.evaluate_all("cs => cs.map(c => c.dataset.id)")
            assert shown and photo_id not in shown

            # Browse a sample of the index, then click an outfit: it finds itself first.
            page.locator("#browse").click()
            expect(page.locator("#status")).to_contain_text("A sample of the index")
            picked = cards.nth(2).get_attribute("data-id")
            cards.nth(2).locator("img").click()
            expect(page.locator("#status")).to_contain_text("Outfits like the one you clicked")
            assert cards.first.get_attribute("data-id") != picked  # a search by id excludes the item itself
            assert cards.count() >= 1
        finally:
            browser.close()
    assert (tmp_path / "gallery.png").stat().st_size > 10_000


# -- request parsing units (fast) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e20, 1e30])
def test_unit_vector_keeps_the_direction_of_tiny_and_huge_vectors(scale):
    from ootd.serve.parsing import unit_vector

    raw = [scale * (i % 5 - 2) for i in range(128)]
    unit = np.asarray(unit_vector(raw, 128))
    assert np.isfinite(unit).all() and abs(np.linalg.norm(unit) - 1) < 1e-9
    assert np.allclose(unit, np.asarray([i % 5 - 2 for i in range(128)]) / np.linalg.norm([i % 5 - 2 for i in
                                                                                           range(128)]))


@pytest.mark.parametrize("value", [1e39, 1e200, -3.5e38])
def test_unit_vector_refuses_components_outside_float32(value):
    from fastapi import HTTPException

    from ootd.serve.parsing import unit_vector

    with pytest.raises(HTTPException) as info:
        unit_vector([value] + [0.1] * 127, 128)
    assert info.value.status_code == 422 and "float32" in info.value.detail


def test_deeply_nested_json_is_a_422_not_a_recursion_error():
    import asyncio

    from fastapi import HTTPException
    from starlette.requests import Request

    from ootd.serve.parsing import MAX_JSON_DEPTH, json_depth, read_json

    def request(body: bytes) -> Request:
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        return Request({"type": "http", "method": "POST", "headers": [(b"content-type", b"application/json")]},
                       receive)

    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        body = b'{"vector": ' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(HTTPException) as info:
            asyncio.run(read_json(request(body), 1 << 20))
        assert info.value.status_code == 422 and "nested too deeply" in info.value.detail
    assert asyncio.run(read_json(request(b'{"vector": [[1]]}'), 1 << 20)) == {"vector": [[1]]}
    assert json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(5) == 0
